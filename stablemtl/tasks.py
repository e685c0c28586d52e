"""The seven StableMTL tasks: annotation -> 3-channel target in [-1, 1] -> task output.

Every task maps its annotation to a 3-channel image in [-1, 1] that the frozen
VAE encodes, and maps a decoded 3-channel prediction back to the task's output
(docs/method.md, "The seven tasks"). Tensors are torch, batch-first ``[B, C, H, W]``; validity
masks are boolean ``[B, 1, H, W]`` (``[B, H, W]`` is accepted on input).

    >>> task = get_task("depth")
    >>> target, valid = task.encode(depth_m, valid)      # [B,3,H,W], [B,1,H,W]
    >>> relative_depth = task.decode(prediction)          # [B,1,H,W] in [0, 1]
    >>> rgb = task.colorize(relative_depth)               # numpy uint8 [B,H,W,3]

Invalid pixels keep their raw annotation in the target, normalised like the
valid ones, as the StableMTL release does (``invalid_targets="keep"``, the
default; the VAE sees them, only the loss mask leaves them out); non-finite
values, which the VAE cannot encode, get the task's fill value.
``invalid_targets="fill"`` gives every invalid pixel the fill value (black,
-1, for depth, semantic, albedo and shading; the zero vector for normal,
optical flow and scene flow) and normalises flows over the valid pixels only.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from stablemtl import options
from stablemtl.metrics import IGNORE_INDEX

TASK_NAMES = ("albedo", "shading", "depth", "normal", "semantic", "optical_flow", "scene_flow")
FLOW_TASKS = ("optical_flow", "scene_flow")  # the tasks that take the next frame as a second input

SEMANTIC_CLASSES = (
    "road", "building", "pole", "traffic light", "traffic sign", "vegetation", "sky", "vehicle",
)
# Cityscapes colours of the 8 classes, in class-id order.
SEMANTIC_PALETTE = (
    (128, 64, 128), (70, 70, 70), (153, 153, 153), (250, 170, 30),
    (220, 220, 0), (107, 142, 35), (70, 130, 180), (0, 0, 142),
)

DEPTH_QUANTILES = (0.02, 0.98)
ALBEDO_MIN = 0.004  # on the [0, 1] scale: a pixel is valid when every channel reaches it
SHADING_WEIGHTS = (0.3, 0.59, 0.11)  # RGB -> grey, as the release


def to_grey(rgb: torch.Tensor, dim: int = -3, keepdim: bool = False) -> torch.Tensor:
    """RGB -> grey with the release's ``SHADING_WEIGHTS`` along the channel axis ``dim``."""
    shape = [1] * rgb.ndim
    shape[dim] = 3
    w = torch.tensor(SHADING_WEIGHTS, dtype=rgb.dtype, device=rgb.device).view(shape)
    return (rgb * w).sum(dim=dim, keepdim=keepdim)


# --------------------------------------------------------------------------- helpers

def _as_batch(x, channels: int | tuple[int, ...], what: str) -> torch.Tensor:
    """Check that ``x`` is a ``[B, C, H, W]`` tensor (numpy is converted) with C in ``channels``."""
    x = torch.as_tensor(x)
    allowed = (channels,) if isinstance(channels, int) else channels
    if x.ndim != 4 or x.shape[1] not in allowed:
        want = " or ".join(str(c) for c in allowed)
        raise ValueError(
            f"{what}: expected a batch-first tensor [B, {want}, H, W], got shape {tuple(x.shape)}; "
            "add the batch axis with x[None] for a single image"
        )
    return x


def _as_valid(valid, like: torch.Tensor, what: str) -> torch.Tensor:
    """Normalise a validity mask to bool ``[B, 1, H, W]`` matching ``like``'s batch and size."""
    b, _, h, w = like.shape
    if valid is None:
        return torch.ones((b, 1, h, w), dtype=torch.bool, device=like.device)
    valid = torch.as_tensor(valid, device=like.device)
    if valid.ndim == 3:
        valid = valid[:, None]
    if valid.ndim != 4 or valid.shape[1] != 1 or valid.shape[0] != b or valid.shape[2:] != (h, w):
        raise ValueError(
            f"{what}: valid mask of shape {tuple(valid.shape)} does not match the annotation "
            f"{tuple(like.shape)}; expected [B, H, W] or [B, 1, H, W] = [{b}, 1, {h}, {w}]"
        )
    return valid.bool()


