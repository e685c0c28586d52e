"""Shared fixtures: one smoke study, run once through papermill, for every test that needs its results."""

from __future__ import annotations

import pytest


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
        for name in ("OUTPUT_DIR", "PREPROCESSED_DIR"):
            mp.delenv(name, raising=False)
        study = run_study("smoke", progress=False, log=lines.append)
    return study, project, lines
