"""Alignments and metrics of the StableMTL evaluation protocol (docs/method.md, "Evaluation").

Plain functions on numpy arrays, channels last. One image is
depth ``[H, W]``, normals ``[H, W, 3]``, optical flow ``[H, W, 2]``, scene flow
``[H, W, 3]``, albedo ``[H, W, 3]``, shading ``[H, W]`` (or ``[H, W, 1]``), class
ids ``[H, W]``; ``valid`` is a boolean ``[H, W]``. Non-finite ground truth is
always treated as invalid. Units: depth metrics and flow/scene-flow rates are
fractions (papers print x100) except SILog, which the release reports x100
(``silog="fraction"`` gives the fraction); normal thresholds are percent; angles degrees.

Dataset-level numbers come from the accumulators (``DepthAccumulator``, ...):
``update`` takes one image or a batch ``[N, ...]`` and returns the per-image
metrics; ``compute`` returns the dataset metrics. Per-image values are kept and
summed exactly (``math.fsum``), so the result does not depend on how images
are batched. An image without a valid pixel is skipped and counted
(``n_skipped``); it never divides by zero.
"""

from __future__ import annotations

import math

import numpy as np

from stablemtl import options

# Direction of every metric name the kit reports (used by Delta_m and the tables).
HIGHER_IS_BETTER = {
    # depth
    "abs_rel": False, "sq_rel": False, "rmse": False, "rmse_log": False, "log10": False,
    "delta1": True, "delta2": True, "delta3": True, "i_rmse": False, "silog": False,
    # normals
    "mean": False, "pooled_mean": False, "median": False, "a11_25": True, "a22_5": True, "a30": True,
    # semantics
    "miou": True, "acc": True,
    # optical flow / scene flow
    "epe": False, "fl": False, "angle": False,
    "epe3d": False, "acc_strict": True, "acc_relax": True, "outliers": False,
    # albedo / shading ("rmse" above)
    "ssim": True, "lmse": False,
}


# the headline metric of each task: the paper's table columns, Delta_m and the VAE ceiling
HEADLINE = {"depth": "abs_rel", "normal": "mean", "semantic": "miou", "optical_flow": "epe", "scene_flow": "epe3d",
            "albedo": "rmse", "shading": "rmse"}
IGNORE_INDEX = 250  # the semantic "ignore" label, shared by tasks, formats and metrics


class EmptyMaskError(ValueError):
    """An image has no valid ground-truth pixel: it cannot be scored."""


# --------------------------------------------------------------------------- input checks

def _check(pred, gt, valid, channels: int | None, what: str):
    """Float64 pred/gt with a trailing channel axis (``channels``) and a bool mask; finite GT only."""
    pred = np.asarray(pred, dtype=np.float64)
    gt = np.asarray(gt, dtype=np.float64)
    valid = np.asarray(valid)
    if channels == 1:  # shading may come as [H, W] or [H, W, 1]
        gt = gt[..., None] if gt.ndim == 2 else gt
        pred = pred[..., None] if pred.ndim == 2 else pred
    if channels is not None:
        if gt.ndim != 3 or gt.shape[-1] != channels:
            raise ValueError(f"{what}: expected ground truth [H, W, {channels}], got {gt.shape}")
    if pred.shape != gt.shape:
        raise ValueError(f"{what}: prediction shape {pred.shape} != ground truth shape {gt.shape}")
    if valid.shape != gt.shape[:2]:
        raise ValueError(f"{what}: valid mask shape {valid.shape} != image size {gt.shape[:2]}")
    finite_gt = np.isfinite(gt) if gt.ndim == 2 else np.isfinite(gt).all(axis=-1)
    valid = valid.astype(bool) & finite_gt
    if not valid.any():
        raise EmptyMaskError(f"{what}: no valid ground-truth pixel in this image")
    finite_pred = np.isfinite(pred) if pred.ndim == 2 else np.isfinite(pred).all(axis=-1)
    if not finite_pred[valid].all():
        n = int((~finite_pred & valid).sum())
        raise ValueError(f"{what}: the prediction is NaN or infinite at {n} valid pixels")
    return pred, gt, valid


