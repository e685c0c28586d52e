"""The StableMTL release's image operations, as its preprocessing runs them (``stablemtl.data.convert``).

Tone mapping and 8-bit quantisation (Hypersim's and MID's), the normals' visualisation,
Hypersim's distance-to-camera -> planar depth, camera-frame normals from a depth map with
D2NT v3 (Virtual KITTI 2) and the back-projection of disparities (FlyingThings3D), in numpy,
with OpenCV's ``filter2D`` where the release's result depends on its rounding.
"""

from __future__ import annotations

import numpy as np

# the release's tone mapping (dataset_preprocess/hypersim/hypersim_util.py; MID's preprocessing uses the same)
TONEMAP = {"percentile": 90, "brightness": 0.8, "gamma": 1 / 2.2, "eps": 1e-4}


def brightness(rgb: np.ndarray) -> np.ndarray:
    """CCIR601 YIQ brightness 0.3 R + 0.59 G + 0.11 B (Hypersim's and the release's tone mapping)."""
    return 0.3 * rgb[..., 0] + 0.59 * rgb[..., 1] + 0.11 * rgb[..., 2]


def tonemap_scale(rgb: np.ndarray, valid: np.ndarray | None = None, percentile: float = TONEMAP["percentile"],
                  target: float = TONEMAP["brightness"], gamma: float = TONEMAP["gamma"],
                  eps: float = TONEMAP["eps"]) -> float:
    """The scale that makes the ``percentile`` brightness of the (valid) pixels ``target`` after the
    gamma: ``target ** (1 / gamma) / p``; 0 when ``p < eps``, 1 without a valid pixel."""
    values = brightness(rgb)
    if valid is not None:
        values = values[valid]
    if values.size == 0:
        return 1.0
    current = float(np.percentile(values, percentile))
    return 0.0 if current < eps else float(np.power(target, 1 / gamma) / current)


def tonemap(rgb: np.ndarray, scale: float, gamma: float = TONEMAP["gamma"]) -> np.ndarray:
    """``clip(max(scale x rgb, 0) ** gamma, 0, 1)``."""
    return np.clip(np.power(np.maximum(scale * rgb, 0), gamma), 0, 1)


