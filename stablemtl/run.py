"""``stablemtl run``: the numbered notebooks, executed in order with papermill.

Each stage is a notebook of ``notebooks/``; each writes its outputs into its folder
(``Study.stage_dir``) and, once it finished, a ``done.json`` there holding the stage's hash:
the sha256 of its parameters (the notebook's knobs, the preset sections and folders it uses)
and of the ``done.json`` files of the stages it reads (``stablemtl.stages.GRAPH``). One rule decides:

- a stage whose ``done.json`` holds its current hash is skipped (``force`` runs it anyway);
- any other stage runs; its new ``done.json`` changes the hash of every stage that reads it, so
  those run too (on this call, or on the next when ``only`` left them out).

A killed stage leaves no new ``done.json`` and runs again on the next call; a training
resumes from its checkpoint there (``stablemtl.train.train_stage``). The runner also

- checks every ``-p key=value`` against the parameters the selected notebooks declare in their
  ``parameters`` cell (papermill itself only warns) and their types, ranges and allowed values
  (``stablemtl.schema``), the preset's fields, and the inputs of the first selected stage; a bad input
  exits with status 2 before any stage starts;
- claims ``results/<run>`` (``stablemtl.guard``: a foreign non-empty folder is refused) and locks it
  while the run uses it (a second run on it stops, naming the first one's pid);
- writes the executed notebooks to ``results/<run>/notebooks/`` and ``results/<run>/manifest.json``
  (preset, parameters, seed, git commit, package versions, data split hashes, wall time per stage);
- stops at the first failing cell and reports the notebook, the cell and the error; the executed
  notebook keeps the traceback.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, fields
from datetime import datetime, timezone
from pathlib import Path

import stablemtl
from stablemtl import options
from stablemtl.data.mini import WORLD_VERSION, is_mini_root
from stablemtl.data.sources import META_FILE, SOURCES
from stablemtl.evaluate import PROTOCOL_VERSION
from stablemtl.guard import InputError, RunLock, StageError, claim
from stablemtl.kernel import session as kernel_session
from stablemtl.model.base import BUILD_VERSION, is_built_base
from stablemtl.paths import DONE_FILE, KINDS, METRICS_FILE, PAPER_DOC, PIPELINE_FILE, in_project, project_root
from stablemtl.presets import yaml_numbers
from stablemtl.report import format_target_check, target_check
from stablemtl.reproduction import compare_with_reference
from stablemtl.results import edited_results, read_metrics
from stablemtl.schema import check_parameters
from stablemtl.stages import (STAGES, Study, check_inputs, context, inputs, is_training_folder, stage_name,
                              train_config)
from stablemtl.train_config import SAME_RESULT, TrainConfig

MANIFEST = "manifest.json"
RUNNER_PARAMETERS = ("preset", "run_name")  # set with --preset / --run-name, not -p


class RunError(RuntimeError):
    """A run cannot start or a stage failed; the message names what and where. ``code``: the exit status
    of ``stablemtl run`` (1: a stage failed, 2: a bad input, 130: interrupted)."""

    code = 1


class BadInput(RunError):
    """A bad input found before any stage starts: a parameter, preset field, name, foreign folder or busy run."""

    code = 2


def notebook_dir() -> Path:
    """``notebooks/`` of the checkout this package is installed from (editable install)."""
    here = Path(stablemtl.__file__).resolve().parents[1] / "notebooks"
    if not (here / f"{STAGES[0]}.ipynb").is_file():
        raise RunError(f"the notebooks are not next to the package ({here}); install stablemtl from a clone of "
                       f"the repository with ./setup.sh (editable), which keeps notebooks/ beside it")
    return here


def declared_parameters(notebook: Path) -> dict:
    """Name -> default of the assignments in the cell tagged ``parameters``."""
    import nbformat

    nb = nbformat.read(str(notebook), as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(cells) != 1:
        raise RunError(f"{notebook}: expected exactly one cell tagged 'parameters', found {len(cells)}")
    out = {}
    for node in ast.parse(cells[0].source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            out[node.targets[0].id] = ast.literal_eval(node.value)
    return out


def parse_parameters(pairs) -> dict:
    """``["key=value", ...]`` -> dict; values are read as YAML (numbers, lists, null, strings)."""
    import yaml

    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip().isidentifier():
            raise BadInput(f"parameter {pair!r}: expected key=value (for example -p iterations=200)")
        try:
            out[key.strip()] = yaml_numbers(yaml.safe_load(value)) if value.strip() else None
        except yaml.YAMLError as err:
            raise BadInput(f"parameter {pair!r} (from -p): its value is not valid YAML ({getattr(err, 'problem', err)}); "
                           f"quote strings, write lists as [a, b]") from None
    return out


def select_stages(only) -> list[str]:
    """``"03,04"`` or ``["03", "04"]`` -> stage names; ``None`` -> all."""
    if not only:
        return list(STAGES)
    keys = [k.strip() for k in (only.split(",") if isinstance(only, str) else only) if k.strip()]
    try:
        return sorted({stage_name(key) for key in keys})
    except ValueError as err:
        raise BadInput(f"{err} (in --only)") from None


# --------------------------------------------------------------------------- the stage hash

def reads(stage: str, knobs: dict) -> tuple[str, ...]:
    """The stages whose ``done.json`` enter ``stage``'s hash: those it reads (``stages.inputs``; stage 05
    reads those that make the models its ``models`` knob names)."""
    return inputs(stage, knobs.get("models"))


FOLDER_FIELDS = ("base", "init", "data_root", "output_dir")  # TrainConfig fields that name folders


def stage_key(study: Study, stage: str, knobs: dict) -> dict:
    """What ``stage``'s outputs depend on, besides the stages it reads: its notebook's knobs and the
    preset sections, folders (relative to the project when inside it: a moved project keeps its
    finished stages) and format versions it uses."""
    preset, key = study.preset, stage[:2]
    out = {"knobs": {k: v for k, v in knobs.items() if k not in RUNNER_PARAMETERS}, "seed": preset.get("seed")}
    if key in ("03", "04", "05"):  # which seeds, ablation and baselines the stages train and evaluate
        out["study"] = preset.get("study")
    if key == "01":
        out.update(data=preset.get("data"), root=in_project(study.data_root), world=WORLD_VERSION)
    elif key == "02":
        out.update(base=(preset.get("model") or {}).get("base"), dir=in_project(study.base_dir), build=BUILD_VERSION)
    elif key in ("03", "04"):
        names = {f.name for f in fields(TrainConfig)}
        try:
            config = train_config(study, "single_stream" if key == "03" else "multi_stream",
                                  **{k: v for k, v in out["knobs"].items() if k in names})
            out["config"] = {k: in_project(v) if k in FOLDER_FIELDS and v else v
                             for k, v in asdict(config).items() if k not in SAME_RESULT}
        except (ValueError, TypeError) as err:  # the notebook reports it, with its cell
            out["config"] = f"invalid: {err}"
    elif key == "05":
        out.update(resolution=(preset.get("evaluate") or {}).get("resolution"), data=in_project(study.data_root),
                   protocol=PROTOCOL_VERSION)
    return out


def read_done(study: Study, stage: str) -> dict:
    """The stage's ``done.json`` (``{}`` when it has not finished)."""
    path = study.stage_dir(stage) / DONE_FILE
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}


