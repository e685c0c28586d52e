"""Tables and figures, regenerated from results files only (``metrics.csv``, logs, prediction caches).

- ``main_table(rows)``: the paper-style table, the published columns (docs/method.md, "Published numbers")
  (one headline metric per task) plus Delta_m, rows trivial, single-task, single-stream from the random
  UNet (the prior's ablation), single-stream, multi-stream, VAE ceiling (then any other model), and the
  published numbers as "paper: ..." rows for comparison;
- ``benchmark_table(rows, benchmark)``: every metric of one benchmark;
- ``differences_table(rows)``: the signed relative change of multi- vs single-stream and of the
  single stream from the prior vs from the random UNet, paired by seed;
- ``gap_closed_table(rows)``: how much of the gap between the trivial row and the VAE ceiling a model closes;
- ``target_check(rows)``: the demo's targets, as ``summary.md`` and the end of ``stablemtl run`` print them;
- markdown and LaTeX renderings, byte-identical for identical inputs;
- figures: training curves from ``train_log.csv`` files, Delta_m terms per metric, the gap closed,
  and a qualitative grid (input, ground truth, models) per benchmark.

Seeds: a model evaluated for several training seeds (column ``seed``) has one value per seed; the
tables show ``mean ± std`` (sample std, ddof 1) over the seeds and their number, a single seed (or
the seed-independent rows, seed ``""``) a plain number. Comparisons are made per seed, then
summarised: Delta_m against ``single_task`` of the same seed (else the mean of its seeds), the
differences paired by seed.

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
from typing import NamedTuple

from stablemtl import metrics
from stablemtl.evaluate import BENCHMARKS, edited_results, prediction_folder, read_metrics

MODEL_ORDER = ("trivial", "single_task", "single_stream_random", "single_stream", "multi_stream", "vae_ceiling")
REFERENCES = ("trivial", "vae_ceiling")  # seed-independent rows: the floor and the ceiling of every benchmark
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
# the paired differences: (model, reference, name); positive = the model is better
PAIRS = (("multi_stream", "single_stream", "multi vs single"),
         ("single_stream", "single_stream_random", "prior vs random"))
GAP_MODELS = ("single_stream_random", "single_stream", "multi_stream")  # the bars of gap_closed.png
GAP_TARGET = 0.5  # the multi stream's mean gap closed must reach it (target check, condition c)
NORMAL_TARGET = 45.0  # degrees: the multi stream's DIODE normal mean angle must stay under it (condition d)


def _direction(metric: str) -> str:
    return "higher better" if metrics.HIGHER_IS_BETTER[metric] else "lower better"


HEADLINES_TEXT = ", ".join(f"{b}/{m} ({_direction(m)})" for b, m in DELTA_M_METRICS)
MAIN_NOTES = (
    f"Delta_m %: the mean over {HEADLINES_TEXT} of the signed relative change (positive = better) against "
    "single_task of the same seed (else the mean of single_task over its seeds), per seed.",
    "Cells: mean ± sample std over the seeds when a model has more than one; seeds: their number. "
    "paper: the published numbers on the real benchmarks, for scale only.",
)


# --------------------------------------------------------------------------- values per seed

class Stat(NamedTuple):
    """Mean, sample standard deviation (ddof 1; 0 for one value) and number of values (seeds)."""
    mean: float
    std: float
    n: int


def stat(values) -> Stat | None:
    """The ``Stat`` of ``values`` (None when there are none); sums in a fixed order for exact reruns."""
    values = [float(v) for v in values]
    if not values:
        return None
    n = len(values)
    if all(v == values[0] for v in values):  # exactly, without the rounding of a sum (NaN: never equal)
        return Stat(values[0], 0.0, n)
    mean = math.fsum(values) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return Stat(mean, std, n)


def seed_key(seed: str):
    """Sort key of the ``seed`` column: the seed-independent ``""`` first, then the seeds as numbers
    (then any other text, as text)."""
    try:
        return (1, int(seed), seed)
    except ValueError:
        return (0 if seed == "" else 2, 0, seed)


def _values(rows: list[dict]) -> dict:
    """(model, benchmark, metric) -> {seed: value}, seeds in ``seed_key`` order, for one run (rows of
    several runs must be filtered first). Rows without a ``seed`` (an older CSV) have seed ``""``."""
    out: dict = {}
    for r in rows:
        key, seed = (r["model"], r["benchmark"], r["metric"]), r.get("seed", "")
        seeds = out.setdefault(key, {})
        if seed in seeds:
            raise ValueError(f"metrics have two values for {key} of seed {seed!r}; pass the rows of one run "
                             f"(column 'run')")
        seeds[seed] = float(r["value"])
    return {k: dict(sorted(v.items(), key=lambda kv: seed_key(kv[0]))) for k, v in out.items()}


def aggregate(rows: list[dict]) -> dict:
    """(model, benchmark, metric) -> ``Stat`` over the seeds."""
    return {k: stat(v.values()) for k, v in _values(rows).items()}


def seeds_of(rows: list[dict], model: str) -> list[str]:
    """The seeds of ``model``'s rows, in ``seed_key`` order (``[""]`` for a seed-independent row)."""
    return sorted({r.get("seed", "") for r in rows if r["model"] == model}, key=seed_key)


