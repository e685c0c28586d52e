"""Results of several seeds: the ``seed`` column (and CSVs of the header before it), the aggregation
over seeds, Delta_m per seed, the paired differences, the gap closed and the target check, on
hand-made rows whose numbers are computed by hand."""

from __future__ import annotations

import math

import pytest

from stablemtl import comparisons as C
from stablemtl import evaluate
from stablemtl import report as R
from stablemtl import results
from stablemtl.benchmarks import BENCHMARKS

HEAD = dict(C.DELTA_M_METRICS)  # benchmark -> headline metric
# the trivial row and the VAE ceiling of each benchmark: a model at fraction q of the way has gap closed q
TRIVIAL = {b: 0.1 if m == "miou" else 60.0 if b == "diode_normal" else 1.0 for b, m in HEAD.items()}
CEILING = {b: 0.9 if m == "miou" else 10.0 if b == "diode_normal" else 0.2 for b, m in HEAD.items()}


def rows_of(model: str, seed: str, values: dict, run: str = "demo") -> list[dict]:
    """metrics.csv rows of ``model`` and ``seed``: ``{benchmark: value}`` of the headline metrics."""
    return [{"run": run, "model": model, "seed": seed, "benchmark": b, "dataset": BENCHMARKS[b].dataset,
             "task": BENCHMARKS[b].task, "metric": HEAD[b], "value": repr(float(v)),
             "higher_is_better": str(HEAD[b] == "miou"), "n_images": "4"} for b, v in values.items()]


def at(q, **override) -> dict:
    """Headline values a fraction ``q`` of the way from the trivial row to the ceiling (per benchmark
    overrides of q by keyword)."""
    return {b: TRIVIAL[b] + override.get(b, q) * (CEILING[b] - TRIVIAL[b]) for b in HEAD}


def world(single, multi, seeds=("1", "2", "3"), vae=True, random=None) -> list[dict]:
    """trivial (and vae_ceiling) rows without a seed; single/multi/random: ``q``, ``{benchmark: value}`` (both
    for every seed) or ``{seed: {benchmark: value}}``."""
    rows = rows_of("trivial", "", TRIVIAL) + (rows_of("vae_ceiling", "", CEILING) if vae else [])
    for model, spec in (("single_stream_random", random), ("single_stream", single), ("multi_stream", multi)):
        if spec is not None:
            for s in seeds:
                values = spec if isinstance(spec, dict) else at(spec)
                rows += rows_of(model, s, values[s] if s in values else values)
    return rows


def write_csv(folder, rows):
    folder.mkdir(parents=True, exist_ok=True)
    results.CsvRows(folder / "metrics.csv", results.METRIC_FIELDS).write(rows)
    return folder


# --------------------------------------------------------------------------- the seed column

def test_seed_column_round_trip_and_the_previous_header(tmp_path):
    assert results.METRIC_FIELDS[:3] == ("run", "model", "seed")
    assert results.SAMPLE_FIELDS[:3] == ("run", "model", "seed")
    rows = world(0.5, 0.6, seeds=("1", "2"))
    write_csv(tmp_path, rows)
    assert (tmp_path / "metrics.csv").read_text().splitlines()[0] == ",".join(results.METRIC_FIELDS)
    assert results.read_metrics(tmp_path) == rows
    # a file of the header before the seed column: every row read, with an empty seed
    old = [f for f in results.METRIC_FIELDS if f != "seed"]
    lines = [",".join(old), "demo,trivial,kitti_flow,kitti_flow,optical_flow,epe,6.0,False,24"]
    (tmp_path / "metrics.csv").write_text("\n".join(lines) + "\n")
    (row,) = results.read_metrics(tmp_path)
    assert row == {"run": "demo", "model": "trivial", "seed": "", "benchmark": "kitti_flow", "dataset": "kitti_flow",
                   "task": "optical_flow", "metric": "epe", "value": "6.0", "higher_is_better": "False",
                   "n_images": "24"}
    assert list(row) == list(results.METRIC_FIELDS)
    (tmp_path / "metrics.csv").write_text("run,model,benchmark,score\ndemo,trivial,kitti_flow,1\n")
    with pytest.raises(results.ResultsFileError, match=r"metrics.csv: expected the header run,model,seed,"):
        results.read_metrics(tmp_path)
    with pytest.raises(ValueError, match="seed 'x1' is not an integer"):
        results.seed_text("x1")
    assert [results.seed_text(s) for s in (None, 3, "07", -2)] == ["", "3", "7", "-2"]


