"""The per-image distributions figure (``figures.plot_per_sample``): the means it marks are the tables' means,
models without rows are skipped, the figure is deterministic, and ``write_figures`` draws it only when the run
folder has a ``per_sample.csv``. Torch-free and fast."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stablemtl import figures
from stablemtl.benchmarks import BENCHMARKS
from stablemtl.paths import MODELS, SAMPLES_FILE
from stablemtl.results import SAMPLE_FIELDS, CsvRows, read_metrics

REFERENCE = Path(__file__).resolve().parents[1] / "results" / "reference" / "demo"
# the headline metrics that metrics.csv holds as the mean of the per-image values (stablemtl.metrics: the depth
# and intrinsic accumulators average images, NormalAccumulator's "mean" too); cityscapes miou (a confusion
# matrix over all pixels), kitti_flow epe and kitti_scene_flow epe3d (pixel-pooled) are not
PER_IMAGE_MEANS = ("kitti_depth", "diode_depth", "diode_normal", "mid_albedo", "mid_shading")


def synthetic_samples(run: str = "toy") -> list[dict]:
    """Per-image rows of three benchmarks: single_stream with two seeds of unequal sizes (the mean of the seed
    means then differs from the pooled mean), multi_stream with one seed, trivial seed-independent, and a
    non-headline metric that must not be drawn; nothing for the other five benchmarks."""
    rng = np.random.default_rng(7)
    rows = []
    plan = [("single_stream", "1", 5), ("single_stream", "2", 3), ("multi_stream", "1", 4), ("trivial", "", 6)]
    for benchmark in ("kitti_depth", "kitti_flow", "mid_albedo"):
        headline = BENCHMARKS[benchmark].headline
        for model, seed, n in plan:
            for i in range(n):
                for metric, value in ((headline, rng.uniform(0.1, 2.0)), ("other_metric", 1000.0)):
                    rows.append(dict(run=run, model=model, seed=seed, benchmark=benchmark, index=str(i), id=f"im{i}",
                                     metric=metric, value=repr(float(value))))
    return rows


def write_samples(folder: Path, rows: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    CsvRows(folder / SAMPLES_FILE, SAMPLE_FIELDS).write(rows)
    return folder


def expected_means(csv: Path, run: str | None = None) -> dict:
    """(benchmark, model) -> the mean over seeds of each seed's mean of the headline metric, straight from the
    CSV with pandas (the tables average the seeds' values, each seed's value averages its images)."""
    df = pd.read_csv(csv, dtype={"seed": str}, keep_default_na=False)
    df["value"] = df["value"].astype(float)
    if run is not None:
        df = df[df["run"] == run]
    df = df[df["metric"] == df["benchmark"].map(lambda b: BENCHMARKS[b].headline)]
    per_seed = df.groupby(["benchmark", "model", "seed"])["value"].mean()
    return per_seed.groupby(["benchmark", "model"]).mean().to_dict()


def marked(result) -> dict:
    """(benchmark, model) -> the x of the mean marker drawn in the benchmark's panel, read from the Axes."""
    out = {}
    for ax, name in zip(result.figure.axes, BENCHMARKS):
        labels = [t.get_text().split(" (")[0] for t in result.figure.axes[0].get_yticklabels()]
        for collection in ax.collections:
            if collection.get_gid() == "mean":
                for x, y in collection.get_offsets():
                    out[(name, labels[int(round(y))])] = float(x)
    return out


def test_the_marked_means_are_the_per_seed_means_averaged_over_seeds(tmp_path):
    folder = write_samples(tmp_path / "run", synthetic_samples())
    result = figures.plot_per_sample(folder, tmp_path / "spread.png")
    expected = expected_means(folder / SAMPLES_FILE)
    drawn = marked(result)
    assert set(drawn) == set(expected) and len(expected) == 9
    for key, value in expected.items():
        assert drawn[key] == pytest.approx(value, rel=1e-12), key
        assert [d["mean"] for d in result.means if (d["benchmark"], d["model"]) == key] == [drawn[key]]
    # the two seeds of unequal size: the pooled mean of the 8 images is not what the tables (and the figure) show
    df = pd.read_csv(folder / SAMPLES_FILE, dtype={"seed": str})
    pooled = df[(df.benchmark == "kitti_depth") & (df.metric == "abs_rel") & (df.model == "single_stream")]["value"]
    assert not math.isclose(pooled.mean(), drawn[("kitti_depth", "single_stream")], rel_tol=1e-9)
    counts = {(d["benchmark"], d["model"]): (d["seeds"], d["images"]) for d in result.means}
    assert counts[("mid_albedo", "single_stream")] == (2, 8) and counts[("mid_albedo", "trivial")] == (1, 6)


