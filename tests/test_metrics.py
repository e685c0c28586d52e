"""Metrics: the reference test vectors, hand-computable cases, oracles and batching invariance."""

import math

import numpy as np
import pytest

from stablemtl import metrics as M

RNG = np.random.default_rng(0)


# ----------------------------------------------------------------------------- depth

def test_depth_reference_vector():
    gt = np.array([[1.0, 2.0], [4.0, 8.0]])
    pred = np.array([[1.0, 2.0], [3.0, 5.0]])
    valid = np.ones((2, 2), bool)
    aligned, scale, shift = M.align_depth_least_squares(pred, gt, valid, return_params=True)
    assert scale == pytest.approx(1.8) and shift == pytest.approx(-1.2)
    assert np.allclose(aligned, [[0.6, 2.4], [4.2, 7.8]])
    m = M.depth_metrics(aligned, gt, valid)
    assert m["abs_rel"] == pytest.approx(0.16875)
    assert m["rmse"] == pytest.approx(0.316228, abs=1e-6)
    assert m["delta1"] == pytest.approx(0.75)
    # the rest by hand on the same four pixels
    a, g = aligned.ravel(), gt.ravel()
    assert m["sq_rel"] == pytest.approx(np.mean((a - g) ** 2 / g))
    assert m["log10"] == pytest.approx(np.mean(np.abs(np.log10(a / g))))
    assert m["i_rmse"] == pytest.approx(math.sqrt(np.mean((1 / a - 1 / g) ** 2)))
    assert m["delta2"] == 0.75 and m["delta3"] == 1.0  # ratios 1/0.6, 1.2, 1.05, 1.025