@pytest.fixture(scope="module")
def mid(tmp_path_factory):
    from stablemtl.data import mini

    root = tmp_path_factory.mktemp("seeds") / "data"
    mini.write_mini_datasets(root, "smoke", datasets=["mid"], workers=1, progress=False)
    return root


def _evaluate(data, out, seed, gamma=1.0, max_images=None, name="fn"):
    def predict(sample, task):
        return evaluate.trivial_prediction(sample, task) ** gamma  # not undone by the scale

    return evaluate.evaluate(predict, ["mid_albedo"], out, data, run="demo", model_name=name,
                             fingerprint=f"v{gamma}", resolution={"mid_albedo": [32, 48]}, progress=False, prefetch=0,
                             seed=seed, max_images=max_images)


def test_evaluate_keeps_each_seed_apart_and_keeps_rows_of_the_previous_header(mid, tmp_path):
    out = tmp_path / "out"
    _evaluate(mid, out, None, name="trivial")
    # the results of a kit before the seed column: both CSVs without it
    for name in ("metrics.csv", "per_sample.csv"):
        lines = (out / name).read_text().splitlines()
        (out / name).write_text("".join(",".join(c for i, c in enumerate(line.split(",")) if i != 2) + "\n"
                                        for line in lines))
    assert "seed" not in (out / "metrics.csv").read_text().splitlines()[0]
    _evaluate(mid, out, 1)
    _evaluate(mid, out, 2, gamma=2.0)
    rows = results.read_metrics(out)
    assert (out / "metrics.csv").read_text().splitlines()[0] == ",".join(results.METRIC_FIELDS)
    assert {(r["model"], r["seed"]) for r in rows} == {("trivial", ""), ("fn", "1"), ("fn", "2")}
    value = {(r["model"], r["seed"]): r["value"] for r in rows if r["metric"] == "rmse"}
    assert value[("fn", "1")] != value[("fn", "2")]  # gamma 2 is another prediction
    assert (out / "predictions/fn/seed1/mid_albedo/00000.npz").is_file()
    assert (out / "predictions/fn/seed2/mid_albedo/00000.npz").is_file()
    assert (out / "predictions/trivial/mid_albedo/00000.npz").is_file()
    # seed 1 evaluated again (on fewer images) replaces seed 1's rows only
    _evaluate(mid, out, 1, max_images=2)
    again = results.read_metrics(out)
    n_images = {(r["model"], r["seed"]) for r in again if r["n_images"] == "2"}
    assert n_images == {("fn", "1")}
    kept = {(r["model"], r["seed"]): r["value"] for r in again if r["metric"] == "rmse"}
    assert kept[("fn", "2")] == value[("fn", "2")] and kept[("trivial", "")] == value[("trivial", "")]
    import csv

    with open(out / "per_sample.csv", newline="") as f:
        per_sample = list(csv.DictReader(f))
    assert {(r["model"], r["seed"]) for r in per_sample} == {("trivial", ""), ("fn", "1"), ("fn", "2")}
    assert len([r for r in per_sample if r["seed"] == "1" and r["metric"] == "rmse"]) == 2
    # readers of the prediction cache take the first seed's folder
    assert results.prediction_folder(out, "fn") == (out / "predictions/fn/seed1", "1")
    assert results.prediction_folder(out, "trivial") == (out / "predictions/trivial", "")
    from stablemtl.browse import Browser

    b = Browser(out)
    b.model.value = "fn"
    assert b.benchmark.value == "mid_albedo" and "seed 1" in b.caption.value and "rmse" in b.caption.value