def models_in(rows: list[dict]) -> list[str]:
    present = {r["model"] for r in rows}
    return [m for m in MODEL_ORDER if m in present] + sorted(present - set(MODEL_ORDER))


def _mean(values: dict) -> float:
    return math.fsum(values.values()) / len(values)


def _change(value: float, reference: float, metric: str) -> float | None:
    """Signed relative change in %, positive = better (None against a zero reference)."""
    if reference == 0:
        return None
    return (value - reference) / abs(reference) * (1 if metrics.HIGHER_IS_BETTER[metric] else -1) * 100


# --------------------------------------------------------------------------- Delta_m, differences, gap closed

def delta_m_per_seed(rows: list[dict], model: str) -> dict[str, tuple[float, dict]]:
    """{seed: (Delta_m, per-metric terms)} of ``model``, each seed against ``single_task`` of the same
    seed where it has that metric's row, else against the mean of ``single_task`` over its seeds;
    seeds missing a metric of ``DELTA_M_METRICS`` are left out."""
    values, out = _values(rows), {}
    for seed in seeds_of(rows, model):
        mine, base, hib = {}, {}, {}
        for benchmark, metric in DELTA_M_METRICS:
            own, ref = values.get((model, benchmark, metric), {}), values.get(("single_task", benchmark, metric))
            if seed not in own or not ref:
                break
            key = f"{benchmark}/{metric}"
            mine[key], base[key] = own[seed], ref[seed] if seed in ref else _mean(ref)
            hib[key] = metrics.HIGHER_IS_BETTER[metric]
        else:
            out[seed] = metrics.delta_m(mine, base, hib, return_terms=True)
    return out


def delta_m_terms(rows: list[dict], model: str) -> tuple[float, dict] | None:
    """Delta_m of ``model`` against the ``single_task`` rows and its per-metric terms, each the mean over
    the model's seeds (``delta_m_per_seed``); None when a metric is missing."""
    per_seed = list(delta_m_per_seed(rows, model).values())
    if not per_seed:
        return None
    terms = {k: math.fsum(t[k] for _, t in per_seed) / len(per_seed) for k in per_seed[0][1]}
    return math.fsum(total for total, _ in per_seed) / len(per_seed), terms


def paired_changes(rows: list[dict], model: str, reference: str) -> dict[str, dict[str, float]]:
    """{benchmark: {seed: signed relative change % of ``model`` vs ``reference``}} on each headline metric,
    paired by seed (seeds both have), and ``"mean"``: per seed, the mean over the eight benchmarks."""
    values, out = _values(rows), {}
    for benchmark, metric in DELTA_M_METRICS:
        a, b = values.get((model, benchmark, metric), {}), values.get((reference, benchmark, metric), {})
        changes = {s: _change(a[s], b[s], metric) for s in a if s in b}
        out[benchmark] = {s: c for s, c in changes.items() if c is not None}
    complete = [s for s in seeds_of(rows, model) if all(s in out[b] for b, _ in DELTA_M_METRICS)]
    out["mean"] = {s: math.fsum(out[b][s] for b, _ in DELTA_M_METRICS) / len(DELTA_M_METRICS) for s in complete}
    return out


