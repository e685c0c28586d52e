"""The ``stablemtl`` command line.

``stablemtl run`` is the kit's main job. The numbered notebooks that run the
whole study are not part of this version yet; until they are, ``run`` reports
what the installed kit provides and checks it on the spot (task encodings and
metrics on synthetic inputs). ``stablemtl info`` prints the environment.
"""

from __future__ import annotations

import argparse
import platform
import sys

import stablemtl


def _self_check() -> list[str]:
    """Encode -> decode every task on a synthetic annotation and report the recovery error."""
    import numpy as np
    import torch

    from stablemtl import metrics, tasks

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
        elif name in ("optical_flow", "scene_flow"):
            o, a = out[0].permute(1, 2, 0).numpy(), ann[0].permute(1, 2, 0).numpy()
            err = float(np.abs(metrics.align_flow_nnls(o, a, valid[0, 0].numpy()) - a).max())
            how = "max |scale-aligned - flow|"
        elif name == "shading":
            grey = (ann * torch.tensor(tasks.SHADING_WEIGHTS)[None, :, None, None]).sum(1, keepdim=True)
            err = float((out - grey).abs().max())
            how = "max |output - grey shading|"
        else:
            err = float((out - ann).abs().max())
            how = "max |output - annotation|"
        lines.append(f"  {name:<13} prompt {task.prompt!r:<16} round trip: {err:.2e}  ({how})")
    return lines


def default_data_root() -> str:
    """``$PREPROCESSED_DIR``, else ``data/preprocessed`` under the current directory (git-ignored)."""
    import os

    return os.environ.get("PREPROCESSED_DIR") or os.path.join("data", "preprocessed")


def cmd_data(args) -> int:
    """Write (or reuse) the procedural mini datasets and summarise them."""
    from stablemtl.data import mini, sources

    roots = mini.write_mini_datasets(args.root, args.preset)
    print(f"\n{'dataset':<18}{'class':<16}{'images':>7}  tasks")
    for name, root in roots.items():
        cls = sources.SOURCES[name]
        ds = cls(root)
        print(f"{name:<18}{cls.__name__:<16}{len(ds):>7}  {', '.join(cls.tasks_provided)}   ({root})")
    return 0


def default_base_dir(preset: str) -> str:
    """``$OUTPUT_DIR/<preset>/base``, else ``outputs/<preset>/base`` (git-ignored)."""
    import os

    return os.path.join(os.environ.get("OUTPUT_DIR") or "outputs", os.path.basename(str(preset)).split(".")[0], "base")


def cmd_base(args) -> int:
    """Build (or reuse) the tiny base model and print its build report."""
    from stablemtl.model import base

    out = args.out or default_base_dir(args.preset)
    base.build_tiny_base(out, args.preset, progress=True)
    print(f"base model ready in {out}")
    print(base.format_build_report(base.build_report(out)))
    return 0


def cmd_run(args) -> int:
    print(f"stablemtl {stablemtl.__version__}: StableMTL (arXiv 2506.08013) research kit\n")
    print("The numbered notebooks (training, evaluation, results) are not in this version yet.")
    print("This runs the stages that exist: data, the base model, then a check of the tasks.\n")
    print(f"Data: procedural miniatures of the eight datasets (preset {args.preset!r}) under {args.root}")
    cmd_data(args)
    print(f"\nModel: the tiny Stable-Diffusion-shaped base (preset {args.preset!r}; cached)")
    cmd_base(args)
    print()
    print("Tasks (stablemtl.tasks), checked now on synthetic annotations:")
    for line in _self_check():
        print(line)
    print("\nMetrics (stablemtl.metrics): depth LS alignment (depth / disparity) + AbsRel ... SILog;")
    print("  normal angular errors (per-image mean, pixel-pooled stats); semantic confusion / mIoU;")
    print("  flow NNLS alignment + EPE, Fl, angle; scene flow EPE3D + rates (AND / OR conventions);")
    print("  albedo / shading RMSE, SSIM, LMSE; Delta_m; accumulators independent of batching.")
    print("File formats (stablemtl.data.formats): PFM, .flo, KITTI flow / depth / disparity PNG and")
    print("  calib, vKITTI 2 depth / flow / scene flow / class PNG, Hypersim depth PNG and HDF5,")
    print("  npy normals and masks, DIODE npy, Cityscapes labelIds, OpenEXR.")
    return 0


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
    for name, func, text in (("run", cmd_run, "the kit's main job"),
                             ("data", cmd_data, "write the procedural mini datasets (cached)"),
                             ("base", cmd_base, "build the tiny base model (cached)")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--preset", default="demo", help="smoke | demo (default) | a preset YAML path")
        p.add_argument("--root", default=default_data_root(),
                       help="where datasets go (default: $PREPROCESSED_DIR or data/preprocessed)")
        p.add_argument("--out", default=None,
                       help="where the base model goes (default: $OUTPUT_DIR/<preset>/base or outputs/<preset>/base)")
        p.set_defaults(func=func)
    sub.add_parser("info", help="versions and devices").set_defaults(func=cmd_info)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
