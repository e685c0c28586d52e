"""Each dataset's own annotation files: how its tools encode depth, flow, scene flow, classes,
normals and calibration on top of the generic formats (``stablemtl.data.formats``).

Readers decode real dataset files with the dataset's own conventions; writers
produce files that those readers (and the official tools) decode with the same
formula, so the procedural miniature datasets are real-format files.

Quantisation follows the datasets' own tools: a value is scaled, clipped to the
integer range and truncated (``astype``), e.g. Hypersim ``uint16(depth_m *
1000)``. Values a format cannot hold raise an error instead of wrapping; NaN
(and inf, except where the format has a "far" code) is written as the format's
invalid code. Writers are atomic, as every writer of ``formats``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stablemtl.data.formats import (FormatError, check_hw, existing_file, read_npy, read_png, write_bytes, write_npy,
                                    write_png)
from stablemtl.metrics import IGNORE_INDEX


def _quantise(values: np.ndarray, scale: float, offset: float = 0.0) -> np.ndarray:
    """``uint16(clip(values * scale + offset, 0, 65535))``, truncating as the datasets' tools."""
    return np.clip(values * scale + offset, 0, 65535).astype(np.uint16)


def _check_range(values: np.ndarray, limit: float, what: str, path, hint: str) -> None:
    finite = values[np.isfinite(values)]
    if finite.size and (finite.max() > limit or finite.min() < -limit):
        worst = finite[np.argmax(np.abs(finite))]
        raise ValueError(f"{path}: {what} {worst:.6g} is outside +-{limit:.6g}, the range the format holds; {hint}")


# --------------------------------------------------------------------------- KITTI

def read_kitti_flow(path) -> tuple[np.ndarray, np.ndarray]:
    """KITTI ``flow_occ``/``flow_noc`` 16-bit PNG: flow = (value - 2^15) / 64, valid where B > 0."""
    img = read_png(path, np.uint16, 3, "a KITTI 16-bit RGB flow PNG").astype(np.float32)
    flow = (img[..., :2] - 32768.0) / 64.0
    valid = img[..., 2] > 0
    return flow, valid


def write_kitti_flow(path, flow, valid) -> Path:
    """Inverse of ``read_kitti_flow``; invalid (or non-finite) pixels are written as (32768, 32768, 0),
    so they read back as zero flow, as the KITTI and FlyingThings3D files hold them."""
    flow = check_hw(flow, 2, "optical flow", path).astype(np.float64)
    valid = check_hw(valid, None, "the valid mask", path).astype(bool) & np.isfinite(flow).all(axis=-1)
    flow = np.where(valid[..., None], flow, 0.0)
    _check_range(flow, 32767.0 / 64.0, "flow component", path, "KITTI PNG flow holds |u|, |v| < 512 px")
    img = np.zeros(flow.shape[:2] + (3,), dtype=np.uint16)
    img[..., :2] = _quantise(flow, 64.0, 32768.0)
    img[..., 2] = valid
    return write_png(path, img)


def _read_u16_scaled(path, scale: float, what: str) -> np.ndarray:
    return read_png(path, np.uint16, 1, what).astype(np.float32) / np.float32(scale)


def _write_u16_scaled(path, values, scale: float, limit: float, what: str, hint: str, far_code=None) -> Path:
    values = check_hw(values, None, what, path).astype(np.float64)
    finite = np.isfinite(values)
    if (values[finite] < 0).any():
        raise ValueError(f"{path}: {what} must not be negative")
    _check_range(values, limit, what, path, hint)
    img = _quantise(np.where(finite, values, 0.0), scale)
    if far_code is not None:
        img[np.isposinf(values)] = far_code
    return write_png(path, img)


def read_kitti_depth(path) -> np.ndarray:
    """KITTI depth PNG (uint16 / 256) in metres; 0 = no measurement."""
    return _read_u16_scaled(path, 256.0, "a KITTI 16-bit depth PNG (uint16 / 256)")


def write_kitti_depth(path, depth) -> Path:
    """Inverse of ``read_kitti_depth``; 0, NaN and inf are written as 0 (invalid)."""
    depth = np.where(np.isinf(np.asarray(depth, dtype=np.float64)), np.nan, depth)
    return _write_u16_scaled(path, depth, 256.0, 65535 / 256.0, "depth (m)",
                             "mark farther points invalid (0 or NaN)")


def read_kitti_disparity(path) -> tuple[np.ndarray, np.ndarray]:
    """KITTI ``disp_occ_0``/``disp_occ_1`` PNG (uint16 / 256) in pixels and its valid mask (> 0)."""
    disp = _read_u16_scaled(path, 256.0, "a KITTI 16-bit disparity PNG (uint16 / 256)")
    return disp, disp > 0


