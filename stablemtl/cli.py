"""The ``stablemtl`` command line.

``stablemtl run`` is the kit's main job: it executes the numbered notebooks
(``notebooks/01_prepare_data`` ... ``06_results``) with papermill for a preset
(``demo`` by default) and prints where the results are and the run's target
check; ``stablemtl status`` says which stages of a run are done, stale or missing
and what the next ``stablemtl run`` would do. ``stablemtl data`` and ``stablemtl base``
run the first two stages' work directly; ``stablemtl prepare`` turns a raw dataset
download into the layout the loaders read, ``stablemtl convert-release`` a released
StableMTL checkpoint into a pipeline folder, ``stablemtl predict`` runs a model on
one's own images, ``stablemtl rehearse`` runs the paper preset's code path end to end on
real-size miniatures with nothing downloaded; ``stablemtl check`` checks the task encodings and
``stablemtl info`` prints the versions and the devices.

The parser is built without torch (``stablemtl --help`` and every command's ``--help`` start in a
fraction of a second): every argument is declared here, and a command's work, which imports torch, is
imported when the command runs. The options mean the same in every command: ``--quiet`` no progress
bars, ``--out`` the output folder of that command, ``--device`` ``auto|cpu|cuda[:N]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
from datetime import datetime
from pathlib import Path

import stablemtl
from stablemtl import metrics
from stablemtl.data.convert.common import RAW_TREES
from stablemtl.guard import LOCK, InputError, exit_status, pid_alive
from stablemtl.paths import DONE_FILE
from stablemtl.presets import available_presets
from stablemtl.rehearse import add_rehearse_parser

# one meaning per option, in every command that has it
QUIET = "no progress bars"
DEVICE = "auto|cpu|cuda[:N] (default auto: the GPU when there is one, else the CPU)"
CHECK_TOLERANCE = 1e-3  # `stablemtl check`: a task whose round trip errs by more fails (exit status 1)
MANIFEST = "manifest.json"  # results/<run>/manifest.json (stablemtl.run.MANIFEST)


# --------------------------------------------------------------------------- the commands' work

def self_check() -> list[dict]:
    """Encode -> decode every task on a synthetic annotation: one record per task (``task``, ``prompt``,
    ``error``: the recovery error, ``how``: what it measures, ``ok``: finite and within ``CHECK_TOLERANCE``;
    a task whose encoding or decoding raises gets ``error`` nan and the exception in ``how``)."""
    import numpy as np
    import torch

    from stablemtl import tasks

    g = torch.Generator().manual_seed(0)
    h, w = 32, 48
    records = []
    for name in tasks.TASK_NAMES:
        task = tasks.get_task(name)
        if name == "depth":
            ann = 1.0 + 9.0 * torch.rand(1, 1, h, w, generator=g)
        elif name == "normal":
            ann = torch.nn.functional.normalize(torch.randn(1, 3, h, w, generator=g), dim=1)
        elif name == "semantic":
            ann = torch.randint(0, len(tasks.SEMANTIC_CLASSES), (1, 1, h, w), generator=g)
        elif name == "optical_flow":
            ann = 20.0 * torch.randn(1, 2, h, w, generator=g)
        elif name == "scene_flow":
            ann = 0.5 * torch.randn(1, 3, h, w, generator=g)
        else:
            ann = 0.05 + 0.9 * torch.rand(1, 3, h, w, generator=g)
        try:
            target, valid = task.encode(ann)
            out = task.decode(target)
            if name == "depth":
                inside = (target[0, 0].abs() < 1).numpy()  # pixels between the 2 % / 98 % quantiles
                aligned = metrics.align_depth_least_squares(out[0, 0].numpy(), ann[0, 0].numpy(), inside)
                err = float(np.abs(aligned - ann[0, 0].numpy())[inside].max())
                how = "max |aligned - depth| (m), inside the quantile range"
            elif name == "semantic":
                err = float((out != ann).float().mean())
                how = "fraction of wrong class ids"
            elif name in tasks.FLOW_TASKS:
                o, a = out[0].permute(1, 2, 0).numpy(), ann[0].permute(1, 2, 0).numpy()
                err = float(np.abs(metrics.align_flow_nnls(o, a, valid[0, 0].numpy()) - a).max())
                how = "max |scale-aligned - flow|"
            elif name == "shading":
                grey = tasks.to_grey(ann, dim=1, keepdim=True)
                err = float((out - grey).abs().max())
                how = "max |output - grey shading|"
            else:
                err = float((out - ann).abs().max())
                how = "max |output - annotation|"
        except Exception as exc:  # noqa: BLE001 - a broken task is a failed check, reported with the others
            err, how = math.nan, f"{type(exc).__name__}: {exc}"
        records.append({"task": name, "prompt": task.prompt, "error": err, "how": how,
                        "ok": math.isfinite(err) and err <= CHECK_TOLERANCE})
    return records


def _study(preset, data=None, base=None):
    """The preset's ``Study`` with the datasets' and the base's folders given on the command line."""
    from stablemtl.stages import context

    overrides = {v: str(Path(f).resolve()) for v, f in (("DATA_DIR", data), ("BASE_DIR", base)) if f}
    saved = {v: os.environ.get(v) for v in overrides}
    os.environ.update(overrides)
    try:  # the folders are resolved into the Study now; the process's environment is left as it was
        return context(preset)  # the preset checked field by field (stablemtl.schema)
    finally:
        for variable, value in saved.items():
            if value is None:
                os.environ.pop(variable, None)
            else:
                os.environ[variable] = value


