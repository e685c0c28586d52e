"""Tables and figures, regenerated from results files only (``metrics.csv``, logs, prediction caches).

- ``main_table(rows)``: the paper-style table, the published columns (docs/method.md, "Published numbers")
  (one headline metric per task) plus Delta_m, rows trivial, single-task,
  single-stream, multi-stream, VAE ceiling (then any other model), and the
  published numbers as "paper: ..." rows for comparison;
- ``benchmark_table(rows, benchmark)``: every metric of one benchmark;
- markdown and LaTeX renderings, byte-identical for identical inputs;
- figures: training curves from ``train_log.csv`` files, Delta_m terms per
  metric, and a qualitative grid (input, ground truth, models) per benchmark.

A ``metrics.csv`` whose sha256 differs from the one ``evaluate`` recorded (``results.sha256.json``)
was edited after it was written: the tables are made all the same (an edit may be deliberate), but
each table file and ``summary.md`` then end with a warning line and the warning is printed. Tables
from unedited results are byte-identical to those of a kit that recorded no hash.

Delta_m (docs/method.md, "Evaluation") uses ``DELTA_M_METRICS`` (one headline metric per
benchmark, all eight) against the ``single_task`` rows; the per-metric terms are
kept (``delta_m_terms``).
"""

from __future__ import annotations

import math
from pathlib import Path

from stablemtl import metrics
from stablemtl.evaluate import BENCHMARKS, edited_results, read_metrics

MODEL_ORDER = ("trivial", "single_task", "single_stream", "multi_stream", "vae_ceiling")
# (benchmark, column title, display factor) of the published columns: docs/method.md, "Published numbers"
COLUMNS = (
    ("cityscapes_semantic", "Cityscapes mIoU", 100.0),
    ("diode_normal", "DIODE normal mean", 1.0),
    ("kitti_depth", "KITTI AbsRel x100", 100.0),
    ("kitti_flow", "KITTI flow EPE", 1.0),
    ("kitti_scene_flow", "KITTI scene-flow EPE3D", 1.0),
    ("mid_albedo", "MID albedo RMSE", 1.0),
)
# Delta_m and the target check: the headline metric of every benchmark
DELTA_M_METRICS = tuple((name, b.headline) for name, b in BENCHMARKS.items())
# docs/method.md, "Published numbers" (paper v2; a third-party summary): the headline columns, then Delta_m %
PAPER_ROWS = {
    "single-task": (48.17, 22.27, 14.21, 10.36, 0.2735, 0.2551, 0.0),
    "DiffusionMTL": (45.92, 44.56, 24.83, 36.60, 0.3502, 0.3660, -78.76),
    "StableMTL single-stream": (52.57, 23.94, 15.64, 12.76, 0.2618, 0.2077, -1.57),
    "StableMTL multi-stream": (55.79, 23.27, 14.98, 10.76, 0.2313, 0.2016, 4.78),
}


def _values(rows: list[dict]) -> dict:
    """(model, benchmark, metric) -> value, for one run (rows of several runs must be filtered first)."""
    out = {}
    for r in rows:
        key = (r["model"], r["benchmark"], r["metric"])
        if key in out:
            raise ValueError(f"metrics have two values for {key}; pass the rows of one run (column 'run')")
        out[key] = float(r["value"])
    return out


def models_in(rows: list[dict]) -> list[str]:
    present = {r["model"] for r in rows}
    return [m for m in MODEL_ORDER if m in present] + sorted(present - set(MODEL_ORDER))


def delta_m_terms(rows: list[dict], model: str) -> tuple[float, dict] | None:
    """Delta_m of ``model`` against the ``single_task`` rows and its per-metric terms (None when missing)."""
    values = _values(rows)
    mine, base, hib = {}, {}, {}
    for benchmark, metric in DELTA_M_METRICS:
        key = f"{benchmark}/{metric}"
        if (model, benchmark, metric) not in values or ("single_task", benchmark, metric) not in values:
            return None
        mine[key], base[key] = values[(model, benchmark, metric)], values[("single_task", benchmark, metric)]
        hib[key] = metrics.HIGHER_IS_BETTER[metric]
    return metrics.delta_m(mine, base, hib, return_terms=True)


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:.1f}"