def _finite(x: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(x).all(dim=1, keepdim=True)


def _unit_interval(x: torch.Tensor, valid: torch.Tensor, what: str) -> torch.Tensor:
    """Float image in [0, 1]; uint8 images are divided by 255. Values above 1 are an error."""
    if x.dtype == torch.uint8:
        return x.float() / 255.0
    x = x.float()
    inside = torch.where(valid & _finite(x), x, torch.zeros((), dtype=x.dtype, device=x.device))
    top = inside.max().item() if inside.numel() else 0.0
    if top > 1.0 + 1e-6:
        raise ValueError(
            f"{what}: values reach {top:.4g} on valid pixels; expected a float image in [0, 1] "
            "(divide 8-bit images by 255, or pass the uint8 tensor as is)"
        )
    return x


def _quantiles(values: torch.Tensor, quantiles: tuple[float, ...]) -> list[float]:
    """Linear-interpolation quantiles of a 1-D tensor (same as ``torch.quantile``, no size limit)."""
    v = values.flatten().double().sort().values
    n = v.numel()
    out = []
    for q in quantiles:
        pos = q * (n - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, n - 1)
        out.append(float(v[lo] + (pos - lo) * (v[hi] - v[lo])))
    return out


def _per_axis_max_abs(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[B, C, 1, 1]`` max |x| over the ``valid`` pixels of each image and channel; 1 where it is 0."""
    masked = torch.where(valid, x.abs(), torch.zeros((), dtype=x.dtype, device=x.device))
    peak = masked.amax(dim=(2, 3), keepdim=True)
    return torch.where(peak > 0, peak, torch.ones_like(peak))


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    """``[B, 3, H, W]`` floats in [0, 1] -> numpy uint8 ``[B, H, W, 3]``."""
    x = (x.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def _black_out(rgb: np.ndarray, valid) -> np.ndarray:
    if valid is not None:
        v = torch.as_tensor(valid)
        v = v[:, 0] if v.ndim == 4 else v
        rgb = rgb.copy()
        rgb[~v.bool().cpu().numpy()] = 0
    return rgb


def _albedo_mask(albedo: torch.Tensor) -> torch.Tensor:
    return (albedo >= ALBEDO_MIN).all(dim=1, keepdim=True) & _finite(albedo)


def albedo_valid_mask(albedo) -> torch.Tensor:
    """The release's albedo (and shading) mask: every channel >= 0.004 on the [0, 1] scale."""
    a = _as_batch(albedo, 3, "albedo")
    return _albedo_mask(a.float() / 255.0 if a.dtype == torch.uint8 else a.float())


# --------------------------------------------------------------------------- tasks

class Task:
    """One task: its prompt and its annotation <-> target <-> output mappings."""

    name: str = ""
    annotation_channels: int | tuple[int, ...] = 3
    invalid_fill: float = 0.0

    @property
    def prompt(self) -> str:
        return self.name.replace("_", " ")

    def __repr__(self) -> str:
        return f"<Task {self.name!r} prompt={self.prompt!r}>"

    def encode(self, annotation, valid=None,
               invalid_targets: str = options.DEFAULTS["invalid_targets"]) -> tuple[torch.Tensor, torch.Tensor]:
        """Annotation ``[B, C, H, W]`` (+ mask) -> (target ``[B, 3, H, W]`` in [-1, 1], mask ``[B, 1, H, W]``).

        ``invalid_targets="keep"`` (the release) keeps the raw annotation at invalid pixels,
        ``"fill"`` gives them the task's fill value (module docstring).
        """
        options.check("invalid_targets", invalid_targets)
        x = _as_batch(annotation, self.annotation_channels, f"{self.name} annotation")
        valid = _as_valid(valid, x, f"{self.name} annotation")
        target, valid = self._encode(x, valid, keep=invalid_targets == "keep")
        keep = _finite(target) if invalid_targets == "keep" else valid
        target = torch.where(keep, target, torch.full_like(target, self.invalid_fill))
        return target.float().clamp(-1.0, 1.0), valid

    def decode(self, prediction) -> torch.Tensor:
        """Decoded 3-channel prediction ``[B, 3, H, W]`` -> task output (clipped to [-1, 1] on the way)."""
        return self._decode(_as_batch(prediction, 3, f"{self.name} prediction").float())

    def colorize(self, output, valid=None) -> np.ndarray:
        """Task output -> numpy uint8 RGB ``[B, H, W, 3]`` for figures; invalid pixels black."""
        raise NotImplementedError

    def _encode(self, x, valid, keep: bool):
        """(target, valid) with the normalisation applied to every pixel; ``keep``: the release's
        normalisation over all pixels where it differs (flows)."""
        raise NotImplementedError

    def _decode(self, x):
        raise NotImplementedError


def _mean_then_clip(x: torch.Tensor) -> torch.Tensor:
    """Single-channel outputs, in the release's order: the channel mean, then the clip, then to [0, 1]."""
    return (x.mean(dim=1, keepdim=True).clamp(-1.0, 1.0) + 1.0) / 2.0


class DepthTask(Task):
    """Depth in metres -> per-image 2 %/98 % quantile normalisation; output relative depth in [0, 1]."""

    name = "depth"
    annotation_channels = 1
    invalid_fill = -1.0

    def _encode(self, depth, valid, keep):
        depth = depth.float()
        valid = valid & torch.isfinite(depth) & (depth > 0)
        target = torch.full_like(depth, -1.0)
        for i in range(depth.shape[0]):
            values = depth[i][valid[i]]
            if values.numel() == 0:
                continue
            near, far = _quantiles(values, DEPTH_QUANTILES)
            # A constant-depth image has far == near: keep it finite (all -1), not NaN.
            span = max(far - near, 1e-12)
            target[i] = (depth[i] - near) / span * 2.0 - 1.0  # every pixel: the release's sky (655 m) -> +1
        return target.repeat(1, 3, 1, 1), valid

    def _decode(self, x):
        return _mean_then_clip(x)

    def colorize(self, output, valid=None, value_range=(0.0, 1.0), cmap="Spectral"):
        """Relative depth (or metric depth with ``value_range=(near, far)``) through a colormap."""
        import matplotlib

        d = _as_batch(output, 1, "depth output").float()
        lo, hi = value_range
        t = ((d[:, 0] - lo) / max(hi - lo, 1e-12)).clamp(0, 1).nan_to_num(0.0)
        lut = (matplotlib.colormaps[cmap](np.linspace(0, 1, 256))[:, :3] * 255).round().astype(np.uint8)
        rgb = lut[(t * 255).round().long().cpu().numpy()]
        return _black_out(rgb, valid)


class NormalTask(Task):
    """Camera-frame unit normals, used as is; output re-normalised per pixel."""

    name = "normal"
    annotation_channels = 3

    def _encode(self, normal, valid, keep):
        normal = normal.float()
        valid = valid & _finite(normal) & (normal.norm(dim=1, keepdim=True) > 1e-6)
        return normal, valid

    def _decode(self, x):
        x = x.clamp(-1.0, 1.0)
        norm = x.norm(dim=1, keepdim=True)
        return torch.where(norm > 0, x / norm.clamp_min(1e-12), x)

    def colorize(self, output, valid=None):
        n = _as_batch(output, 3, "normal output").float()
        return _black_out(_to_uint8((n + 1.0) / 2.0), valid)


class SemanticTask(Task):
    """Class ids (0..7, 250 = ignore) <-> Cityscapes palette colours; nearest colour decodes."""

    name = "semantic"
    annotation_channels = 1
    invalid_fill = -1.0

    @staticmethod
    def palette(device=None) -> torch.Tensor:
        """``[8, 3]`` palette in target space, colour / 255 * 2 - 1."""
        return torch.tensor(SEMANTIC_PALETTE, dtype=torch.float32, device=device) / 255.0 * 2.0 - 1.0

    def _encode(self, labels, valid, keep):
        if labels.is_floating_point() and not torch.equal(labels, labels.round()):
            raise ValueError("semantic annotation: expected integer class ids, got fractional values")
        labels = labels.long()
        known = (labels >= 0) & (labels < len(SEMANTIC_CLASSES)) | (labels == IGNORE_INDEX)
        if not bool(known.all()):
            bad = torch.unique(labels[~known])[:10].tolist()
            raise ValueError(
                f"semantic annotation: class ids {bad} are not in 0..{len(SEMANTIC_CLASSES) - 1} "
                f"or {IGNORE_INDEX} (ignore); map the dataset's labels to the 8 classes first"
            )
        labelled = labels != IGNORE_INDEX
        ids = torch.where(labelled, labels, torch.zeros_like(labels))[:, 0]
        target = self.palette(labels.device)[ids].permute(0, 3, 1, 2)
        # the ignore label is black in both modes, as the release's colour map leaves it
        target = torch.where(labelled, target, torch.full_like(target, self.invalid_fill))
        return target, valid & labelled

    def _decode(self, x):
        x = x.clamp(-1.0, 1.0)
        palette = self.palette(x.device)
        # argmin_k |x - p_k|^2 = argmax_k 2 x.p_k - |p_k|^2, without a [B, K, 3, H, W] intermediate
        score = 2.0 * torch.einsum("bchw,kc->bkhw", x, palette) - (palette ** 2).sum(1)[None, :, None, None]
        return score.argmax(dim=1, keepdim=True)

    def colorize(self, output, valid=None):
        ids = _as_batch(output, 1, "semantic output").long()[:, 0]
        lut = np.zeros((256, 3), dtype=np.uint8)
        lut[: len(SEMANTIC_PALETTE)] = SEMANTIC_PALETTE
        rgb = lut[ids.clamp(0, 255).cpu().numpy()]
        return _black_out(rgb, valid)


class _FlowTask(Task):
    """Flow-like vectors: per image and per axis divided by the max |value| (the release: over every
    finite pixel, invalid ones included; ``invalid_targets="fill"``: over the valid pixels)."""

    def _encode(self, flow, valid, keep):
        flow = flow.float()
        valid = valid & _finite(flow)
        normalised = flow / _per_axis_max_abs(flow, _finite(flow) if keep else valid)
        return self._to_three(normalised), valid


class OpticalFlowTask(_FlowTask):
    """2-D flow in pixels -> channels (u, v, u); output the first two channels (scale-free)."""

    name = "optical_flow"
    annotation_channels = 2

    @staticmethod
    def _to_three(f):
        return torch.cat([f, f[:, :1]], dim=1)

    def _decode(self, x):
        return x[:, :2].clamp(-1.0, 1.0)

    def colorize(self, output, valid=None, max_radius=None):
        """Middlebury colour wheel; saturation by |flow| / max_radius (per image max by default)."""
        f = _as_batch(output, 2, "optical_flow output").float()
        if valid is not None:
            f = torch.where(_as_valid(valid, f, "optical_flow output"), f, torch.zeros_like(f))
        return _black_out(flow_to_color(f.cpu().numpy(), max_radius), valid)


class SceneFlowTask(_FlowTask):
    """3-D scene flow in metres -> channels (x, y, z); output the three channels (scale-free)."""

    name = "scene_flow"
    annotation_channels = 3

    @staticmethod
    def _to_three(f):
        return f

    def _decode(self, x):
        return x.clamp(-1.0, 1.0)

    def colorize(self, output, valid=None):
        """Each axis divided by its max |value| over the image, mapped to [0, 255]."""
        f = _as_batch(output, 3, "scene_flow output").float()
        mask = _as_valid(valid, f, "scene_flow output")
        return _black_out(_to_uint8((f / _per_axis_max_abs(f, mask) + 1.0) / 2.0), valid)


class AlbedoTask(Task):
    """RGB albedo in [0, 1] (uint8 accepted) -> albedo * 2 - 1; valid where every channel >= 0.004."""

    name = "albedo"
    annotation_channels = 3
    invalid_fill = -1.0

    def _encode(self, albedo, valid, keep):
        albedo = _unit_interval(albedo, valid, "albedo annotation")
        return albedo * 2.0 - 1.0, valid & _albedo_mask(albedo)

    def _decode(self, x):
        return (x.clamp(-1.0, 1.0) + 1.0) / 2.0

    def colorize(self, output, valid=None):
        return _black_out(_to_uint8(_as_batch(output, 3, "albedo output").float()), valid)


class ShadingTask(Task):
    """Shading image (RGB or grey, [0, 1], uint8 accepted) -> grey * 2 - 1 repeated.

    The release masks shading with the albedo mask: pass
    ``valid=albedo_valid_mask(albedo)`` when the albedo is known.
    """

    name = "shading"
    annotation_channels = (1, 3)
    invalid_fill = -1.0

    def _encode(self, shading, valid, keep):
        shading = _unit_interval(shading, valid, "shading annotation")
        grey = to_grey(shading, dim=1, keepdim=True) if shading.shape[1] == 3 else shading
        valid = valid & torch.isfinite(grey)
        return (grey * 2.0 - 1.0).repeat(1, 3, 1, 1), valid

    def _decode(self, x):
        return _mean_then_clip(x)

    def colorize(self, output, valid=None):
        s = _as_batch(output, 1, "shading output").float()
        return _black_out(_to_uint8(s.repeat(1, 3, 1, 1)), valid)


TASKS: dict[str, Task] = {
    t.name: t
    for t in (AlbedoTask(), ShadingTask(), DepthTask(), NormalTask(), SemanticTask(),
              OpticalFlowTask(), SceneFlowTask())
}
assert tuple(TASKS) == TASK_NAMES


def get_task(name: str) -> Task:
    """The task called ``name``; a ``ValueError`` lists the valid names otherwise."""
    try:
        return TASKS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASK_NAMES)}") from None