def gap_closed(rows: list[dict]) -> dict[str, dict[str, dict[str, float]]] | None:
    """{model: {benchmark: {seed: (trivial - model) / (trivial - vae_ceiling)}}} on each headline metric
    (1 = the VAE ceiling, 0 = the trivial row; the same ratio of signed differences for higher-is-better
    metrics), ``trivial`` and ``vae_ceiling`` taken as the mean of their rows, and ``"mean"``: per seed,
    the mean over the eight benchmarks. None without ``trivial`` and ``vae_ceiling`` rows."""
    values, refs = _values(rows), {}
    for benchmark, metric in DELTA_M_METRICS:
        t, v = values.get(("trivial", benchmark, metric)), values.get(("vae_ceiling", benchmark, metric))
        if t and v and _mean(t) != _mean(v):
            refs[benchmark] = (_mean(t), _mean(v), metric)
    if not refs:
        return None
    out = {}
    for model in models_in(rows):
        if model in REFERENCES:
            continue
        per = {b: {s: (t - x) / (t - v) for s, x in values.get((model, b, metric), {}).items()}
               for b, (t, v, metric) in refs.items()}
        complete = [s for s in seeds_of(rows, model) if len(refs) == len(DELTA_M_METRICS)
                    and all(s in per[b] for b in refs)]
        per["mean"] = {s: math.fsum(per[b][s] for b in refs) / len(refs) for s in complete}
        out[model] = per
    return out


# --------------------------------------------------------------------------- tables

def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:.1f}"


def _pm(s: Stat | None, factor: float = 1.0, digits: int = 4) -> str:
    """``mean ± std`` of a ``Stat`` (std to 2 digits), the plain mean for one seed, ``-`` for none."""
    if s is None:
        return "-"
    mean = _fmt(s.mean * factor, digits)
    return mean if s.n < 2 else f"{mean} ± {_fmt(s.std * factor, 2)}"


def _seeds_cell(rows: list[dict], model: str) -> str:
    """The number of training seeds of ``model``'s rows; ``-`` for the seed-independent reference rows."""
    return "-" if model in REFERENCES else str(len(seeds_of(rows, model)))


