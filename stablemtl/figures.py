"""The figures of a results folder, drawn from its result files only (``metrics.csv``, training logs,
the prediction cache): training curves from ``train_log.csv`` files, Delta_m terms per metric, the gap
closed, and a qualitative grid (input, ground truth, models) per benchmark.

The numbers come from ``stablemtl.comparisons`` (as those of the tables); ``write_figures`` writes every
figure the inputs allow (``report.write_report`` calls it). Importing this module imports neither
matplotlib nor torch: each function imports what it draws with.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stablemtl.benchmarks import BENCHMARKS
from stablemtl.comparisons import DELTA_M_METRICS, GAP_TARGET, delta_m_terms, gap_closed, seeds_of, stat
from stablemtl.paths import KINDS
from stablemtl.results import prediction_folder

GAP_MODELS = ("single_stream_random", "single_stream", "multi_stream")  # the bars of gap_closed.png


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


def write_figures(results_dir, rows: list[dict], training_logs: dict | None = None) -> dict[str, Path]:
    """Every figure the inputs allow, in ``<results_dir>/figures``: the training curves of ``training_logs``
    (``{label: train_log.csv}``), the Delta_m terms and the gap closed of ``rows`` (one run's rows of
    ``metrics.csv``) and the qualitative grid of the cached predictions; a gap-closed figure left from
    earlier results is removed when the rows no longer allow one."""
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
    models = [m for m in KINDS if (results_dir / "predictions" / m).is_dir()]
    if models:
        written["qualitative.png"] = plot_qualitative(results_dir, folder / "qualitative.png", models)
    return written
