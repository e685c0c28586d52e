"""``stablemtl run``: the numbered notebooks, executed in order with papermill.

Each stage is a notebook of ``notebooks/``. The runner

- checks every ``-p key=value`` against the parameters the selected notebooks
  declare in their ``parameters`` cell (papermill itself only warns);
- checks the inputs of the first selected stage before any long work;
- skips a stage whose outputs are complete and whose parameters are those of
  its last successful run and that ran after every earlier stage's last run
  (``force`` reruns it); once a stage runs, every later selected stage runs as
  well, and a later stage left out by ``only`` runs on the next call;
- resumes a training stage (03, 04) only when its last attempt was interrupted
  with the same parameters and nothing before it ran again; otherwise the
  earlier training folder is moved to ``<kind>.previous`` and training starts
  from scratch (a checkpoint of other settings is never continued);
- writes the executed notebooks to ``results/<run>/notebooks/`` and the manifest
  (``results/<run>/manifest.json``: preset, parameters, seed, git commit,
  package versions, data split hashes, wall time per stage) after every stage;
- stops at the first failing cell and reports the notebook, the cell and the
  error; the executed notebook keeps the traceback.
"""

from __future__ import annotations

import ast
import hashlib
import json
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import stablemtl
from stablemtl import options
from stablemtl import study as S
from stablemtl.presets import yaml_numbers

MANIFEST = "manifest.json"
# the parameters the runner sets itself (from --preset / --run-name and the study's directories)
RUNNER_PARAMETERS = ("preset", "run_name")


# the stages whose outputs each stage reads
_NEEDS = {"01": set(), "02": {"01"}, "03": {"01", "02"}, "04": {"01", "02", "03"}, "05": {"01", "03", "04"},
          "06": {"05"}}


class RunError(RuntimeError):
    """A run cannot start or a stage failed; the message names what and where."""


def notebook_dir() -> Path:
    """``notebooks/`` of the checkout this package is installed from (editable install)."""
    here = Path(stablemtl.__file__).resolve().parents[1] / "notebooks"
    if not (here / f"{S.STAGES[0]}.ipynb").is_file():
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
            raise RunError(f"parameter {pair!r}: expected key=value (for example -p iterations=200)")
        out[key.strip()] = yaml_numbers(yaml.safe_load(value)) if value.strip() else None
    return out



def select_stages(only) -> list[str]:
    """``"03,04"`` or ``["03", "04"]`` -> stage names; ``None`` -> all."""
    if not only:
        return list(S.STAGES)
    keys = [k.strip() for k in (only.split(",") if isinstance(only, str) else only) if k.strip()]
    chosen = []
    for key in keys:
        match = [s for s in S.STAGES if s == key or s.split("_")[0] == key.zfill(2)]
        if not match:
            raise RunError(f"unknown stage {key!r} in --only; stages: "
                           + ", ".join(s.split('_')[0] + ' (' + s + ')' for s in S.STAGES))
        chosen += [m for m in match if m not in chosen]
    return sorted(chosen)


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


def split_hashes(study: S.Study) -> dict:
    """sha256 (16 hex) of each dataset's split lists and generation record, the data a run saw."""
    from stablemtl.data.sources import SOURCES

    out = {}
    for name, cls in SOURCES.items():
        root = study.data_root / cls.root_hint
        files = sorted((root / "data_split").glob("*")) if (root / "data_split").is_dir() else []
        files += [root / "stablemtl_dataset.json"] if (root / "stablemtl_dataset.json").is_file() else []
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


def _stage_outputs_complete(study: S.Study, stage: str) -> bool:
    return all(p.exists() for p in S.stage_outputs(study, stage))


def _earlier_stage_ran_after(manifest: dict, stage: str) -> str | None:
    """The first earlier stage whose last run started after ``stage``'s (its outputs are then stale),
    from the run counter ``sequence`` of the manifest's stage records."""
    records = manifest.get("stages", {})
    own = records.get(stage, {}).get("sequence", 0)
    for earlier in S.STAGES[:S.STAGES.index(stage)]:
        if records.get(earlier, {}).get("sequence", 0) > own:
            return earlier
    return None