def main_table(rows: list[dict], paper: bool = True) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the main table: one headline metric per task, Delta_m % and the number of seeds."""
    stats = aggregate(rows)
    header = ["model"] + [title for _, title, _ in COLUMNS] + ["Delta_m %", "seeds"]
    body = []
    for model in models_in(rows):
        cells = [model] + [_pm(stats.get((model, b, BENCHMARKS[b].headline)), factor) for b, _, factor in COLUMNS]
        dm = stat(total for total, _ in delta_m_per_seed(rows, model).values())
        body.append(cells + [_pm(dm), _seeds_cell(rows, model)])
    if paper:
        for name, numbers in PAPER_ROWS.items():
            body.append([f"paper: {name}"] + [_fmt(v) for v in numbers] + ["-"])
    return header, body


def benchmark_table(rows: list[dict], benchmark: str) -> tuple[list[str], list[list[str]]]:
    """Every metric of one benchmark, one row per model (mean ± std over its seeds)."""
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; valid: {', '.join(BENCHMARKS)}")
    mine = [r for r in rows if r["benchmark"] == benchmark]
    names = list(dict.fromkeys(r["metric"] for r in mine))
    stats = aggregate(mine)
    header = ["model"] + names + ["images", "seeds"]
    body = []
    for m in models_in(mine):
        images = "/".join(sorted({str(r["n_images"]) for r in mine if r["model"] == m}, key=seed_key))
        body.append([m] + [_pm(stats.get((m, benchmark, k))) for k in names] + [images, _seeds_cell(mine, m)])
    return header, body


def differences_table(rows: list[dict]) -> tuple[list[str], list[list[str]]] | None:
    """Per headline metric and their average (last row): each pair of ``PAIRS`` present (a column and its
    number of seeds), the signed relative change in % (positive = better) paired by seed, mean ± std.
    None when no pair is present."""
    found = [(m, r, paired_changes(rows, m, r)) for m, r, _ in PAIRS]
    found = [(m, r, ch) for m, r, ch in found if any(ch.values())]
    if not found:
        return None
    header = ["benchmark", "metric"] + [h for m, r, _ in found for h in (f"{m} vs {r} %", "seeds")]
    body = []
    for benchmark, metric in DELTA_M_METRICS + (("mean", None),):
        cells = [benchmark, f"{metric} ({_direction(metric)})" if metric else "the eight above"]
        for _, _, changes in found:
            cells += [_pm(stat(changes[benchmark].values()), digits=3), str(len(changes[benchmark]))]
        body.append(cells)
    return header, body


DIFFERENCES_NOTES = ("Signed relative change of the first model vs the second in % (positive = the first is better), "
                     "computed per seed on the seeds both have (paired), then mean ± sample std over the seeds; "
                     "mean: per seed, the mean over the eight benchmarks.",)


def gap_closed_table(rows: list[dict]) -> tuple[list[str], list[list[str]]] | None:
    """Per model (not the references): the gap closed on each benchmark and their mean, mean ± std over
    the seeds; None without ``trivial`` and ``vae_ceiling`` rows."""
    gaps = gap_closed(rows)
    if gaps is None:
        return None
    header = ["model"] + list(BENCHMARKS) + ["mean", "seeds"]
    body = [[model] + [_pm(stat(per.get(b, {}).values()), digits=3) for b in list(BENCHMARKS) + ["mean"]]
            + [str(len(seeds_of(rows, model)))] for model, per in gaps.items()]
    return header, body


GAP_NOTES = ("Gap closed = (trivial - model) / (trivial - vae_ceiling) on each benchmark's headline metric "
             "(1 = the VAE ceiling, 0 = the trivial row), per seed, then mean ± sample std over the seeds; "
             "mean: per seed, the mean over the eight benchmarks.",)


def to_markdown(header: list[str], body: list[list[str]], notes=()) -> str:
    """A markdown table, then each note as a paragraph."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines) + "\n" + "".join(f"\n{note}\n" for note in notes)


def to_latex(header: list[str], body: list[list[str]], notes=()) -> str:
    """A booktabs tabular (``±`` as ``$\\pm$``), then each note as a comment line."""
    esc = lambda s: s.replace("_", r"\_").replace("%", r"\%").replace("±", r"$\pm$")  # noqa: E731
    lines = [r"\begin{tabular}{l" + "r" * (len(header) - 1) + "}", r"\toprule",
             " & ".join(esc(h) for h in header) + r" \\", r"\midrule"]
    lines += [" & ".join(esc(c) for c in row) + r" \\" for row in body]
    lines += [r"\bottomrule", r"\end{tabular}"] + ["% " + note.replace("±", r"$\pm$") for note in notes]
    return "\n".join(lines) + "\n"


def table_text(results_dir, name: str) -> str:
    """The markdown of ``tables/<name>.md`` of a results folder, or a line saying why there is none."""
    path = Path(results_dir) / "tables" / f"{name}.md"
    if path.is_file():
        return path.read_text()
    why = {"differences": "no pair of models evaluated on the same seeds",
           "gap_closed": "no trivial and vae_ceiling rows"}.get(name, "not written")
    return f"*No `{path}`: {why}.*\n"


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


def run_rows(results_dir, run: str | None = None) -> tuple[str | None, list[dict]]:
    """The run and its rows of ``<results_dir>/metrics.csv`` (``run`` None: the only run there is)."""
    rows = read_metrics(results_dir)
    runs = sorted({r["run"] for r in rows})
    if run is None:
        if len(runs) > 1:
            raise ValueError(f"{results_dir}/metrics.csv holds several runs {runs}; choose one with run=")
        run = runs[0] if runs else None
    return run, [r for r in rows if r["run"] == run]