def cmd_data(args) -> int:
    """Stage 01's work alone: write the procedural mini datasets (or check the real ones); summarise them."""
    from stablemtl import views
    from stablemtl.stages import prepare_data

    if args.root and args.out and Path(args.root).resolve() != Path(args.out).resolve():
        raise InputError(f"--root {args.root} and --out {args.out} name two folders; give one: --out, the "
                         f"datasets' folder (--root is its former name)")
    study = _study(args.preset, data=args.out or args.root)
    print(views.dataset_table(prepare_data(study, progress=not args.quiet)).to_string())
    return 0


def cmd_base(args) -> int:
    """Stage 02's work alone: build the tiny base model (or check SD2) and print its build report."""
    from stablemtl.model.base import describe
    from stablemtl.stages import prepare_base

    study = _study(args.preset, base=args.out)
    progress = study.procedural and not args.quiet  # a tiny base's bars and build report
    out = prepare_base(study, progress=progress, rebuild=args.rebuild)
    print(f"base model ready in {out}")
    if not progress:  # SD2's description, or the build report without the bars
        print(describe(out))
    return 0


def cmd_check(args) -> int:
    """The task encodings' round trips; exit status 1 when one errs by more than ``CHECK_TOLERANCE``."""
    print("Tasks (stablemtl.tasks), checked now on synthetic annotations:")
    records = self_check()
    for r in records:
        mark = "" if r["ok"] else f"  FAILED (above {CHECK_TOLERANCE:.0e})"
        print(f"  {r['task']:<13} prompt {r['prompt']!r:<16} round trip: {r['error']:.2e}  ({r['how']}){mark}")
    failed = [r["task"] for r in records if not r["ok"]]
    if failed:
        print(f"stablemtl check: {len(failed)} of {len(records)} task(s) failed: {', '.join(failed)} (an encoding "
              f"and its decoding no longer invert each other within {CHECK_TOLERANCE:.0e})", file=sys.stderr)
        return 1
    print(f"all {len(records)} tasks round-trip within {CHECK_TOLERANCE:.0e}")
    return 0


def cmd_run(args) -> int:
    from stablemtl import run

    print(f"stablemtl {stablemtl.__version__}: StableMTL (arXiv 2506.08013), preset {args.preset!r}\n", flush=True)
    return run.main(args)


