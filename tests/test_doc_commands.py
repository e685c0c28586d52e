"""Every command of the README and the docs pages runs here, so a documented example cannot fail.

The commands are the lines of the ```bash blocks of README.md, notebooks/README.md and docs/*.md (split at
``&&``; ``export`` lines set the environment of the lines after them in the same block). Every
``stablemtl`` command is parsed by the CLI's own parser, then run in a fresh project folder as
``HOW`` says:

- ``run``: the study commands run at the smoke preset (``--preset`` added, or a user's preset file copied
  from smoke.yaml as the docs say); the first of them (the README's ``stablemtl run``) makes the project
  the others start from. The variants that differ from a command run here only by their parameters or run
  name are run with ``--dry-run`` (every check before the first stage: where a documented example failed
  before). The paper preset's commands must stop before any stage, naming what is missing (no real data
  here).
- ``rehearse``, ``prepare``, ``convert-release`` and ``base --rebuild`` need minutes, downloads or the
  release's files: ``--help``.
- ``predict`` runs on two images of the smoke data, with the model the smoke run trained.
- papermill runs its notebook; ``jupyter lab`` prints its version; pytest's markers, options and paths
  exist; ``./setup.sh`` is what CI runs (``.ci/run``), its arguments are checked; a script of
  ``experiments/`` (minutes per seed) answers ``--help`` with the options the docs give it.

A command none of these covers fails ``test_every_documented_command_is_covered``.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "notebooks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BIN = Path(sys.executable).parent
SMOKE = ROOT / "stablemtl" / "presets" / "smoke.yaml"
FIRST = "run"  # the README's first command: run by the ``project`` fixture through the console script
# the other run commands that train or evaluate for real at the smoke preset; the rest are checked with
# --dry-run (the first command among them, which the fixture ran)
FULL_RUNS = {
    "run --seeds 3 -p single_task=true",
    "run --run-name depth-only --only 03,05,06 -p tasks=[depth] -p models=[trivial,single_stream]",
    "run --only 05,06",
}
HELP_ONLY = {"rehearse", "prepare", "convert-release"}


@dataclass
class Command:
    where: str  # file:line
    argv: list[str]
    env: dict = field(default_factory=dict)

    @property
    def text(self) -> str:
        return " ".join(self.argv)


def documented_commands() -> list[Command]:
    out = []
    for doc in DOCS:
        text = doc.read_text()
        for block in re.finditer(r"^```bash\n(.*?)^```", text, re.S | re.M):
            env: dict = {}
            first = text[:block.start()].count("\n") + 2
            for k, line in enumerate(block.group(1).replace("\\\n", " ").splitlines()):
                words = shlex.split(line, comments=True)
                for part in _split(words) if words else []:
                    if part[0] == "export":
                        key, _, value = part[1].partition("=")
                        env[key] = value
                    else:
                        out.append(Command(f"{doc.relative_to(ROOT)}:{first + k}", part, dict(env)))
    return out


def _split(words: list[str]) -> list[list[str]]:
    parts, current = [], []
    for w in words:
        if w == "&&":
            parts.append(current)
            current = []
        else:
            current.append(w)
    return parts + [current]


COMMANDS = documented_commands()


def kind(c: Command) -> str:
    program = c.argv[0]
    if program == "./setup.sh":
        return "setup"
    if program in (".venv/bin/stablemtl", "stablemtl"):
        return "stablemtl"
    if program == ".venv/bin/python" and c.argv[1:3] == ["-m", "pytest"]:
        return "pytest"
    if program == ".venv/bin/python" and c.argv[1:2] and c.argv[1].startswith("experiments/"):
        return "experiment"
    if program == ".venv/bin/papermill":
        return "papermill"
    if program == ".venv/bin/jupyter" and c.argv[1:2] == ["lab"]:
        return "jupyter"
    return "unknown"


def test_every_documented_command_is_covered():
    assert len(COMMANDS) > 30, "the docs' ```bash blocks were not found"
    assert [f"{c.where}: {c.text}" for c in COMMANDS if kind(c) == "unknown"] == []
    texts = {" ".join(c.argv[1:]) for c in COMMANDS if kind(c) == "stablemtl"}
    assert FULL_RUNS | {FIRST} <= texts, f"documented no more: {(FULL_RUNS | {FIRST}) - texts}"
    assert "./setup.sh --test && .venv/bin/python -m pytest" in (ROOT / ".ci" / "run").read_text()


def test_every_stablemtl_command_parses():
    from stablemtl.cli import build_parser

    parser = build_parser()
    for c in COMMANDS:
        if kind(c) == "stablemtl":
            try:
                parser.parse_args(c.argv[1:])
            except SystemExit as exit:
                assert exit.code == 0, f"{c.where}: {c.text}"


# --------------------------------------------------------------------------- running them

@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A fresh project where the README's first command ran (at the smoke preset) through the console
    script, as a user runs it; returns (folder, its environment, that command's output)."""
    folder = tmp_path_factory.mktemp("documented")
    env = {k: v for k, v in os.environ.items()
           if k not in ("OUTPUT_DIR", "RESULTS_DIR", "DATA_DIR", "BASE_DIR", "PREPROCESSED_DIR", "BASE_CKPT_DIR")}
    env["STABLEMTL_PROJECT"] = str(folder)
    (folder / "notebooks").symlink_to(ROOT / "notebooks")
    frames = folder / "my_frames"
    frames.mkdir()
    done = subprocess.run([str(BIN / "stablemtl"), "run", "--preset", "smoke"], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    for k, image in enumerate(sorted((folder / "data" / "smoke" / "diode").rglob("*.png"))[:2]):
        shutil.copy(image, frames / f"frame{k}.png")
    return folder, env, done


def test_the_first_command_shows_the_notebooks_progress_and_no_warning(project):
    _, _, done = project
    bars = done.stderr.replace("\r", "\n")
    assert re.search(r"train single_stream: +100%.*step/s, loss=[0-9.]+, task=", bars), bars[-2000:]
    assert re.search(r"multi_stream / kitti_scene_flow: .*img", bars), bars[-2000:]
    assert "mini hypersim" in bars and "pretraining the tiny VAE" in bars
    assert "TCP" not in done.stderr and "Warning" not in done.stderr, done.stderr[-2000:]
    assert "(a) single_stream and multi_stream beat trivial" in done.stdout


def _localised(c: Command, folder: Path, tmp: Path) -> tuple[list[str], dict]:
    """The command as it runs here: the smoke preset, the console scripts of this environment, folders of
    the docs' examples (/data, /scratch, /tmp, outputs/demo) moved into the test's folders."""
    def move(word: str) -> str:
        word = re.sub(r"^/(data|scratch)/", lambda m: f"{tmp}/{m.group(1)}/", word)
        word = re.sub(r"^/tmp/", f"{tmp}/", word)
        return word.replace("outputs/demo/", "outputs/smoke/")
    argv = [move(w) for w in c.argv]
    env = {k: move(v) for k, v in c.env.items()}
    argv[0] = str(BIN / Path(argv[0]).name) if argv[0] != "./setup.sh" else argv[0]
    if kind(c) == "stablemtl" and argv[1] in ("run", "status", "data", "base") and "--help" not in argv:
        if "--preset" not in argv:
            argv[2:2] = ["--preset", "smoke"]
        i = argv.index("--preset") + 1
        if argv[i] == "demo":
            argv[i] = "smoke"
        elif argv[i].endswith(".yaml"):  # a user's preset: a copy of a built-in one without its name line
            lines = SMOKE.read_text().splitlines(keepends=True)
            (folder / argv[i]).write_text("".join(x for x in lines if not x.startswith("name:")))
    return argv, env


def _run(argv: list[str], env: dict, folder: Path, timeout: int = 600):
    return subprocess.run(argv, cwd=folder, env=env, capture_output=True, text=True, timeout=timeout)


def _pytest_arguments_exist(argv: list[str]) -> list[str]:
    """What pytest would refuse in ``argv``: an unknown marker, option or path."""
    markers = re.findall(r'"(\w+):', (ROOT / "pyproject.toml").read_text().split("markers", 1)[1].split("]", 1)[0])
    options = re.findall(r'addoption\("(--[\w-]+)"', (ROOT / "tests" / "conftest.py").read_text())
    problems, words = [], iter(argv)
    for w in words:
        if w == "-m":
            problems += [m for m in re.findall(r"\w+", next(words)) if m not in markers + ["not", "and", "or"]]
        elif w.startswith("-"):
            problems += [] if w in options + ["-q", "-x", "-v"] else [w]
        elif not (ROOT / w.split("::")[0]).exists():
            problems.append(w)
    return problems


def _order(c: Command) -> int:
    """The commands that replace what the others read (the data, the base, a training the notebook makes
    by itself) run last."""
    return int(kind(c) == "papermill" or c.argv[1:2] in (["data"], ["base"]))


@pytest.mark.slow
@pytest.mark.parametrize("c", sorted([c for c in COMMANDS if kind(c) != "unknown"], key=_order),
                         ids=lambda c: f"{c.where} {c.text}")
def test_documented_command_runs(c, project, tmp_path, monkeypatch, capsys):
    from stablemtl import cli

    folder, base_env, _ = project
    argv, extra = _localised(c, folder, tmp_path)
    env = {**base_env, **extra}
    what, sub = kind(c), (c.argv[1] if len(c.argv) > 1 else "")
    if what == "setup":
        assert set(argv[1:]) <= {"--test"}, c.text  # .ci/run runs `./setup.sh --test`; the tests are this suite
        return
    if what == "pytest":
        assert _pytest_arguments_exist(argv[3:]) == [], c.text
        return
    if what == "experiment":  # minutes per seed: its options are checked by its own parser
        done = _run([sys.executable, str(ROOT / argv[1]), "--help"], env, folder)
        assert done.returncode == 0 and all(w.split("=")[0] in done.stdout for w in argv[2:] if w.startswith("--")), \
            f"{c.where}: {c.text}\n{done.stdout}{done.stderr}"
        return
    if what in ("jupyter", "papermill"):
        if what == "jupyter":
            assert all((ROOT / a).exists() for a in argv[2:]), c.text
            argv = [argv[0], "lab", "--version"]
        done = _run(argv, env, folder)
        assert done.returncode == 0, f"{c.where}: {c.text}\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
        return
    # stablemtl: in this process (no torch import per command), in the project, with the block's exports
    monkeypatch.chdir(folder)
    for key in set(os.environ) - set(env):
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if sub in HELP_ONLY or sub == "base" and "--rebuild" in argv:
        argv = argv[:2] + ["--help"]
    paper = sub == "run" and argv[argv.index("--preset") + 1] == "paper"
    if sub == "run":
        argv += ([] if " ".join(c.argv[1:]) in FULL_RUNS and not c.env and not paper else ["--dry-run"])
        argv += ["--quiet"]
    if sub == "predict" and "models/stablemtl_multi" in argv:  # a converted release model: the smoke run's here
        argv[argv.index("models/stablemtl_multi")] = "outputs/smoke/multi_stream/model"
    try:
        code = cli.main(argv[1:])
    except SystemExit as exit:  # --help, --version
        code = exit.code
    out = capsys.readouterr()
    if paper:  # no real data or SD2 weights here: it stops before any stage and says what is missing
        assert code == 2 and re.search(r"set PREPROCESSED_DIR|the paper preset needs real data and weights", out.err), \
            f"{c.where}: {c.text}\n{out.err}"
        return
    assert code == 0, f"{c.where}: {c.text}\n{out.out[-2000:]}{out.err[-3000:]}"
    if sub == "predict":
        predictions = folder / (argv[argv.index("--out") + 1] if "--out" in argv else "predictions")
        assert {"frame0", "frame1"} <= {p.name for p in predictions.iterdir()}
        assert (predictions / "frame0" / "contact_sheet.png").is_file()