def tables(rows: list[dict]) -> dict[str, tuple]:
    """{name: (header, body, notes)} of every table the rows allow: main, one per benchmark, differences,
    gap_closed."""
    out = {"main": main_table(rows) + (MAIN_NOTES,)}
    for benchmark in BENCHMARKS:
        if any(r["benchmark"] == benchmark for r in rows):
            out[benchmark] = benchmark_table(rows, benchmark) + ((),)
    for name, table, notes in (("differences", differences_table(rows), DIFFERENCES_NOTES),
                               ("gap_closed", gap_closed_table(rows), GAP_NOTES)):
        if table is not None:
            out[name] = table + (notes,)
    return out


def write_tables(results_dir, run: str | None = None, warnings: list[str] | None = None) -> dict[str, Path]:
    """Write ``tables/<name>.{md,tex}`` of every table of ``tables`` from ``metrics.csv`` (an optional table
    left from earlier results is removed); an edited ``metrics.csv`` is named in a warning line under every
    table (``warnings``: already computed ones)."""
    results_dir = Path(results_dir)
    warnings = edit_warnings(results_dir) if warnings is None else warnings
    _, rows = run_rows(results_dir, run)
    out = results_dir / "tables"
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    made = tables(rows)
    for name, (header, body, notes) in made.items():
        for ext, render in (("md", to_markdown), ("tex", to_latex)):
            path = out / f"{name}.{ext}"
            path.write_text(_with_warnings(render(header, body, notes), warnings, ext))
            written[f"{name}.{ext}"] = path
    for stale in {"differences", "gap_closed"} - set(made):
        for ext in ("md", "tex"):
            (out / f"{stale}.{ext}").unlink(missing_ok=True)
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
    """Per benchmark: input, ground truth and each model's prediction of sample ``index`` (of its first
    seed, ``evaluate.prediction_folder``)."""
    from matplotlib.figure import Figure  # not pyplot: no backend switch, no figure left open
    import numpy as np

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
    import numpy as np

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
               yerr=[s.std if s else 0.0 for s in stats], capsize=2, label=f"{model} (n={len(seeds_of(rows, model))})")
    ax.axhline(0, color="k", lw=0.8)
    ax.axhline(GAP_TARGET, color="tab:red", ls="--", lw=1, label=f"target {GAP_TARGET:g}")
    ax.set_ylim(-0.5, 1.1)
    ax.set_xticks(np.arange(len(keys)) + 0.4 - width / 2, keys, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("gap closed (0 trivial, 1 VAE ceiling)", fontsize=8)
    ax.legend(fontsize=7, ncol=len(found) + 1, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(out_file, dpi=110)
    return Path(out_file)


# --------------------------------------------------------------------------- target check

def _better(value: float | None, reference: float | None, metric: str) -> bool:
    if value is None or reference is None:
        return False
    return value > reference if metrics.HIGHER_IS_BETTER[metric] else value < reference


def target_check(rows: list[dict]) -> tuple[dict, bool]:
    """The demo's targets, on each benchmark's headline metric:

    (a) single_stream and multi_stream beat the trivial row on all eight benchmarks, in every seed;
    (b) multi-stream is not worse than single-stream on average: the mean over the benchmarks of the
        signed relative change of the means over seeds is >= 0;
    with ``vae_ceiling`` rows (else "not evaluated", which does not fail the check):
    (c) multi-stream's mean gap closed over the eight benchmarks (mean over seeds) >= ``GAP_TARGET``;
    (d) multi-stream's DIODE normal mean angle (mean over seeds) < ``NORMAL_TARGET`` degrees.

    Returns (the check: ``benchmarks`` (one dict per benchmark: ``Stat`` per model, beats trivial, multi
    vs single %, gap closed), ``mean change``, ``gap closed`` (multi-stream's mean, ``Stat``), ``paired``
    (per pair of ``PAIRS``, the ``Stat`` of its per-seed mean over the benchmarks), ``conditions`` (key,
    text, status: True / False / None = not evaluated, detail) and ``seeds``; passed).
    """
    values, stats, gaps = _values(rows), aggregate(rows), gap_closed(rows) or {}
    seeds = {m: seeds_of(rows, m) for m in ("single_stream", "multi_stream")}
    table, failures = [], {}
    for benchmark, metric in DELTA_M_METRICS:
        row = {"benchmark": benchmark, "metric": metric,
               **{m: stats.get((m, benchmark, metric)) for m in ("trivial", "single_stream", "multi_stream")}}
        trivial = row["trivial"].mean if row["trivial"] else None
        for model, model_seeds in seeds.items():
            own = values.get((model, benchmark, metric), {})
            lost = [s for s in model_seeds if not _better(own.get(s), trivial, metric)]
            row[f"{model} beats trivial"] = bool(model_seeds) and not lost
            for s in lost:
                failures.setdefault(f"{model} seed {s or '-'}", []).append(benchmark)
        s, m = row["single_stream"], row["multi_stream"]
        row["multi vs single %"] = _change(m.mean, s.mean, metric) if s and m else None
        row["gap closed"] = stat(gaps.get("multi_stream", {}).get(benchmark, {}).values())
        table.append(row)
    changes = [r["multi vs single %"] for r in table if r["multi vs single %"] is not None]
    mean_change = math.fsum(changes) / len(changes) if len(changes) == len(DELTA_M_METRICS) else None
    gap = stat(gaps.get("multi_stream", {}).get("mean", {}).values())
    normal = stats.get(("multi_stream", "diode_normal", "mean"))
    vae = any(r["model"] == "vae_ceiling" for r in rows)
    missing = [f"{m}: no rows" for m, s in seeds.items() if not s]
    conditions = [
        ("a", "single_stream and multi_stream beat trivial on all 8 benchmarks in every seed",
         not failures and not missing, "; ".join(missing + [f"{k}: {', '.join(v)}" for k, v in failures.items()])),
        ("b", "multi-stream not worse than single-stream on average (mean signed relative change of the means "
              ">= 0)", mean_change is not None and mean_change >= 0, f"{_fmt(mean_change)} %"),
        ("c", f"multi-stream's mean gap closed over the 8 benchmarks >= {GAP_TARGET:g}",
         (gap is not None and gap.mean >= GAP_TARGET) if vae else None, _pm(gap, digits=3) + _n(gap)),
        ("d", f"multi-stream's DIODE normal mean angle < {NORMAL_TARGET:g} degrees",
         (normal is not None and normal.mean < NORMAL_TARGET) if vae else None, _pm(normal) + _n(normal)),
    ]
    check = {"benchmarks": table, "mean change": mean_change, "gap closed": gap, "seeds": seeds,
             "paired": {name: stat(paired_changes(rows, m, r)["mean"].values()) for m, r, name in PAIRS},
             "conditions": [dict(zip(("key", "text", "status", "detail"), c)) for c in conditions]}
    return check, all(c["status"] is not False for c in check["conditions"])


def _n(s: Stat | None) -> str:
    return "" if s is None else f", {s.n} seed{'s' * (s.n != 1)}"


def format_target_check(check: dict, passed: bool) -> str:
    """The target check as the fixed-width text of ``summary.md`` and the end of ``stablemtl run``: the
    headline metrics (mean ± std over seeds; ``*``: beats trivial in every seed; the gap closed column
    with ``vae_ceiling`` rows), the paired averages and each condition with MET / NOT MET and its numbers."""
    seeds, gap = check["seeds"], check["gap closed"] is not None or any(r["gap closed"] for r in check["benchmarks"])
    star = lambda r, m: _pm(r[m]) + ("*" if r[f"{m} beats trivial"] else " ")  # noqa: E731
    last = lambda value: f"{value:>16}" if gap else ""  # noqa: E731
    titles = [f"{m.split('_')[0]} (n={len(seeds[m])})" for m in ("single_stream", "multi_stream")]
    lines = [f"{'benchmark':<20}{'metric':<9}{'trivial':>10}{titles[0]:>22}{titles[1]:>22}{'multi vs single':>17}"
             + last("gap closed")]
    for r in check["benchmarks"]:
        lines.append(f"{r['benchmark']:<20}{r['metric']:<9}{_pm(r['trivial']):>10}{star(r, 'single_stream'):>22}"
                     f"{star(r, 'multi_stream'):>22}{_fmt(r['multi vs single %']) + ' %':>17}"
                     + last(_pm(r["gap closed"], digits=3)))
    lines.append(f"{'mean':<20}{'':<63}{_fmt(check['mean change']) + ' %':>17}"
                 + last(_pm(check["gap closed"], digits=3)))
    listed = {m: "not recorded" if seeds[m] == [""] else ", ".join(s or "-" for s in seeds[m]) or "none" for m in seeds}
    lines.append(f"* = beats the trivial baseline in every seed; cells: mean ± sample std over the seeds "
                 f"(single_stream seeds: {listed['single_stream']}; multi_stream: {listed['multi_stream']}).")
    for model, reference, name in PAIRS:
        s = check["paired"][name]
        lines.append(f"{name} ({model} vs {reference}; paired by seed, mean over the 8 benchmarks): "
                     + (f"{_pm(s, digits=3)} %{_n(s)}" if s else f"- (no {reference} rows of the same seeds)"))
    for c in check["conditions"]:
        status = {None: "not evaluated (no vae_ceiling rows)", True: "MET", False: "NOT MET"}[c["status"]]
        detail = f" ({c['detail']})" if c["detail"] and c["status"] is not None else ""
        lines.append(f"({c['key']}) {c['text']}: {status}{detail}")
    failed = ", ".join(f"({c['key']})" for c in check["conditions"] if c["status"] is False)
    lines.append("Targets MET" if passed else f"Targets NOT MET: {failed}")
    return "\n".join(lines)


def write_summary(results_dir, run: str | None = None, title: str | None = None,
                  warnings: list[str] | None = None) -> Path:
    """``summary.md``: the target check of ``run``'s rows under the heading ``title``."""
    results_dir = Path(results_dir)
    warnings = edit_warnings(results_dir) if warnings is None else warnings
    run, rows = run_rows(results_dir, run)
    summary = results_dir / "summary.md"
    text = format_target_check(*target_check(rows))
    summary.write_text(_with_warnings(f"# {title or 'Run ' + str(run)}\n\n```\n{text}\n```\n", warnings, "md"))
    return summary


def write_report(results_dir, training_logs: dict | None = None, run: str | None = None,
                 title: str | None = None, figures: bool = True) -> dict[str, Path]:
    """Tables (``<results_dir>/tables``), ``summary.md`` (the target check of ``run``'s rows, under the
    heading ``title``) and, with ``figures``, every figure the inputs allow (``figures/``)."""
    results_dir = Path(results_dir)
    warnings = edit_warnings(results_dir)
    written = write_tables(results_dir, run, warnings)
    written["summary.md"] = write_summary(results_dir, run, title, warnings)
    if not figures:
        return written
    folder = results_dir / "figures"
    folder.mkdir(exist_ok=True)
    _, rows = run_rows(results_dir, run)
    if training_logs:
        written["training_curves.png"] = plot_training_curves(training_logs, folder / "training_curves.png")
    if any(delta_m_terms(rows, m) for m in ("single_stream", "multi_stream")):
        written["delta_m.png"] = plot_delta_m(rows, folder / "delta_m.png")
    gaps = gap_closed(rows)
    if gaps and any(m in gaps for m in GAP_MODELS):
        written["gap_closed.png"] = plot_gap_closed(rows, folder / "gap_closed.png")
    else:
        (folder / "gap_closed.png").unlink(missing_ok=True)
    models = [m for m in ("single_stream", "multi_stream") if (results_dir / "predictions" / m).is_dir()]
    if models:
        written["qualitative.png"] = plot_qualitative(results_dir, folder / "qualitative.png", models)
    return written
