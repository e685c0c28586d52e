"""Your run and the committed one, side by side: does a run of a preset reproduce the reference results
committed for it (``results/reference/<preset>/``, which no command writes)?

Per model and benchmark (the headline metric of each), the run's value of each seed is compared with the
committed value of the same seed and with the spread of the committed seeds:

- ``identical``: the same number, as on the machine that wrote the reference (same CPU threads and
  package versions give the same bits: docs/reproducibility.md);
- ``equal within 1e-4``: relative difference at most ``TOLERANCE`` (float rounding: a run on this
  machine and the committed run differed by at most 2.9e-5 relative over all 300 metrics of the first
  seed, 173 of them identical);
- ``within the seed spread``: not identical, but no further from the committed mean than two sample
  standard deviations of the committed seeds, about what another machine's rounding gives;
- ``outside the seed spread``: further than that (or the committed run has one seed only).

The run reproduces the reference when every compared value is identical ("exactly") or equal within
the tolerance, and is "within the seed spread" when the others lie within it. Only a run of the committed configuration is compared: the same preset, and no parameter other
than those that add rows (``seeds``, ``single_task``, ``random_init``); torch-free.
"""

from __future__ import annotations

import json
from pathlib import Path

from stablemtl.comparisons import DELTA_M_METRICS, seed_key, seed_values, stat
from stablemtl.data.formats import write_bytes
from stablemtl.paths import METRICS_FILE, REFERENCE, project_root
from stablemtl.results import read_metrics

REFERENCE_DIR = Path("results") / REFERENCE  # under the project: results/reference/<preset>/
REPORT_FILE = "reproduction.md"  # results/<run>/
SPREAD = 2.0  # standard deviations of the committed seeds
TOLERANCE = 1e-4  # relative: float rounding, not a different result
ADDS_ROWS = ("seeds", "single_task", "random_init")  # parameters that add rows without changing the others
VERDICTS = ("identical", f"equal within {TOLERANCE:g}", "within the seed spread", "outside the seed spread")


def reference_dir(preset_name: str) -> Path | None:
    """``results/reference/<preset>/`` of the project when it holds results, else None."""
    folder = project_root() / REFERENCE_DIR / preset_name
    return folder if (folder / METRICS_FILE).is_file() else None


def configuration_difference(preset: dict, parameters: dict, reference: Path) -> str | None:
    """Why a run of ``preset`` with ``parameters`` (``-p``) is not the configuration of ``reference``
    (its ``manifest.json``), or None when it is."""
    given = sorted(k for k, v in parameters.items() if k not in ADDS_ROWS and v is not None)
    if given:
        return f"it sets {', '.join(given)} (-p)"
    try:
        recorded = json.loads((reference / "manifest.json").read_text())["preset"]
    except (OSError, ValueError, KeyError):
        return f"{reference / 'manifest.json'} records no preset"
    ours, theirs = ({k: v for k, v in p.items() if k != "study"} for p in (preset, recorded))
    if ours != theirs:
        fields = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
        return f"its preset differs from the committed run's in {', '.join(fields)}"
    return None


def compare(rows: list[dict], reference_rows: list[dict]) -> list[dict]:
    """One record per (model, benchmark, headline metric, seed) of ``rows`` that the reference also has
    (the model and benchmark): the value, the committed value of that seed (None when the reference has
    no such seed), the committed mean, std and number of seeds, the difference and the verdict."""
    ours, theirs = seed_values(rows), seed_values(reference_rows)
    headline = dict(DELTA_M_METRICS)
    out = []
    for (model, benchmark, metric), values in ours.items():
        if headline.get(benchmark) != metric or (model, benchmark, metric) not in theirs:
            continue
        committed = theirs[(model, benchmark, metric)]
        spread = stat(committed.values())
        for seed, value in values.items():
            same_seed = committed.get(seed)
            if same_seed is not None and value == same_seed:
                verdict = VERDICTS[0]
            elif same_seed is not None and abs(value - same_seed) <= TOLERANCE * abs(same_seed):
                verdict = VERDICTS[1]
            elif spread.n > 1 and abs(value - spread.mean) <= SPREAD * spread.std:
                verdict = VERDICTS[2]
            else:
                verdict = VERDICTS[3]
            out.append({"model": model, "benchmark": benchmark, "metric": metric, "seed": seed, "value": value,
                        "committed": same_seed, "mean": spread.mean, "std": spread.std, "n": spread.n,
                        "difference": None if same_seed is None else value - same_seed, "verdict": verdict})
    return sorted(out, key=lambda r: (r["model"], r["benchmark"], seed_key(r["seed"])))