def run_study(preset: str = "demo", only=None, parameters: dict | None = None, run_name: str | None = None,
              force: bool = False, results_root=None, output_root=None, progress: bool = True,
              log=print) -> S.Study:
    """Execute the selected stages' notebooks; returns the study. Raises ``RunError`` with the failing
    notebook and cell."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    parameters = dict(parameters or {})
    stages = select_stages(only)
    nb_dir = notebook_dir()
    declared = {s: declared_parameters(nb_dir / f"{s}.ipynb") for s in stages}
    for key in parameters:
        if key in RUNNER_PARAMETERS:
            raise RunError(f"set {key!r} with --{key.replace('_', '-')}, not -p")
        if not any(key in d for d in declared.values()):
            valid = sorted({k for d in declared.values() for k in d} - set(RUNNER_PARAMETERS))
            raise RunError(f"unknown parameter {key!r} for stage(s) {', '.join(stages)}; "
                           f"the notebooks declare: {', '.join(valid)}")
        if key in options.OPTIONS and parameters[key] is not None:  # a release-parity option: check it now
            try:
                options.check(key, parameters[key])
            except ValueError as err:
                raise RunError(str(err)) from None
    paths = {k: parameters.get(k) for k in ("data_root", "output_root", "results_root", "base_dir")}
    paths["results_root"] = paths["results_root"] or results_root
    paths["output_root"] = paths["output_root"] or output_root
    try:
        study = S.context(preset, run_name, **paths)
    except (ValueError, S.StageError) as err:
        raise RunError(str(err)) from err
    # inputs made by stages outside the selection must exist now, not after an hour of work
    selected = {s[:2] for s in stages}
    needs = {s[:2]: set(_NEEDS[s[:2]]) for s in stages}
    models = parameters.get("models")
    if "05" in needs and models is not None:  # evaluating without a model kind does not need its stage
        needs["05"] -= {k for k, kind in (("03", "single_stream"), ("04", "multi_stream")) if kind not in models}
    needed = sorted(set().union(*needs.values()) - selected)
    try:
        S.require(study, *needed)
    except S.StageError as err:
        raise RunError(str(err)) from err
    if not study.procedural:
        _check_paper_inputs(study, stages)

    root = S.project_root()
    study.results_dir.mkdir(parents=True, exist_ok=True)
    executed_dir = study.results_dir / "notebooks"
    executed_dir.mkdir(exist_ok=True)
    manifest_path = study.results_dir / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    manifest.update({"run": study.run, "preset_name": study.name, "preset": study.preset,
                     "seed": parameters.get("seed", study.preset.get("seed")), "git_commit": _git_commit(root),
                     "versions": _versions(), "platform": platform.platform(),
                     "directories": {"data": str(study.data_root), "base": str(study.base_dir),
                                     "outputs": str(study.output_dir), "results": str(study.results_dir)}})
    manifest.setdefault("stages", {})
    rerun_from_here = False
    total = time.perf_counter()
    for i, stage in enumerate(stages, 1):
        given = {"preset": preset if isinstance(preset, str) else study.name, "run_name": study.run}
        given.update({k: str(v) if isinstance(v, Path) else v for k, v in parameters.items() if k in declared[stage]})
        given = {k: v for k, v in given.items() if k in declared[stage]}
        record = manifest["stages"].get(stage, {})
        newer = _earlier_stage_ran_after(manifest, stage)
        complete = (record.get("status") == "done" and record.get("parameters") == given and newer is None
                    and _stage_outputs_complete(study, stage))
        if complete and not force and not rerun_from_here:
            log(f"[{i}/{len(stages)}] {stage}: complete, skipped (outputs present, same parameters; --force reruns)")
            continue
        stale = newer and not force and not rerun_from_here and record.get("status") == "done"
        # training resumes only an interrupted attempt of the same settings on unchanged inputs
        interrupted = record.get("status") in ("running", "failed") and record.get("parameters") == given
        kind = {"03": "single_stream", "04": "multi_stream"}.get(stage[:2])
        fresh = force or rerun_from_here or newer is not None or not interrupted
        rerun_from_here = True
        log(f"[{i}/{len(stages)}] {stage}" + (f": {newer} ran after it, so it runs again" if stale else
                                              "" if fresh or not kind else " (resuming the interrupted training)"))
        moved = S.set_aside_training(study, kind) if kind and fresh else None
        if moved:
            log(f"      the earlier training of this run moved to {moved}")
        output = executed_dir / f"{stage}.ipynb"
        manifest["sequence"] = manifest.get("sequence", 0) + 1
        manifest["stages"][stage] = {"status": "running", "parameters": given, "sequence": manifest["sequence"],
                                     "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        _write_json(manifest_path, manifest)
        start = time.perf_counter()
        try:
            papermill.execute_notebook(str(nb_dir / f"{stage}.ipynb"), str(output), parameters=given,
                                       cwd=str(root), kernel_name="python3", progress_bar=progress,
                                       log_output=False, report_mode=False)
        except PapermillExecutionError as err:
            manifest["stages"][stage].update(status="failed", wall_s=round(time.perf_counter() - start, 1),
                                             error=f"{err.ename}: {err.evalue}", cell=err.exec_count)
            _write_json(manifest_path, manifest)
            source = (err.source or "").strip().splitlines()
            raise RunError(f"stage {stage} failed in notebooks/{stage}.ipynb, cell [{err.exec_count}] "
                           f"({source[0] if source else ''}...):\n  {err.ename}: {err.evalue}\n"
                           f"the executed notebook with the full traceback: {output}") from None
        manifest["stages"][stage].update(status="done", wall_s=round(time.perf_counter() - start, 1),
                                         outputs=[str(p) for p in S.stage_outputs(study, stage)])
        if stage.startswith("01"):
            manifest["data_split_hashes"] = split_hashes(study)
        _write_json(manifest_path, manifest)
        log(f"      done in {manifest['stages'][stage]['wall_s']:.0f} s")
    manifest["last_run_wall_s"] = round(time.perf_counter() - total, 1)
    _write_json(manifest_path, manifest)
    return study


def _check_paper_inputs(study: S.Study, stages: list[str]) -> None:
    """Real data and SD2 weights: a clear message before any stage starts."""
    missing = []
    if not study.data_root.is_dir():
        missing.append(f"datasets: {study.data_root} does not exist (PREPROCESSED_DIR)")
    if not (study.base_dir / "model_index.json").is_file():
        missing.append(f"Stable Diffusion 2 weights: {study.base_dir}/model_index.json is missing (BASE_CKPT_DIR)")
    if missing:
        raise RunError("the paper preset needs real data and weights:\n  " + "\n  ".join(missing)
                       + f"\nsee {S.README_PAPER}")


def summary(study: S.Study) -> str:
    """The end-of-run summary: where the results are and the target check of the run's metrics."""
    from stablemtl.evaluate import read_metrics

    lines = [f"results of run {study.run!r} (preset {study.name}): {study.results_dir}"]
    for name in ("tables/main.md", "figures", "notebooks", MANIFEST, "summary.md"):
        if (study.results_dir / name).exists():
            lines.append(f"  {study.results_dir / name}")
    if (study.results_dir / "metrics.csv").is_file():
        rows = [r for r in read_metrics(study.results_dir) if r["run"] == study.run]
        table, passed = S.target_check(rows)
        lines += ["", S.format_target_check(table, passed)]
    return "\n".join(lines)


def main(args) -> int:
    """The ``stablemtl run`` command (see ``stablemtl.cli``)."""
    try:
        parameters = parse_parameters(args.parameter)
        start = time.perf_counter()
        study = run_study(args.preset, only=args.only, parameters=parameters, run_name=args.run_name,
                          force=args.force, progress=not args.quiet)
    except RunError as err:
        print(f"stablemtl run: {err}", file=sys.stderr)
        return 1
    print(f"\nfinished in {time.perf_counter() - start:.0f} s\n")
    print(summary(study))
    return 0