# --------------------------------------------------------------------------- flow colour wheel

def _color_wheel() -> np.ndarray:
    """The Middlebury colour wheel (Baker et al. 2011): 55 hues, red-yellow-green-cyan-blue-magenta."""
    segments = ((15, (255, 0, 0), (255, 255, 0)), (6, (255, 255, 0), (0, 255, 0)),
                (4, (0, 255, 0), (0, 255, 255)), (11, (0, 255, 255), (0, 0, 255)),
                (13, (0, 0, 255), (255, 0, 255)), (6, (255, 0, 255), (255, 0, 0)))
    rows = []
    for n, start, end in segments:
        ramp = np.floor(255.0 * np.arange(n) / n)  # one channel rises (or falls) per segment
        seg = np.empty((n, 3))
        for c in range(3):
            seg[:, c] = start[c] if start[c] == end[c] else (ramp if end[c] > start[c] else 255.0 - ramp)
        rows.append(seg)
    return np.concatenate(rows)


def flow_to_color(flow: np.ndarray, max_radius: float | None = None) -> np.ndarray:
    """``[B, 2, H, W]`` flow -> uint8 ``[B, H, W, 3]``: hue = direction, saturation = magnitude."""
    wheel = _color_wheel() / 255.0
    ncols = len(wheel)
    out = np.zeros(flow.shape[:1] + flow.shape[2:] + (3,), dtype=np.uint8)
    for i, (u, v) in enumerate(flow.astype(np.float64)):
        rad = np.hypot(u, v)
        top = max_radius if max_radius is not None else rad.max()
        if top > 0:
            u, v, rad = u / top, v / top, rad / top
        angle = np.arctan2(-v, -u) / np.pi
        fk = (angle + 1.0) / 2.0 * (ncols - 1)
        k0 = np.floor(fk).astype(int)
        k1 = (k0 + 1) % ncols
        frac = (fk - k0)[..., None]
        col = (1 - frac) * wheel[k0] + frac * wheel[k1]
        inside = (rad <= 1)[..., None]
        col = np.where(inside, 1 - rad[..., None] * (1 - col), col * 0.75)
        out[i] = np.floor(255.0 * col).astype(np.uint8)
    return out