def cmd_info(args) -> int:
    """The versions, then the devices: CPU cores, torch's threads, each GPU with its name and memory."""
    import torch

    from stablemtl import devices

    print(f"stablemtl {stablemtl.__version__}")
    print(f"python    {platform.python_version()} ({sys.executable})")
    print(f"torch     {torch.__version__}, CUDA available: {torch.cuda.is_available()}"
          + (f" (CUDA {torch.version.cuda})" if torch.version.cuda else ""))
    for module in ("diffusers", "transformers", "accelerate", "numpy"):
        try:
            print(f"{module:<9} {__import__(module).__version__}")
        except ImportError:
            print(f"{module:<9} not installed")
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print("devices")
    print(f"  cpu       {os.cpu_count()} cores ({usable} usable by this process); torch threads: "
          f"{torch.get_num_threads()} (the smoke and demo presets use {devices.REFERENCE_THREADS} on a machine "
          f"without a GPU; STABLEMTL_THREADS overrides)")
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        props = torch.cuda.get_device_properties(i)
        print(f"  cuda:{i:<4} {props.name}, {props.total_memory / 2 ** 30:.1f} GiB, compute capability "
              f"{props.major}.{props.minor}")
    if not torch.cuda.is_available():
        print("  (no CUDA device)")
    if "mps" in devices.available_devices():
        print("  mps       Apple GPU (Metal)")
    return 0


# the commands whose work imports torch at its top: their module is imported when they run

def cmd_prepare(args) -> int:
    from stablemtl.data.prepare import cmd_prepare as work

    return work(args)


def cmd_convert(args) -> int:
    from stablemtl.model.release import cmd_convert as work

    return work(args)


def cmd_predict(args) -> int:
    from stablemtl.predict import cmd_predict as work

    return work(args)


# --------------------------------------------------------------------------- stablemtl status

def _finished(record: dict) -> datetime | None:
    try:
        return datetime.fromisoformat(record["finished"])
    except (KeyError, TypeError, ValueError):
        return None


def _plain(value):
    """``value`` as ``done.json`` stores it (JSON: tuples become lists, paths strings)."""
    return json.loads(json.dumps(value, default=str))


def _why_stale(study, stage: str, done: dict, knobs: dict) -> list[str]:
    """Why ``done.json``'s hash is not ``stage_hash`` now, from what is cheap to tell: the knobs it ran with
    (``done.json`` keeps them) and the stages it reads (missing, or finished after it)."""
    from stablemtl import run

    changed, stored = [], done.get("knobs")
    if isinstance(stored, dict):
        now = _plain(knobs)
        for key in sorted((set(stored) | set(now)) - set(run.RUNNER_PARAMETERS)):
            if stored.get(key, "(not declared)") != now.get(key, "(not declared)"):
                value = now.get(key, "(not declared)")
                changed.append(f"it ran with {key}={stored.get(key, '(not declared)')!r}; now {key}={value!r}"
                               + (" (the preset's value)" if value is None else ""))
    upstream, finished = [], _finished(done)
    for other in run.reads(stage, knobs):
        record = run.read_done(study, other)
        if not record:
            upstream.append(f"stage {other} has not finished (no {DONE_FILE})")
        elif finished and _finished(record) and _finished(record) > finished:
            upstream.append(f"stage {other} finished again after it ({record['finished']})")
    reasons = changed + upstream
    if not reasons:
        reasons.append("its parameters or inputs changed (the preset, its folders or a format version)")
    elif changed and not upstream and run.stage_hash(study, stage, stored) != done.get("hash"):
        reasons.append("and its other parameters or inputs changed (the preset, its folders or a format version)")
    return reasons