# --------------------------------------------------------------------------- aggregation, Delta_m

def test_aggregation_gives_mean_and_sample_std_over_seeds():
    rows = rows_of("trivial", "", {"kitti_flow": 5.0})
    for seed, v in (("1", 1.0), ("2", 2.0), ("10", 4.0)):
        rows += rows_of("multi_stream", seed, {"kitti_flow": v})
    stats = C.aggregate(rows)
    s = stats[("multi_stream", "kitti_flow", "epe")]
    assert s.n == 3 and s.mean == pytest.approx(7 / 3) and s.std == pytest.approx(math.sqrt(7 / 3))
    assert stats[("trivial", "kitti_flow", "epe")] == C.Stat(5.0, 0.0, 1)
    assert C.seeds_of(rows, "multi_stream") == ["1", "2", "10"]  # as numbers
    header, body = R.main_table(rows, paper=False)
    cells = {row[0]: dict(zip(header, row)) for row in body}
    assert cells["multi_stream"]["KITTI flow EPE"] == "2.333 ± 1.5" and cells["multi_stream"]["seeds"] == "3"
    assert cells["trivial"]["KITTI flow EPE"] == "5" and cells["trivial"]["seeds"] == "-"  # seed-independent
    header, body = R.benchmark_table(rows, "kitti_flow")
    assert body[1] == ["multi_stream", "2.333 ± 1.5", "4", "3"]
    with pytest.raises(ValueError, match=r"two values for \('multi_stream', 'kitti_flow', 'epe'\) of seed '2'"):
        C.aggregate(rows + rows_of("multi_stream", "2", {"kitti_flow": 3.0}))


def test_delta_m_per_seed_against_the_same_seed_else_the_mean_of_single_task():
    one = lambda v, miou: {b: miou if m == "miou" else v for b, m in HEAD.items()}  # noqa: E731
    rows = rows_of("single_task", "1", one(1.0, 0.5)) + rows_of("single_task", "2", one(2.0, 1.0))
    rows += rows_of("multi_stream", "1", one(0.5, 0.75))  # 50 % better than single_task seed 1 everywhere
    rows += rows_of("multi_stream", "2", one(2.0, 1.0))  # equal to seed 2
    rows += rows_of("multi_stream", "3", one(1.5, 0.75))  # equal to the mean of seeds 1 and 2
    per_seed = C.delta_m_per_seed(rows, "multi_stream")
    assert list(per_seed) == ["1", "2", "3"]
    assert [round(total, 9) for total, _ in per_seed.values()] == [50.0, 0.0, 0.0]
    assert per_seed["1"][1]["cityscapes_semantic/miou"] == pytest.approx(50.0)
    total, terms = C.delta_m_terms(rows, "multi_stream")
    assert total == pytest.approx(50 / 3) and terms["kitti_depth/abs_rel"] == pytest.approx(50 / 3)
    header, body = R.main_table(rows, paper=False)
    row = dict(zip(header, next(r for r in body if r[0] == "multi_stream")))
    assert row["Delta_m %"] == f"16.67 ± {math.sqrt((100 / 3) ** 2 / 2 + (50 / 3) ** 2):.2g}" == "16.67 ± 29"
    assert C.delta_m_per_seed([r for r in rows if r["benchmark"] != "mid_shading"], "multi_stream") == {}