def test_depth_metrics_hand_cases():
    gt = np.array([[1.0, 2.0, 4.0]])
    valid = np.ones_like(gt, bool)
    perfect = M.depth_metrics(gt, gt, valid)
    assert all(perfect[k] == 0 for k in ("abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "i_rmse", "silog"))
    assert perfect["delta1"] == 1
    doubled = M.depth_metrics(2 * gt, gt, valid)
    assert doubled["abs_rel"] == pytest.approx(1.0)
    assert doubled["rmse_log"] == pytest.approx(math.log(2))
    assert doubled["silog"] == pytest.approx(0.0, abs=1e-7)  # scale-invariant
    assert doubled["delta1"] == 0 and doubled["delta3"] == 0  # ratio 2 > 1.25^3 = 1.953
    # the thresholds are strict: ratio exactly 1.25 is not under 1.25
    edge = M.depth_metrics(np.array([[1.25]]), np.array([[1.0]]), np.ones((1, 1), bool))
    assert edge["delta1"] == 0 and edge["delta2"] == 1


def test_depth_alignment_clips_to_range_and_disparity_space():
    gt = np.array([[1.0, 2.0], [4.0, 8.0]])
    valid = np.ones((2, 2), bool)
    clipped = M.align_depth_least_squares(np.array([[1.0, 2.0], [3.0, 5.0]]), gt, valid, depth_range=(1.0, 5.0))
    assert np.allclose(clipped, [[1.0, 2.4], [4.2, 5.0]])
    disparity = 0.5 / gt + 0.1  # an affine function of 1 / depth
    aligned = M.align_depth_least_squares(disparity, gt, valid, space="disparity")
    assert np.allclose(aligned, gt)
    with pytest.raises(ValueError, match="'depth' or 'disparity'"):
        M.align_depth_least_squares(gt, gt, valid, space="log")


def test_depth_metrics_refuse_unaligned_nonpositive_predictions():
    with pytest.raises(ValueError, match="<= 0 at 1 valid pixels; align it"):
        M.depth_metrics(np.array([[0.0, 1.0]]), np.array([[1.0, 1.0]]), np.ones((1, 2), bool))


def test_nan_ground_truth_is_invalid_not_a_number():
    gt = np.array([[1.0, 2.0, np.nan, np.inf]])
    pred = np.array([[1.0, 2.2, 5.0, 7.0]])
    with_nan = M.depth_metrics(pred, gt, np.ones((1, 4), bool))
    masked = M.depth_metrics(pred[:, :2], gt[:, :2], np.ones((1, 2), bool))
    assert with_nan == masked


def test_empty_mask_raises_a_named_error():
    with pytest.raises(M.EmptyMaskError):
        M.depth_metrics(np.ones((2, 2)), np.ones((2, 2)), np.zeros((2, 2), bool))


# ----------------------------------------------------------------------------- normals

def _normals_at_angles(degrees):
    t = np.radians(np.asarray(degrees, dtype=np.float64))
    pred = np.stack([np.sin(t), np.zeros_like(t), np.cos(t)], -1)[None]
    gt = np.tile([0.0, 0.0, 1.0], (1, len(t), 1))
    return pred, gt, np.ones((1, len(t)), bool)


def test_normal_reference_vector():
    pred, gt, valid = _normals_at_angles([10, 20, 40])
    assert np.allclose(M.normal_angular_errors(pred, gt, valid), [10, 20, 40])
    m = M.normal_metrics(pred, gt, valid)
    assert m["mean"] == pytest.approx(23.333333, abs=1e-5)
    assert m["median"] == pytest.approx(20.0)
    assert m["rmse"] == pytest.approx(26.4575, abs=1e-4)
    assert m["a11_25"] == pytest.approx(100 / 3) and m["a22_5"] == pytest.approx(200 / 3)
    assert m["a30"] == pytest.approx(200 / 3)


def test_normal_errors_ignore_prediction_length_and_handle_opposites():
    pred, gt, valid = _normals_at_angles([0, 90, 180])
    assert np.allclose(M.normal_angular_errors(3.0 * pred, gt, valid), [0, 90, 180])


def test_normal_accumulator_reference_mean_vs_pooled():
    acc = M.NormalAccumulator()
    for angles in ([10, 20, 40], [30]):
        acc.update(*_normals_at_angles(angles))
    out = acc.compute()
    assert out["mean"] == pytest.approx((70 / 3 + 30) / 2)  # per-image means, then averaged
    assert out["pooled_mean"] == pytest.approx(100 / 4)  # all pixels together
    assert out["median"] == pytest.approx(25.0)
    assert acc.n_images == 2


# ----------------------------------------------------------------------------- semantics

def test_semantic_confusion_hand_case():
    gt = np.array([[0, 0, 1, 1], [2, 2, 250, 1]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 3, 1]])
    conf = M.SemanticConfusion(num_classes=4)
    per_image = conf.update(pred, gt)
    out = conf.compute()
    # valid: 7 pixels, correct: 0,1,1,2,1 -> 5 / 7
    assert out["acc"] == pytest.approx(5 / 7)
    # class 0: tp 1, gt 2, pred 2 -> 1/3; class 1: tp 3, gt 3, pred 4 -> 3/4; class 2: tp 1, gt 2, pred 1 -> 1/2
    assert np.allclose(out["iou"][:3], [1 / 3, 3 / 4, 1 / 2])
    assert math.isnan(out["iou"][3])  # absent from GT and (valid) predictions
    assert out["miou"] == pytest.approx((1 / 3 + 3 / 4 + 1 / 2) / 3)
    assert per_image[0]["acc"] == pytest.approx(5 / 7)


def test_semantic_rejects_out_of_range_ids():
    with pytest.raises(ValueError, match=r"prediction has class ids \[8\] outside 0..7"):
        M.SemanticConfusion().update(np.array([[8]]), np.array([[0]]))


# ----------------------------------------------------------------------------- flow

def test_nnls_alignment_matches_scipy():
    from scipy.optimize import nnls

    pred = RNG.normal(size=(6, 7, 2))
    gt = pred * np.array([2.5, -1.0]) + 0.3 * RNG.normal(size=(6, 7, 2))  # v axis anti-correlated
    valid = RNG.random((6, 7)) > 0.2
    aligned, scale = M.align_flow_nnls(pred, gt, valid, return_scale=True)
    for c in range(2):
        expected, _ = nnls(pred[..., c][valid][:, None], gt[..., c][valid])
        assert scale[c] == pytest.approx(expected[0], abs=1e-12)
    assert scale[1] == 0.0  # non-negative: a negative fit is clamped to 0
    assert np.allclose(aligned, pred * scale)


def test_flow_metrics_hand_cases():
    gt = np.array([[[10.0, 0.0], [100.0, 0.0], [10.0, 0.0], [0.0, 5.0]]])
    pred = np.array([[[14.0, 0.0], [104.0, 0.0], [12.0, 0.0], [0.0, 5.0]]])
    valid = np.ones((1, 4), bool)
    m = M.flow_metrics(pred, gt, valid, align=False)
    # EPE 4, 4, 2, 0; outliers: only the first (4 > 3 and 4/10 > 5 %); 4/100 < 5 %
    assert m["epe"] == pytest.approx(2.5)
    assert m["fl"] == pytest.approx(0.25)
    assert m["angle"] == pytest.approx(0.0)
    perpendicular = M.flow_metrics(np.array([[[0.0, 1.0]]]), np.array([[[1.0, 0.0]]]), np.ones((1, 1), bool),
                                   align=False)
    assert perpendicular["angle"] == pytest.approx(90.0)
    scaled = M.flow_metrics(0.1 * gt, gt, valid, align=True)
    assert scaled["epe"] == pytest.approx(0.0, abs=1e-9) and scaled["fl"] == 0


def test_scene_flow_and_versus_or_conventions():
    gt = np.array([[[0.5, 0.0, 0.0], [0.2, 0.0, 0.0], [4.0, 0.0, 0.0]]])
    pred = gt + np.array([[[0.04, 0, 0], [0.0, 0.35, 0], [0.35, 0, 0]]])
    valid = np.ones((1, 3), bool)
    a = M.scene_flow_metrics(pred, gt, valid, align=False, convention="and")
    o = M.scene_flow_metrics(pred, gt, valid, align=False, convention="or")
    # pixel 1: EPE 0.04 < 0.05 but 8 % > 5 %: strict only under OR; relaxed under both
    # pixel 2: EPE 0.35 > 0.3 and 175 % > 10 %: outlier under both
    # pixel 3: EPE 0.35 > 0.3 but 8.75 % < 10 %: outlier only under OR; relaxed only under OR
    assert a["epe3d"] == pytest.approx((0.04 + 0.35 + 0.35) / 3)
    assert (a["acc_strict"], a["acc_relax"], a["outliers"]) == pytest.approx((0, 1 / 3, 1 / 3))
    assert (o["acc_strict"], o["acc_relax"], o["outliers"]) == pytest.approx((1 / 3, 2 / 3, 2 / 3))
    with pytest.raises(ValueError, match="'and'.*'or'"):
        M.scene_flow_metrics(pred, gt, valid, convention="xor")


# ----------------------------------------------------------------------------- albedo / shading

def test_ssim_matches_scikit_image():
    from skimage.metrics import structural_similarity

    x = RNG.random((20, 23, 3))
    y = np.clip(x + 0.1 * RNG.normal(size=x.shape), 0, 1)
    expected = structural_similarity(x, y, data_range=1.0, channel_axis=2)
    assert M.ssim(x, y) == pytest.approx(expected, abs=1e-10)
    assert M.ssim(x[..., 0], y[..., 0]) == pytest.approx(structural_similarity(x[..., 0], y[..., 0], data_range=1.0),
                                                         abs=1e-10)
    assert M.ssim(x, x) == pytest.approx(1.0)


def _lmse_loops(correct, estimate, mask, window=16, shift=8):
    """A direct transcription of the windowed definition, as an oracle."""
    ssq = total = 0.0
    for i in range(0, correct.shape[0] - window + 1, shift):
        for j in range(0, correct.shape[1] - window + 1, shift):
            c = correct[i:i + window, j:j + window].reshape(-1)
            e = estimate[i:i + window, j:j + window].reshape(-1)
            m = np.repeat(mask[i:i + window, j:j + window].reshape(-1), correct.size // mask.size)
            alpha = np.sum(c * e * m) / np.sum(e * e * m) if np.sum(e * e * m) > 1e-5 else 0.0
            ssq += np.sum(m * (c - alpha * e) ** 2)
            total += np.sum(m * c * c)
    return ssq / total


@pytest.mark.parametrize("channels", [1, 3])
def test_lmse_matches_window_loops(channels):
    shape = (45, 61) if channels == 1 else (45, 61, 3)
    gt, est = RNG.random(shape), RNG.random(shape)
    mask = RNG.random((45, 61)) > 0.3
    assert M.lmse(gt, est, mask) == pytest.approx(_lmse_loops(gt, est, mask), rel=1e-10)
    assert M.lmse(gt, 3.0 * gt, mask) == pytest.approx(0.0, abs=1e-12)  # local scale absorbs 3x


def test_intrinsic_metrics_scale_invariance_and_rmse_reduction():
    albedo = 0.1 + 0.8 * RNG.random((32, 40, 3))
    valid = np.ones((32, 40), bool)
    m = M.intrinsic_metrics(0.5 * albedo, albedo, valid)
    assert m["rmse"] == pytest.approx(0.0, abs=1e-12)
    assert m["ssim"] == pytest.approx(1.0) and m["lmse"] == pytest.approx(0.0, abs=1e-12)
    # a constant error of 0.1 on every channel: per pixel sqrt(3 * 0.01) (reference), per element 0.1
    off = np.clip(albedo + 0.1, 0, 1)
    gt = off - 0.1
    ref = M.intrinsic_metrics(off, gt, valid)  # the global scale is fitted first
    s = np.dot(off.ravel(), gt.ravel()) / np.dot(off.ravel(), off.ravel())
    err = (np.clip(s * off, 0, 1) - gt) ** 2
    assert ref["rmse"] == pytest.approx(math.sqrt(err.sum() / valid.sum()))
    elem = M.intrinsic_metrics(off, gt, valid, rmse_reduction="element")
    assert elem["rmse"] == pytest.approx(ref["rmse"] / math.sqrt(3))
    shading = M.intrinsic_metrics(0.5 * albedo[..., 0], albedo[..., 0], valid)
    assert shading["rmse"] == pytest.approx(0.0, abs=1e-12)


# ----------------------------------------------------------------------------- Delta_m

def test_delta_m_hand_case_and_terms():
    values = {"miou": 0.55, "epe": 9.0, "abs_rel": 0.11}
    baseline = {"miou": 0.50, "epe": 10.0, "abs_rel": 0.10}
    delta, terms = M.delta_m(values, baseline, M.HIGHER_IS_BETTER, return_terms=True)
    assert terms == pytest.approx({"miou": 10.0, "epe": 10.0, "abs_rel": -10.0})
    assert delta == pytest.approx(10.0 / 3)
    with pytest.raises(KeyError, match="'silog' is missing from baseline"):
        M.delta_m({"silog": 1.0}, baseline, M.HIGHER_IS_BETTER)


def test_delta_m_of_the_papers_headline_numbers():
    # docs/method.md "Published numbers", six headline metrics (the paper also uses others, so its -1.57 differs)
    single_task = {"miou": 48.17, "mean": 22.27, "abs_rel": 14.21, "epe": 10.36, "epe3d": 0.2735, "rmse": 0.2551}
    single_stream = {"miou": 52.57, "mean": 23.94, "abs_rel": 15.64, "epe": 12.76, "epe3d": 0.2618, "rmse": 0.2077}
    expected = np.mean([(52.57 - 48.17) / 48.17, -(23.94 - 22.27) / 22.27, -(15.64 - 14.21) / 14.21,
                        -(12.76 - 10.36) / 10.36, -(0.2618 - 0.2735) / 0.2735, -(0.2077 - 0.2551) / 0.2551]) * 100
    assert M.delta_m(single_stream, single_task, M.HIGHER_IS_BETTER) == pytest.approx(expected)
    assert expected == pytest.approx(-1.456, abs=1e-3)


# ----------------------------------------------------------------------------- accumulators

def _batch(kind, n=5, h=20, w=27):
    valid = RNG.random((n, h, w)) > 0.25
    valid[2] = False  # one image without a valid pixel: skipped, counted
    if kind == "depth":
        gt = 1 + 20 * RNG.random((n, h, w))
        pred = 0.3 * gt + 0.1 * RNG.random((n, h, w))
    elif kind in ("normal", "scene_flow", "intrinsic"):
        gt = RNG.random((n, h, w, 3)) + (0.05 if kind == "intrinsic" else -0.5)
        pred = gt + 0.2 * RNG.normal(size=gt.shape)
    else:  # flow
        gt = 20 * RNG.normal(size=(n, h, w, 2))
        pred = 0.1 * gt + RNG.normal(size=gt.shape)
    return pred, gt, valid


@pytest.mark.parametrize("make,kind", [
    (lambda: M.DepthAccumulator((1e-5, 80.0)), "depth"),
    (lambda: M.DepthAccumulator((0.6, 350.0), align="disparity"), "depth"),
    (M.NormalAccumulator, "normal"),
    (M.FlowAccumulator, "flow"),
    (M.SceneFlowAccumulator, "scene_flow"),
    (M.IntrinsicAccumulator, "intrinsic"),
])
def test_accumulators_do_not_depend_on_batching(make, kind):
    pred, gt, valid = _batch(kind)
    whole, single, mixed = make(), make(), make()
    per_image = whole.update(pred, gt, valid)
    for i in range(len(valid)):
        single.update(pred[i], gt[i], valid[i])
    mixed.update(pred[:3], gt[:3], valid[:3])
    mixed.update(pred[3:], gt[3:], valid[3:])
    assert whole.compute() == single.compute() == mixed.compute()  # exactly, not approximately
    assert whole.n_images == 4 and whole.n_skipped == 1 and per_image[2] is None
    assert not any(k.startswith("_") for k in per_image[0])


def test_pooled_flow_accumulator_weights_pixels_not_images():
    acc = M.FlowAccumulator(align=False)
    gt = np.zeros((1, 4, 2))
    acc.update(np.ones((1, 4, 2)) * [3.0, 4.0], gt, np.array([[True, False, False, False]]))  # 1 px, EPE 5
    acc.update(np.zeros((1, 4, 2)), gt, np.ones((1, 4), bool))  # 4 px, EPE 0
    assert acc.compute()["epe"] == pytest.approx(1.0)  # 5 / 5 pixels, not (5 + 0) / 2 images


def test_semantic_accumulator_does_not_depend_on_batching():
    gt = RNG.integers(0, 8, size=(4, 9, 9))
    gt[RNG.random(gt.shape) < 0.1] = 250
    pred = np.where(RNG.random(gt.shape) < 0.7, gt % 250, RNG.integers(0, 8, size=gt.shape)) % 8
    a, b = M.SemanticConfusion(), M.SemanticConfusion()
    a.update(pred, gt)
    for i in range(4):
        b.update(pred[i], gt[i])
    assert np.array_equal(a.matrix, b.matrix) and a.compute()["miou"] == b.compute()["miou"]


def test_accumulator_without_scored_images_explains():
    acc = M.DepthAccumulator(depth_range=(1e-5, 80.0))
    acc.update(np.ones((2, 2)), np.ones((2, 2)), np.zeros((2, 2), bool))
    with pytest.raises(ValueError, match=r"no image with valid pixels was scored \(1 skipped\)"):
        acc.compute()


def test_shape_mismatch_is_reported():
    with pytest.raises(ValueError, match=r"prediction shape \(2, 3\) != ground truth shape \(2, 2\)"):
        M.depth_metrics(np.ones((2, 3)), np.ones((2, 2)), np.ones((2, 2), bool))
    with pytest.raises(ValueError, match=r"expected ground truth \[H, W, 3\]"):
        M.normal_metrics(np.ones((2, 2, 2)), np.ones((2, 2, 2)), np.ones((2, 2), bool))