def verdict(records: list[dict]) -> str:
    """The one-line answer for ``compare``'s records."""
    if not records:
        return "nothing to compare: the run has no model and benchmark of the committed run"
    counts = {v: sum(r["verdict"] == v for r in records) for v in VERDICTS}
    n = len(records)
    if counts[VERDICTS[0]] == n:
        return f"reproduced exactly: all {n} headline values are identical to the committed run's"
    if counts[VERDICTS[0]] + counts[VERDICTS[1]] == n:
        return (f"reproduced: {counts[VERDICTS[0]]} of {n} headline values identical to the committed run's, the "
                f"other {counts[VERDICTS[1]]} equal within {TOLERANCE:g} (relative)")
    if counts[VERDICTS[3]] == 0:
        return (f"reproduced within the seed spread: {counts[VERDICTS[0]] + counts[VERDICTS[1]]} of {n} headline "
                f"values equal to the committed run's, the other {counts[VERDICTS[2]]} within {SPREAD:g} standard "
                f"deviations of the committed seeds")
    def distance(r: dict) -> float:  # in committed standard deviations
        return abs(r["value"] - r["mean"]) / r["std"] if r["std"] else float("inf")

    worst = max((r for r in records if r["verdict"] == VERDICTS[3]), key=distance)
    return (f"NOT reproduced: {counts[VERDICTS[3]]} of {n} headline values lie outside {SPREAD:g} standard "
            f"deviations of the committed seeds (e.g. {worst['model']} on {worst['benchmark']}, seed "
            f"{worst['seed'] or '-'}: {worst['value']:.6g} against {worst['mean']:.6g} ± {worst['std']:.2g}, "
            f"{worst['n']} seeds); {counts[VERDICTS[0]] + counts[VERDICTS[1]]} equal, {counts[VERDICTS[2]]} "
            f"within the spread")


def format_comparison(records: list[dict], reference: Path) -> str:
    """A markdown table of ``compare``'s records under its verdict."""
    lines = [f"# Your run and the committed one ({reference})", "", verdict(records), "",
             "| model | benchmark | metric | seed | yours | committed (same seed) | committed mean ± std (n) "
             "| verdict |", "|---|---|---|---|---|---|---|---|"]
    for r in records:
        same = "-" if r["committed"] is None else f"{r['committed']:.6g}"
        lines.append(f"| {r['model']} | {r['benchmark']} | {r['metric']} | {r['seed'] or '-'} | {r['value']:.6g} "
                     f"| {same} | {r['mean']:.4g} ± {r['std']:.2g} ({r['n']}) | {r['verdict']} |")
    return "\n".join(lines) + "\n"


def compare_with_reference(results_dir: Path, run: str, preset: dict, parameters: dict) -> str | None:
    """After a run: compare its results with the committed reference of its preset, write
    ``results/<run>/reproduction.md`` and return the verdict line; None when there is no reference or no
    results, a line saying why when the run is not of the committed configuration."""
    reference = reference_dir(str(preset.get("name", "")))
    if reference is None or not (Path(results_dir) / METRICS_FILE).is_file():
        return None
    if Path(results_dir).resolve() == reference.resolve():
        return None
    why = configuration_difference(preset, parameters, reference)
    if why is not None:
        return f"not compared with the committed run ({reference}): {why}"
    rows = [r for r in read_metrics(results_dir) if r["run"] == run]
    reference_rows = read_metrics(reference)
    reference_rows = [r for r in reference_rows if r["run"] == reference_rows[0]["run"]] if reference_rows else []
    records = compare(rows, reference_rows)
    write_bytes(Path(results_dir) / REPORT_FILE, format_comparison(records, reference).encode())
    return f"{verdict(records)} (details: {Path(results_dir) / REPORT_FILE})"