def to_uint8(x: np.ndarray) -> np.ndarray:
    """``uint8(x * 255)`` truncating, as the release (x in [0, 1]); non-finite values become 0."""
    return (np.nan_to_num(np.asarray(x, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0) * 255).astype(np.uint8)


def normal_to_rgb(normal: np.ndarray) -> np.ndarray:
    """Normals -> uint8 RGB ``((n / |n| + 1) / 2 * 255)`` (the release's visualisation)."""
    norm = np.maximum(np.linalg.norm(normal, axis=-1, keepdims=True), 1e-12)
    return (((normal / norm + 1) * 0.5) * 255).astype(np.uint8)


def normalize_rows(v: np.ndarray) -> np.ndarray:
    """Unit vectors along the last axis; zero vectors stay zero (sklearn's ``normalize``)."""
    norm = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.where(norm == 0, 1.0, norm)


def distance_to_planar(distance: np.ndarray, focal: float) -> np.ndarray:
    """Hypersim distance to the camera centre -> planar depth: ``distance / |(x, y, f)| * f`` on the
    image-plane grid x = j - (W - 1) / 2, y = i - (H - 1) / 2 (ml-hypersim issue 9)."""
    h, w = distance.shape
    x = np.linspace(-0.5 * w + 0.5, 0.5 * w - 0.5, w, dtype=np.float32)[None, :]
    y = np.linspace(-0.5 * h + 0.5, 0.5 * h - 0.5, h, dtype=np.float32)[:, None]
    norm = np.sqrt(x * x + y * y + np.float32(focal) ** 2, dtype=np.float32)
    return distance / norm * focal


def _neighbour(a: np.ndarray, dy: int, dx: int, border: str = "reflect", fill: float = 0.0) -> np.ndarray:
    """``a`` at (i + dy, j + dx): beyond the border mirrored without repeating the edge (OpenCV's
    default ``BORDER_REFLECT_101``) or ``fill``."""
    h, w = a.shape
    if border == "reflect":
        padded = np.pad(a, 1, mode="reflect")
        return padded[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
    out = np.full_like(a, fill)
    ys, yd = (slice(dy, h), slice(0, h - dy)) if dy >= 0 else (slice(0, h + dy), slice(-dy, h))
    xs, xd = (slice(dx, w), slice(0, w - dx)) if dx >= 0 else (slice(0, w + dx), slice(-dx, w))
    out[yd, xd] = a[ys, xs]
    return out


def _soft_min(lap: np.ndarray, axis: int, base: float, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """D2NT's weights of the two one-sided gradients along ``axis`` (1: left/right, 0: up/down), from
    the neighbours' ``base ** -laplacian`` (0 beyond the border), then made hard where one side's
    weight exceeds the other's ``base`` times (in the release's order of assignments)."""
    power = np.power(base, -lap)
    before = _neighbour(power, 0, -1, "fill") if axis == 1 else _neighbour(power, -1, 0, "fill")
    after = _neighbour(power, 0, 1, "fill") if axis == 1 else _neighbour(power, 1, 0, "fill")
    first = (before + eps / 2) / (eps + before + after)
    second = (after + eps / 2) / (eps + before + after)
    first[first / (second + eps) > base] = 1
    second[first / (second + eps) > base] = 0
    first[second / (first + eps) > base] = 0
    second[second / (first + eps) > base] = 1
    return first, second


def _laplacian(z: np.ndarray) -> np.ndarray:
    """|4-neighbour Laplacian| of depth (D2NT's DLF-alpha) with OpenCV's ``filter2D``, as the release:
    vKITTI depth is quantised to centimetres, so neighbours often tie exactly, and the MRF step's
    choice between them depends on the very rounding of this sum."""
    import cv2

    kernel = np.array([[0, -1, 0], [-1, 4, -1], [0, -1, 0]], dtype=np.float64)
    return np.abs(cv2.filter2D(z, -1, kernel, borderType=cv2.BORDER_REFLECT_101))


def d2nt_normals(depth: np.ndarray, fx: float, fy: float, cx: float, cy: float,
                 base: float = float(np.e), eps: float = 1e-8) -> np.ndarray:
    """Camera-frame normals from a depth map with D2NT v3 (Feng et al. 2023), as the release runs it
    on Virtual KITTI 2: discontinuity-aware gradients (1D-DLF soft minimum of the one-sided
    differences), the depth-to-normal translation with the release's 1-based pixel grid
    (u = 1..W minus cx), normalisation, then the MRF refinement (each pixel takes the normal of the
    4-neighbour, or itself, with the smallest |4-neighbour Laplacian| of depth; ties: left, right,
    up, down, self). The normals point away from the camera (x right, y down, z forward)."""
    z = np.asarray(depth, dtype=np.float64)
    h, w = z.shape
    left, right, up, down = (_neighbour(z, 0, -1), _neighbour(z, 0, 1), _neighbour(z, -1, 0), _neighbour(z, 1, 0))
    grad_l, grad_r, grad_u, grad_d = z - left, right - z, z - up, down - z
    l1, l2 = _soft_min(np.abs(grad_l - grad_r), 1, base, eps)
    l3, l4 = _soft_min(np.abs(grad_u - grad_d), 0, base, eps)
    gu, gv = l1 * grad_l + l2 * grad_r, l3 * grad_u + l4 * grad_d
    u_map = np.arange(1, w + 1, dtype=np.float64)[None, :] - cx
    v_map = np.arange(1, h + 1, dtype=np.float64)[:, None] - cy
    n = -np.stack([gu * fx, gv * fy, -(z + v_map * gv + u_map * gu)], axis=-1)
    n = n / (np.linalg.norm(n, axis=-1, keepdims=True) + eps)
    lap = _laplacian(z)
    costs = np.stack([_neighbour(lap, 0, -1, "fill", np.inf), _neighbour(lap, 0, 1, "fill", np.inf),
                      _neighbour(lap, -1, 0, "fill", np.inf), _neighbour(lap, 1, 0, "fill", np.inf), lap])
    best = np.argmin(costs, axis=0)
    out = np.empty_like(n)
    for c in range(3):
        candidates = np.stack([_neighbour(n[..., c], 0, -1, "fill"), _neighbour(n[..., c], 0, 1, "fill"),
                               _neighbour(n[..., c], -1, 0, "fill"), _neighbour(n[..., c], 1, 0, "fill"), n[..., c]])
        out[..., c] = np.take_along_axis(candidates, best[None], axis=0)[0]
    return out


def disparity_to_points(disparity: np.ndarray, baseline: float, focal: float, cx: float, cy: float,
                        flow: np.ndarray | None = None, eps: float = 1e-5) -> np.ndarray:
    """Back-project a disparity map (float32, as the release): depth = b f / (d + eps),
    x = (j - cx [+ u]) z / f, y = (i - cy [+ v]) z / f; ``[H, W, 3]``."""
    h, w = disparity.shape
    depth = baseline * focal / (disparity + np.float32(eps))
    xx = np.tile(np.arange(w, dtype=np.float32)[None, :], (h, 1))
    yy = np.tile(np.arange(h, dtype=np.float32)[:, None], (1, w))
    if flow is None:
        x, y = (xx - cx) * depth / focal, (yy - cy) * depth / focal
    else:
        x, y = (xx - cx + flow[..., 0]) * depth / focal, (yy - cy + flow[..., 1]) * depth / focal
    return np.stack([x, y, depth], axis=-1)