def run_status(preset: str = "demo", run_name: str | None = None) -> dict:
    """Where a run stands, read from its ``done.json`` files and ``manifest.json`` (nothing is written):
    ``{"study", "stages": [{"stage", "state": "done"|"stale"|"missing", "finished", "wall_s", "why",
    "last", "runs"}], "next": [stages the next `stablemtl run` runs], "busy": lock holder pid or None}``.

    The rule is ``stablemtl run``'s (``stablemtl.run``): a stage whose ``done.json`` holds
    ``stage_hash(study, stage, knobs)`` (the knobs: its notebook's declared defaults with the preset and
    run name) is skipped, any other runs, and a stage that runs changes the hash of every stage reading it."""
    from stablemtl import run
    from stablemtl.stages import STAGES, context

    study = context(preset, run_name)
    notebooks = run.notebook_dir()
    every = run.stage_knobs(study, preset, {s: run.declared_parameters(notebooks / f"{s}.ipynb") for s in STAGES},
                            {})
    manifest_file = study.results_dir / MANIFEST
    try:
        recorded = json.loads(manifest_file.read_text()).get("stages", {}) if manifest_file.is_file() else {}
    except (OSError, ValueError, AttributeError):
        recorded = {}
    rows, running = [], set()
    for stage in STAGES:
        knobs = every[stage]
        done, entry = run.read_done(study, stage), recorded.get(stage) or {}
        row = {"stage": stage, "finished": done.get("finished"), "wall_s": None, "why": [], "last": None}
        if not done:
            row["state"] = "missing"
            if (study.stage_dir(stage) / DONE_FILE).is_file():
                row["why"] = [f"its {DONE_FILE} cannot be read"]
            if entry.get("status") in ("failed", "interrupted", "running"):
                row["last"] = {"failed": f"the last attempt failed: {entry.get('error')} (cell [{entry.get('cell')}])",
                               "interrupted": "the last attempt was interrupted",
                               "running": f"an attempt started {entry.get('started')} and did not finish (still "
                                          f"running, or killed)"}[entry["status"]]
        elif done.get("hash") == run.stage_hash(study, stage, knobs):
            row["state"] = "done"
        else:
            row["state"], row["why"] = "stale", _why_stale(study, stage, done, knobs)
        if done and entry.get("hash") == done.get("hash"):  # this run's record of the call that made it
            row["wall_s"] = entry.get("wall_s")
        upstream = [r for r in run.reads(stage, knobs) if r in running]
        row["runs"] = row["state"] != "done" or bool(upstream)
        if row["state"] == "done" and upstream:
            row["why"] = [f"stage {', '.join(upstream)} runs before it, so it runs again"]
        if row["runs"]:
            running.add(stage[:2])
        rows.append(row)
    try:
        holder = int(json.loads((study.results_dir / LOCK).read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        holder = None
    busy = holder if holder is not None and pid_alive(holder) else None
    return {"study": study, "stages": rows, "next": [r["stage"] for r in rows if r["runs"]], "busy": busy}


def format_status(status: dict, preset: str, run_name: str | None) -> str:
    study = status["study"]
    lines = [f"run {study.run_name!r} of preset {study.name!r}: results in {study.results_dir}"]
    if status["busy"]:
        lines.append(f"  a stablemtl run (pid {status['busy']}) is using it now")
    for row in status["stages"]:
        text = f"  {row['stage']:<24} {row['state']:<8}"
        if row["finished"]:
            wall = (f", {row['wall_s']:.0f} s" if isinstance(row["wall_s"], (int, float))
                    else "; wall time not in this run's manifest")
            text += f" finished {row['finished']}{wall}"
        lines.append(text.rstrip())
        lines += [f"  {'':<24} {'':<8} {why}" for why in row["why"] + ([row["last"]] if row["last"] else [])]
    command = f"stablemtl run --preset {preset}" + (f" --run-name {run_name}" if run_name else "")
    if status["next"]:
        skipped = [r["stage"][:2] for r in status["stages"] if not r["runs"]]
        lines.append(f"next `{command}` runs {', '.join(s[:2] for s in status['next'])}"
                     + (f" and skips {', '.join(skipped)} (done)" if skipped else ""))
    else:
        lines.append(f"next `{command}` runs nothing: every stage is done (--force reruns them)")
    return "\n".join(lines)


def cmd_status(args) -> int:
    from stablemtl.run import RunError

    try:
        status = run_status(args.preset, args.run_name)
    except RunError as err:
        raise InputError(str(err)) from None
    print(format_status(status, args.preset, args.run_name))
    return 0


# --------------------------------------------------------------------------- the parser

def _preset_argument(p, presets: str) -> None:
    p.add_argument("--preset", default="demo", help=f"{presets} (default demo) or a preset YAML path")


def add_prepare_parser(sub) -> None:
    """``stablemtl prepare`` (the work: ``stablemtl.data.prepare``, whose ``add_prepare_parser`` is the same)."""
    p = sub.add_parser(
        "prepare", help="convert a raw dataset download into the layout the kit reads",
        description="Convert a raw download (Hypersim HDF5, Virtual KITTI 2 depth, the FlyingThings3D subset, "
                    "MID EXR) into the StableMTL release's preprocessed layout, or check the layout of Cityscapes, "
                    "KITTI and DIODE. Resumable; writes stablemtl_prepare.json last.")
    p.add_argument("dataset", choices=tuple(RAW_TREES))
    p.add_argument("--raw", required=True,
                   help="the raw download's folder (see docs/paper.md, 'Preparing the raw datasets')")
    p.add_argument("--out", default=None,
                   help="the output folder: the prepared dataset (default: $PREPROCESSED_DIR/<dataset's folder>)")
    p.add_argument("--workers", type=int, default=None, help="processes converting frames (default: every CPU)")
    p.add_argument("--quiet", action="store_true", help=QUIET)
    p.add_argument("--split-csv", default=None,
                   help="hypersim: metadata_images_split_scene_v1.csv when it is not in the raw folder")
    p.add_argument("--eigen-list", default=None,
                   help="kitti_depth: the official Eigen test list when the folder has no data_split/")
    p.set_defaults(func=cmd_prepare)


def add_convert_parser(sub) -> None:
    """``stablemtl convert-release`` (the work: ``stablemtl.model.release``)."""
    p = sub.add_parser(
        "convert-release", help="convert a released StableMTL checkpoint into a kit pipeline folder",
        description="Turn a StableMTL release run folder (config.yaml + checkpoint/latest/unet/) into a "
                    "self-contained pipeline folder that StableMTLPipeline.from_pretrained and stablemtl predict load.")
    p.add_argument("run_dir", help="the release run folder (e.g. the unpacked single_stream/ or multi_stream/)")
    p.add_argument("out_dir", help="the output folder: the pipeline folder to write")
    p.add_argument("--base", default=None, help="Stable Diffusion 2, diffusers layout "
                                                "(default $BASE_CKPT_DIR/stable-diffusion-2)")
    p.add_argument("--child", default=None, help="multi stream: single_stream_unet.pth, its frozen auxiliary stream")
    p.set_defaults(func=cmd_convert)


def add_predict_parser(sub) -> None:
    """``stablemtl predict`` (the work: ``stablemtl.predict``)."""
    p = sub.add_parser(
        "predict", help="a trained model's outputs for your own images",
        description="Predict every task of a trained model (or --tasks) for image files or folders (sorted by "
                    "name; optical_flow and scene_flow pair each image with the next one) and write "
                    "<out>/<image>/<task>.png, <task>.npy (float32, at the image's size), depth_16bit.png "
                    "(depth = png / 65535) and contact_sheet.png. Exit status: 0 all done, 1 some image or "
                    "task failed, 2 nothing ran.")
    p.add_argument("images", nargs="+", metavar="IMAGES", help="image files and/or folders of images")
    p.add_argument("--model", required=True, metavar="DIR",
                   help="a model folder, e.g. outputs/demo/multi_stream/model")
    p.add_argument("--tasks", default=None, help="comma-separated tasks, e.g. depth,normal (default: the model's)")
    p.add_argument("--out", default="predictions", metavar="DIR",
                   help="the output folder: one folder per image (default: ./predictions)")
    p.add_argument("--device", default="auto", help=DEVICE)
    p.add_argument("--bf16", action="store_true", help="run in bfloat16 (half the memory and time on a GPU)")
    p.add_argument("--max-side", type=int, default=None, metavar="N",
                   help="run the model at most at N pixels on the longer side (default: the image's own size)")
    p.add_argument("--quiet", action="store_true", help=QUIET)
    p.set_defaults(func=cmd_predict)


def build_parser() -> argparse.ArgumentParser:
    """The whole ``stablemtl`` parser; building it imports no torch."""
    parser = argparse.ArgumentParser(prog="stablemtl", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"stablemtl {stablemtl.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    presets = " | ".join(available_presets())
    p = sub.add_parser("run", help="run the study: the numbered notebooks through papermill",
                       description="Execute notebooks/01_prepare_data ... 06_results in order with papermill; "
                                   "results go to results/<run>/ (executed notebooks, manifest.json, metrics, "
                                   "tables, figures). Complete stages are skipped (`stablemtl status` lists them).")
    _preset_argument(p, presets)
    p.add_argument("--only", default=None, help="comma-separated stages to run, e.g. 03,04 (default: all)")
    p.add_argument("-p", "--parameter", action="append", default=[], metavar="KEY=VALUE",
                   help="a notebook parameter, e.g. -p iterations=200 -p tasks=[depth,normal] (repeatable)")
    p.add_argument("--run-name", default=None, help="results/<run-name> (default: the preset's name)")
    p.add_argument("--seeds", type=int, default=None, metavar="N",
                   help="train and evaluate N seeds (the preset's seed and the next ones); tables show mean "
                        "and std over them (default: the preset's study.seeds, 1 for demo)")
    p.add_argument("--force", action="store_true", help="rerun the selected stages even when complete")
    p.add_argument("--dry-run", action="store_true",
                   help="check the parameters, the preset, the folders and the inputs of the selected stages, "
                        "print which stages would run, and stop (nothing is written)")
    p.add_argument("--quiet", action="store_true", help=QUIET)
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("status", help="which stages of a run are done, stale or missing; what `run` would do",
                       description="For each stage of a run: done (when, and its wall time from the run's "
                                   "manifest.json), stale (why) or missing; then which stages the next "
                                   "`stablemtl run` with the same preset and run name would run. Writes nothing.")
    _preset_argument(p, presets)
    p.add_argument("--run-name", default=None, help="results/<run-name> (default: the preset's name)")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("data", help="stage 01's work alone: write the procedural mini datasets or check the real ones")
    _preset_argument(p, presets)
    p.add_argument("--out", default=None, metavar="DIR",
                   help="the output folder: the datasets (default: $DATA_DIR, else data/<preset>; paper: "
                        "$PREPROCESSED_DIR, checked only)")
    p.add_argument("--root", default=None, metavar="DIR", help="the former name of --out")
    p.add_argument("--quiet", action="store_true", help=QUIET)
    p.set_defaults(func=cmd_data)
    p = sub.add_parser("base", help="stage 02's work alone: build the tiny base model or check SD2")
    _preset_argument(p, presets)
    p.add_argument("--out", default=None, metavar="DIR",
                   help="the output folder: the base model (default: $BASE_DIR, else $OUTPUT_DIR/<preset>/base "
                        "or outputs/<preset>/base; paper: $BASE_CKPT_DIR/stable-diffusion-2, checked only)")
    p.add_argument("--rebuild", action="store_true",
                   help="build the tiny base from scratch (VAE, then the generative prior: about 10 min "
                        "for demo on 2 cores) instead of copying the one committed in bases/<preset>")
    p.add_argument("--quiet", action="store_true", help=QUIET)
    p.set_defaults(func=cmd_base)
    add_prepare_parser(sub)  # raw downloads -> the layouts the loaders read
    add_convert_parser(sub)  # released StableMTL checkpoints -> pipeline folders
    add_predict_parser(sub)  # a model on one's own images
    add_rehearse_parser(sub)  # the paper preset's code path on real-size miniatures, nothing downloaded
    sub.add_parser("check", help="check the task encodings on synthetic annotations (exit status 1 when one fails)"
                   ).set_defaults(func=cmd_check)
    sub.add_parser("info", help="versions and devices").set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return exit_status(f"stablemtl {args.command}", lambda: args.func(args),
                       bad_input=lambda err: "preset" in str(err))  # presets.load_preset's ValueErrors


if __name__ == "__main__":
    sys.exit(main())
