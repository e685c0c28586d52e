"""Why the demo's multi stream loses on KITTI scene flow: the measurements of items 1, 2, 3 and 5.

For each seed, from the demo's trained single stream of that seed (trained here when missing, exactly as
stage 03 does), the script trains and evaluates on the eight benchmarks:

- ``multi@K``: the multi stream as stage 04 trains it, evaluated after K = 0, 30, 60, 130 (the demo's
  budget) and 260 optimizer steps of one run (the schedule depends on the step only, so the model at
  130 is the one stage 04 makes; ``multi@0`` is the single stream, the task attention's output
  projections being zero);
- ``single+130``: the single stream trained 130 more steps with the multi stream's recipe (its learning
  rate, warm-up, data draws and fresh optimizer): the same budget without the task attention;
- ``multi_frozen``: the multi stream with its main UNet frozen, only the task attention training, 130
  steps;

and records the task attention's weights of the scene-flow main pass over the other tasks, per block, on
the KITTI scene-flow images (mean over images, pixels and heads), at each K.

Run from the project root after ``stablemtl run`` (it reads ``data/demo``, ``outputs/demo/base`` and the
single streams of ``outputs/demo``, and trains a missing seed's single stream as stage 03 would):

    .venv/bin/python experiments/scene_flow.py --seeds 2024 2025 2026

It prints one JSON line per model and writes into ``--out`` (default ``outputs/experiments/scene_flow``)
``metrics.csv`` and ``per_sample.csv`` (the kit's tidy rows: run ``scene_flow``, model = the variant),
``attention.json``, ``curve.png`` and ``attention.png``, besides the trainings' checkpoints. The files of
the run behind docs/study-design.md are committed in ``experiments/scene_flow/``. On 2 CPU cores: about
8 minutes per seed, plus 2 per seed whose single stream is trained here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from stablemtl.benchmarks import BENCHMARKS
from stablemtl.comparisons import DELTA_M_METRICS
from stablemtl.data.sources import SOURCES
from stablemtl.evaluate import evaluate
from stablemtl.model.pipeline import load_model
from stablemtl.paths import KINDS
from stablemtl.results import read_metrics
from stablemtl.stages import context, train_config, train_model
from stablemtl.train import Trainer

CURVE = (0, 30, 60, 130, 260)
BUDGET = 130  # the demo's multi-stream steps


def evaluate_variant(model, name: str, seed: int, study, out: Path) -> dict:
    """The eight benchmarks' headline metrics of ``model`` (rows of run ``scene_flow`` in ``out``)."""
    was_training = model.training
    model.eval()
    resolution = (study.preset.get("evaluate") or {}).get("resolution")
    evaluate(model, list(BENCHMARKS), out, study.data_root, run="scene_flow", model_name=name, seed=seed,
             resolution=resolution, progress=False)
    model.train(was_training)
    rows = [r for r in read_metrics(out) if r["model"] == name and r["seed"] == str(seed)]
    headline = dict(DELTA_M_METRICS)  # benchmark -> its headline metric
    return {r["benchmark"]: float(r["value"]) for r in rows if headline.get(r["benchmark"]) == r["metric"]}


@torch.no_grad()
def scene_flow_attention(model, study, images: int = 8) -> dict[str, list[float]]:
    """Per site, the scene-flow main pass's attention over the auxiliary tasks on the first ``images``
    KITTI scene-flow images (mean over images, pixels and heads), in ``model.aux_tasks_for``'s order."""
    bench = BENCHMARKS["kitti_scene_flow"]
    size = tuple(((study.preset.get("evaluate") or {}).get("resolution") or {}).get(bench.name, bench.resolution))
    cls = SOURCES[bench.dataset]
    source = cls(study.data_root / cls.root_hint, tasks=[bench.task], resolution=size)
    was_training = model.training
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    for i in range(min(images, len(source))):
        sample = source[i]
        z, z_next = model.frozen.encode(torch.stack([sample["rgb"], sample["rgb_next"]]) * 2 - 1).chunk(2)
        weights: dict = {}
        model.predict_latents(z, z_next, ["scene_flow"], attention_weights=weights)
        for site, probs in weights.items():
            p = torch.stack(probs).mean(dim=(0, 1, 2, 3))  # one [T, B, N, Ta] per call -> [Ta]
            sums[site] = sums.get(site, 0) + p / min(images, len(source))
    model.train(was_training)
    return {site: [round(float(v), 5) for v in p] for site, p in sums.items()}


def single_stream(study, seed: int) -> Path:
    """The demo's single stream of ``seed`` (stage 03's training; kept when it is there)."""
    return train_model(study, KINDS[0], progress=False, seed=seed)