def stage_hash(study: Study, stage: str, knobs: dict) -> str:
    """sha256 of ``stage_key`` and of the ``done.json`` of every stage in ``reads``."""
    upstream = {}
    for other in reads(stage, knobs):
        path = study.stage_dir(other) / DONE_FILE
        upstream[other] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
    text = json.dumps({"key": stage_key(study, stage, knobs), "reads": upstream}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def write_done(study: Study, stage: str, digest: str, knobs: dict) -> Path:
    path = study.stage_dir(stage) / DONE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_json(path, {"stage": stage_name(stage), "hash": digest, "knobs": knobs,
                       "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    return path


# --------------------------------------------------------------------------- before and around the stages

def check_run_parameters(stages: list[str], parameters: dict) -> tuple[dict, dict]:
    """Each ``-p`` key must be a knob of a selected notebook (``declared_parameters``) and its value one
    that ``stablemtl.schema.SPECS`` allows; returns the notebooks' declared knobs and defaults per stage
    and the parameters, normalised (``tasks=depth`` -> ``["depth"]``)."""
    nb_dir = notebook_dir()
    declared = {s: declared_parameters(nb_dir / f"{s}.ipynb") for s in stages}
    for key, value in parameters.items():
        if key in options.OPTIONS and value is not None and key not in RUNNER_PARAMETERS and \
                any(key in d for d in declared.values()):  # a release-parity option: its own message
            try:
                options.check(key, value)
            except ValueError as err:
                raise BadInput(f"parameter {err} (from -p)") from None
    try:
        return declared, check_parameters(parameters, declared, RUNNER_PARAMETERS)
    except InputError as err:
        raise BadInput(str(err)) from None


def is_results_folder(folder: Path) -> bool:
    """An earlier run folder without a ``.stablemtl`` marker (such as the committed ``results/reference/demo``): a manifest."""
    return (folder / MANIFEST).is_file()


def _check_folders(study: Study, stages: list[str]) -> None:
    """The folders the selected stages write must be new, empty or the kit's (``guard.claim``) and
    writable, checked before any stage starts; ``--force`` does not change this."""
    folders = [(study.results_dir, "results", is_results_folder)]
    keys = {s[:2] for s in stages}
    if study.procedural and "01" in keys:
        folders.append((study.data_root, "data", is_mini_root))
    if study.procedural and "02" in keys:
        folders.append((study.base_dir, "base", is_built_base))
    for key, kind in (("03", KINDS[0]), ("04", KINDS[1])):
        if key in keys:
            out = study.output_dir / kind
            folders += [(out, "training", is_training_folder),
                        (out.with_name(f"{kind}.previous"), "training", is_training_folder)]
    try:
        for folder, kind, recognise in folders:
            claim(folder, kind, recognise, create=False)
    except InputError as err:
        raise BadInput(str(err)) from None
    for folder, _, _ in folders:  # a read-only place fails here, not in a notebook after minutes of work
        there = next((p for p in (folder, *folder.parents) if p.exists()), None)
        if there is not None and not os.access(there, os.W_OK):
            raise BadInput(f"cannot write {folder}: {there} is read-only or not writable for this user; give the "
                           f"run a writable place (OUTPUT_DIR, RESULTS_DIR, DATA_DIR) or fix the folder's permissions")


def _check_inputs(study: Study, stages: list[str], knobs: dict) -> None:
    """Inputs made by stages outside the selection must exist now, not after an hour of work."""
    names = {f.name for f in fields(TrainConfig)}
    for stage in stages:
        if stage[:2] in ("03", "04"):  # the batch split: a bad one fails now, not in the notebook
            given = {k: v for k, v in knobs[stage].items() if k in names and k not in RUNNER_PARAMETERS}
            try:
                train_config(study, KINDS[int(stage[:2]) - 3], **given).accumulation()
            except (ValueError, TypeError) as err:
                raise BadInput(f"stage {stage}: {err} (the preset's train section and -p)") from None
    selected = {s[:2] for s in stages}
    try:
        for stage in stages:
            check_inputs(study, stage, knobs[stage].get("models"), ahead=selected)
    except StageError as err:
        raise BadInput(str(err)) from err
    if not study.procedural:
        _check_paper_inputs(study, stages)


class Manifest:
    """``results/<run>/manifest.json``: what ran, with which parameters and versions, for how long."""

    def __init__(self, study: Study, parameters: dict):
        self.study = study
        self.path = study.results_dir / MANIFEST
        study.results_dir.mkdir(parents=True, exist_ok=True)
        self.data = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.data.update({"run": study.run_name, "preset_name": study.name, "preset": study.preset,
                          "seed": parameters.get("seed", study.preset.get("seed")),
                          "git_commit": _git_commit(project_root()), "versions": _versions(),
                          "platform": platform.platform(),
                          "directories": {k: in_project(v) for k, v in (
                              ("data", study.data_root), ("base", study.base_dir), ("outputs", study.output_dir),
                              ("results", study.results_dir))}})
        self.data.setdefault("stages", {})

    def record(self, stage: str, **values) -> None:
        entry = self.data["stages"].setdefault(stage, {})
        if values.get("status") == "skipped" and entry.get("status") == "done":
            return  # keep the record of the run that made the outputs
        entry.update(values)
        if stage == STAGES[0] and values.get("status") == "done":
            self.data["data_split_hashes"] = split_hashes(self.study)
        _write_json(self.path, self.data)

    def finish(self, wall_s: float) -> None:
        self.data["last_run_wall_s"] = wall_s
        _write_json(self.path, self.data)


def _execute(study: Study, stage: str, knobs: dict, manifest: Manifest, progress: bool) -> float:
    """Run one notebook with papermill into ``results/<run>/notebooks/``; returns its wall seconds."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    output = study.results_dir / "notebooks" / f"{stage}.ipynb"
    output.parent.mkdir(parents=True, exist_ok=True)
    given = {k: str(v) if isinstance(v, Path) else v for k, v in knobs.items()}
    manifest.record(stage, status="running", parameters=knobs,
                    started=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    start = time.perf_counter()
    try:
        with kernel_session(progress) as manager:
            papermill.execute_notebook(str(notebook_dir() / f"{stage}.ipynb"), str(output), parameters=given,
                                       cwd=str(project_root()), kernel_name="python3", progress_bar=progress,
                                       log_output=False, report_mode=False, kernel_manager_class=manager)
    except PapermillExecutionError as err:
        manifest.record(stage, status="failed", wall_s=round(time.perf_counter() - start, 1),
                        error=f"{err.ename}: {err.evalue}", cell=err.exec_count)
        source = (err.source or "").strip().splitlines()
        raise RunError(f"stage {stage} failed in notebooks/{stage}.ipynb, cell [{err.exec_count}] "
                       f"({source[0] if source else ''}...):\n  {err.ename}: {err.evalue}\n"
                       f"the executed notebook with the full traceback: {output}") from None
    return round(time.perf_counter() - start, 1)


def _git_commit(root: Path) -> str | None:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if commit.returncode:
        return None
    return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _versions() -> dict:
    out = {"python": platform.python_version(), "stablemtl": stablemtl.__version__}
    for module in ("torch", "diffusers", "transformers", "accelerate", "numpy", "papermill"):
        try:
            out[module] = __import__(module).__version__
        except ImportError:
            out[module] = None
    return out


def split_hashes(study: Study) -> dict:
    """sha256 (16 hex) of each dataset's split lists and generation record, the data a run saw."""
    out = {}
    for name, cls in SOURCES.items():
        root = study.data_root / cls.root_hint
        files = sorted((root / "data_split").glob("*")) if (root / "data_split").is_dir() else []
        files += [root / META_FILE] if (root / META_FILE).is_file() else []
        if files:
            h = hashlib.sha256()
            for f in files:
                if f.is_file():
                    h.update(f.name.encode() + f.read_bytes())
            out[name] = h.hexdigest()[:16]
    return out


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".json.partial")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)


def stage_knobs(study: Study, preset, declared: dict, parameters: dict) -> dict:
    """Each stage's knobs as ``stablemtl run`` passes them to its notebook (and hashes them): the notebook's
    declared defaults (``declared``: stage -> ``declared_parameters``), with the ``parameters`` it declares,
    the preset and the run name."""
    given = {**parameters, "preset": preset if isinstance(preset, str) else study.name, "run_name": study.run_name}
    return {s: {**d, **{k: v for k, v in given.items() if k in d}} for s, d in declared.items()}


def run_study(preset: str = "demo", only=None, parameters: dict | None = None, run_name: str | None = None,
              force: bool = False, progress: bool = True, log=print, dry_run: bool = False) -> Study:
    """Execute the selected stages' notebooks; returns the run's ``Study``. Raises ``RunError`` with the
    failing notebook and cell. ``dry_run``: every check that comes before the first stage (parameters,
    preset, folders, the inputs of the selected stages), then which stages would run; nothing is written."""
    stages = select_stages(only)
    declared, parameters = check_run_parameters(stages, dict(parameters or {}))
    try:
        study = context(preset, run_name)
    except (ValueError, StageError) as err:
        raise BadInput(str(err)) from err
    knobs = stage_knobs(study, preset, declared, parameters)
    _check_folders(study, stages)
    _check_inputs(study, stages, knobs)
    if dry_run:
        for i, (stage, runs) in enumerate(plan(study, stages, knobs, force).items(), 1):
            log(f"[{i}/{len(stages)}] {stage}: " + ("would run" if runs else "done, would be skipped"))
        return study
    try:
        claim(study.results_dir, "results", is_results_folder, log=log)
        lock = RunLock(study.results_dir, log=log).acquire()
    except InputError as err:
        raise BadInput(str(err)) from None
    try:
        _run_stages(study, stages, knobs, parameters, force, progress, log)
    finally:
        lock.release()
    return study


def plan(study: Study, stages: list[str], knobs: dict, force: bool = False) -> dict[str, bool]:
    """Which of ``stages`` a run would execute: those not done with their current hash (all with
    ``force``), and those reading a stage that runs before them."""
    running, out = set(), {}
    for stage in stages:
        upstream = [r for r in reads(stage, knobs[stage]) if r in running]
        out[stage] = force or bool(upstream) or read_done(study, stage).get("hash") != stage_hash(study, stage,
                                                                                                  knobs[stage])
        if out[stage]:
            running.add(stage[:2])
    return out


def _run_stages(study: Study, stages: list[str], knobs: dict, parameters: dict, force: bool, progress: bool,
                log) -> None:
    """The stage loop of ``run_study``, inside the run folder's lock."""
    manifest = Manifest(study, parameters)
    total = time.perf_counter()
    for i, stage in enumerate(stages, 1):
        digest = stage_hash(study, stage, knobs[stage])
        done = read_done(study, stage)
        if not force and done.get("hash") == digest:
            log(f"[{i}/{len(stages)}] {stage}: done, skipped (same parameters and inputs; --force reruns it)")
            manifest.record(stage, status="skipped")
            continue
        log(f"[{i}/{len(stages)}] {stage}")
        (study.stage_dir(stage) / DONE_FILE).unlink(missing_ok=True)  # until it finishes again
        try:
            wall = _execute(study, stage, knobs[stage], manifest, progress)
        except KeyboardInterrupt:
            manifest.record(stage, status="interrupted")
            error = RunError(f"interrupted during stage {stage}; what it wrote stays (a training keeps its last "
                             f"checkpoint, an evaluation its prediction cache): run the same command again to "
                             f"continue")
            error.code = 130
            raise error from None
        write_done(study, stage, digest, knobs[stage])
        manifest.record(stage, status="done", wall_s=wall, hash=digest)
        log(f"      done in {wall:.0f} s")
    manifest.finish(round(time.perf_counter() - total, 1))


def _check_paper_inputs(study: Study, stages: list[str]) -> None:
    """Real data and SD2 weights: a clear message before any stage starts."""
    missing = []
    if not study.data_root.is_dir():
        missing.append(f"datasets: {study.data_root} does not exist (PREPROCESSED_DIR)")
    if not (study.base_dir / PIPELINE_FILE).is_file():
        missing.append(f"Stable Diffusion 2 weights: {study.base_dir / PIPELINE_FILE} is missing (BASE_CKPT_DIR)")
    if missing:
        raise BadInput("the paper preset needs real data and weights:\n  " + "\n  ".join(missing)
                       + f"\nsee {PAPER_DOC}")


def summary(study: Study) -> str:
    """The end-of-run summary: where the results are and the target check of the run's metrics."""
    lines = [f"results of run {study.run_name!r} (preset {study.name}): {study.results_dir}"]
    for name in ("tables/main.md", "figures", "notebooks", MANIFEST, "summary.md"):
        if (study.results_dir / name).exists():
            lines.append(f"  {study.results_dir / name}")
    if (study.results_dir / METRICS_FILE).is_file():
        # checked on every call, also when every stage was skipped (the report's own check runs in stage 06)
        lines += [f"warning: {message}" for message in edited_results(study.results_dir)]
        rows = [r for r in read_metrics(study.results_dir) if r["run"] == study.run_name]
        lines += ["", format_target_check(*target_check(rows))]
    return "\n".join(lines)


def main(args) -> int:
    """The ``stablemtl run`` command (see ``stablemtl.cli``)."""
    try:
        parameters = parse_parameters(args.parameter)
        if getattr(args, "seeds", None) is not None:
            if "seeds" in parameters and parameters["seeds"] != args.seeds:
                raise BadInput(f"--seeds {args.seeds} and -p seeds={parameters['seeds']} disagree; give one")
            parameters["seeds"] = args.seeds
        start = time.perf_counter()
        study = run_study(args.preset, only=args.only, parameters=parameters, run_name=args.run_name,
                          force=args.force, progress=not args.quiet, dry_run=getattr(args, "dry_run", False))
    except RunError as err:
        print(f"stablemtl run: {err}", file=sys.stderr)
        return err.code
    if getattr(args, "dry_run", False):
        print(f"dry run of run {study.run_name!r} (preset {study.name}): the checks passed; nothing was run")
        return 0
    print(f"\nfinished in {time.perf_counter() - start:.0f} s\n")
    print(summary(study))
    compared = compare_with_reference(study.results_dir, study.run_name, study.preset, parameters)
    if compared:
        print(f"\nyour run and the committed one: {compared}")
    return 0