# --------------------------------------------------------------------------- depth

def align_depth_least_squares(pred, gt, valid, space: str = "depth", depth_range=None,
                              return_params: bool = False):
    """Least-squares scale and shift of an affine-invariant prediction to metric GT.

    ``space="depth"`` fits ``scale * pred + shift`` to ``gt`` (the release);
    ``space="disparity"`` treats ``pred`` as affine-invariant disparity, fits it
    to ``1 / gt`` and returns ``1 / max(aligned, 1e-3)``. With ``depth_range``
    (min, max) the result is clipped to it and then to >= 1e-6, as the protocol.
    """
    pred, gt, valid = _check(pred, gt, valid, None, "depth alignment")
    if space == "depth":
        mask = valid
        target = gt
    elif space == "disparity":
        mask = valid & (gt > 0) & (pred > 0)
        if not mask.any():
            raise EmptyMaskError("depth alignment: no pixel with positive GT and prediction")
        target = np.zeros_like(gt)
        target[gt > 0] = 1.0 / gt[gt > 0]
    else:
        raise ValueError(f"space must be 'depth' or 'disparity', got {space!r}")
    a = np.stack([pred[mask], np.ones(int(mask.sum()))], axis=1)
    (scale, shift), *_ = np.linalg.lstsq(a, target[mask], rcond=None)
    aligned = pred * scale + shift
    if space == "disparity":
        aligned = 1.0 / np.maximum(aligned, 1e-3)
    if depth_range is not None:
        aligned = np.maximum(np.clip(aligned, *depth_range), 1e-6)
    return (aligned, float(scale), float(shift)) if return_params else aligned


def depth_metrics(pred, gt, valid, silog: str = options.DEFAULTS["silog"]) -> dict[str, float]:
    """AbsRel, SqRel, RMSE, RMSE-log, log10, delta1..3 (strict <), iRMSE (1/m), SILog.

    ``pred`` is metric depth (aligned and clipped); GT <= 0 is invalid. SILog is
    ``sqrt(mean(d^2) - mean(d)^2)`` of the log differences, x100 as the release
    reports it (``silog="fraction"``: without the factor).
    """
    silog_factor = 100.0 if options.check("silog", silog) == "x100" else 1.0
    pred, gt, valid = _check(pred, gt, valid, None, "depth metrics")
    valid &= gt > 0
    if not valid.any():
        raise EmptyMaskError("depth metrics: no pixel with positive ground-truth depth")
    p, g = pred[valid], gt[valid]
    if (p <= 0).any():
        raise ValueError(
            f"depth metrics: prediction is <= 0 at {int((p <= 0).sum())} valid pixels; align it "
            "and clip to the dataset range first (align_depth_least_squares(..., depth_range=...))"
        )
    diff = p - g
    log_diff = np.log(p) - np.log(g)
    ratio = np.maximum(p / g, g / p)
    return {
        "abs_rel": float(np.mean(np.abs(diff) / g)),
        "sq_rel": float(np.mean(diff ** 2 / g)),
        "rmse": float(np.sqrt(np.mean(diff ** 2))),
        "rmse_log": float(np.sqrt(np.mean(log_diff ** 2))),
        "log10": float(np.mean(np.abs(np.log10(p) - np.log10(g)))),
        "delta1": float(np.mean(ratio < 1.25)),
        "delta2": float(np.mean(ratio < 1.25 ** 2)),
        "delta3": float(np.mean(ratio < 1.25 ** 3)),
        "i_rmse": float(np.sqrt(np.mean((1.0 / p - 1.0 / g) ** 2))),
        "silog": silog_factor * float(np.sqrt(max(np.mean(log_diff ** 2) - np.mean(log_diff) ** 2, 0.0))),
    }


# --------------------------------------------------------------------------- normals

