"""The command line: help without torch, --version, one meaning per option, `status`, `check`'s exit status,
`info`'s devices."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import stablemtl
from stablemtl import cli

HEAVY = ("torch", "diffusers", "transformers", "accelerate")
FINISHED = "2025-01-01T10:00:0{}+00:00"  # done.json's "finished", one second apart per stage


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


COMMANDS = sorted(_commands(cli.build_parser()))


# --------------------------------------------------------------------------- help without torch

@pytest.mark.parametrize("argv", [["--help"], ["--version"]] + [[c, "--help"] for c in COMMANDS],
                         ids=lambda argv: " ".join(argv))
def test_help_and_version_import_no_heavy_module(argv):
    probe = (f"import sys\nfrom stablemtl import cli\ntry:\n    cli.main({argv!r})\nexcept SystemExit:\n    pass\n"
             f"print('loaded:', sorted(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert "usage: stablemtl" in done.stdout or "stablemtl " in done.stdout
    assert done.stderr.strip().splitlines()[-1] == "loaded: []"


def test_version(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out == f"stablemtl {stablemtl.__version__}\n"


# --------------------------------------------------------------------------- one declaration, one meaning

WORK = [("prepare", "stablemtl.data.prepare", "cmd_prepare", ["prepare", "mid", "--raw", "x"]),
        ("convert-release", "stablemtl.model.release", "cmd_convert", ["convert-release", "run", "out"]),
        ("predict", "stablemtl.predict", "cmd_predict", ["predict", "a.png", "--model", "m"])]


@pytest.mark.parametrize("command, module, work, argv", WORK, ids=[w[0] for w in WORK])
def test_a_command_runs_its_modules_work(command, module, work, argv, monkeypatch):
    """The CLI declares every command's arguments (without torch) and imports the module's work when the
    command runs: its exit status is the work's."""
    mod = importlib.import_module(module)
    monkeypatch.setattr(mod, work, lambda args: 42)
    assert cli.main(argv) == 42


def test_quiet_out_and_device_mean_the_same_in_every_command():
    found = {}
    for name, p in _commands(cli.build_parser()).items():
        for action in p._actions:
            if action.option_strings and action.option_strings[0] in ("--quiet", "--out", "--device"):
                found.setdefault(action.option_strings[0], {})[name] = action
    assert {name: a.help for name, a in found["--quiet"].items()} == \
        {name: "no progress bars" for name in ("run", "data", "base", "prepare", "predict", "rehearse")}
    assert sorted(found["--device"]) == ["predict", "rehearse"]
    assert all(a.help == cli.DEVICE and a.default == "auto" for a in found["--device"].values())
    assert sorted(found["--out"]) == ["base", "data", "predict", "prepare", "rehearse"]
    assert all(a.help.startswith("the output folder: ") for a in found["--out"].values())


def test_data_refuses_two_different_folders(capsys, tmp_path):
    assert cli.main(["data", "--preset", "smoke", "--root", str(tmp_path / "a"), "--out", str(tmp_path / "b")]) == 2
    assert "give one: --out" in capsys.readouterr().err and not any(tmp_path.iterdir())


# --------------------------------------------------------------------------- check and info

def test_check_passes_and_exits_1_when_a_task_no_longer_round_trips(monkeypatch, capsys):
    from stablemtl import tasks

    assert cli.main(["check"]) == 0
    assert f"all {len(tasks.TASK_NAMES)} tasks round-trip" in capsys.readouterr().out
    albedo = tasks.get_task("albedo")
    monkeypatch.setattr(albedo, "decode", lambda prediction: albedo._decode(prediction.float()) * 0.5)
    monkeypatch.setattr(tasks.get_task("depth"), "decode", lambda prediction: 1 / 0)
    assert cli.main(["check"]) == 1
    captured = capsys.readouterr()
    assert "2 of 7 task(s) failed: albedo, depth" in captured.err
    albedo_line = next(line for line in captured.out.splitlines() if line.strip().startswith("albedo"))
    assert "FAILED (above 1e-03)" in albedo_line
    depth_line = next(line for line in captured.out.splitlines() if line.strip().startswith("depth"))
    assert "nan" in depth_line and "ZeroDivisionError" in depth_line
    assert "FAILED" not in next(line for line in captured.out.splitlines() if line.strip().startswith("normal"))