def test_main_table_notes_name_the_delta_m_metrics_and_their_direction(tmp_path):
    written = R.write_tables(write_csv(tmp_path, world(0.5, 0.6)))
    md, tex = written["main.md"].read_text(), written["main.tex"].read_text()
    for benchmark, metric in C.DELTA_M_METRICS:
        direction = "higher better" if metric == "miou" else "lower better"
        assert f"{benchmark}/{metric} ({direction})" in md.split("|")[-1]
    assert tex.splitlines()[-2].startswith("% Delta_m %: the mean over cityscapes_semantic/miou (higher better)")
    assert "$\\pm$" in tex and "±" not in tex


# --------------------------------------------------------------------------- differences, gap closed

def test_paired_differences_are_computed_per_seed():
    factors = {"1": 0.9, "2": 0.8, "3": 1.0}  # multi = single x factor (lower better): 10, 20, 0 % better
    single = {s: at(0.5) for s in factors}
    multi = {s: {b: v * (2 - f if HEAD[b] == "miou" else f) for b, v in at(0.5).items()} for s, f in factors.items()}
    random = {s: {b: v * (0.5 if HEAD[b] == "miou" else 2.0) for b, v in at(0.5).items()} for s in factors}
    rows = world(single, multi, random=random)
    rows = [r for r in rows if not (r["model"] == "single_stream_random" and r["seed"] == "3")]  # seeds 1, 2 only
    changes = C.paired_changes(rows, "multi_stream", "single_stream")
    assert {s: round(v, 9) for s, v in changes["kitti_depth"].items()} == {"1": 10.0, "2": 20.0, "3": 0.0}
    assert {s: round(v, 9) for s, v in changes["cityscapes_semantic"].items()} == {"1": 10.0, "2": 20.0, "3": 0.0}
    header, body = R.differences_table(rows)
    assert header == ["benchmark", "metric", "multi_stream vs single_stream %", "seeds",
                      "single_stream vs single_stream_random %", "seeds"]
    assert [r[0] for r in body] == [b for b, _ in C.DELTA_M_METRICS] + ["mean"]  # the average row last
    assert body[-1][2:] == ["10 ± 10", "3", "56.2 ± 0", "2"]  # (100 % on miou + 7 x 50 %) / 8 = 56.25
    assert body[0][1] == "miou (higher better)" and body[1][1] == "abs_rel (lower better)"
    # a pair that is absent has no column; no pair, no table
    header, _ = R.differences_table([r for r in rows if r["model"] != "single_stream_random"])
    assert header == ["benchmark", "metric", "multi_stream vs single_stream %", "seeds"]
    assert R.differences_table([r for r in rows if r["model"] != "single_stream"]) is None


def test_gap_closed_matches_a_hand_computation(tmp_path):
    rows = world(0.5, {"1": at(0.7, kitti_depth=0.5), "2": at(0.7, kitti_depth=0.8)}, seeds=("1", "2"))
    # kitti_depth: trivial 1.0, ceiling 0.2; seeds 0.6 and 0.36 give (1 - 0.6) / 0.8 = 0.5 and 0.64 / 0.8 = 0.8
    values = {r["seed"]: float(r["value"]) for r in rows
              if r["model"] == "multi_stream" and r["benchmark"] == "kitti_depth"}
    assert values == pytest.approx({"1": 0.6, "2": 0.36})
    gaps = C.gap_closed(rows)
    assert gaps["multi_stream"]["kitti_depth"] == pytest.approx({"1": 0.5, "2": 0.8})
    assert gaps["multi_stream"]["cityscapes_semantic"] == pytest.approx({"1": 0.7, "2": 0.7})  # higher is better
    assert gaps["multi_stream"]["mean"] == pytest.approx({"1": (7 * 0.7 + 0.5) / 8, "2": (7 * 0.7 + 0.8) / 8})
    assert set(gaps) == {"single_stream", "multi_stream"}  # not the references
    header, body = R.gap_closed_table(rows)
    assert header == ["model"] + list(BENCHMARKS) + ["mean", "seeds"]
    multi = dict(zip(header, body[1]))
    assert multi["model"] == "multi_stream" and multi["kitti_depth"] == "0.65 ± 0.21" and multi["seeds"] == "2"
    assert dict(zip(header, body[0]))["kitti_depth"] == "0.5 ± 0"
    # without vae_ceiling rows: no gap closed, no table file, no figure
    folder = write_csv(tmp_path / "a", [r for r in rows if r["model"] != "vae_ceiling"])
    assert C.gap_closed(results.read_metrics(folder)) is None
    written = R.write_report(folder, figures=True)
    assert "gap_closed.md" not in written and not (folder / "tables/gap_closed.md").exists()
    assert "gap_closed.png" not in written
    folder = write_csv(tmp_path / "b", rows)
    written = R.write_report(folder, figures=True)
    assert written["gap_closed.md"].read_text().splitlines()[3].startswith("| multi_stream |")
    assert written["gap_closed.png"].read_bytes()[:4] == b"\x89PNG"
    assert "multi\\_stream & " in written["gap_closed.tex"].read_text()
    assert " & 0.65 $\\pm$ 0.21 & " in written["gap_closed.tex"].read_text()


