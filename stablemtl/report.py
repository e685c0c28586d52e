"""Tables, the target check and the summary, regenerated from result files only (``metrics.csv``).

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
- ``write_report``: the tables, ``summary.md`` and the figures (``stablemtl.figures``: training curves,
  Delta_m terms per metric, the gap closed, a qualitative grid per benchmark).

Importing this module imports neither torch nor matplotlib.

Seeds: a model evaluated for several training seeds (column ``seed``) has one value per seed; the
tables show ``mean ± std`` (sample std, ddof 1) over the seeds and their number, a single seed (or
the seed-independent rows, seed ``""``) a plain number. The values per seed, Delta_m, the paired
differences and the gap closed are computed in ``stablemtl.comparisons``.

A ``metrics.csv`` whose sha256 differs from the one ``evaluate`` recorded (``results.sha256.json``)
was edited after it was written: the tables are made all the same (an edit may be deliberate), but
each table file and ``summary.md`` then end with a warning line and the warning is printed. Tables
from unedited results are byte-identical to those of a kit that recorded no hash.
"""

from __future__ import annotations

import math
from pathlib import Path

from stablemtl import metrics
from stablemtl.benchmarks import BENCHMARKS
from stablemtl.comparisons import (DELTA_M_METRICS, GAP_TARGET, Stat, aggregate, delta_m_per_seed, gap_closed,
                                   models_in, paired_changes, relative_change, seed_key, seed_values, seeds_of, stat)
from stablemtl.figures import write_figures
from stablemtl.paths import KINDS, METRICS_FILE, REFERENCES
from stablemtl.results import edited_results, read_metrics

# (benchmark, column title, display factor) of the published columns: docs/method.md, "Published numbers"
COLUMNS = (
    ("cityscapes_semantic", "Cityscapes mIoU", 100.0),
    ("diode_normal", "DIODE normal mean", 1.0),
    ("kitti_depth", "KITTI AbsRel x100", 100.0),
    ("kitti_flow", "KITTI flow EPE", 1.0),
    ("kitti_scene_flow", "KITTI scene-flow EPE3D", 1.0),
    ("mid_albedo", "MID albedo RMSE", 1.0),
)
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


# --------------------------------------------------------------------------- tables

def format_value(value: float | None, digits: int = 4) -> str:
    """A number as the tables show it: ``digits`` significant digits (one decimal from 1000), ``-`` for none."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:.1f}"


def format_stat(s: Stat | None, factor: float = 1.0, digits: int = 4) -> str:
    """``mean ± std`` of a ``Stat`` (std to 2 digits), the plain mean for one seed, ``-`` for none."""
    if s is None:
        return "-"
    mean = format_value(s.mean * factor, digits)
    return mean if s.n < 2 else f"{mean} ± {format_value(s.std * factor, 2)}"


def _seeds_cell(rows: list[dict], model: str) -> str:
    """The number of training seeds of ``model``'s rows; ``-`` for the seed-independent reference rows."""
    return "-" if model in REFERENCES else str(len(seeds_of(rows, model)))