def test_info_lists_the_devices(monkeypatch, capsys):
    import torch

    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"torch threads: {torch.get_num_threads()}" in out and f"{os.cpu_count()} cores" in out
    # a machine with a GPU (torch.cuda faked): its name and memory
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(
        name=f"Fake GPU {i}", total_memory=80 * 2 ** 30, major=9, minor=0))
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "cuda:0    Fake GPU 0, 80.0 GiB, compute capability 9.0" in out and "cuda:1    Fake GPU 1" in out
    assert "(no CUDA device)" not in out


# --------------------------------------------------------------------------- status

@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.setenv("STABLEMTL_PROJECT", str(tmp_path))
    for name in ("OUTPUT_DIR", "RESULTS_DIR", "DATA_DIR", "BASE_DIR", "PREPROCESSED_DIR"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def _finish(study, stage: str, second: int, **changed) -> str:
    """What ``stablemtl run`` leaves when ``stage`` finishes with the notebook's knobs (and ``changed``,
    as from ``-p``); returns the hash."""
    from stablemtl import run

    declared = run.declared_parameters(run.notebook_dir() / f"{stage}.ipynb")
    knobs = {**declared, **{k: v for k, v in (("preset", "smoke"), ("run_name", study.run_name)) if k in declared},
             **changed}
    digest = run.stage_hash(study, stage, knobs)
    path = run.write_done(study, stage, digest, knobs)
    path.write_text(json.dumps({**json.loads(path.read_text()), "finished": FINISHED.format(second)}))
    return digest


def _status(capsys, *argv) -> tuple[int, list[str], str]:
    code = cli.main(["status", "--preset", "smoke", *argv])
    out = capsys.readouterr().out
    return code, out.splitlines(), out


def _state(lines: list[str], stage: str) -> str:
    return next(line for line in lines if line.strip().startswith(stage)).split()[1]


def test_status_of_a_finished_a_stale_and_a_half_finished_run(project, capsys):
    from stablemtl.run import MANIFEST
    from stablemtl.stages import STAGES, context

    study = context("smoke")
    code, lines, out = _status(capsys)
    assert code == 0 and [_state(lines, s) for s in STAGES] == ["missing"] * 6
    assert lines[-1] == "next `stablemtl run --preset smoke` runs 01, 02, 03, 04, 05, 06"
    hashes = {stage: _finish(study, stage, i) for i, stage in enumerate(STAGES)}
    (study.results_dir / MANIFEST).write_text(json.dumps({"stages": {
        STAGES[0]: {"status": "done", "wall_s": 12.4, "hash": hashes[STAGES[0]]},
        STAGES[1]: {"status": "done", "wall_s": 3.0, "hash": "of another call"}}}))
    before = _tree(project)
    code, lines, out = _status(capsys)
    assert code == 0 and [_state(lines, s) for s in STAGES] == ["done"] * 6
    assert f"finished {FINISHED.format(0)}, 12 s" in out  # the manifest's record of the call that made it
    assert f"finished {FINISHED.format(1)}; wall time not in this run's manifest" in out
    assert lines[-1] == "next `stablemtl run --preset smoke` runs nothing: every stage is done (--force reruns them)"
    assert _tree(project) == before  # status writes nothing
    # stage 03 rerun by hand with another -p: stale itself, and its readers see a new done.json
    _finish(study, STAGES[2], 9, iterations=3)
    code, lines, out = _status(capsys)
    assert [_state(lines, s) for s in STAGES] == ["done", "done", "stale", "stale", "stale", "done"]
    assert "it ran with iterations=3; now iterations=None (the preset's value)" in out
    assert f"stage 03 finished again after it ({FINISHED.format(9)})" in out
    assert "stage 05 runs before it, so it runs again" in out  # 06 is up to date, but 05 reruns
    assert lines[-1] == "next `stablemtl run --preset smoke` runs 03, 04, 05, 06 and skips 01, 02 (done)"
    # half finished: stage 04 never finished, its last attempt failed; a run holds the folder now
    (study.stage_dir(STAGES[3]) / "done.json").unlink()
    (study.results_dir / MANIFEST).write_text(json.dumps({"stages": {
        STAGES[3]: {"status": "failed", "error": "RuntimeError: boom", "cell": 7}}}))
    (study.results_dir / ".stablemtl.lock").write_text(json.dumps({"pid": os.getpid()}))
    code, lines, out = _status(capsys, "--run-name", "smoke")
    assert [_state(lines, s) for s in STAGES] == ["done", "done", "stale", "missing", "stale", "done"]
    assert "the last attempt failed: RuntimeError: boom (cell [7])" in out
    assert "stage 04 has not finished (no done.json)" in out and f"(pid {os.getpid()}) is using it now" in out
    assert lines[-1] == ("next `stablemtl run --preset smoke --run-name smoke` runs 03, 04, 05, 06 and skips "
                         "01, 02 (done)")


def test_status_names_a_preset_it_cannot_read(project, capsys):
    assert cli.main(["status", "--preset", "nonexistent"]) == 2
    assert "stablemtl status:" in capsys.readouterr().err


@pytest.mark.slow
def test_status_agrees_with_a_smoke_run(smoke_study, capsys, monkeypatch):
    """After the real smoke run every stage is done; another run name of the same preset shares its data and
    base (stages 01 and 02) and has the rest to do."""
    from stablemtl.stages import STAGES

    _, project, _ = smoke_study
    monkeypatch.setenv("STABLEMTL_PROJECT", str(project))
    for name in ("OUTPUT_DIR", "RESULTS_DIR", "DATA_DIR", "BASE_DIR", "PREPROCESSED_DIR"):
        monkeypatch.delenv(name, raising=False)
    before = _tree(project)
    code, lines, out = _status(capsys)
    assert code == 0 and [_state(lines, s) for s in STAGES] == ["done"] * 6, out
    assert "runs nothing" in lines[-1]
    wall = json.loads((project / "results/smoke/manifest.json").read_text())["stages"][STAGES[2]]["wall_s"]
    assert f", {wall:.0f} s" in next(line for line in lines if STAGES[2] in line)
    code, lines, out = _status(capsys, "--run-name", "half")
    assert [_state(lines, s) for s in STAGES] == ["done", "done"] + ["missing"] * 4, out
    assert lines[-1] == ("next `stablemtl run --preset smoke --run-name half` runs 03, 04, 05, 06 and skips 01, 02 "
                         "(done)")
    assert _tree(project) == before


def test_a_folder_that_cannot_be_written_and_a_full_disk_are_named(tmp_path, monkeypatch, capsys):
    import errno

    from stablemtl import cli
    from stablemtl.guard import DiskFullError

    def read_only(args):
        raise PermissionError(errno.EROFS, "Read-only file system", str(tmp_path / "results" / "demo"))

    monkeypatch.setattr(cli, "cmd_status", read_only)
    assert cli.main(["status"]) == 2
    err = capsys.readouterr().err
    assert f"stablemtl status: cannot write {tmp_path / 'results' / 'demo'}: Read-only file system" in err
    assert "Traceback" not in err

    def full(args):
        raise DiskFullError("the disk is full: writing the file x.npz stopped after 1.0 MiB with 0.0 MiB free")

    monkeypatch.setattr(cli, "cmd_status", full)
    assert cli.main(["status"]) == 1
    assert "stablemtl status: the disk is full: writing the file x.npz" in capsys.readouterr().err