def test_the_png_has_the_figure_size_and_is_deterministic(tmp_path):
    from PIL import Image

    folder = write_samples(tmp_path / "run", synthetic_samples())
    before = np.random.get_state()
    np.random.seed(1)  # the caller's global generator: neither used for the jitter nor moved by the figure
    state = np.random.get_state()
    first = figures.plot_per_sample(folder, tmp_path / "a.png")
    after = np.random.get_state()
    assert after[0] == state[0] and np.array_equal(after[1], state[1]) and after[2:] == state[2:]
    np.random.seed(2)
    second = figures.plot_per_sample(folder, tmp_path / "b.png")
    np.random.set_state(before)
    assert first.path.read_bytes() == second.path.read_bytes()  # the strip's jitter is seeded
    width, height = (first.figure.get_size_inches() * 110).round().astype(int)
    with Image.open(first.path) as png:
        assert png.size == (width, height) and png.format == "PNG"
    assert len(first.figure.axes) == 8


def test_models_without_rows_are_skipped_and_empty_benchmarks_say_so(tmp_path):
    folder = write_samples(tmp_path / "run", synthetic_samples())
    result = figures.plot_per_sample(folder, tmp_path / "spread.png", models=("vae_ceiling", "multi_stream",
                                                                                "single_stream"))
    labels = [t.get_text() for t in result.figure.axes[0].get_yticklabels()]
    assert labels == ["multi_stream", "single_stream (2 seeds)"]  # the order of models; trivial not asked for
    assert {d["model"] for d in result.means} == {"multi_stream", "single_stream"}
    texts = {name: [t.get_text() for t in ax.texts] for ax, name in zip(result.figure.axes, BENCHMARKS)}
    assert texts["diode_normal"] == ["no per-image mean"] and texts["kitti_depth"] == []
    with pytest.raises(ValueError, match="no per-image values"):
        figures.plot_per_sample(folder, tmp_path / "none.png", models=("vae_ceiling",))


def test_one_run_of_several_is_drawn(tmp_path):
    folder = write_samples(tmp_path / "run", synthetic_samples("a") + synthetic_samples("b")[:40])
    with pytest.raises(ValueError, match="several runs"):
        figures.plot_per_sample(folder, tmp_path / "spread.png")
    result = figures.plot_per_sample(folder, tmp_path / "spread.png", run="b")
    assert {(d["benchmark"], d["model"]): d["mean"] for d in result.means} == pytest.approx(
        expected_means(folder / SAMPLES_FILE, run="b"), rel=1e-12)


def test_write_figures_draws_it_only_with_a_per_sample_file(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    assert figures.write_figures(folder, [], None) == {}  # no per_sample.csv: nothing, no error
    assert not (folder / "figures" / figures.PER_SAMPLE_FIGURE).exists()
    write_samples(folder, synthetic_samples())
    rows = [dict(run="toy", model="trivial", seed="", benchmark="kitti_depth", dataset="kitti_depth", task="depth",
                 metric="abs_rel", value="0.5", higher_is_better="False", n_images="6")]
    written = figures.write_figures(folder, rows, None)
    assert written == {figures.PER_SAMPLE_FIGURE: folder / "figures" / figures.PER_SAMPLE_FIGURE}
    assert written[figures.PER_SAMPLE_FIGURE].stat().st_size > 10_000
    (folder / SAMPLES_FILE).unlink()  # the per-image rows gone: the figure left from them goes too
    assert figures.write_figures(folder, rows, None) == {}
    assert not (folder / "figures" / figures.PER_SAMPLE_FIGURE).exists()


def test_the_reference_run_marks_the_means_of_its_tables(tmp_path):
    """The committed demo run, read only: where metrics.csv holds the mean of the per-image values the marked
    mean is the table's mean over seeds; where it pools pixels the table's value is marked apart."""
    rows = read_metrics(REFERENCE)
    result = figures.plot_per_sample(REFERENCE, tmp_path / "spread.png", rows=rows)
    metrics = pd.read_csv(REFERENCE / "metrics.csv", dtype={"seed": str}, keep_default_na=False)
    metrics = metrics[metrics["metric"] == metrics["benchmark"].map(lambda b: BENCHMARKS[b].headline)]
    table = metrics.groupby(["benchmark", "model"])["value"].mean().to_dict()
    drawn = marked(result)
    assert set(drawn) == {(b, m) for b in BENCHMARKS for m in MODELS} == set(table)
    for (benchmark, model), value in drawn.items():
        if benchmark in PER_IMAGE_MEANS:
            assert value == pytest.approx(table[(benchmark, model)], rel=1e-12), (benchmark, model)
    assert drawn == pytest.approx(expected_means(REFERENCE / SAMPLES_FILE), rel=1e-12)
    # the pooled headlines: the table's own value is marked (gid "table"), at the table's mean over seeds
    pooled = {name for name, b in BENCHMARKS.items() if b.task in figures.POOLED_TASKS}
    assert pooled == set(BENCHMARKS) - set(PER_IMAGE_MEANS)
    for ax, name in zip(result.figure.axes, BENCHMARKS):
        bars = [c.get_offsets()[:, 0] for c in ax.collections if c.get_gid() == "table"]
        if name in pooled:
            assert sorted(bars[0]) == pytest.approx(sorted(table[(name, m)] for m in MODELS), rel=1e-12)
        else:
            assert bars == []
    assert not (REFERENCE / "figures" / "spread.png").exists()
