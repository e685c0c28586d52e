"""The numbers behind the tables and the figures, from the rows of ``metrics.csv`` (one run's): the values
of each model per seed and their statistics, Delta_m, the paired differences and the gap closed.
``stablemtl.report`` makes the tables and the target check of them, ``stablemtl.figures`` the figures;
torch-free.

Seeds: a model evaluated for several training seeds (column ``seed``) has one value per seed
(``seed_values``); comparisons are made per seed, then summarised (``Stat``: mean, sample std, number of
seeds): Delta_m against ``single_task`` of the same seed (else the mean of its seeds), the differences
paired by seed, the gap closed against the means of the seed-independent ``trivial`` and ``vae_ceiling``
rows.

Delta_m (docs/method.md, "Evaluation") uses ``DELTA_M_METRICS`` (one headline metric per
benchmark, all eight) against the ``single_task`` rows; the per-metric terms are
kept (``delta_m_terms``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

from stablemtl import metrics
from stablemtl.benchmarks import BENCHMARKS
from stablemtl.paths import MODELS, REFERENCES

# Delta_m and the target check: the headline metric of every benchmark
DELTA_M_METRICS = tuple((name, b.headline) for name, b in BENCHMARKS.items())
GAP_TARGET = 0.5  # the multi stream's mean gap closed must reach it (target check, condition c)


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


def seed_values(rows: list[dict]) -> dict:
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
    return {k: stat(v.values()) for k, v in seed_values(rows).items()}


def seeds_of(rows: list[dict], model: str) -> list[str]:
    """The seeds of ``model``'s rows, in ``seed_key`` order (``[""]`` for a seed-independent row)."""
    return sorted({r.get("seed", "") for r in rows if r["model"] == model}, key=seed_key)


def models_in(rows: list[dict]) -> list[str]:
    """The models of the rows in the tables' order (``paths.MODELS``), then any other, by name."""
    present = {r["model"] for r in rows}
    return [m for m in MODELS if m in present] + sorted(present - set(MODELS))


def _mean(values: dict) -> float:
    return math.fsum(values.values()) / len(values)


def relative_change(value: float, reference: float, metric: str) -> float | None:
    """Signed relative change in %, positive = better (None against a zero reference)."""
    if reference == 0:
        return None
    return (value - reference) / abs(reference) * (1 if metrics.HIGHER_IS_BETTER[metric] else -1) * 100


# --------------------------------------------------------------------------- Delta_m, differences, gap closed

def delta_m_per_seed(rows: list[dict], model: str) -> dict[str, tuple[float, dict]]:
    """{seed: (Delta_m, per-metric terms)} of ``model``, each seed against ``single_task`` of the same
    seed where it has that metric's row, else against the mean of ``single_task`` over its seeds;
    seeds missing a metric of ``DELTA_M_METRICS`` are left out."""
    values, out = seed_values(rows), {}
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
    values, out = seed_values(rows), {}
    for benchmark, metric in DELTA_M_METRICS:
        a, b = values.get((model, benchmark, metric), {}), values.get((reference, benchmark, metric), {})
        changes = {s: relative_change(a[s], b[s], metric) for s in a if s in b}
        out[benchmark] = {s: c for s, c in changes.items() if c is not None}
    complete = [s for s in seeds_of(rows, model) if all(s in out[b] for b, _ in DELTA_M_METRICS)]
    out["mean"] = {s: math.fsum(out[b][s] for b, _ in DELTA_M_METRICS) / len(DELTA_M_METRICS) for s in complete}
    return out


def gap_closed(rows: list[dict]) -> dict[str, dict[str, dict[str, float]]] | None:
    """{model: {benchmark: {seed: (trivial - model) / (trivial - vae_ceiling)}}} on each headline metric
    (1 = the VAE ceiling, 0 = the trivial row; the same ratio of signed differences for higher-is-better
    metrics), ``trivial`` and ``vae_ceiling`` taken as the mean of their rows, and ``"mean"``: per seed,
    the mean over the eight benchmarks. None without ``trivial`` and ``vae_ceiling`` rows."""
    values, refs = seed_values(rows), {}
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
