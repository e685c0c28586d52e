"""Crops, flips and colour jitter of the sources: the KITTI benchmark crop and the Eigen window,
centre crops, mirroring a sample with its vectors and intrinsics, the photometric augmentation."""

from __future__ import annotations

import math

import numpy as np
import torch

from stablemtl.data.formats import FormatError

KB_CROP = (352, 1216)  # KITTI's benchmark crop (height, width) of its 375 x 1242 frames


def kb_crop(height: int, width: int, crop: tuple[int, int]) -> tuple[int, int]:
    """Top-left corner of the KITTI benchmark crop: bottom rows, centred columns."""
    ch, cw = crop
    if height < ch or width < cw:
        raise FormatError(f"image {height}x{width} is smaller than the KITTI benchmark crop {ch}x{cw}")
    return height - ch, (width - cw) // 2


def eigen_crop_mask(full_height: int, full_width: int, crop: tuple[int, int] = KB_CROP) -> np.ndarray:
    """The release's Eigen evaluation window in KB-crop coordinates: bool ``[352, 1216]``.

    The window is built on the original image (rows ``[int(0.3324324 H), int(0.91351351 H))``,
    columns ``[int(0.0359477 W), int(0.96405229 W))``), then the KITTI benchmark crop is applied:
    for 375 x 1242 that is rows 101..318 and columns 31..1183 of the crop.
    """
    mask = np.zeros((full_height, full_width), dtype=bool)
    mask[int(0.3324324 * full_height):int(0.91351351 * full_height),
         int(0.0359477 * full_width):int(0.96405229 * full_width)] = True
    top, left = kb_crop(full_height, full_width, crop)
    return mask[top:top + crop[0], left:left + crop[1]]


def center_crop(height: int, width: int, crop_hw) -> tuple[int, int]:
    ch, cw = crop_hw
    if height < ch or width < cw:
        raise FormatError(f"image {height}x{width} is smaller than the centre crop {ch}x{cw}")
    return (height - ch) // 2, (width - cw) // 2


def color_jitter_params(strength, generator) -> tuple[float, float, float, float]:
    """Draw (brightness, contrast, saturation, hue) factors as torchvision's ColorJitter ranges."""
    b, c, s, h = strength
    u = torch.rand(4, generator=generator).tolist()
    return (1 - b + 2 * b * u[0], 1 - c + 2 * c * u[1], 1 - s + 2 * s * u[2], -h + 2 * h * u[3])


def color_jitter(rgb: torch.Tensor, brightness: float, contrast: float, saturation: float, hue: float) -> torch.Tensor:
    """Brightness, contrast, saturation, then a hue rotation (a fraction of the colour circle, in YIQ)."""
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=rgb.dtype)[:, None, None]
    x = (rgb * brightness).clamp(0, 1)
    grey_mean = (x * weights).sum(0).mean()
    x = (grey_mean + contrast * (x - grey_mean)).clamp(0, 1)
    grey = (x * weights).sum(0, keepdim=True)
    x = (grey + saturation * (x - grey)).clamp(0, 1)
    if hue:
        to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=rgb.dtype)
        a = 2 * math.pi * hue
        rot = torch.tensor([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]], dtype=rgb.dtype)
        m = torch.linalg.inv(to_yiq) @ rot @ to_yiq
        x = torch.einsum("ij,jhw->ihw", m, x).clamp(0, 1)
    return x


def _rasters(sample: dict) -> list[str]:
    return [k for k in sample if isinstance(sample[k], torch.Tensor) and sample[k].ndim == 3]


def flip(sample: dict, axis: int, component: int) -> None:
    """Mirror every ``[C, H, W]`` raster of ``sample`` along ``axis`` in place; the ``component``
    (0 = x, 1 = y) of the vector tasks changes sign and the principal point mirrors."""
    for key in _rasters(sample):
        sample[key] = sample[key].flip(axis)
    for task in ("optical_flow", "scene_flow", "normal"):
        if task in sample:
            sample[task][component] = -sample[task][component]
    size = sample["rgb"].shape[axis]
    sample["K"][component, 2] = size - 1 - sample["K"][component, 2]


def crop(sample: dict, top: int, left: int, height: int, width: int) -> None:
    """Cut the window ``[top, top + height) x [left, left + width)`` out of every raster in place; the
    principal point moves with it."""
    for key in _rasters(sample):
        sample[key] = sample[key][..., top:top + height, left:left + width]
    sample["K"][0, 2] -= left
    sample["K"][1, 2] -= top


def resize(sample: dict, size: tuple[int, int], tasks=(), rgb_resize: str = "nearest-exact",
           rescale_flow: bool = True) -> dict:
    """Resize ``rgb`` / ``rgb_next`` (nearest-exact, or bilinear with antialiasing for
    ``rgb_resize="antialias"``) and the annotations, targets and masks of ``tasks`` (nearest-exact)
    to ``size``; optical-flow vectors scale with the image when ``rescale_flow``; the intrinsics follow."""
    import torch.nn.functional as F

    h, w = sample["rgb"].shape[-2:]
    if (h, w) == tuple(size):
        return sample
    sy, sx = size[0] / h, size[1] / w

    def nearest(x):
        return F.interpolate(x[None].float(), size=size, mode="nearest-exact")[0].to(x.dtype)

    for key in ("rgb", "rgb_next"):
        if key in sample:
            if rgb_resize == "antialias":
                sample[key] = F.interpolate(sample[key][None], size=size, mode="bilinear",
                                            antialias=True, align_corners=False)[0].clamp(0, 1)
            else:
                sample[key] = nearest(sample[key])
    for task in tasks:
        for key in (task, f"{task}_target", f"{task}_valid"):
            if key in sample:
                sample[key] = nearest(sample[key])
        if task == "optical_flow" and task in sample and rescale_flow:
            # vectors scale with the image (the release forgot this; its scoring keeps native pixels)
            sample[task] = sample[task] * torch.tensor([sx, sy])[:, None, None]
    K = sample["K"].clone()
    K[0, 0], K[0, 2] = K[0, 0] * sx, (K[0, 2] + 0.5) * sx - 0.5
    K[1, 1], K[1, 2] = K[1, 1] * sy, (K[1, 2] + 0.5) * sy - 0.5
    sample["K"] = K
    return sample
