"""Evaluation: known predictions give known metrics, resuming is exact, bad input is named."""

import csv
import math

import pytest
import torch

from stablemtl import evaluate as E
from stablemtl import stages
from stablemtl.benchmarks import BENCHMARKS
from stablemtl.results import read_metrics
from stablemtl.data import mini
from stablemtl.data.sources import DatasetLayoutError

from rounding import unit_roundoff  # tests/rounding.py: tolerances from the arithmetic

RES = {"cityscapes_semantic": [32, 64], "kitti_depth": [32, 104], "diode_depth": [48, 64], "diode_normal": [48, 64],
       "kitti_flow": [32, 104], "kitti_scene_flow": [32, 104], "mid_albedo": [32, 48], "mid_shading": [32, 48]}
HEADLINE = {"cityscapes_semantic": ("miou", 1.0), "kitti_depth": ("abs_rel", 0.0), "diode_depth": ("abs_rel", 0.0),
            "diode_normal": ("mean", 0.0), "kitti_flow": ("epe", 0.0), "kitti_scene_flow": ("epe3d", 0.0),
            "mid_albedo": ("rmse", 0.0), "mid_shading": ("rmse", 0.0)}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    mini.write_mini_datasets(root, "smoke", workers=1, progress=False)
    return root


def from_gt(transform=lambda gt, task: gt):
    """A predictor returning (a transform of) the ground truth at the input resolution."""
    def predict(sample, task):
        gt = sample[task][None].float()
        if task == "shading":
            gt = (gt * torch.tensor([0.3, 0.59, 0.11])[None, :, None, None]).sum(1, keepdim=True)
        return transform(gt, task)
    return predict


def metric(rows, model, benchmark, name):
    (row,) = [r for r in rows if r["model"] == model and r["benchmark"] == benchmark and r["metric"] == name]
    return float(row["value"]), int(row["n_images"])


def test_ground_truth_as_prediction_scores_perfectly(data, tmp_path):
    E.evaluate(from_gt(), list(BENCHMARKS), tmp_path, data, model_name="oracle", resolution=RES, progress=False)
    rows = read_metrics(tmp_path)
    for benchmark, (name, best) in HEADLINE.items():
        value, n = metric(rows, "oracle", benchmark, name)
        assert value == pytest.approx(best, abs=1e-5), benchmark
        assert n >= 3
    assert {r["metric"] for r in rows if r["benchmark"] == "cityscapes_semantic"} >= {"miou", "acc", "iou_road"}