def write_kitti_disparity(path, disparity, valid=None) -> Path:
    """Inverse of ``read_kitti_disparity``; invalid pixels are written as 0."""
    disparity = np.asarray(disparity, dtype=np.float64)
    if valid is not None:
        disparity = np.where(np.asarray(valid, dtype=bool), disparity, np.nan)
    disparity = np.where(np.isinf(disparity), np.nan, disparity)
    return _write_u16_scaled(path, disparity, 256.0, 65535 / 256.0, "disparity (px)",
                             "mark those pixels invalid")


def read_kitti_calib(path) -> dict:
    """A KITTI calibration text file (``key: v1 v2 ...``): numeric rows as float64 arrays, others as text."""
    path = existing_file(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise FormatError(f"{path}: not a KITTI calibration text file (byte {err.start} is not UTF-8 text; "
                          f"expected lines 'key: v1 v2 ...')") from None
    calib = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise FormatError(f"{path}: line {number} is not 'key: values': {line!r}")
        try:
            calib[key.strip()] = np.array([float(v) for v in value.split()])
        except ValueError:
            calib[key.strip()] = value.strip()
    return calib


def write_kitti_calib(path, calib: dict) -> Path:
    """Write a KITTI calibration file (numbers in the devkit's ``%e`` format)."""
    lines = []
    for key, value in calib.items():
        text = value if isinstance(value, str) else " ".join("%e" % v for v in np.ravel(value))
        lines.append(f"{key}: {text}")
    return write_bytes(path, ("\n".join(lines) + "\n").encode())


# --------------------------------------------------------------------------- Virtual KITTI 2

# vKITTI 2 category colours (colors.txt) and their map to the kit's 8 classes.
VKITTI_CATEGORIES = {
    "Terrain": (210, 0, 200), "Sky": (90, 200, 255), "Tree": (0, 199, 0),
    "Vegetation": (90, 240, 0), "Building": (140, 140, 140), "Road": (100, 60, 100),
    "GuardRail": (250, 100, 255), "TrafficSign": (255, 255, 0), "TrafficLight": (200, 200, 0),
    "Pole": (255, 130, 0), "Misc": (80, 80, 80), "Truck": (160, 60, 60),
    "Car": (255, 127, 80), "Van": (0, 139, 139), "Undefined": (0, 0, 0),
}
VKITTI_TO_CLASS = {
    "Road": 0, "Building": 1, "Pole": 2, "TrafficLight": 3, "TrafficSign": 4,
    "Tree": 5, "Vegetation": 5, "Sky": 6, "Truck": 7, "Car": 7, "Van": 7,
}  # Terrain, GuardRail, Misc, Undefined -> ignore (250)
VKITTI_DEPTH_SCALE = 100.0  # uint16 centimetres; 65535 (655.35 m) is the sky's far code


def read_vkitti_depth(path) -> np.ndarray:
    """vKITTI 2 depth PNG (uint16, cm) in metres; the sky holds the far code 655.35 m."""
    return _read_u16_scaled(path, VKITTI_DEPTH_SCALE, "a vKITTI 2 16-bit depth PNG (cm)")


def write_vkitti_depth(path, depth) -> Path:
    """Inverse of ``read_vkitti_depth``; +inf (sky) -> 65535, NaN -> 0."""
    return _write_u16_scaled(path, depth, VKITTI_DEPTH_SCALE, 655.35, "depth (m)",
                             "use +inf for the sky / far code", far_code=65535)


def read_vkitti_flow(path) -> tuple[np.ndarray, np.ndarray]:
    """vKITTI 2 forward-flow PNG: flow = (2 / 65535 * [R, G] - 1) * [W - 1, H - 1]; valid where B > 0."""
    img = read_png(path, np.uint16, 3, "a vKITTI 2 16-bit RGB flow PNG")
    h, w = img.shape[:2]
    valid = img[..., 2] > 0
    flow = 2.0 / 65535.0 * img[..., :2].astype(np.float32) - 1.0
    flow *= np.array([w - 1, h - 1], dtype=np.float32)
    flow[~valid] = 0.0
    return flow, valid


def write_vkitti_flow(path, flow, valid) -> Path:
    """Inverse of ``read_vkitti_flow``; valid pixels get B = 65535, invalid ones (0, 0, 0)."""
    flow = check_hw(flow, 2, "optical flow", path).astype(np.float64)
    valid = check_hw(valid, None, "the valid mask", path).astype(bool) & np.isfinite(flow).all(axis=-1)
    h, w = flow.shape[:2]
    size = np.array([w - 1, h - 1], dtype=np.float64)
    normalised = np.where(valid[..., None], flow / size, 0.0)
    _check_range(normalised, 1.0, "flow / (image size - 1)", path, "vKITTI flow holds |u| <= W-1, |v| <= H-1")
    img = np.zeros((h, w, 3), dtype=np.uint16)
    img[..., :2] = _quantise(normalised, 65535.0 / 2.0, 65535.0 / 2.0)
    img[..., 2] = 65535
    img[~valid] = 0
    return write_png(path, img)


def read_vkitti_scene_flow(path) -> tuple[np.ndarray, np.ndarray]:
    """vKITTI 2 forward-scene-flow PNG: (2 / 65535 * RGB - 1) * 10 m.

    The file has no validity flag, so ``valid`` is all True here; the release
    masks scene flow with the forward-flow file's valid mask (B > 0).
    """
    img = read_png(path, np.uint16, 3, "a vKITTI 2 16-bit RGB scene-flow PNG")
    flow = (2.0 / 65535.0 * img.astype(np.float32) - 1.0) * 10.0
    return flow, np.ones(img.shape[:2], dtype=bool)


def write_vkitti_scene_flow(path, scene_flow) -> Path:
    """Inverse of ``read_vkitti_scene_flow``; components must lie in [-10, 10] m (NaN -> 0)."""
    flow = check_hw(scene_flow, 3, "scene flow", path).astype(np.float64)
    _check_range(flow, 10.0, "scene-flow component (m)", path, "vKITTI scene flow holds +-10 m")
    return write_png(path, _quantise(np.nan_to_num(flow, nan=0.0) / 10.0, 65535.0 / 2.0, 65535.0 / 2.0))


def read_vkitti_semantic(path) -> np.ndarray:
    """vKITTI 2 ``classSegmentation`` colour PNG -> the kit's class ids (int64, 250 = ignore)."""
    rgb = read_png(path, np.uint8, 3, "a vKITTI 2 8-bit RGB class-segmentation PNG")
    code = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    lut = {(r << 16) | (g << 8) | b: VKITTI_TO_CLASS.get(name, IGNORE_INDEX)
           for name, (r, g, b) in VKITTI_CATEGORIES.items()}
    colours, inverse = np.unique(code, return_inverse=True)
    unknown = [c for c in colours.tolist() if c not in lut]
    if unknown:
        shown = [((c >> 16) & 255, (c >> 8) & 255, c & 255) for c in unknown[:5]]
        raise FormatError(f"{path}: colours {shown} are not vKITTI 2 categories (colors.txt)")
    return np.array([lut[c] for c in colours.tolist()], dtype=np.int64)[inverse].reshape(code.shape)


def write_vkitti_semantic(path, categories) -> Path:
    """Write an array of vKITTI 2 category names (``VKITTI_CATEGORIES`` keys) as a colour PNG."""
    categories = check_hw(categories, None, "a category map", path)
    names, inverse = np.unique(categories, return_inverse=True)
    unknown = [n for n in names.tolist() if n not in VKITTI_CATEGORIES]
    if unknown:
        raise ValueError(f"{path}: unknown vKITTI 2 categories {unknown}; valid: {list(VKITTI_CATEGORIES)}")
    palette = np.array([VKITTI_CATEGORIES[n] for n in names.tolist()], dtype=np.uint8)
    return write_png(path, palette[inverse.reshape(categories.shape)])


# --------------------------------------------------------------------------- Hypersim (preprocessed)

HYPERSIM_DEPTH_SCALE = 1000.0  # uint16 millimetres
HYPERSIM_DEPTH_MAX = 65.535  # metres: the largest depth the uint16 millimetres hold


def read_hypersim_depth(path) -> np.ndarray:
    """Preprocessed Hypersim planar depth PNG (uint16, mm) in metres; 0 = invalid."""
    return _read_u16_scaled(path, HYPERSIM_DEPTH_SCALE, "a Hypersim 16-bit depth PNG (mm)")


def write_hypersim_depth(path, depth) -> Path:
    """Inverse of ``read_hypersim_depth``; NaN / inf -> 0 (invalid), as the preprocessing."""
    depth = np.where(np.isinf(np.asarray(depth, dtype=np.float64)), np.nan, depth)
    return _write_u16_scaled(path, depth, HYPERSIM_DEPTH_SCALE, HYPERSIM_DEPTH_MAX, "depth (m)",
                             "Hypersim's valid range ends at 65 m: mark farther pixels invalid (NaN)")


# --------------------------------------------------------------------------- npy (normals, masks, DIODE)

def read_normal_npy(path) -> np.ndarray:
    """Camera-frame normals ``[H, W, 3]`` float32 (Hypersim preprocessed, vKITTI estimated)."""
    return read_npy(path, ndim=3, channels=3, kinds="f").astype(np.float32)


def _read_npy_hw(path, what: str, kinds: str = "biuf") -> np.ndarray:
    """A ``[H, W]`` (or ``[H, W, 1]``) ``.npy`` array of ``kinds`` as ``[H, W]``."""
    array = read_npy(path, kinds=kinds)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim != 2:
        raise FormatError(f"{path}: expected {what} [H, W] or [H, W, 1], got shape {array.shape}")
    return array


def read_mask_npy(path) -> np.ndarray:
    """A validity mask ``[H, W]`` (bool, or 0/1 numbers) as bool."""
    return _read_npy_hw(path, "a mask").astype(bool)


def read_diode_depth(path) -> np.ndarray:
    """DIODE ``*_depth.npy`` (``[H, W, 1]`` metres) as float32 ``[H, W]``."""
    return _read_npy_hw(path, "a DIODE depth map", kinds="f").astype(np.float32)


def write_diode_depth(path, depth) -> Path:
    return write_npy(path, check_hw(depth, None, "depth", path).astype(np.float32)[..., None])


def read_diode_mask(path) -> np.ndarray:
    """DIODE ``*_depth_mask.npy`` (float 0/1) as bool ``[H, W]``."""
    return read_mask_npy(path)


def write_diode_mask(path, mask) -> Path:
    return write_npy(path, check_hw(mask, None, "a mask", path).astype(np.float32))


DIODE_NORMAL_FLIP = np.array([-1.0, 1.0, 1.0], dtype=np.float32)


def read_diode_normal(path) -> tuple[np.ndarray, np.ndarray]:
    """DIODE ``*_normal.npy`` -> normals in the kit's convention ``(-nx, ny, nz)`` and the mask
    of pixels whose stored normal has length in (0.5, 1.5); non-finite normals are invalid."""
    raw = read_npy(path, ndim=3, channels=3, kinds="f").astype(np.float32)
    with np.errstate(invalid="ignore"):
        norm = np.linalg.norm(raw, axis=-1)
        valid = (norm > 0.5) & (norm < 1.5)
    return raw * DIODE_NORMAL_FLIP, valid


def write_diode_normal(path, normal) -> Path:
    """Inverse of ``read_diode_normal`` (the x flip is its own inverse)."""
    return write_npy(path, check_hw(normal, 3, "normals", path).astype(np.float32) * DIODE_NORMAL_FLIP)


# --------------------------------------------------------------------------- Cityscapes

# labelId -> the kit's class id: road 7, building 11, pole 17, traffic light 19,
# traffic sign 20, vegetation 21, sky 23, vehicle = car 26 + bus 28; else ignore.
CITYSCAPES_TO_CLASS = {7: 0, 11: 1, 17: 2, 19: 3, 20: 4, 21: 5, 23: 6, 26: 7, 28: 7}


def read_cityscapes_label_ids(path) -> np.ndarray:
    """A ``*_gtFine_labelIds.png`` as its raw Cityscapes label ids (uint8 ``[H, W]``)."""
    return read_png(path, np.uint8, 1, "a Cityscapes 8-bit labelIds PNG")


def write_cityscapes_label_ids(path, label_ids) -> Path:
    label_ids = check_hw(label_ids, None, "label ids", path)
    if label_ids.min() < 0 or label_ids.max() > 255:
        raise ValueError(f"{path}: Cityscapes label ids are 0..255 (-1 'license plate' is stored as 255)")
    return write_png(path, label_ids.astype(np.uint8))


def cityscapes_to_classes(label_ids) -> np.ndarray:
    """Map raw Cityscapes label ids to the kit's 8 classes (int64, 250 = ignore)."""
    lut = np.full(256, IGNORE_INDEX, dtype=np.int64)
    for label_id, cls in CITYSCAPES_TO_CLASS.items():
        lut[label_id] = cls
    return lut[np.asarray(label_ids, dtype=np.uint8)]


def read_cityscapes_labels(path) -> np.ndarray:
    """A ``*_gtFine_labelIds.png`` as the kit's class ids (int64, 250 = ignore)."""
    return cityscapes_to_classes(read_cityscapes_label_ids(path))