def main_table(rows: list[dict], paper: bool = True) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the main table: one headline metric per task, Delta_m % and the number of seeds."""
    stats = aggregate(rows)
    header = ["model"] + [title for _, title, _ in COLUMNS] + ["Delta_m %", "seeds"]
    body = []
    for model in models_in(rows):
        cells = [model] + [format_stat(stats.get((model, b, BENCHMARKS[b].headline)), factor)
                           for b, _, factor in COLUMNS]
        dm = stat(total for total, _ in delta_m_per_seed(rows, model).values())
        body.append(cells + [format_stat(dm), _seeds_cell(rows, model)])
    if paper:
        for name, numbers in PAPER_ROWS.items():
            body.append([f"paper: {name}"] + [format_value(v) for v in numbers] + ["-"])
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
        cells = [format_stat(stats.get((m, benchmark, k))) for k in names]
        body.append([m] + cells + [images, _seeds_cell(mine, m)])
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
            cells += [format_stat(stat(changes[benchmark].values()), digits=3), str(len(changes[benchmark]))]
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
    body = [[model] + [format_stat(stat(per.get(b, {}).values()), digits=3) for b in list(BENCHMARKS) + ["mean"]]
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
    """``WARNING: ...`` lines for the results CSVs edited since evaluate wrote them (``results.edited_results``),
    each also passed to ``log`` (printed); ``[]`` when every recorded hash matches."""
    lines = [f"WARNING: {message}" for message in edited_results(results_dir, names=(METRICS_FILE,))]
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
            raise ValueError(f"{results_dir}/{METRICS_FILE} holds several runs {runs}; choose one with run=")
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
    values, stats, gaps = seed_values(rows), aggregate(rows), gap_closed(rows) or {}
    seeds = {m: seeds_of(rows, m) for m in KINDS}
    table, failures, absent = [], {}, {}
    for benchmark, metric in DELTA_M_METRICS:
        row = {"benchmark": benchmark, "metric": metric,
               **{m: stats.get((m, benchmark, metric)) for m in ("trivial", "single_stream", "multi_stream")}}
        trivial = row["trivial"].mean if row["trivial"] else None
        for model, model_seeds in seeds.items():
            own = values.get((model, benchmark, metric), {})
            lost = [s for s in model_seeds if not _better(own.get(s), trivial, metric)]
            row[f"{model} beats trivial"] = bool(model_seeds) and not lost
            for s in lost:
                if own.get(s) is None or trivial is None:  # no rows (a run of fewer tasks): said apart
                    absent.setdefault(model, []).append(benchmark)
                else:
                    failures.setdefault(f"{model} seed {s or '-'}", []).append(benchmark)
        s, m = row["single_stream"], row["multi_stream"]
        row["multi vs single %"] = relative_change(m.mean, s.mean, metric) if s and m else None
        row["gap closed"] = stat(gaps.get("multi_stream", {}).get(benchmark, {}).values())
        table.append(row)
    changes = [r["multi vs single %"] for r in table if r["multi vs single %"] is not None]
    mean_change = math.fsum(changes) / len(changes) if len(changes) == len(DELTA_M_METRICS) else None
    gap = stat(gaps.get("multi_stream", {}).get("mean", {}).values())
    normal = stats.get(("multi_stream", "diode_normal", "mean"))
    vae = any(r["model"] == "vae_ceiling" for r in rows)
    missing = [f"{m}: no rows" for m, s in seeds.items() if not s]
    missing += [f"{m}: no rows on {', '.join(dict.fromkeys(b))}" for m, b in absent.items()]
    conditions = [
        ("a", "single_stream and multi_stream beat trivial on all 8 benchmarks in every seed",
         not failures and not missing, "; ".join([f"{k}: {', '.join(v)}" for k, v in failures.items()] + missing)),
        ("b", "multi-stream not worse than single-stream on average (mean signed relative change of the means "
              ">= 0)", mean_change is not None and mean_change >= 0,
         f"{format_value(mean_change)} %" if mean_change is not None else "a benchmark lacks one of the two"),
        ("c", f"multi-stream's mean gap closed over the 8 benchmarks >= {GAP_TARGET:g}",
         (gap is not None and gap.mean >= GAP_TARGET) if vae else None, format_stat(gap, digits=3) + _n(gap)),
        ("d", f"multi-stream's DIODE normal mean angle < {NORMAL_TARGET:g} degrees",
         (normal is not None and normal.mean < NORMAL_TARGET) if vae else None, format_stat(normal) + _n(normal)),
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
    star = lambda r, m: format_stat(r[m]) + ("*" if r[f"{m} beats trivial"] else " ")  # noqa: E731
    last = lambda value: f"{value:>16}" if gap else ""  # noqa: E731
    titles = [f"{m.split('_')[0]} (n={len(seeds[m])})" for m in KINDS]
    lines = [f"{'benchmark':<20}{'metric':<9}{'trivial':>10}{titles[0]:>22}{titles[1]:>22}{'multi vs single':>17}"
             + last("gap closed")]
    for r in check["benchmarks"]:
        lines.append(f"{r['benchmark']:<20}{r['metric']:<9}{format_stat(r['trivial']):>10}"
                     f"{star(r, 'single_stream'):>22}{star(r, 'multi_stream'):>22}"
                     f"{format_value(r['multi vs single %']) + ' %':>17}"
                     + last(format_stat(r["gap closed"], digits=3)))
    lines.append(f"{'mean':<20}{'':<63}{format_value(check['mean change']) + ' %':>17}"
                 + last(format_stat(check["gap closed"], digits=3)))
    listed = {m: "not recorded" if seeds[m] == [""] else ", ".join(s or "-" for s in seeds[m]) or "none" for m in seeds}
    lines.append(f"* = beats the trivial baseline in every seed; cells: mean ± sample std over the seeds "
                 f"(single_stream seeds: {listed['single_stream']}; multi_stream: {listed['multi_stream']}).")
    for model, reference, name in PAIRS:
        s = check["paired"][name]
        lines.append(f"{name} ({model} vs {reference}; paired by seed, mean over the 8 benchmarks): "
                     + (f"{format_stat(s, digits=3)} %{_n(s)}" if s else f"- (no {reference} rows of the same seeds)"))
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
    heading ``title``) and, with ``figures``, every figure the inputs allow (``figures/``,
    ``stablemtl.figures.write_figures``)."""
    results_dir = Path(results_dir)
    warnings = edit_warnings(results_dir)
    written = write_tables(results_dir, run, warnings)
    written["summary.md"] = write_summary(results_dir, run, title, warnings)
    if not figures:
        return written
    _, rows = run_rows(results_dir, run)
    written.update(write_figures(results_dir, rows, training_logs))
    return written