def run_seed(study, seed: int, out: Path, report) -> None:
    init = single_stream(study, seed)
    aux = None
    # the multi stream's curve, one run
    config = train_config(study, KINDS[1], seed=seed, iterations=CURVE[-1], checkpoint_every=0,
                          output_dir=str(out / f"seed{seed}" / "multi_curve"))
    trainer = Trainer(config, progress=False)
    attention = {}
    for k in CURVE:
        if k:
            trainer.train(until=k)
        report(f"multi@{k}", seed, evaluate_variant(trainer.model, f"multi@{k}", seed, study, out))
        attention[k] = scene_flow_attention(trainer.model, study)
        aux = trainer.model.aux_tasks_for(["scene_flow"])
    # the same budget without the task attention: the single stream, with the multi stream's recipe
    single_cfg = train_config(study, KINDS[0], seed=seed, iterations=BUDGET, checkpoint_every=0,
                              lr=config.lr, warmup=config.warmup, decay_steps=config.decay_steps,
                              output_dir=str(out / f"seed{seed}" / "single_plus"))
    more = Trainer(single_cfg, progress=False)
    trained = load_model(init)
    more.model.unet.load_state_dict(trained.unet.state_dict())
    more.train()
    report(f"single+{BUDGET}", seed, evaluate_variant(more.model, f"single+{BUDGET}", seed, study, out))
    # the task attention alone: the main UNet frozen
    frozen_cfg = train_config(study, KINDS[1], seed=seed, iterations=BUDGET, checkpoint_every=0,
                              output_dir=str(out / f"seed{seed}" / "multi_frozen"))
    frozen = Trainer(frozen_cfg, progress=False)
    frozen.model.unet.requires_grad_(False)  # Adam skips parameters without a gradient
    frozen.train()
    report("multi_frozen", seed, evaluate_variant(frozen.model, "multi_frozen", seed, study, out))
    attention["frozen"] = scene_flow_attention(frozen.model, study)
    path = out / "attention.json"
    saved = json.loads(path.read_text()) if path.is_file() else {}
    saved[str(seed)] = {"aux_tasks": aux, "by_step": attention}
    path.write_text(json.dumps(saved, indent=1))


def plot(out: Path) -> list[Path]:
    """``<out>/curve.png`` (each benchmark's headline metric against the multi stream's steps, per seed,
    with single+130 and multi_frozen at 130) and ``<out>/attention.png`` (the scene-flow main pass's
    attention over the other tasks, per block, after 130 steps, mean over seeds)."""
    import numpy as np
    from matplotlib.figure import Figure

    rows = read_metrics(out)
    headline = dict(DELTA_M_METRICS)
    value = {(r["model"], r["seed"], r["benchmark"]): float(r["value"]) for r in rows
             if headline.get(r["benchmark"]) == r["metric"]}
    seeds = sorted({r["seed"] for r in rows})
    fig = Figure(figsize=(16, 7), layout="constrained")
    for i, (bench, metric) in enumerate(DELTA_M_METRICS):
        ax = fig.add_subplot(2, 4, i + 1)
        for j, seed in enumerate(seeds):
            colour = f"C{j}"
            ys = [value.get((f"multi@{k}", seed, bench)) for k in CURVE]
            ax.plot(CURVE, ys, "o-", color=colour, label=f"multi, seed {seed}")
            for name, marker in ((f"single+{BUDGET}", "s"), ("multi_frozen", "^")):
                if (name, seed, bench) in value:
                    ax.plot([BUDGET], [value[(name, seed, bench)]], marker, color=colour, mfc="none", ms=9,
                            label=f"{name}" if j == 0 else None)
        ax.axvline(BUDGET, color="grey", lw=0.8, ls=":")
        ax.set_title(f"{bench} {metric}", fontsize=9)
        ax.set_xlabel("multi-stream steps (0 = the single stream)", fontsize=8)
        if i == 0:
            ax.legend(fontsize=7)
    curve = out / "curve.png"
    fig.savefig(curve, dpi=90)
    written = [curve]
    attention_file = out / "attention.json"
    if attention_file.is_file():
        saved = json.loads(attention_file.read_text())
        first = next(iter(saved.values()))
        sites = list(first["by_step"][str(BUDGET)])
        mean = np.mean([[v["by_step"][str(BUDGET)][s] for s in sites] for v in saved.values()], axis=0)
        fig = Figure(figsize=(8, 4), layout="constrained")
        ax = fig.add_subplot()
        im = ax.imshow(mean, cmap="viridis", vmin=1 / len(first["aux_tasks"]) - 0.01,
                       vmax=1 / len(first["aux_tasks"]) + 0.01)
        ax.set_xticks(range(len(first["aux_tasks"])), first["aux_tasks"], rotation=30, fontsize=8)
        ax.set_yticks(range(len(sites)), [s.split(".transformer")[0] for s in sites], fontsize=8)
        ax.set_title(f"scene flow's task attention after {BUDGET} steps (uniform = 1/{len(first['aux_tasks'])}), "
                     f"mean of {len(saved)} seeds", fontsize=9)
        fig.colorbar(im, ax=ax)
        fig.savefig(out / "attention.png", dpi=90)
        written.append(out / "attention.png")
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[2024, 2025, 2026])
    parser.add_argument("--out", default="outputs/experiments/scene_flow")
    parser.add_argument("--run-name", default="demo", help="the run whose single streams start the multi stream")
    parser.add_argument("--plot-only", action="store_true", help="only draw the figures from <out>'s files")
    args = parser.parse_args(argv)
    if args.plot_only:
        print("\n".join(map(str, plot(Path(args.out)))))
        return 0
    study = context("demo", args.run_name)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    def report(name, seed, values):
        print(json.dumps({"model": name, "seed": seed, **values}), flush=True)

    for seed in args.seeds:
        run_seed(study, seed, out, report)
    plot(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
