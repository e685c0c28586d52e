"""The ``stablemtl`` command line.

``stablemtl run`` is the kit's main job: it executes the numbered notebooks
(``notebooks/01_prepare_data`` ... ``06_results``) with papermill for a preset
(``demo`` by default) and prints where the results are and the run's target
check. ``stablemtl data`` and ``stablemtl base`` run the first two stages'
work directly; ``stablemtl prepare`` turns a raw dataset download into the
layout the loaders read, ``stablemtl convert-release`` a released StableMTL
checkpoint into a pipeline folder, ``stablemtl predict`` runs a model on
one's own images, ``stablemtl rehearse`` runs the paper preset's code path end to end on
real-size miniatures with nothing downloaded; ``stablemtl check`` checks the task encodings and
``stablemtl info`` prints the environment.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import stablemtl
from stablemtl import metrics
from stablemtl.guard import InputError, StageError
from stablemtl.presets import available_presets
from stablemtl.rehearse import add_rehearse_parser

# The commands' work is imported when a command runs (it imports torch); the parser is built without it.


def _self_check() -> list[str]:
    """Encode -> decode every task on a synthetic annotation and report the recovery error."""
    import numpy as np
    import torch

    from stablemtl import tasks

    g = torch.Generator().manual_seed(0)
    h, w = 32, 48
    lines = []
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
        lines.append(f"  {name:<13} prompt {task.prompt!r:<16} round trip: {err:.2e}  ({how})")
    return lines


def _study(args):
    import os

    from stablemtl.stages import context

    overrides = {v: str(Path(f).resolve()) for v, f in (("DATA_DIR", args.root), ("BASE_DIR", args.out)) if f}
    saved = {v: os.environ.get(v) for v in overrides}
    os.environ.update(overrides)
    try:  # the folders are resolved into the Study now; the process's environment is left as it was
        return context(args.preset)  # the preset checked field by field (stablemtl.schema)
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

    print(views.dataset_table(prepare_data(_study(args))).to_string())
    return 0


def cmd_base(args) -> int:
    """Stage 02's work alone: build the tiny base model (or check SD2) and print its build report."""
    from stablemtl.model.base import describe
    from stablemtl.stages import prepare_base

    study = _study(args)
    out = prepare_base(study, progress=study.procedural, rebuild=getattr(args, "rebuild", False))  # bars, report
    print(f"base model ready in {out}")
    if not study.procedural:
        print(describe(out))
    return 0


def cmd_check(args) -> int:
    print("Tasks (stablemtl.tasks), checked now on synthetic annotations:")
    for line in _self_check():
        print(line)
    return 0


def cmd_run(args) -> int:
    from stablemtl import run

    print(f"stablemtl {stablemtl.__version__}: StableMTL (arXiv 2506.08013), preset {args.preset!r}\n", flush=True)
    return run.main(args)


def cmd_info(args) -> int:
    import torch

    print(f"stablemtl {stablemtl.__version__}")
    print(f"python    {platform.python_version()} ({sys.executable})")
    print(f"torch     {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
    for module in ("diffusers", "transformers", "accelerate", "numpy"):
        try:
            print(f"{module:<9} {__import__(module).__version__}")
        except ImportError:
            print(f"{module:<9} not installed")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stablemtl", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    presets = " | ".join(available_presets())
    p = sub.add_parser("run", help="run the study: the numbered notebooks through papermill",
                       description="Execute notebooks/01_prepare_data ... 06_results in order with papermill; "
                                   "results go to results/<run>/ (executed notebooks, manifest.json, metrics, "
                                   "tables, figures). Complete stages are skipped.")
    p.add_argument("--preset", default="demo", help=f"{presets} (default demo) or a preset YAML path")
    p.add_argument("--only", default=None, help="comma-separated stages to run, e.g. 03,04 (default: all)")
    p.add_argument("-p", "--parameter", action="append", default=[], metavar="KEY=VALUE",
                   help="a notebook parameter, e.g. -p iterations=200 -p tasks=[depth,normal] (repeatable)")
    p.add_argument("--run-name", default=None, help="results/<run-name> (default: the preset's name)")
    p.add_argument("--seeds", type=int, default=None, metavar="N",
                   help="train and evaluate N seeds (the preset's seed and the next ones); tables show mean "
                        "and std over them (default: the preset's study.seeds, 1 for demo)")
    p.add_argument("--force", action="store_true", help="rerun the selected stages even when complete")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_run)
    for name, func, text in (("data", cmd_data, "stage 01's work alone: write the procedural mini datasets "
                                                "or check the real ones"),
                             ("base", cmd_base, "stage 02's work alone: build the tiny base model or check SD2")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--preset", default="demo", help=f"{presets} (default demo) or a preset YAML path")
        p.add_argument("--root", default=None,
                       help="the datasets' folder (default: data/<preset>; paper: $PREPROCESSED_DIR)")
        p.add_argument("--out", default=None,
                       help="the base model's folder (default: $OUTPUT_DIR/<preset>/base or outputs/<preset>/base)")
        if name == "base":
            p.add_argument("--rebuild", action="store_true",
                           help="build the tiny base from scratch (VAE, then the generative prior: about 12 min "
                                "for demo on 2 cores) instead of copying the one committed in bases/<preset>")
        p.set_defaults(func=func)
    from stablemtl.data.prepare import add_prepare_parser
    from stablemtl.model.release import add_convert_parser
    from stablemtl.predict import add_predict_parser

    add_prepare_parser(sub)  # raw downloads -> the layouts the loaders read
    add_convert_parser(sub)  # released StableMTL checkpoints -> pipeline folders
    add_predict_parser(sub)  # a model on one's own images
    add_rehearse_parser(sub)  # the paper preset's code path on real-size miniatures, nothing downloaded
    sub.add_parser("check", help="check the task encodings on synthetic annotations").set_defaults(func=cmd_check)
    sub.add_parser("info", help="versions and devices").set_defaults(func=cmd_info)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (InputError, StageError, ValueError) as err:  # a bad input: named, no traceback, status 2
        if not isinstance(err, (InputError, StageError)) and "preset" not in str(err):
            raise
        print(f"stablemtl {args.command}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"stablemtl {args.command}: interrupted; what was written stays (a training keeps its last "
              f"checkpoint); run the command again to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
