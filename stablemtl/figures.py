"""The figures of a results folder, drawn from its result files only (``metrics.csv``, ``per_sample.csv``,
training logs, the prediction cache): training curves from ``train_log.csv`` files, Delta_m terms per metric,
the gap closed, the per-image distributions behind the tables' means (seaborn), and a qualitative grid
(input, ground truth, models) per benchmark.

The numbers come from ``stablemtl.comparisons`` (as those of the tables); ``write_figures`` writes every
figure the inputs allow (``report.write_report`` calls it). Importing this module imports neither
matplotlib nor torch: each function imports what it draws with.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np

from stablemtl.benchmarks import BENCHMARKS
from stablemtl.comparisons import (DELTA_M_METRICS, GAP_TARGET, delta_m_terms, gap_closed, seed_key, seed_values,
                                   seeds_of, stat)
from stablemtl.metrics import HIGHER_IS_BETTER
from stablemtl.paths import KINDS, MODELS, SAMPLES_FILE
from stablemtl.results import SAMPLE_FIELDS, CsvRows, prediction_folder

GAP_MODELS = ("single_stream_random", "single_stream", "multi_stream")  # the bars of gap_closed.png
PER_SAMPLE_FIGURE = "per_sample_distributions.png"
# the tasks whose headline metric the tables pool over the pixels of all images (stablemtl.metrics:
# SemanticConfusion, FlowAccumulator, SceneFlowAccumulator) instead of averaging the per-image values: there the
# mean of the per-image values differs from the table's number, which the figure marks apart
POOLED_TASKS = ("semantic", "optical_flow", "scene_flow")


def plot_training_curves(log_files: dict, out_file, smooth: int = 10):
    """Loss per task against the step for each run (``{label: train_log.csv}``), one panel per task."""
    from matplotlib.figure import Figure  # not pyplot: no backend switch, no figure left open
    import pandas as pd

    frames = []
    for label, path in log_files.items():
        df = pd.read_csv(path)
        df["run"] = label
        frames.append(df)
    if not frames:
        raise ValueError("no training log given")
    data = pd.concat(frames)
    tasks = list(dict.fromkeys(data["task"]))
    fig = Figure(figsize=(2.6 * len(tasks), 2.6))
    axes = fig.subplots(1, len(tasks), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for label, df in data[data["task"] == task].groupby("run", sort=False):
            ax.plot(df["step"], df["loss"].rolling(smooth, min_periods=1).mean(), label=label)
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("step")
        ax.set_yscale("log")
    axes[0][0].set_ylabel("latent MSE")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_file, dpi=110)
    return Path(out_file)


def plot_delta_m(rows: list[dict], out_file, models=KINDS):
    """Delta_m terms per metric (bars), one colour per model."""
    from matplotlib.figure import Figure  # not pyplot: no backend switch, no figure left open

    found = {m: delta_m_terms(rows, m) for m in models}
    found = {m: t for m, t in found.items() if t is not None}
    if not found:
        raise ValueError("Delta_m needs single_task rows and the models' rows for every metric of DELTA_M_METRICS")
    keys = [f"{b}/{m}" for b, m in DELTA_M_METRICS]
    fig = Figure(figsize=(8, 3))
    ax = fig.subplots()
    width = 0.8 / len(found)
    for i, (model, (total, terms)) in enumerate(found.items()):
        ax.bar(np.arange(len(keys)) + i * width, [terms[k] for k in keys], width, label=f"{model} ({total:+.1f} %)")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(np.arange(len(keys)) + 0.4 - width / 2, keys, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("Delta_m term (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_file, dpi=110)
    return Path(out_file)


def colorize_cached(task: str, array, valid=None):
    """A cached prediction / ground truth (numpy, [H, W] or [H, W, C]) as uint8 RGB."""
    import torch

    from stablemtl.tasks import get_task

    x = torch.from_numpy(np.asarray(array))
    x = x[None, None] if x.ndim == 2 else x.permute(2, 0, 1)[None]
    v = None if valid is None else torch.from_numpy(np.asarray(valid, dtype=bool))[None, None]
    if task == "depth":  # metric ground truth or relative prediction: each scaled to its valid range
        vals = x[v.expand_as(x)] if v is not None else x.flatten()
        lo, hi = (float(vals.min()), float(vals.max())) if vals.numel() else (0.0, 1.0)
        return get_task(task).colorize(x.float(), v, value_range=(lo, hi if hi > lo else lo + 1))[0]
    if task == "semantic":
        return get_task(task).colorize(x.long(), v)[0]
    return get_task(task).colorize(x.float(), v)[0]


def plot_qualitative(results_dir, out_file, models=KINDS, index: int = 0):
    """Per benchmark: input, ground truth and each model's prediction of sample ``index`` (of its first
    seed, ``results.prediction_folder``)."""
    from matplotlib.figure import Figure  # not pyplot: no backend switch, no figure left open

    results_dir = Path(results_dir)
    rows = []
    for name, b in BENCHMARKS.items():
        files = {m: prediction_folder(results_dir, m)[0] / name / f"{index:05d}.npz" for m in models}
        files = {m: f for m, f in files.items() if f.is_file()}
        if files:
            rows.append((name, b.task, files))
    if not rows:
        raise FileNotFoundError(f"{results_dir}/predictions: no cached predictions of {list(models)}")
    cols = 2 + len(models)
    fig = Figure(figsize=(2.4 * cols, 1.6 * len(rows)))
    axes = fig.subplots(len(rows), cols, squeeze=False)
    for r, (name, task, files) in enumerate(rows):
        with np.load(next(iter(files.values()))) as first:
            images = [("input", first["rgb"]), ("ground truth", colorize_cached(task, first["gt"], first["valid"]))]
        for m in models:
            if m in files:
                with np.load(files[m]) as stored:
                    images.append((m, colorize_cached(task, stored["pred"])))
            else:
                images.append((m, None))
        for c, (title, img) in enumerate(images):
            ax = axes[r][c]
            ax.axis("off")
            if img is not None:
                ax.imshow(img)
            if r == 0:
                ax.set_title(title, fontsize=8)
        axes[r][0].text(-0.05, 0.5, name, transform=axes[r][0].transAxes, rotation=90, va="center", ha="right", fontsize=7)
    fig.tight_layout()
    fig.savefig(out_file, dpi=110)
    return Path(out_file)


def plot_gap_closed(rows: list[dict], out_file, models=GAP_MODELS):
    """Gap closed per benchmark and its mean (bars: the mean over seeds, error bars: the std), one colour
    per model of ``models`` present, the target ``GAP_TARGET`` as a line; the y axis is clipped to
    [-0.5, 1.1] (a model far below the trivial row runs off the bottom)."""
    from matplotlib.figure import Figure  # not pyplot: no backend switch, no figure left open

    gaps = gap_closed(rows)
    found = [m for m in models if gaps and m in gaps]
    if not found:
        raise ValueError(f"the gap closed needs trivial and vae_ceiling rows and rows of one of {list(models)}")
    keys = list(BENCHMARKS) + ["mean"]
    fig = Figure(figsize=(9, 3.2))
    ax = fig.subplots()
    width = 0.8 / len(found)
    for i, model in enumerate(found):
        stats = [stat(gaps[model].get(k, {}).values()) for k in keys]
        ax.bar(np.arange(len(keys)) + i * width, [s.mean if s else np.nan for s in stats], width,
               yerr=[s.std if s else 0.0 for s in stats], capsize=2,
               label=f"{model} (n={len(seeds_of(rows, model))})")
    ax.axhline(0, color="k", lw=0.8)
    ax.axhline(GAP_TARGET, color="tab:red", ls="--", lw=1, label=f"target {GAP_TARGET:g}")
    ax.set_ylim(-0.5, 1.1)
    ax.set_xticks(np.arange(len(keys)) + 0.4 - width / 2, keys, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("gap closed (0 trivial, 1 VAE ceiling)", fontsize=8)
    ax.legend(fontsize=7, ncol=len(found) + 1, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(out_file, dpi=110)
    return Path(out_file)


class PerSampleFigure(NamedTuple):
    """What ``plot_per_sample`` drew: the PNG, the matplotlib ``Figure`` (one Axes per benchmark, in
    ``BENCHMARKS`` order; the mean markers are its collections of gid ``"mean"``, the table's pooled values
    those of gid ``"table"``) and one dict per (benchmark, model) drawn: benchmark, metric, model, mean (the
    marked one: the mean over the seeds of each seed's mean over its images, as the tables average seeds),
    seeds, images (the values drawn) and table (the table's value, the mean over the seeds of ``rows``; None
    without rows)."""
    path: Path
    figure: object
    means: list[dict]


def read_samples(samples, run: str | None = None) -> list[dict]:
    """The rows of ``run`` (None: the only run there is) of a ``per_sample.csv``: ``samples`` is a results
    folder, the file, or its rows already read."""
    if isinstance(samples, (str, Path)):
        path = Path(samples) / SAMPLES_FILE if Path(samples).is_dir() else Path(samples)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no per-image metrics (stablemtl.evaluate writes {SAMPLES_FILE})")
        samples = CsvRows(path, SAMPLE_FIELDS).read()
    runs = sorted({r["run"] for r in samples})
    if run is None and len(runs) > 1:
        raise ValueError(f"the per-image rows hold several runs {runs}; choose one with run=")
    run = runs[0] if run is None and runs else run
    return [r for r in samples if r["run"] == run]


def headline_samples(samples: list[dict], models=MODELS) -> dict[str, dict]:
    """{benchmark: {model: {seed: [finite per-image values of the benchmark's headline metric]}}} of one run's
    per-image rows, models in the order of ``models`` (those without values left out), seeds in ``seed_key``
    order; a benchmark without per-image values of its headline metric maps to ``{}``."""
    found: dict = {name: {} for name in BENCHMARKS}
    for r in samples:
        b = BENCHMARKS.get(r["benchmark"])
        value = float(r["value"])
        if b is not None and r["metric"] == b.headline and r["model"] in models and math.isfinite(value):
            found[b.name].setdefault(r["model"], {}).setdefault(r.get("seed", ""), []).append(value)
    return {name: {m: dict(sorted(per[m].items(), key=lambda kv: seed_key(kv[0]))) for m in models if m in per}
            for name, per in found.items()}


def plot_per_sample(samples, out_file, models=MODELS, rows: list[dict] | None = None,
                    run: str | None = None) -> PerSampleFigure:
    """The spread behind each mean of the tables: per benchmark (2 x 4 panels), the per-image values of its
    headline metric, one row per model of ``models`` present (box: quartiles and 1.5 IQR whiskers; dots: every
    image of every seed, pooled; white diamond: the mean, over the seeds of each seed's mean over its images).
    ``samples``: see ``read_samples``. Where the tables pool the metric over pixels (``POOLED_TASKS``) the
    mean of the per-image values is not the table's number: the panel says so, and with ``rows`` (the run's
    rows of ``metrics.csv``) the table's value is marked too (black bar)."""
    from matplotlib.figure import Figure  # not pyplot: no backend switch, no figure left open
    from matplotlib.lines import Line2D
    import pandas as pd
    import seaborn as sns

    found = headline_samples(read_samples(samples, run), models)
    order = [m for m in models if any(m in per for per in found.values())]
    if not order:
        raise ValueError(f"no per-image values of the headline metrics for any of {list(models)}")
    table = {k: stat(v.values()).mean for k, v in seed_values(rows).items()} if rows else {}
    palette = dict(zip(order, sns.color_palette("colorblind", len(order))))
    n_seeds = {m: max(len(per[m]) for per in found.values() if m in per) for m in order}
    labels = [f"{m} ({n_seeds[m]} seeds)" if n_seeds[m] > 1 else m for m in order]
    fig = Figure(figsize=(13, 1.0 + 0.7 * len(order)))
    axes = fig.subplots(2, 4)
    means = []
    for i, (ax, (name, b)) in enumerate(zip(axes.flat, BENCHMARKS.items())):
        metric, per = b.headline, found[name]
        ax.set_title(name + (" (table: pooled over pixels)" if b.task in POOLED_TASKS else ""), fontsize=8)
        data = pd.DataFrame([(m, v) for m, seeds in per.items() for values in seeds.values() for v in values],
                            columns=["model", "value"])
        if data.empty:
            ax.text(0.5, 0.5, f"no per-image {metric}", transform=ax.transAxes, ha="center", va="center", fontsize=8)
            ax.set_ylim(len(order) - 0.5, -0.5)
        else:
            style = dict(data=data, x="value", y="model", order=order, hue="model", hue_order=order,
                         palette=palette, legend=False, ax=ax)
            with warnings.catch_warnings():  # seaborn 0.13.2 passes matplotlib 3.11's deprecated vert= to bxp
                warnings.filterwarnings("ignore", message="vert: bool was deprecated")
                sns.boxplot(**style, fill=False, showfliers=False, width=0.6, linewidth=0.9)
            state = np.random.get_state()  # the strip's jitter draws from numpy's global generator: seeded here
            np.random.seed(0)
            try:
                sns.stripplot(**style, size=2.5, alpha=0.55, jitter=0.22, zorder=1)
            finally:
                np.random.set_state(state)
            drawn = [dict(benchmark=name, metric=metric, model=m, mean=stat(math.fsum(v) / len(v) for v in
                                                                             seeds.values()).mean,
                          seeds=len(seeds), images=sum(map(len, seeds.values())), table=table.get((m, name, metric)))
                     for m, seeds in per.items()]
            means += drawn
            ys = [order.index(d["model"]) for d in drawn]
            ax.scatter([d["mean"] for d in drawn], ys, marker="D", s=26, facecolor="white", edgecolor="black",
                       linewidth=0.9, zorder=5, gid="mean")
            shown = [(d["table"], y) for d, y in zip(drawn, ys) if d["table"] is not None]
            if b.task in POOLED_TASKS and shown:
                ax.scatter(*zip(*shown), marker="|", s=140, color="black", linewidth=1.6, zorder=6, gid="table")
        ax.set_yticks(range(len(order)), labels if i % 4 == 0 else [""] * len(order))
        ax.set_xlabel(f"{metric} per image ({'higher' if HIGHER_IS_BETTER[metric] else 'lower'} is better)",
                      fontsize=8)
        ax.set_ylabel("")
        ax.tick_params(labelsize=7)
        ax.grid(axis="x", alpha=0.3)
    handles = [Line2D([], [], ls="", marker="o", ms=3, color="grey", alpha=0.6, label="one image (all seeds)"),
               Line2D([], [], ls="", marker="D", ms=5, mfc="white", mec="black",
                      label="mean (over seeds of the per-seed mean)"),
               Line2D([], [], color="grey", lw=0.9, label="box: quartiles, whiskers 1.5 IQR")]
    if any(d["table"] is not None for d in means):
        handles.append(Line2D([], [], ls="", marker="|", ms=10, mew=1.6, color="black",
                              label="table value (pooled over pixels)"))
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(out_file, dpi=110)
    return PerSampleFigure(Path(out_file), fig, means)


def write_figures(results_dir, rows: list[dict], training_logs: dict | None = None) -> dict[str, Path]:
    """Every figure the inputs allow, in ``<results_dir>/figures``: the training curves of ``training_logs``
    (``{label: train_log.csv}``), the Delta_m terms and the gap closed of ``rows`` (one run's rows of
    ``metrics.csv``), the per-image distributions of that run's rows of ``per_sample.csv`` and the
    qualitative grid of the cached predictions; a gap-closed or per-image figure left from earlier results is
    removed when the inputs no longer allow one."""
    results_dir = Path(results_dir)
    folder = results_dir / "figures"
    folder.mkdir(exist_ok=True)
    written = {}
    if training_logs:
        written["training_curves.png"] = plot_training_curves(training_logs, folder / "training_curves.png")
    if any(delta_m_terms(rows, m) for m in KINDS):
        written["delta_m.png"] = plot_delta_m(rows, folder / "delta_m.png")
    gaps = gap_closed(rows)
    if gaps and any(m in gaps for m in GAP_MODELS):
        written["gap_closed.png"] = plot_gap_closed(rows, folder / "gap_closed.png")
    else:
        (folder / "gap_closed.png").unlink(missing_ok=True)
    samples = read_samples(results_dir, rows[0]["run"]) if rows and (results_dir / SAMPLES_FILE).is_file() else []
    if any(headline_samples(samples).values()):
        written[PER_SAMPLE_FIGURE] = plot_per_sample(samples, folder / PER_SAMPLE_FIGURE, rows=rows).path
    else:
        (folder / PER_SAMPLE_FIGURE).unlink(missing_ok=True)
    models = [m for m in KINDS if (results_dir / "predictions" / m).is_dir()]
    if models:
        written["qualitative.png"] = plot_qualitative(results_dir, folder / "qualitative.png", models)
    return written