def _unit(v: np.ndarray) -> np.ndarray:
    """``v / max(|v|, 1e-12)`` along the last axis (a zero vector stays zero, as torch's normalize)."""
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def normal_angular_errors(pred, gt, valid) -> np.ndarray:
    """Angular error in degrees at the valid pixels (1-D). GT of zero length is invalid."""
    pred, gt, valid = _check(pred, gt, valid, 3, "normal metrics")
    valid &= np.linalg.norm(gt, axis=-1) > 0
    if not valid.any():
        raise EmptyMaskError("normal metrics: no pixel with a non-zero ground-truth normal")
    cos = np.sum(_unit(pred[valid]) * _unit(gt[valid]), axis=-1)
    return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))


def _normal_summary(errors: np.ndarray) -> dict[str, float]:
    return {
        "mean": float(np.mean(errors)),
        "median": float(np.median(errors)),
        "rmse": float(np.sqrt(np.mean(errors ** 2))),
        "a11_25": float(np.mean(errors < 11.25) * 100.0),
        "a22_5": float(np.mean(errors < 22.5) * 100.0),
        "a30": float(np.mean(errors < 30.0) * 100.0),
    }


def normal_metrics(pred, gt, valid) -> dict[str, float]:
    """Mean, median, RMSE (degrees) and % of pixels under 11.25 / 22.5 / 30 degrees."""
    return _normal_summary(normal_angular_errors(pred, gt, valid))


# --------------------------------------------------------------------------- semantics

class SemanticConfusion:
    """Dataset-level confusion matrix (rows = ground truth, columns = prediction).

    ``compute`` gives pixel accuracy ``acc``, per-class ``iou`` (NaN for a class
    absent from both GT and prediction) and ``miou`` = nanmean of the IoUs.
    """

    def __init__(self, num_classes: int = 8, ignore_index: int = IGNORE_INDEX):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
        self.n_images = 0
        self.n_skipped = 0

    def _image_matrix(self, pred, gt, valid) -> np.ndarray:
        pred, gt = np.asarray(pred), np.asarray(gt)
        if pred.shape != gt.shape:
            raise ValueError(f"semantic: prediction shape {pred.shape} != ground truth shape {gt.shape}")
        mask = gt != self.ignore_index
        if valid is not None:
            valid = np.asarray(valid, dtype=bool)
            if valid.shape != gt.shape:
                raise ValueError(f"semantic: valid mask shape {valid.shape} != {gt.shape}")
            mask &= valid
        g, p = gt[mask].astype(np.int64), pred[mask].astype(np.int64)
        for name, ids in (("ground truth", g), ("prediction", p)):
            if ids.size and (ids.min() < 0 or ids.max() >= self.num_classes):
                bad = np.unique(ids[(ids < 0) | (ids >= self.num_classes)])[:10].tolist()
                raise ValueError(
                    f"semantic: {name} has class ids {bad} outside 0..{self.num_classes - 1} "
                    f"(ignore label is {self.ignore_index})"
                )
        n = self.num_classes
        return np.bincount(g * n + p, minlength=n * n).reshape(n, n)

    @staticmethod
    def scores(matrix: np.ndarray) -> dict:
        total = matrix.sum()
        tp = np.diag(matrix).astype(np.float64)
        union = matrix.sum(axis=0) + matrix.sum(axis=1) - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = np.where(union > 0, tp / union, np.nan)
        miou = float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")
        return {"miou": miou, "acc": float(tp.sum() / total) if total else float("nan"),
                "iou": iou.tolist()}

    def update(self, pred, gt, valid=None) -> list[dict | None]:
        """Add one image ``[H, W]`` or a batch ``[N, H, W]``; returns per-image miou/acc (None if skipped)."""
        gt = np.asarray(gt)
        batch = gt.ndim == 3
        preds, gts = (pred, gt) if batch else ([pred], [gt])
        valids = (valid if valid is not None else [None] * len(gts)) if batch else [valid]
        out = []
        for p, g, v in zip(preds, gts, valids):
            m = self._image_matrix(p, g, v)
            if m.sum() == 0:
                self.n_skipped += 1
                out.append(None)
                continue
            self.matrix += m
            self.n_images += 1
            s = self.scores(m)
            out.append({"miou": s["miou"], "acc": s["acc"]})
        return out

    def compute(self) -> dict:
        if self.n_images == 0:
            raise ValueError("semantic: no image with valid pixels was scored")
        return self.scores(self.matrix)


