"""Evaluation: known predictions give known metrics, resuming is exact, bad input is named."""

import csv
import math

import pytest
import torch

from stablemtl import evaluate as E
from stablemtl.data import mini
from stablemtl.data.sources import DatasetLayoutError

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
    E.evaluate(from_gt(), list(E.BENCHMARKS), tmp_path, data, model_name="oracle", resolution=RES, progress=False)
    rows = E.read_metrics(tmp_path)
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
    rows = E.read_metrics(tmp_path)
    assert metric(rows, "warped", "kitti_depth", "abs_rel")[0] < 1e-4
    assert metric(rows, "warped", "kitti_flow", "epe")[0] < 1e-4
    assert metric(rows, "warped", "kitti_scene_flow", "epe3d")[0] < 1e-4
    assert metric(rows, "warped", "mid_albedo", "rmse")[0] < 1e-3
    # rotating n by 10 degrees about x moves it by acos(nx^2 + (1 - nx^2) cos 10deg): per-image means, averaged
    import numpy as np

    per_image = []
    for file in sorted((tmp_path / "predictions/warped/diode_normal").iterdir()):
        with np.load(file) as stored:
            nx = stored["gt"][..., 0][stored["valid"]].astype(np.float64)
        per_image.append(np.degrees(np.arccos(np.clip(nx**2 + (1 - nx**2) * math.cos(math.radians(10)), -1, 1))).mean())
    assert metric(rows, "warped", "diode_normal", "mean")[0] == pytest.approx(np.mean(per_image), abs=1e-3)
    assert 5 < np.mean(per_image) <= 10


def test_resuming_gives_the_files_of_an_uninterrupted_run(data, tmp_path):
    benchmarks = ["cityscapes_semantic", "kitti_depth", "mid_shading"]
    E.evaluate("trivial", benchmarks, tmp_path / "full", data, resolution=RES, progress=False)
    E.evaluate("trivial", benchmarks, tmp_path / "resumed", data, resolution=RES, max_images=2, progress=False)
    cached = sorted((tmp_path / "resumed/predictions/trivial/kitti_depth").iterdir())
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
    E.evaluate(from_gt(), list(E.BENCHMARKS), tmp_path, data, model_name="oracle", resolution=RES, progress=False)
    E.evaluate("trivial", list(E.BENCHMARKS), tmp_path, data, resolution=RES, progress=False)
    rows = E.read_metrics(tmp_path)
    for benchmark, (name, best) in HEADLINE.items():
        trivial = metric(rows, "trivial", benchmark, name)[0]
        oracle = metric(rows, "oracle", benchmark, name)[0]
        assert abs(trivial - best) > abs(oracle - best) + 1e-3, benchmark
    assert {r["model"] for r in rows} == {"oracle", "trivial"}  # both kept in one file


def test_bad_input_is_named(data, tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics in this results folder"):
        E.read_metrics(tmp_path)
    with pytest.raises(DatasetLayoutError, match="does not exist"):
        E.evaluate("trivial", ["mid_albedo"], tmp_path, tmp_path / "nowhere", progress=False)
    with pytest.raises(ValueError, match="unknown benchmark 'nyu_depth'"):
        E.evaluate("trivial", ["nyu_depth"], tmp_path, data, progress=False)
    with pytest.raises(ValueError, match="model_name"):
        E.evaluate(from_gt(), ["mid_albedo"], tmp_path, data, progress=False)