def test_alignment_invariances_and_a_known_error(data, tmp_path):
    def transform(gt, task):
        if task == "depth":
            return 0.5 * gt + 3.0  # undone by the least-squares scale and shift
        if task in ("optical_flow", "scene_flow"):
            return gt * torch.tensor([2.0, 0.5, 3.0][: gt.shape[1]])[None, :, None, None]  # per-axis scales
        if task == "normal":  # rotate every normal by 10 degrees about the x axis
            a = math.radians(10)
            rot = torch.tensor([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
            return torch.einsum("ij,bjhw->bihw", rot, gt)
        if task == "albedo":
            return gt * 0.7  # undone by the global scale
        return gt
    benchmarks = ["kitti_depth", "diode_depth", "diode_normal", "kitti_flow", "kitti_scene_flow", "mid_albedo"]
    E.evaluate(from_gt(transform), benchmarks, tmp_path, data, model_name="warped", resolution=RES, progress=False)
    rows = read_metrics(tmp_path)
    assert metric(rows, "warped", "kitti_depth", "abs_rel")[0] < 1e-4
    assert metric(rows, "warped", "kitti_flow", "epe")[0] < 1e-4
    assert metric(rows, "warped", "kitti_scene_flow", "epe3d")[0] < 1e-4
    assert metric(rows, "warped", "mid_albedo", "rmse")[0] < 1e-3
    # rotating n by 10 degrees about x moves it by acos(nx^2 + (1 - nx^2) cos 10deg): per-image means, averaged
    import numpy as np

    per_image = []
    for file in sorted((tmp_path / "predictions/warped/diode_normal").glob("*.npz")):
        with np.load(file) as stored:
            nx = stored["gt"][..., 0][stored["valid"]].astype(np.float64)
        per_image.append(np.degrees(np.arccos(np.clip(nx**2 + (1 - nx**2) * math.cos(math.radians(10)), -1, 1))).mean())
    assert metric(rows, "warped", "diode_normal", "mean")[0] == pytest.approx(np.mean(per_image), abs=1e-3)
    assert 5 < np.mean(per_image) <= 10


def test_resuming_gives_the_files_of_an_uninterrupted_run(data, tmp_path):
    benchmarks = ["cityscapes_semantic", "kitti_depth", "mid_shading"]
    E.evaluate("trivial", benchmarks, tmp_path / "full", data, resolution=RES, progress=False)
    E.evaluate("trivial", benchmarks, tmp_path / "resumed", data, resolution=RES, max_images=2, progress=False)
    cached = sorted((tmp_path / "resumed/predictions/trivial/kitti_depth").glob("*.npz"))
    assert len(cached) == 2
    stamps = [p.stat().st_mtime_ns for p in cached]
    E.evaluate("trivial", benchmarks, tmp_path / "resumed", data, resolution=RES, progress=False)
    assert [p.stat().st_mtime_ns for p in cached] == stamps  # not predicted again
    for name in ("metrics.csv", "per_sample.csv"):
        assert (tmp_path / "full" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes()
    with open(tmp_path / "full/per_sample.csv", newline="") as f:
        ids = {(r["benchmark"], r["index"]) for r in csv.DictReader(f)}
    assert len(ids) == 3 + 3 + 4


def test_trivial_rows_are_the_floor(data, tmp_path):
    E.evaluate(from_gt(), list(BENCHMARKS), tmp_path, data, model_name="oracle", resolution=RES, progress=False)
    E.evaluate("trivial", list(BENCHMARKS), tmp_path, data, resolution=RES, progress=False)
    rows = read_metrics(tmp_path)
    for benchmark, (name, best) in HEADLINE.items():
        trivial = metric(rows, "trivial", benchmark, name)[0]
        oracle = metric(rows, "oracle", benchmark, name)[0]
        assert abs(trivial - best) > abs(oracle - best) + 1e-3, benchmark
    assert {r["model"] for r in rows} == {"oracle", "trivial"}  # both kept in one file


def test_bad_input_is_named(data, tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics in this results folder"):
        read_metrics(tmp_path)
    with pytest.raises(DatasetLayoutError, match="does not exist"):
        E.evaluate("trivial", ["mid_albedo"], tmp_path, tmp_path / "nowhere", progress=False)
    with pytest.raises(ValueError, match="unknown benchmark 'nyu_depth'"):
        E.evaluate("trivial", ["nyu_depth"], tmp_path, data, progress=False)
    with pytest.raises(ValueError, match="model_name"):
        E.evaluate(from_gt(), ["mid_albedo"], tmp_path, data, progress=False)


# --------------------------------------------------------------------------- report and browser

@pytest.fixture(scope="module")
def results(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    noisy = lambda scale: (lambda gt, task: gt + scale * torch.sin(torch.arange(gt.numel()).reshape(gt.shape).float())  # noqa: E731
                           if task not in ("semantic",) else gt)
    E.evaluate("trivial", list(BENCHMARKS), out, data, resolution=RES, progress=False, run="demo")
    for name, scale in (("single_task", 0.05), ("single_stream", 0.08), ("multi_stream", 0.03)):
        E.evaluate(from_gt(noisy(scale)), list(BENCHMARKS), out, data, model_name=name, resolution=RES,
                   progress=False, run="demo")
    return out


def test_tables_regenerate_byte_identically(results, tmp_path):
    from stablemtl import report

    first = {k: p.read_bytes() for k, p in report.write_tables(results).items()}
    again = {k: p.read_bytes() for k, p in report.write_tables(results).items()}
    assert first == again and "main.md" in first and "kitti_depth.tex" in first
    main = first["main.md"].decode()
    assert main.splitlines()[0] == ("| model | Cityscapes mIoU | DIODE normal mean | KITTI AbsRel x100 | KITTI flow EPE "
                                    "| KITTI scene-flow EPE3D | MID albedo RMSE | Delta_m % | seeds |")
    names = [line.split(" | ")[0][2:] for line in main.splitlines()[2:]]
    assert names[:4] == ["trivial", "single_task", "single_stream", "multi_stream"]
    assert "paper: StableMTL multi-stream" in names
    assert r"\begin{tabular}" in first["main.tex"].decode()


def test_delta_m_matches_a_hand_computation(results):
    from stablemtl import comparisons

    rows = [r for r in read_metrics(results) if r["run"] == "demo"]
    value = {(r["model"], r["benchmark"], r["metric"]): float(r["value"]) for r in rows}
    terms = []
    for benchmark, name in comparisons.DELTA_M_METRICS:
        m, b = value[("multi_stream", benchmark, name)], value[("single_task", benchmark, name)]
        sign = 1 if name == "miou" else -1
        terms.append(sign * (m - b) / b * 100)
    total, per_metric = comparisons.delta_m_terms(rows, "multi_stream")
    assert total == pytest.approx(sum(terms) / len(terms))
    assert len(per_metric) == 8
    assert comparisons.delta_m_terms(rows, "single_task")[0] == 0.0
    assert comparisons.delta_m_terms([r for r in rows if r["model"] != "single_task"], "multi_stream") is None


def test_figures_are_written(results, tmp_path):
    from stablemtl import figures

    rows = [r for r in read_metrics(results) if r["run"] == "demo"]
    log = tmp_path / "train_log.csv"
    log.write_text("step,task,dataset,loss,lr,step_s,data_s\n" + "".join(
        f"{s},{t},hypersim,{1.0 / (s + 1)},0.0001,0.5,0.01\n" for s, t in enumerate(["depth", "normal"] * 10)))
    for path in (figures.plot_training_curves({"single_stream": log}, tmp_path / "curves.png"),
                 figures.plot_delta_m(rows, tmp_path / "delta_m.png"),
                 figures.plot_qualitative(results, tmp_path / "grid.png")):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_browser_reacts_to_its_widgets(results):
    from stablemtl.browse import Browser

    b = Browser(results)
    assert b.model.options == ("multi_stream", "single_stream", "single_task", "trivial")
    b.model.value = "multi_stream"
    b.benchmark.value = "kitti_depth"
    first = {k: img.value for k, img in b.images.items()}
    assert all(v[:4] == b"\x89PNG" for v in first.values())
    assert "sample 0" in b.caption.value and "abs_rel" in b.caption.value
    b.index.value = 1
    assert b.images["input"].value != first["input"] and "sample 1" in b.caption.value
    b.benchmark.value = "cityscapes_semantic"
    assert "semantic" in b.caption.value and "miou" in b.caption.value
    b.model.value = "trivial"
    assert b.images["prediction"].value != first["prediction"]


def test_report_inputs_are_checked(tmp_path):
    from stablemtl.browse import Browser
    from stablemtl import report

    with pytest.raises(FileNotFoundError, match="no metrics"):
        report.write_tables(tmp_path)
    with pytest.raises(FileNotFoundError, match="no prediction cache"):
        Browser(tmp_path)


def test_single_task_rows_and_the_full_report(data, results, tmp_path):
    from stablemtl import report

    E.evaluate_single_task({"depth": from_gt(), "semantic": from_gt()}, tmp_path, data, resolution=RES, progress=False)
    rows = read_metrics(tmp_path)
    assert {(r["model"], r["benchmark"]) for r in rows} == {("single_task", "kitti_depth"), ("single_task", "diode_depth"),
                                                            ("single_task", "cityscapes_semantic")}
    written = report.write_report(results, training_logs=None)
    assert {"main.md", "main.tex", "delta_m.png", "qualitative.png"} <= set(written)


def test_images_without_valid_ground_truth_are_skipped_and_counted(data, tmp_path):
    import shutil

    import numpy as np

    from stablemtl.data import annotations
    from stablemtl.data.sources import Cityscapes

    copy = tmp_path / "data"
    shutil.copytree(data / "cityscapes", copy / "cityscapes")
    source = Cityscapes(copy / "cityscapes")
    label = copy / "cityscapes" / Cityscapes.label_path(source.entries[1][0])
    annotations.write_cityscapes_label_ids(label, np.zeros_like(annotations.read_cityscapes_label_ids(label)))  # all "unlabeled"
    E.evaluate("trivial", ["cityscapes_semantic"], tmp_path / "out", copy, resolution=RES, progress=False)
    (row,) = [r for r in read_metrics(tmp_path / "out") if r["metric"] == "miou"]
    assert row["n_images"] == str(len(source) - 1) and math.isfinite(float(row["value"]))


def test_a_checkpoint_of_the_wrong_kind_is_named(data, tmp_path, tiny_base):
    from stablemtl.model import streams as S
    from stablemtl.model.pipeline import save_model

    path = save_model(S.SingleStream.from_base(tiny_base), tmp_path / "single")
    with pytest.raises(ValueError, match="holds a 'single_stream' model, not a 'multi_stream' one"):
        E.evaluate(path, ["mid_albedo"], tmp_path / "out", data, expect_kind="multi_stream", progress=False)
    E.evaluate(path, ["mid_albedo"], tmp_path / "out", data, resolution=RES, expect_kind="single_stream", progress=False)
    assert {r["model"] for r in read_metrics(tmp_path / "out")} == {"single_stream"}


def test_benchmarks_on_the_same_images_share_one_pipeline_call(data, tmp_path, monkeypatch, tiny_base):
    import numpy as np

    from stablemtl.model import streams as S
    from stablemtl.model.pipeline import StableMTLPipeline, save_model

    torch.manual_seed(0)
    multi = S.MultiStream.from_single_stream(S.SingleStream.from_base(tiny_base), query_hidden=16, heads=2)
    for p in multi.task_attention.parameters():  # away from the identity initialisation
        p.data.add_(0.05 * torch.randn_like(p))
    path = save_model(multi, tmp_path / "multi")

    calls = []
    call = StableMTLPipeline.__call__
    monkeypatch.setattr(StableMTLPipeline, "__call__", lambda self, *a, **k: calls.append(k["tasks"]) or call(self, *a, **k))
    pairs = ["diode_depth", "diode_normal", "kitti_flow", "kitti_scene_flow", "mid_albedo", "mid_shading"]
    # in float64: a call for two tasks and one for a single task are batches of other sizes, which sum in other
    # orders; in float64 they agree to within about 1e-11 (rounding.network_tolerance) on every machine (a normal's
    # error grows by 1 / |v| when its decoded vector v is normalised: still far below float32's rounding for
    # |v| down to 1e-5). The tasks decode in float32 (Task.decode) from float64 values that round at most 1 ulp
    # (2u of the largest value) apart, a normalisation at most doubles that, each result rounds (2u), and the
    # bilinear resize to the ground truth's size (4 weighted terms) is within 4u of its exact value on each
    # side: within 2u x 2 + 2u + 2 x 4u = 14u <= 16u of the largest prediction.
    kw = dict(resolution=RES, progress=False, dtype=torch.float64)
    E.evaluate(path, pairs, tmp_path / "together", data, **kw)
    n_images = sum(len(list((tmp_path / "together/predictions/multi_stream" / b).glob("*.npz"))) for b in pairs[::2])
    assert len(calls) == n_images and all(len(t) == 2 for t in calls)  # one call per image for both tasks
    for b in pairs:
        E.evaluate(path, [b], tmp_path / "apart", data, **kw)
    for b in pairs:
        for file in sorted((tmp_path / "together/predictions/multi_stream" / b).glob("*.npz")):
            with np.load(file) as x, np.load(tmp_path / "apart/predictions/multi_stream" / b / file.name) as y:
                tolerance = 16 * unit_roundoff(torch.float32) * np.abs(y["pred"]).max()
                np.testing.assert_allclose(x["pred"], y["pred"], rtol=0, atol=tolerance, err_msg=f"{b} {file.name}")


def test_another_model_of_the_same_name_never_scores_stale_predictions(data, tmp_path, tiny_base):
    """``evaluate`` called directly: the prediction cache carries the weights' fingerprint."""
    import json

    import numpy as np

    from stablemtl.model import streams as S
    from stablemtl.model.fingerprint import model_fingerprint

    first = S.SingleStream.from_base(tiny_base, ["albedo", "shading"])
    second = S.SingleStream.from_base(tiny_base, ["albedo", "shading"])
    with torch.no_grad():
        second.unet.conv_out.bias.add_(0.3)  # other weights, same name and tasks
    assert model_fingerprint(first) != model_fingerprint(second)
    kw = dict(resolution=RES, max_images=2, progress=False)
    E.evaluate(first, ["mid_albedo"], tmp_path / "shared", data, **kw)
    E.evaluate(second, ["mid_albedo"], tmp_path / "shared", data, **kw)  # same model name: single_stream
    E.evaluate(second, ["mid_albedo"], tmp_path / "fresh", data, **kw)
    for i in range(2):
        with np.load(tmp_path / f"shared/predictions/single_stream/mid_albedo/{i:05d}.npz") as a, \
                np.load(tmp_path / f"fresh/predictions/single_stream/mid_albedo/{i:05d}.npz") as b:
            np.testing.assert_array_equal(a["pred"], b["pred"])
    shared, fresh = read_metrics(tmp_path / "shared"), read_metrics(tmp_path / "fresh")
    assert [(r["metric"], r["value"]) for r in shared] == [(r["metric"], r["value"]) for r in fresh]
    record = json.loads((tmp_path / "shared/predictions/single_stream/mid_albedo/cache.json").read_text())
    assert record["weights"] == model_fingerprint(second) and record["protocol"] == E.PROTOCOL_VERSION
    # the same weights again: the cache is used, nothing is predicted anew
    stamps = [p.stat().st_mtime_ns for p in sorted((tmp_path / "fresh/predictions/single_stream/mid_albedo").glob("*.npz"))]
    E.evaluate(second, ["mid_albedo"], tmp_path / "fresh", data, **kw)
    assert [p.stat().st_mtime_ns for p in sorted((tmp_path / "fresh/predictions/single_stream/mid_albedo").glob("*.npz"))] == stamps


# --------------------------------------------------------------------------- device, precision, prefetch

@pytest.fixture(scope="module")
def intrinsics_model(tiny_base, tmp_path_factory):
    """A small single-stream checkpoint (albedo and shading: one pipeline call per MID image)."""
    from stablemtl.model import streams as S
    from stablemtl.model.pipeline import save_model

    torch.manual_seed(0)
    return save_model(S.SingleStream.from_base(tiny_base, ["albedo", "shading"]),
                      tmp_path_factory.mktemp("model") / "single")


@pytest.mark.slow
def test_evaluation_uses_the_gpu_when_there_is_one(data, tmp_path, monkeypatch, intrinsics_model):
    """A fake GPU: the default device is ``cuda:0``; the pipeline is moved there once (recorded, not
    moved: this machine has none), and a caller's model is put back where it came from."""
    from stablemtl import devices
    from stablemtl.model.pipeline import StableMTLPipeline, load_model

    monkeypatch.setattr(devices, "default_device", lambda: torch.device("cuda:0"))
    monkeypatch.setattr(devices, "available_devices", lambda: ["cpu", "cuda:0"])
    moves = []
    monkeypatch.setattr(StableMTLPipeline, "to", lambda self, *a, **k: moves.append(a) or self)
    kw = dict(resolution=RES, max_images=1, progress=False)
    E.evaluate(intrinsics_model, ["mid_albedo", "mid_shading"], tmp_path / "a", data, **kw)
    assert moves == [(torch.device("cuda:0"),)]
    moves.clear()
    model = load_model(intrinsics_model)
    E.evaluate(model, ["mid_albedo"], tmp_path / "b", data, **kw)
    assert moves == [(torch.device("cuda:0"),), (torch.device("cpu"),)]
    moves.clear()
    E.evaluate(model, ["mid_albedo"], tmp_path / "c", data, device="cpu", **kw)
    assert moves == []  # already there
    import inspect

    assert {"device", "dtype"} <= set(inspect.signature(stages.evaluate_models).parameters)  # passed on to evaluate


def test_a_device_that_does_not_exist_is_named(data, tmp_path):
    for bad in ("cuda:7", "nonsense") + (() if torch.cuda.is_available() else ("cuda",)):
        with pytest.raises(ValueError, match=f"'{bad}'.*available: cpu"):
            E.evaluate("trivial", ["mid_albedo"], tmp_path, data, resolution=RES, progress=False, device=bad)


@pytest.mark.slow
def test_prefetching_and_resuming_give_the_same_files(data, tmp_path, monkeypatch, intrinsics_model):
    import threading

    import numpy as np

    from stablemtl.data.sources import SOURCES

    threads = []
    get = SOURCES["mid"].__getitem__
    monkeypatch.setattr(SOURCES["mid"], "__getitem__",
                        lambda self, i: threads.append(threading.current_thread().name) or get(self, i))
    benchmarks, kw = ["mid_albedo", "mid_shading"], dict(resolution=RES, progress=False)
    E.evaluate(intrinsics_model, benchmarks, tmp_path / "plain", data, prefetch=0, **kw)
    assert threads and not any("prefetch" in t for t in threads)
    threads.clear()
    E.evaluate(intrinsics_model, benchmarks, tmp_path / "ahead", data, prefetch=2, **kw)
    assert all("prefetch" in t for t in threads)  # every image loaded in the background
    E.evaluate(intrinsics_model, benchmarks, tmp_path / "resumed", data, max_images=2, prefetch=2, **kw)
    E.evaluate(intrinsics_model, benchmarks, tmp_path / "resumed", data, prefetch=3, **kw)
    for run in ("ahead", "resumed"):
        for name in ("metrics.csv", "per_sample.csv"):
            assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / run / name).read_bytes(), (run, name)
        for b in benchmarks:
            files = sorted((tmp_path / "plain/predictions/single_stream" / b).glob("*.npz"))
            assert len(files) >= 3
            for file in files:
                with np.load(file) as x, np.load(tmp_path / run / "predictions/single_stream" / b / file.name) as y:
                    for key in x.files:
                        np.testing.assert_array_equal(x[key], y[key], err_msg=f"{run} {b} {file.name} {key}")


@pytest.mark.slow
def test_bfloat16_evaluation_casts_a_copy_and_caches_apart(data, tmp_path, intrinsics_model):
    import json

    from stablemtl.model.fingerprint import model_fingerprint
    from stablemtl.model.pipeline import load_model

    model = load_model(intrinsics_model)
    kw = dict(resolution=RES, max_images=2, progress=False)
    E.evaluate(model, ["mid_albedo"], tmp_path, data, **kw)
    full = read_metrics(tmp_path)
    E.evaluate(model, ["mid_albedo"], tmp_path, data, dtype=torch.bfloat16, **kw)
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # the caller's weights are untouched
    record = json.loads((tmp_path / "predictions/single_stream/mid_albedo/cache.json").read_text())
    assert record["weights"] != model_fingerprint(model)  # bf16 predictions are cached apart
    half = read_metrics(tmp_path)
    (a,), (b,) = ([float(r["value"]) for r in rows if r["metric"] == "rmse"] for rows in (full, half))
    # bfloat16's rounding (u = 2**-8) moves the tiny model's albedo by about 0.01 (test_model's BF16_TOLERANCE
    # measurement), and an rmse by no more than its pixels move: the same on every CPU (bf16 rounding, not sum order)
    assert b == pytest.approx(a, abs=0.02)
    with pytest.raises(ValueError, match="float16 is not supported on the CPU"):
        E.evaluate(model, ["mid_albedo"], tmp_path, data, dtype=torch.float16, device="cpu", **kw)