# --------------------------------------------------------------------------- optical / scene flow

def _nnls_scale(p: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Per-column minimiser of ||s p - g||^2 over s >= 0, for ``[N, C]`` arrays (0 when p is 0)."""
    num = np.sum(p * g, axis=0)
    den = np.sum(p * p, axis=0)
    return np.where(den > 0, np.maximum(num, 0.0) / np.where(den > 0, den, 1.0), 0.0)


def align_flow_nnls(pred, gt, valid, return_scale: bool = False):
    """Per-axis non-negative least-squares scale (no shift): ``s_c = max(0, <p_c, g_c> / <p_c, p_c>)``.

    Works for any number of channels (optical flow ``[H, W, 2]``, scene flow ``[H, W, 3]``).
    """
    pred, gt, valid = _check(pred, gt, valid, None, "flow alignment")
    if gt.ndim != 3:
        raise ValueError(f"flow alignment: expected [H, W, C] arrays, got {gt.shape}")
    scale = _nnls_scale(pred[valid], gt[valid])
    aligned = pred * scale
    return (aligned, scale) if return_scale else aligned


def _flow_sums(pred, gt, valid, align: bool) -> dict[str, float]:
    pred, gt, valid = _check(pred, gt, valid, 2, "optical flow metrics")
    p, g = pred[valid], gt[valid]
    if align:
        p = p * _nnls_scale(p, g)
    epe = np.linalg.norm(p - g, axis=-1)
    mag = np.linalg.norm(g, axis=-1)
    cos = np.sum(_unit(p) * _unit(g), axis=-1)
    return {
        "n": float(valid.sum()),
        "epe": float(np.sum(epe)),
        # KITTI outlier: EPE > 3 px and > 5 % of |gt| (written without a division by |gt|)
        "fl": float(np.sum((epe > 3.0) & (epe > 0.05 * mag))),
        # the release's angular error: angle between the 2-D flow directions
        "angle": float(np.sum(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))),
    }


def flow_metrics(pred, gt, valid, align: bool = True) -> dict[str, float]:
    """EPE (px), Fl (fraction of outliers) and mean angular error (degrees) over valid pixels.

    ``align=True`` first scales each axis of the prediction (``align_flow_nnls``);
    ``align=False`` scores metric flow as is.
    """
    s = _flow_sums(pred, gt, valid, align)
    return {k: s[k] / s["n"] for k in ("epe", "fl", "angle")}


SCENE_FLOW_CONVENTIONS = ("and", "or")


def _scene_flow_sums(pred, gt, valid, align: bool, convention: str) -> dict[str, float]:
    if convention not in SCENE_FLOW_CONVENTIONS:
        raise ValueError(f"convention must be 'and' (StableMTL release) or 'or' (FlowNet3D), got {convention!r}")
    pred, gt, valid = _check(pred, gt, valid, 3, "scene flow metrics")
    p, g = pred[valid], gt[valid]
    if align:
        p = p * _nnls_scale(p, g)
    epe = np.linalg.norm(p - g, axis=-1)
    mag = np.linalg.norm(g, axis=-1) + 1e-4  # as the release
    both = np.logical_and if convention == "and" else np.logical_or
    return {
        "n": float(valid.sum()),
        "epe3d": float(np.sum(epe)),
        "acc_strict": float(np.sum(both(epe < 0.05, epe < 0.05 * mag))),
        "acc_relax": float(np.sum(both(epe < 0.1, epe < 0.1 * mag))),
        "outliers": float(np.sum(both(epe > 0.3, epe > 0.1 * mag))),
    }


def scene_flow_metrics(pred, gt, valid, align: bool = True, convention: str = "and") -> dict[str, float]:
    """EPE3D (m) and strict / relaxed accuracy and outlier rates (fractions) over valid pixels.

    ``convention="and"`` is the StableMTL release (absolute AND relative
    threshold: strict EPE < 0.05 m and < 5 %, relaxed < 0.1 m and < 10 %,
    outlier > 0.3 m and > 10 %); ``"or"`` is the FlowNet3D convention.
    """
    s = _scene_flow_sums(pred, gt, valid, align, convention)
    return {k: s[k] / s["n"] for k in ("epe3d", "acc_strict", "acc_relax", "outliers")}


# --------------------------------------------------------------------------- albedo / shading

def _box_sums(x: np.ndarray, size: int, step: int = 1) -> np.ndarray:
    """Sums of ``x`` ([H, W, ...]) over every size x size window fully inside, every ``step`` pixels."""
    s = np.zeros((x.shape[0] + 1, x.shape[1] + 1) + x.shape[2:])
    s[1:, 1:] = x.cumsum(axis=0).cumsum(axis=1)
    i = np.arange(0, x.shape[0] - size + 1, step)
    j = np.arange(0, x.shape[1] - size + 1, step)
    ii, jj = i[:, None], j[None, :]
    return s[ii + size, jj + size] - s[ii, jj + size] - s[ii + size, jj] + s[ii, jj]


def ssim(pred, gt, data_range: float = 1.0, win_size: int = 7) -> float:
    """Mean SSIM over channels, as scikit-image's default ``structural_similarity``.

    Uniform 7x7 window, sample covariance, K1 = 0.01, K2 = 0.03; the mean is
    taken over the pixels whose window lies inside the image.
    """
    x = np.asarray(pred, dtype=np.float64)
    y = np.asarray(gt, dtype=np.float64)
    x, y = (x[..., None], y[..., None]) if x.ndim == 2 else (x, y)
    if min(x.shape[:2]) < win_size:
        raise ValueError(f"ssim: image {x.shape[:2]} is smaller than the {win_size}x{win_size} window")
    n = win_size * win_size
    mx, my = _box_sums(x, win_size) / n, _box_sums(y, win_size) / n
    mxx, myy, mxy = (_box_sums(a, win_size) / n for a in (x * x, y * y, x * y))
    cov = n / (n - 1.0)
    vx, vy, vxy = cov * (mxx - mx * mx), cov * (myy - my * my), cov * (mxy - mx * my)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * vxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(np.mean(s.mean(axis=(0, 1))))


def lmse(gt, pred, valid, window: int = 16, shift: int = 8) -> float:
    """Local mean squared error (Grosse et al.), the release's variant.

    In each ``window`` x ``window`` patch (every ``shift`` pixels) the
    prediction gets its own least-squares scale (one for all channels; 0 when
    the patch's masked prediction energy is <= 1e-5); the summed squared errors
    are divided by the summed masked ``gt**2``. NaN when that sum is 0.
    """
    g = np.asarray(gt, dtype=np.float64)
    e = np.asarray(pred, dtype=np.float64)
    g, e = (g[..., None], e[..., None]) if g.ndim == 2 else (g, e)
    if min(g.shape[:2]) < window:
        raise ValueError(f"lmse: image {g.shape[:2]} is smaller than the {window}x{window} window")
    m = np.asarray(valid, dtype=np.float64)[..., None]
    gg = _box_sums((m * g * g).sum(-1), window, shift)
    ge = _box_sums((m * g * e).sum(-1), window, shift)
    ee = _box_sums((m * e * e).sum(-1), window, shift)
    alpha = np.where(ee > 1e-5, ge / np.where(ee > 1e-5, ee, 1.0), 0.0)
    ssq = np.maximum(gg - 2 * alpha * ge + alpha ** 2 * ee, 0.0)
    total = gg.sum()
    return float(ssq.sum() / total) if total > 0 else float("nan")


RMSE_REDUCTIONS = ("pixel", "element")


def intrinsic_metrics(pred, gt, valid, rmse_reduction: str = "pixel") -> dict[str, float]:
    """RMSE, SSIM and LMSE of albedo ([H, W, 3]) or shading ([H, W]) after one global scale.

    The prediction is scaled by the least-squares factor over all masked pixels
    and channels, then clipped to [0, 1]. RMSE over masked pixels:
    ``rmse_reduction="pixel"`` (the release) sums the squared error over channels
    and averages over pixels; ``"element"`` averages over pixels and channels
    (they agree for shading). SSIM is computed on the whole image (the release),
    with non-finite GT set to 0; LMSE uses windows of 16 shifted by 8.
    """
    if rmse_reduction not in RMSE_REDUCTIONS:
        raise ValueError(f"rmse_reduction must be one of {RMSE_REDUCTIONS}, got {rmse_reduction!r}")
    channels = np.asarray(gt).shape[-1] if np.asarray(gt).ndim == 3 else 1
    pred, gt, valid = _check(pred, gt, valid, channels, "intrinsic metrics")
    p, g = pred[valid].ravel(), gt[valid].ravel()
    den = float(np.dot(p, p))
    scale = float(np.dot(p, g)) / den if den > 0 else 0.0
    scaled = np.clip(pred * scale, 0.0, 1.0)
    sq = ((scaled - gt)[valid] ** 2).sum(axis=-1)
    rmse = np.sqrt(sq.mean() if rmse_reduction == "pixel" else sq.mean() / channels)
    gt_finite = np.nan_to_num(gt, nan=0.0, posinf=0.0, neginf=0.0)
    return {
        "rmse": float(rmse),
        "ssim": ssim(scaled, gt_finite),
        "lmse": lmse(gt_finite, scaled, valid),
    }


# --------------------------------------------------------------------------- Delta_m

def delta_m(values: dict, baseline: dict, higher_is_better: dict, return_terms: bool = False):
    """Multi-task gain in percent: mean over metrics of ``(-1)^l (M - M_b) / M_b * 100``.

    ``l = 1`` when lower is better. The metrics are the keys of ``values``;
    ``baseline`` (the single-task models) and ``higher_is_better`` must have
    them all. With ``return_terms`` returns ``(delta, {metric: term})``.
    """
    if not values:
        raise ValueError("delta_m: no metric given")
    terms = {}
    for key, value in values.items():
        for name, table in (("baseline", baseline), ("higher_is_better", higher_is_better)):
            if key not in table:
                raise KeyError(f"delta_m: metric {key!r} is missing from {name} (has {sorted(table)})")
        base = float(baseline[key])
        if base == 0 or not math.isfinite(base):
            raise ValueError(f"delta_m: baseline of {key!r} is {base}; it must be finite and non-zero")
        sign = 1.0 if higher_is_better[key] else -1.0
        terms[key] = sign * (float(value) - base) / base * 100.0
    delta = math.fsum(terms.values()) / len(terms)
    return (delta, terms) if return_terms else delta


# --------------------------------------------------------------------------- accumulators

class _Accumulator:
    """Collects per-image results; subclasses define ``_image`` and ``compute``."""

    image_ndim = 2  # ndim of one image's valid mask; a batch has one more

    def __init__(self):
        self.records: list[dict] = []
        self.n_skipped = 0

    @property
    def n_images(self) -> int:
        return len(self.records)

    def update(self, pred, gt, valid) -> list[dict | None]:
        """Score one image or a batch; returns each image's metrics (None when skipped)."""
        valid = np.asarray(valid)
        if valid.ndim == self.image_ndim:
            pred, gt, valid = [pred], [gt], [valid]
        elif valid.ndim != self.image_ndim + 1:
            raise ValueError(f"{type(self).__name__}: valid must be [H, W] or [N, H, W], got {valid.shape}")
        out = []
        for p, g, v in zip(pred, gt, valid, strict=True):
            try:
                record = self._image(p, g, v)
            except EmptyMaskError:
                self.n_skipped += 1
                out.append(None)
                continue
            self.records.append(record)
            out.append(self._public(record))
        return out

    @staticmethod
    def _public(record: dict) -> dict:
        return {k: v for k, v in record.items() if not k.startswith("_")}

    def _require_images(self):
        if not self.records:
            raise ValueError(f"{type(self).__name__}: no image with valid pixels was scored "
                             f"({self.n_skipped} skipped)")

    def _mean_over_images(self) -> dict[str, float]:
        self._require_images()
        keys = self._public(self.records[0])
        return {k: math.fsum(r[k] for r in self.records) / len(self.records) for k in keys}

    def compute(self) -> dict[str, float]:
        return self._mean_over_images()


class DepthAccumulator(_Accumulator):
    """Per-image alignment (``align``: 'depth', 'disparity' or None), clip to the dataset's
    ``depth_range`` (min, max) in metres (KITTI 1e-5..80, DIODE 0.6..350), metrics; mean over images.
    ``silog``: "x100" (the release) or "fraction"."""

    def __init__(self, depth_range: tuple[float, float], align: str | None = "depth",
                 silog: str = options.DEFAULTS["silog"]):
        super().__init__()
        self.align, self.depth_range, self.silog = align, depth_range, options.check("silog", silog)

    def _image(self, pred, gt, valid):
        if self.align is not None:
            pred = align_depth_least_squares(pred, gt, valid, space=self.align, depth_range=self.depth_range)
        else:
            pred = np.maximum(np.clip(np.asarray(pred, dtype=np.float64), *self.depth_range), 1e-6)
        return depth_metrics(pred, gt, valid, silog=self.silog)


class NormalAccumulator(_Accumulator):
    """``mean``: per-image mean error averaged over images (the release). Pixel-pooled (DSINE):
    ``pooled_mean, median, rmse, a11_25, a22_5, a30``."""

    def __init__(self):
        super().__init__()
        self._errors: list[np.ndarray] = []

    def _image(self, pred, gt, valid):
        errors = normal_angular_errors(pred, gt, valid)
        self._errors.append(errors)
        return _normal_summary(errors)

    def compute(self):
        self._require_images()
        pooled = _normal_summary(np.concatenate(self._errors))
        return {"mean": math.fsum(r["mean"] for r in self.records) / len(self.records),
                "pooled_mean": pooled.pop("mean"), **pooled}


class _PooledAccumulator(_Accumulator):
    """Sums over all valid pixels of all images, divided by the pixel count."""

    keys: tuple[str, ...] = ()

    def _image(self, pred, gt, valid):
        sums = self._sums(pred, gt, valid)
        return {**{k: sums[k] / sums["n"] for k in self.keys}, **{"_" + k: v for k, v in sums.items()}}

    def compute(self):
        self._require_images()
        n = math.fsum(r["_n"] for r in self.records)
        return {k: math.fsum(r["_" + k] for r in self.records) / n for k in self.keys}


class FlowAccumulator(_PooledAccumulator):
    """Optical flow: per-image per-axis NNLS scale (``align``), then EPE, Fl, angle pooled over pixels."""

    keys = ("epe", "fl", "angle")

    def __init__(self, align: bool = True):
        super().__init__()
        self.align = align

    def _sums(self, pred, gt, valid):
        return _flow_sums(pred, gt, valid, self.align)


class SceneFlowAccumulator(_PooledAccumulator):
    """Scene flow: per-image per-axis NNLS scale, then EPE3D and rates pooled over pixels."""

    keys = ("epe3d", "acc_strict", "acc_relax", "outliers")

    def __init__(self, align: bool = True, convention: str = "and"):
        super().__init__()
        self.align, self.convention = align, convention

    def _sums(self, pred, gt, valid):
        return _scene_flow_sums(pred, gt, valid, self.align, self.convention)


class IntrinsicAccumulator(_Accumulator):
    """Albedo or shading: per-image RMSE, SSIM, LMSE averaged over images."""

    def __init__(self, rmse_reduction: str = "pixel"):
        super().__init__()
        self.rmse_reduction = rmse_reduction

    def _image(self, pred, gt, valid):
        return intrinsic_metrics(pred, gt, valid, self.rmse_reduction)