# --------------------------------------------------------------------------- target check

def _check(rows):
    check, passed = R.target_check(rows)
    return {c["key"]: c["status"] for c in check["conditions"]}, passed, R.format_target_check(check, passed)


def test_target_check_passes_and_fails_on_each_condition_alone():
    status, passed, text = _check(world(0.55, 0.7))
    assert passed and status == {"a": True, "b": True, "c": True, "d": True}, text
    assert text.splitlines()[-1] == "Targets MET"
    assert "multi (n=3)" in text.splitlines()[0] and "gap closed" in text.splitlines()[0]
    cases = {  # each world fails one condition only
        "a": world(0.55, {"1": at(0.7), "2": at(0.7, kitti_flow=-0.01), "3": at(0.7)}),
        "b": world(0.7, 0.6),
        "c": world(0.4, 0.45),
        "d": world(at(0.55, diode_normal=0.1), at(0.7, diode_normal=0.2)),
    }
    for key, rows in cases.items():
        status, passed, text = _check(rows)
        assert not passed and [k for k, ok in status.items() if not ok] == [key], (key, text)
        assert text.splitlines()[-1] == f"Targets NOT MET: ({key})"
        assert any(line.startswith(f"({key}) ") and line.split(": ", 1)[1].startswith("NOT MET")
                   for line in text.splitlines()), text
    assert "multi_stream seed 2: kitti_flow" in _check(cases["a"])[2]
    assert ": NOT MET (0.45 ± 0, 3 seeds)" in _check(cases["c"])[2]
    # without vae_ceiling rows, (c) and (d) are not evaluated and do not fail the check
    status, passed, text = _check([r for r in cases["c"] if r["model"] != "vae_ceiling"])
    assert passed and status["c"] is None and status["d"] is None, text
    assert "(c) multi-stream's mean gap closed over the 8 benchmarks >= 0.5: not evaluated (no vae_ceiling rows)" \
        in text
    # a model without rows fails (a)
    status, passed, _ = _check([r for r in world(0.55, 0.7) if r["model"] != "single_stream"])
    assert not passed and status["a"] is False
    # a run of fewer tasks: a benchmark without rows is named as such, not as one the model lost
    rows = [r for r in cases["a"] if not (r["model"] in R.KINDS and r["benchmark"] == "mid_albedo")]
    status, passed, text = _check(rows)
    assert not passed and status["a"] is False and status["b"] is False
    line = next(x for x in text.splitlines() if x.startswith("(a) "))
    assert line.endswith("(multi_stream seed 2: kitti_flow; single_stream: no rows on mid_albedo; "
                         "multi_stream: no rows on mid_albedo)"), line
    assert "(b) " in text and "(a benchmark lacks one of the two)" in text