def main_table(rows: list[dict], paper: bool = True) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the main table: one headline metric per task and Delta_m %."""
    values = _values(rows)
    header = ["model"] + [title for _, title, _ in COLUMNS] + ["Delta_m %"]
    body = []
    for model in models_in(rows):
        cells = [model]
        for benchmark, _, factor in COLUMNS:
            v = values.get((model, benchmark, BENCHMARKS[benchmark].headline))
            cells.append(_fmt(None if v is None else v * factor))
        dm = delta_m_terms(rows, model)
        cells.append(_fmt(None if dm is None else dm[0]))
        body.append(cells)
    if paper:
        for name, numbers in PAPER_ROWS.items():
            body.append([f"paper: {name}"] + [_fmt(v) for v in numbers])
    return header, body


def benchmark_table(rows: list[dict], benchmark: str) -> tuple[list[str], list[list[str]]]:
    """Every metric of one benchmark, one row per model."""
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; valid: {', '.join(BENCHMARKS)}")
    mine = [r for r in rows if r["benchmark"] == benchmark]
    names = []
    for r in mine:
        if r["metric"] not in names:
            names.append(r["metric"])
    values = _values(mine)
    header = ["model"] + names + ["images"]
    n_images = {r["model"]: r["n_images"] for r in mine}
    body = [[m] + [_fmt(values.get((m, benchmark, k))) for k in names] + [str(n_images[m])] for m in models_in(mine)]
    return header, body


def to_markdown(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def to_latex(header: list[str], body: list[list[str]]) -> str:
    esc = lambda s: s.replace("_", r"\_").replace("%", r"\%")  # noqa: E731
    lines = [r"\begin{tabular}{l" + "r" * (len(header) - 1) + "}", r"\toprule",
             " & ".join(esc(h) for h in header) + r" \\", r"\midrule"]
    lines += [" & ".join(esc(c) for c in row) + r" \\" for row in body]
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def edit_warnings(results_dir, log=print) -> list[str]:
    """``WARNING: ...`` lines for the results CSVs edited since evaluate wrote them (``evaluate.edited_results``),
    each also passed to ``log`` (printed); ``[]`` when every recorded hash matches."""
    lines = [f"WARNING: {message}" for message in edited_results(results_dir, names=("metrics.csv",))]
    for line in lines:
        log(line)
    return lines


def _with_warnings(text: str, warnings: list[str], ext: str) -> str:
    """A rendered table (``md`` or ``tex``) followed by the warning lines (none: unchanged)."""
    if not warnings:
        return text
    mark = "%" if ext == "tex" else ">"
    return text + "\n" + "".join(f"{mark} {w}\n" for w in warnings)


def write_tables(results_dir, run: str | None = None, warnings: list[str] | None = None) -> dict[str, Path]:
    """Write ``tables/main.{md,tex}`` and ``tables/<benchmark>.{md,tex}`` from ``metrics.csv``; an edited
    ``metrics.csv`` is named in a warning line under every table (``warnings``: already computed ones)."""
    results_dir = Path(results_dir)
    warnings = edit_warnings(results_dir) if warnings is None else warnings
    rows = read_metrics(results_dir)
    runs = sorted({r["run"] for r in rows})
    if run is None:
        if len(runs) > 1:
            raise ValueError(f"{results_dir}/metrics.csv holds several runs {runs}; choose one with run=")
        run = runs[0] if runs else None
    rows = [r for r in rows if r["run"] == run]
    out = results_dir / "tables"
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    tables = {"main": main_table(rows)}
    for benchmark in BENCHMARKS:
        if any(r["benchmark"] == benchmark for r in rows):
            tables[benchmark] = benchmark_table(rows, benchmark)
    for name, (header, body) in tables.items():
        for ext, render in (("md", to_markdown), ("tex", to_latex)):
            path = out / f"{name}.{ext}"
            path.write_text(_with_warnings(render(header, body), warnings, ext))
            written[f"{name}.{ext}"] = path
    return written


# --------------------------------------------------------------------------- figures

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


def plot_delta_m(rows: list[dict], out_file, models=("single_stream", "multi_stream")):
    """Delta_m terms per metric (bars), one colour per model."""
    from matplotlib.figure import Figure  # not pyplot: no backend switch, no figure left open
    import numpy as np

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
    import numpy as np
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


def plot_qualitative(results_dir, out_file, models=("single_stream", "multi_stream"), index: int = 0):
    """Per benchmark: input, ground truth and each model's prediction of sample ``index``."""
    from matplotlib.figure import Figure  # not pyplot: no backend switch, no figure left open
    import numpy as np

    results_dir = Path(results_dir)
    rows = []
    for name, b in BENCHMARKS.items():
        files = {m: results_dir / "predictions" / m / name / f"{index:05d}.npz" for m in models}
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


