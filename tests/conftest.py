"""Shared fixtures: the tiny base the model tests build on, and one smoke study, run once through
papermill, for every test that needs its results."""

from __future__ import annotations

import pytest


def build_tiny_base(folder, seed: int = 1):
    """The smoke preset's tiny base with a VAE trained for 3 steps only (enough for shapes, equivalences
    and round trips, not for quality), saved in ``folder``; returns the ``Base``."""
    from stablemtl.model import base as B
    from stablemtl.presets import load_preset

    cfg = dict(load_preset("smoke")["model"]["base"], vae_steps=3, vae_images=6, report_images=2)
    base, info = B.make_tiny_base(cfg, seed=seed, progress=False)
    B.save_base(base, folder, info)
    return base


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory):
    """A tiny base built once per test session (seed 1); tests must not write into it."""
    folder = tmp_path_factory.mktemp("base") / "tiny"
    build_tiny_base(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_base(tiny_base_dir):
    """The session's tiny base, loaded (its modules are shared: do not train them in place)."""
    from stablemtl.model.base import load_base

    return load_base(tiny_base_dir)


@pytest.fixture(scope="session")
def smoke_study(tmp_path_factory):
    """The whole study (every notebook) with the ``smoke`` preset in a fresh project folder.

    Returns ``(study, project_dir, log_lines)``. The project folder holds ``data/smoke``,
    ``outputs/`` and ``results/smoke`` exactly as a user's checkout would.
    """
    from stablemtl.run import run_study

    project = tmp_path_factory.mktemp("project")
    lines: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STABLEMTL_PROJECT", str(project))
        for name in ("OUTPUT_DIR", "RESULTS_DIR", "DATA_DIR", "BASE_DIR", "PREPROCESSED_DIR"):
            mp.delenv(name, raising=False)
        study = run_study("smoke", progress=False, log=lines.append)
    return study, project, lines


def pytest_addoption(parser):
    parser.addoption("--rebuild-base", action="store_true",
                     help="also run the tests marked rebuild (the demo base built from scratch: about 10 minutes)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--rebuild-base"):
        return
    skip = pytest.mark.skip(reason="builds the demo base from scratch (about 10 min); run with --rebuild-base")
    for item in items:
        if "rebuild" in item.keywords:
            item.add_marker(skip)