def test_target_check_of_one_run_without_seeds_is_the_previous_check():
    rows = [dict(r, seed="") for r in world(0.5, 0.6, seeds=("1",), vae=False)]
    status, passed, text = _check(rows)
    assert passed and status == {"a": True, "b": True, "c": None, "d": None}
    assert "±" not in text.split("* =")[0]  # one seed: plain numbers
    lines = text.splitlines()
    assert lines[0].split() == ["benchmark", "metric", "trivial", "single", "(n=1)", "multi", "(n=1)", "multi", "vs",
                                "single"]
    assert lines[1].split()[:5] == ["cityscapes_semantic", "miou", "0.1", "0.5*", "0.58*"]
    change = (0.58 - 0.5) / 0.5 * 100  # miou: 16 % better
    assert lines[1].split()[5] == f"{change:.4g}"
    assert "prior vs random (single_stream vs single_stream_random; paired by seed" in text


def test_target_check_spreads_and_the_paired_averages_are_printed():
    random = {s: at(q) for s, q in (("1", 0.2), ("2", 0.3), ("3", 0.25))}
    check, passed = R.target_check(world({"1": at(0.5), "2": at(0.6), "3": at(0.55)}, 0.7, random=random))
    text = R.format_target_check(check, passed)
    single = check["benchmarks"][0]["single_stream"]
    assert single.n == 3 and single.mean == pytest.approx(0.1 + 0.55 * 0.8) and single.std == pytest.approx(0.04)
    assert f"{R.format_value(single.mean)} ± 0.04*" in text.splitlines()[1]
    for name in ("multi vs single", "prior vs random"):
        s = check["paired"][name]
        assert s.n == 3 and s.std > 0 and f"{name} (" in text and f"{R.format_stat(s, digits=3)} %, 3 seeds" in text


# --------------------------------------------------------------------------- files

def test_tables_and_summary_are_byte_identical_for_identical_inputs(tmp_path):
    random = {s: at(q) for s, q in (("1", 0.2), ("2", 0.3), ("3", 0.25))}
    rows = world({"1": at(0.5), "2": at(0.6), "3": at(0.55)}, 0.7, random=random)
    rows += rows_of("single_task", "1", at(0.6)) + rows_of("single_task", "2", at(0.65))
    outputs = []
    for name in ("a", "b"):
        folder = write_csv(tmp_path / name, rows)
        written = R.write_report(folder, run="demo", title="Run demo", figures=False)
        outputs.append({k: p.read_bytes() for k, p in written.items()})
    assert outputs[0] == outputs[1]
    assert {"main.md", "main.tex", "differences.md", "differences.tex", "gap_closed.md", "gap_closed.tex",
            "summary.md", "kitti_depth.md"} <= set(outputs[0])
    assert not (tmp_path / "a" / "figures").exists()
    main = outputs[0]["main.md"].decode()
    assert "| single_stream_random |" in main.split("| single_stream |")[0]  # just before single_stream
    names = [line.split(" | ")[0][2:] for line in main.splitlines()[2:] if line.startswith("| ")]
    assert names[:5] == ["trivial", "single_task", "single_stream_random", "single_stream", "multi_stream"]
    assert names[5] == "vae_ceiling"
    assert outputs[0]["differences.md"].decode().splitlines()[-3].startswith("| mean | the eight above |")
    assert r"$\pm$" in outputs[0]["differences.tex"].decode() and "±" not in outputs[0]["main.tex"].decode()
    assert outputs[0]["summary.md"].decode().startswith("# Run demo\n\n```\nbenchmark")
    # a table the inputs no longer allow is removed, not left stale
    write_csv(tmp_path / "a", [r for r in rows if r["model"] not in ("vae_ceiling", "single_stream_random",
                                                                      "multi_stream")])
    written = R.write_tables(tmp_path / "a")
    assert "main.md" in written and "gap_closed.md" not in written and "differences.tex" not in written
    assert not any((tmp_path / "a" / "tables" / f"{n}.{e}").exists() for n in ("differences", "gap_closed")
                   for e in ("md", "tex"))