def target_check(rows: list[dict]) -> tuple[list[dict], bool]:
    """The demo's targets per benchmark headline metric: each trained model beats the trivial row, and
    multi-stream is not worse than single-stream on average (mean signed relative change >= 0).

    Returns (one dict per benchmark, then the row ``"mean"``; passed).
    """
    values = _values(rows)
    table, ok, changes = [], True, []
    for benchmark, metric in DELTA_M_METRICS:
        hib = metrics.HIGHER_IS_BETTER[metric]
        t, s, m = (values.get((model, benchmark, metric)) for model in ("trivial", "single_stream", "multi_stream"))
        better = lambda a, b: a is not None and b is not None and (a > b if hib else a < b)  # noqa: E731
        row = {"benchmark": benchmark, "metric": metric + (" (higher better)" if hib else " (lower better)"),
               "trivial": t, "single_stream": s, "multi_stream": m,
               "single beats trivial": better(s, t), "multi beats trivial": better(m, t)}
        if s is not None and m is not None and s != 0:
            row["multi vs single %"] = (m - s) / abs(s) * (1 if hib else -1) * 100
            changes.append(row["multi vs single %"])
        ok = ok and row["single beats trivial"] and row["multi beats trivial"]
        table.append(row)
    mean_change = sum(changes) / len(changes) if len(changes) == len(DELTA_M_METRICS) else None
    table.append({"benchmark": "mean", "metric": "multi vs single (signed relative change)",
                  "multi vs single %": mean_change})
    return table, bool(ok and mean_change is not None and mean_change >= 0)


def format_target_check(table: list[dict], passed: bool) -> str:
    """The target check as the fixed-width text of ``summary.md`` and the end of ``stablemtl run``."""
    f = lambda v: "-" if v is None or v != v else f"{v:.4g}"  # noqa: E731
    mark = lambda b: "*" if b else " "  # noqa: E731
    lines = [f"{'benchmark':<20}{'metric':<24}{'trivial':>10}{'single':>10}{'multi':>10}{'multi vs single':>17}"]
    for r in table:
        change = f(r.get("multi vs single %")) + " %"
        if r["benchmark"] == "mean":
            lines.append(f"{'mean':<20}{'':<24}{'':>30}{change:>17}")
            continue
        lines.append(f"{r['benchmark']:<20}{r['metric'].split(' ')[0]:<24}{f(r['trivial']):>10}"
                     f"{f(r['single_stream']) + mark(r['single beats trivial']):>10}"
                     f"{f(r['multi_stream']) + mark(r['multi beats trivial']):>10}{change:>17}")
    lines.append("* = beats the trivial baseline.  Targets " + ("MET" if passed else "NOT MET") +
                 ": both models beat trivial on every benchmark and multi-stream is not worse than single-stream "
                 "on average.")
    return "\n".join(lines)


def write_report(results_dir, training_logs: dict | None = None, run: str | None = None,
                 title: str | None = None) -> dict[str, Path]:
    """Tables, every figure the inputs allow (``<results_dir>/tables``, ``figures``) and ``summary.md``
    (the target check of ``run``'s rows, under the heading ``title``)."""
    results_dir = Path(results_dir)
    warnings = edit_warnings(results_dir)
    written = write_tables(results_dir, run, warnings)
    figures = results_dir / "figures"
    figures.mkdir(exist_ok=True)
    rows = [r for r in read_metrics(results_dir) if run is None or r["run"] == run]
    table, passed = target_check(rows)
    summary = results_dir / "summary.md"
    summary.write_text(_with_warnings(f"# {title or 'Run ' + str(run)}\n\n```\n{format_target_check(table, passed)}"
                                      f"\n```\n", warnings, "md"))
    written["summary.md"] = summary
    if training_logs:
        written["training_curves.png"] = plot_training_curves(training_logs, figures / "training_curves.png")
    if any(delta_m_terms(rows, m) for m in ("single_stream", "multi_stream")):
        written["delta_m.png"] = plot_delta_m(rows, figures / "delta_m.png")
    models = [m for m in ("single_stream", "multi_stream") if (results_dir / "predictions" / m).is_dir()]
    if models:
        written["qualitative.png"] = plot_qualitative(results_dir, figures / "qualitative.png", models)
    return written
