"""Readers and writers of every file format the StableMTL datasets use.

Readers decode real dataset files with the dataset's own conventions; writers
produce files that those readers (and the official tools) decode with the same
formula, so the procedural miniature datasets are real-format files. Arrays are
numpy, channels last (``[H, W, C]``), RGB order (OpenCV's BGR never leaks out).

Quantisation follows the datasets' own tools: a value is scaled, clipped to the
integer range and truncated (``astype``), e.g. Hypersim ``uint16(depth_m *
1000)``. Values a format cannot hold raise an error instead of wrapping; NaN
(and inf, except where the format has a "far" code) is written as the format's
invalid code. Every writer writes atomically (temporary file + rename), so an
interrupted run never leaves a half-written file under the final name.

A missing file raises ``FileNotFoundError``; a corrupt, truncated or
mis-typed file raises ``FormatError`` naming the file and what was expected.
Decoders that would return partial data without a word are checked first:
a JPEG must end with its EOI marker and a PNG with its IEND chunk (OpenCV
fills a truncated image with grey and says nothing), and a fixed-size binary
file (``.flo``, PFM) must hold exactly the bytes its header announces (a
``.flo`` written with a float64 body is twice as long and would decode as noise).
``set_aside_corrupt`` renames a kit-written file that cannot be read (a cache
entry, a state file) so that the next run recomputes it instead of failing again.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import numpy as np

from stablemtl.metrics import IGNORE_INDEX


class FormatError(ValueError):
    """A file exists but does not hold what its format promises."""


# --------------------------------------------------------------------------- plumbing

_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once: the process's file-creation mask


def _atomic_write(path, write) -> Path:
    """Call ``write(tmp_path)`` then rename the temporary file to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix or ".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp's 0600, else: a file as open() would create it
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _write_bytes(path, data: bytes) -> Path:
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
    return _atomic_write(path, write)


def _exists(path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    return path


def set_aside_corrupt(path, reason: str, then: str = "recomputing it", log=print) -> Path:
    """Rename the unreadable kit-written file or folder ``path`` to ``<name>.corrupt`` (``.corrupt.2``, ...
    when taken), say so (and ``then``, what happens instead) through ``log``; returns the new place."""
    path = Path(path)
    target, n = path.with_name(path.name + ".corrupt"), 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.corrupt.{n}")
    os.replace(path, target)
    log(f"{path}: cannot be read ({reason}); set aside as {target.name}, {then}")
    return target


# the last bytes of a complete file: JPEG's EOI marker, PNG's IEND chunk (its CRC is fixed)
_JPEG_START, _JPEG_END = b"\xff\xd8", b"\xff\xd9"
_PNG_START, _PNG_END = b"\x89PNG\r\n\x1a\n", b"IEND\xaeB`\x82"


def incomplete(path) -> str | None:
    """Why the JPEG or PNG ``path`` is truncated (its decoders would return partial data), ``None`` when
    it is complete or of another type: a JPEG must have its EOI marker after its last start of scan
    (data appended after the image, as phones' motion photos do, is allowed), a PNG must hold its
    IEND chunk."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        f.seek(max(0, size - 4096))
        tail = f.read()
    if head.startswith(_JPEG_START) and not tail.rstrip(b"\x00 \t\r\n").endswith(_JPEG_END):
        data = path.read_bytes()  # not at the very end: is the EOI after the last scan (a trailer follows)?
        if data.find(_JPEG_END, max(0, data.rfind(b"\xff\xda"))) < 0:
            return f"truncated JPEG: {size} bytes without the end-of-image marker FF D9 after its last scan"
    if head.startswith(_PNG_START) and _PNG_END not in tail:
        return f"truncated PNG: {size} bytes without the IEND chunk at the end"
    return None


def check_complete(path) -> None:
    """Raise ``FormatError`` naming ``path`` when it is a truncated JPEG or PNG (``incomplete``)."""
    reason = incomplete(path)
    if reason is not None:
        raise FormatError(f"{path}: {reason}; the file is incomplete: copy or download it again")


def _depth_name(dtype) -> str:
    return {np.dtype(np.uint8): "8-bit", np.dtype(np.uint16): "16-bit"}.get(np.dtype(dtype), str(dtype))


def _read_png(path, dtype, channels: int, what: str) -> np.ndarray:
    """Decode an image with OpenCV and check bit depth and channel count; returns RGB order."""
    import cv2

    path = _exists(path)
    reason = incomplete(path)
    if reason is not None:
        raise FormatError(f"{path}: cannot decode the image ({reason}); expected {what}: copy or download "
                          f"the file again")
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise FormatError(f"{path}: cannot decode the image (corrupt or truncated?); expected {what}")
    have = 1 if img.ndim == 2 else img.shape[2]
    if img.dtype != np.dtype(dtype) or have != channels:
        raise FormatError(
            f"{path}: expected {what} ({_depth_name(dtype)}, {channels} channel(s)), "
            f"got {_depth_name(img.dtype)} with {have} channel(s)"
        )
    if channels == 3:
        img = img[..., ::-1]
    elif channels == 4:
        img = img[..., [2, 1, 0, 3]]
    return np.ascontiguousarray(img)


def _write_png(path, img: np.ndarray, jpeg_quality: int | None = None) -> Path:
    """Encode ``img`` (RGB order) with OpenCV by the path's extension (png, jpg), atomically."""
    import cv2

    img = np.asarray(img)
    if img.ndim == 3 and img.shape[2] == 3:
        img = img[..., ::-1]
    elif img.ndim == 3 and img.shape[2] == 4:
        img = img[..., [2, 1, 0, 3]]
    flags = [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)] if jpeg_quality is not None else []
    ok, buf = cv2.imencode(Path(path).suffix or ".png", np.ascontiguousarray(img), flags)
    if not ok:
        raise FormatError(f"{path}: OpenCV could not encode an image of shape {img.shape} and dtype {img.dtype}")
    return _write_bytes(path, buf.tobytes())


def _quantise(values: np.ndarray, scale: float, offset: float = 0.0) -> np.ndarray:
    """``uint16(clip(values * scale + offset, 0, 65535))``, truncating as the datasets' tools."""
    return np.clip(values * scale + offset, 0, 65535).astype(np.uint16)


def _check_hw(array, channels: int | None, what: str, path) -> np.ndarray:
    array = np.asarray(array)
    ok = array.ndim == 2 if channels is None else (array.ndim == 3 and array.shape[2] == channels)
    if not ok:
        shape = "[H, W]" if channels is None else f"[H, W, {channels}]"
        raise ValueError(f"{path}: {what} must be {shape}, got shape {array.shape}")
    return array


def _check_range(values: np.ndarray, limit: float, what: str, path, hint: str) -> None:
    finite = values[np.isfinite(values)]
    if finite.size and (finite.max() > limit or finite.min() < -limit):
        worst = finite[np.argmax(np.abs(finite))]
        raise ValueError(f"{path}: {what} {worst:.6g} is outside +-{limit:.6g}, the range the format holds; {hint}")


# --------------------------------------------------------------------------- 8-bit images

def read_rgb(path) -> np.ndarray:
    """An 8-bit RGB image (png or jpg) as uint8 ``[H, W, 3]``."""
    return _read_png(path, np.uint8, 3, "an 8-bit RGB image")


def write_rgb(path, image, quality: int = 95) -> Path:
    """Write uint8 RGB, or floats in [0, 1] converted as ``uint8(x * 255)``; jpg uses ``quality``."""
    image = _check_hw(image, 3, "an RGB image", path)
    if image.dtype != np.uint8:
        image = np.asarray(image, dtype=np.float64)
        if not np.isfinite(image).all() or image.min() < 0 or image.max() > 1:
            raise ValueError(f"{path}: float images must be finite and in [0, 1] (got {image.min():.4g}..{image.max():.4g})")
        image = (image * 255.0).astype(np.uint8)
    is_jpeg = Path(path).suffix.lower() in (".jpg", ".jpeg")
    return _write_png(path, image, jpeg_quality=quality if is_jpeg else None)


def read_mask_png(path) -> np.ndarray:
    """A single-channel 8-bit mask (e.g. FlyingThings3D occlusions) as bool, non-zero = True."""
    return _read_png(path, np.uint8, 1, "an 8-bit single-channel mask PNG") > 0


def write_mask_png(path, mask) -> Path:
    """Write a bool mask as an 8-bit PNG with 0 / 255."""
    mask = _check_hw(mask, None, "a mask", path)
    return _write_png(path, np.where(mask.astype(bool), 255, 0).astype(np.uint8))


# --------------------------------------------------------------------------- PFM (FlyingThings3D)

def read_pfm(path) -> np.ndarray:
    """A PFM image (``Pf`` grey or ``PF`` colour) as float32 ``[H, W]`` / ``[H, W, 3]``, top row first.

    Values are returned as stored (inf/NaN included); loaders decide validity.
    """
    path = _exists(path)
    data = path.read_bytes()
    header = re.match(rb"(P[Ff])\s+(\d+)\s+(\d+)\s+(-?[0-9.eE+-]+)\s", data)
    if header is None:
        raise FormatError(f"{path}: not a PFM file (expected a 'PF' or 'Pf' header with width, height and scale)")
    kind, width, height, scale = header.groups()
    channels = 3 if kind == b"PF" else 1
    width, height, scale = int(width), int(height), float(scale)
    count = width * height * channels
    body = data[header.end():]
    if len(body) != 4 * count:
        what = "truncated PFM" if len(body) < 4 * count else "PFM longer than its header says"
        raise FormatError(f"{path}: {what}: {width}x{height}x{channels} floats need {4 * count} bytes after "
                          f"the header (4 per float32), found {len(body)}")
    dtype = "<f4" if scale < 0 else ">f4"
    img = np.frombuffer(body, dtype=dtype, count=count).reshape(height, width, channels)
    img = np.flipud(img).astype(np.float32)
    return img[..., 0] if channels == 1 else img


def write_pfm(path, image) -> Path:
    """Write float32 ``[H, W]`` or ``[H, W, 3]`` as little-endian PFM (header as Freiburg's tools)."""
    image = np.asarray(image, dtype=np.float32)
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        raise ValueError(f"{path}: PFM holds [H, W] or [H, W, 3] images, got shape {image.shape}")
    kind = b"PF\n" if image.ndim == 3 else b"Pf\n"
    header = kind + b"%d %d\n" % (image.shape[1], image.shape[0]) + b"%f\n" % -1.0
    return _write_bytes(path, header + np.flipud(image).astype("<f4").tobytes())


# --------------------------------------------------------------------------- Middlebury .flo

FLO_MAGIC = 202021.25  # the float32 whose bytes spell "PIEH"


def read_flo(path) -> np.ndarray:
    """A Middlebury ``.flo`` file as float32 ``[H, W, 2]`` (u, v) in pixels, as stored."""
    path = _exists(path)
    data = path.read_bytes()
    if len(data) < 12 or np.frombuffer(data[:4], "<f4")[0] != FLO_MAGIC:
        raise FormatError(f"{path}: not a .flo file (expected the magic bytes 'PIEH')")
    width, height = (int(v) for v in np.frombuffer(data[4:12], "<i4"))
    need = 12 + 8 * width * height
    if width <= 0 or height <= 0 or len(data) != need:
        what = "truncated .flo" if len(data) < need else ".flo longer than its header says"
        hint = " (a float64 body? .flo holds float32)" if len(data) == 12 + 16 * width * height else ""
        raise FormatError(f"{path}: {what}: a {width}x{height} flow needs {need} bytes, found {len(data)} "
                          f"(12 + 4*2*{width}*{height} expected){hint}")
    return np.frombuffer(data[12:], "<f4").reshape(height, width, 2).copy()


def write_flo(path, flow) -> Path:
    """Write float32 ``[H, W, 2]`` flow as a Middlebury ``.flo`` file."""
    flow = _check_hw(flow, 2, "optical flow", path).astype("<f4")
    header = b"PIEH" + np.array([flow.shape[1], flow.shape[0]], "<i4").tobytes()
    return _write_bytes(path, header + flow.tobytes())


# --------------------------------------------------------------------------- KITTI

def read_kitti_flow(path) -> tuple[np.ndarray, np.ndarray]:
    """KITTI ``flow_occ``/``flow_noc`` 16-bit PNG: flow = (value - 2^15) / 64, valid where B > 0."""
    img = _read_png(path, np.uint16, 3, "a KITTI 16-bit RGB flow PNG").astype(np.float32)
    flow = (img[..., :2] - 32768.0) / 64.0
    valid = img[..., 2] > 0
    return flow, valid


def write_kitti_flow(path, flow, valid) -> Path:
    """Inverse of ``read_kitti_flow``; invalid (or non-finite) pixels are written as (32768, 32768, 0),
    so they read back as zero flow, as the KITTI and FlyingThings3D files hold them."""
    flow = _check_hw(flow, 2, "optical flow", path).astype(np.float64)
    valid = _check_hw(valid, None, "the valid mask", path).astype(bool) & np.isfinite(flow).all(axis=-1)
    flow = np.where(valid[..., None], flow, 0.0)
    _check_range(flow, 32767.0 / 64.0, "flow component", path, "KITTI PNG flow holds |u|, |v| < 512 px")
    img = np.zeros(flow.shape[:2] + (3,), dtype=np.uint16)
    img[..., :2] = _quantise(flow, 64.0, 32768.0)
    img[..., 2] = valid
    return _write_png(path, img)


def _read_u16_scaled(path, scale: float, what: str) -> np.ndarray:
    return _read_png(path, np.uint16, 1, what).astype(np.float32) / np.float32(scale)


def _write_u16_scaled(path, values, scale: float, limit: float, what: str, hint: str, far_code=None) -> Path:
    values = _check_hw(values, None, what, path).astype(np.float64)
    finite = np.isfinite(values)
    if (values[finite] < 0).any():
        raise ValueError(f"{path}: {what} must not be negative")
    _check_range(values, limit, what, path, hint)
    img = _quantise(np.where(finite, values, 0.0), scale)
    if far_code is not None:
        img[np.isposinf(values)] = far_code
    return _write_png(path, img)


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
    path = _exists(path)
    calib = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
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
    return _write_bytes(path, ("\n".join(lines) + "\n").encode())


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


def read_vkitti_depth(path) -> np.ndarray:
    """vKITTI 2 depth PNG (uint16, cm) in metres; the sky holds the far code 655.35 m."""
    return _read_u16_scaled(path, 100.0, "a vKITTI 2 16-bit depth PNG (cm)")


def write_vkitti_depth(path, depth) -> Path:
    """Inverse of ``read_vkitti_depth``; +inf (sky) -> 65535, NaN -> 0."""
    return _write_u16_scaled(path, depth, 100.0, 655.35, "depth (m)",
                             "use +inf for the sky / far code", far_code=65535)


def read_vkitti_flow(path) -> tuple[np.ndarray, np.ndarray]:
    """vKITTI 2 forward-flow PNG: flow = (2 / 65535 * [R, G] - 1) * [W - 1, H - 1]; valid where B > 0."""
    img = _read_png(path, np.uint16, 3, "a vKITTI 2 16-bit RGB flow PNG")
    h, w = img.shape[:2]
    valid = img[..., 2] > 0
    flow = 2.0 / 65535.0 * img[..., :2].astype(np.float32) - 1.0
    flow *= np.array([w - 1, h - 1], dtype=np.float32)
    flow[~valid] = 0.0
    return flow, valid


def write_vkitti_flow(path, flow, valid) -> Path:
    """Inverse of ``read_vkitti_flow``; valid pixels get B = 65535, invalid ones (0, 0, 0)."""
    flow = _check_hw(flow, 2, "optical flow", path).astype(np.float64)
    valid = _check_hw(valid, None, "the valid mask", path).astype(bool) & np.isfinite(flow).all(axis=-1)
    h, w = flow.shape[:2]
    size = np.array([w - 1, h - 1], dtype=np.float64)
    normalised = np.where(valid[..., None], flow / size, 0.0)
    _check_range(normalised, 1.0, "flow / (image size - 1)", path, "vKITTI flow holds |u| <= W-1, |v| <= H-1")
    img = np.zeros((h, w, 3), dtype=np.uint16)
    img[..., :2] = _quantise(normalised, 65535.0 / 2.0, 65535.0 / 2.0)
    img[..., 2] = 65535
    img[~valid] = 0
    return _write_png(path, img)


def read_vkitti_scene_flow(path) -> tuple[np.ndarray, np.ndarray]:
    """vKITTI 2 forward-scene-flow PNG: (2 / 65535 * RGB - 1) * 10 m.

    The file has no validity flag, so ``valid`` is all True here; the release
    masks scene flow with the forward-flow file's valid mask (B > 0).
    """
    img = _read_png(path, np.uint16, 3, "a vKITTI 2 16-bit RGB scene-flow PNG")
    flow = (2.0 / 65535.0 * img.astype(np.float32) - 1.0) * 10.0
    return flow, np.ones(img.shape[:2], dtype=bool)


def write_vkitti_scene_flow(path, scene_flow) -> Path:
    """Inverse of ``read_vkitti_scene_flow``; components must lie in [-10, 10] m (NaN -> 0)."""
    flow = _check_hw(scene_flow, 3, "scene flow", path).astype(np.float64)
    _check_range(flow, 10.0, "scene-flow component (m)", path, "vKITTI scene flow holds +-10 m")
    return _write_png(path, _quantise(np.nan_to_num(flow, nan=0.0) / 10.0, 65535.0 / 2.0, 65535.0 / 2.0))


def read_vkitti_semantic(path) -> np.ndarray:
    """vKITTI 2 ``classSegmentation`` colour PNG -> the kit's class ids (int64, 250 = ignore)."""
    rgb = _read_png(path, np.uint8, 3, "a vKITTI 2 8-bit RGB class-segmentation PNG")
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
    categories = _check_hw(categories, None, "a category map", path)
    names, inverse = np.unique(categories, return_inverse=True)
    unknown = [n for n in names.tolist() if n not in VKITTI_CATEGORIES]
    if unknown:
        raise ValueError(f"{path}: unknown vKITTI 2 categories {unknown}; valid: {list(VKITTI_CATEGORIES)}")
    palette = np.array([VKITTI_CATEGORIES[n] for n in names.tolist()], dtype=np.uint8)
    return _write_png(path, palette[inverse.reshape(categories.shape)])


# --------------------------------------------------------------------------- Hypersim (preprocessed) and raw HDF5

HYPERSIM_DEPTH_SCALE = 1000.0  # uint16 millimetres


def read_hypersim_depth(path) -> np.ndarray:
    """Preprocessed Hypersim planar depth PNG (uint16, mm) in metres; 0 = invalid."""
    return _read_u16_scaled(path, HYPERSIM_DEPTH_SCALE, "a Hypersim 16-bit depth PNG (mm)")


def write_hypersim_depth(path, depth) -> Path:
    """Inverse of ``read_hypersim_depth``; NaN / inf -> 0 (invalid), as the preprocessing."""
    depth = np.where(np.isinf(np.asarray(depth, dtype=np.float64)), np.nan, depth)
    return _write_u16_scaled(path, depth, HYPERSIM_DEPTH_SCALE, 65.535, "depth (m)",
                             "Hypersim's valid range ends at 65 m: mark farther pixels invalid (NaN)")


def read_hdf5(path, key: str = "dataset") -> np.ndarray:
    """One dataset of an HDF5 file (raw Hypersim frames store theirs under ``dataset``)."""
    import h5py

    path = _exists(path)
    try:
        with h5py.File(path, "r") as f:
            if key not in f:
                raise FormatError(f"{path}: HDF5 file has no dataset {key!r} (has {sorted(f.keys())})")
            return f[key][()]
    except OSError as err:
        raise FormatError(f"{path}: cannot read as HDF5 ({err})") from None


def write_hdf5(path, array, key: str = "dataset") -> Path:
    """Write ``array`` as dataset ``key`` of a gzip-compressed HDF5 file."""
    import h5py

    def write(tmp):
        with h5py.File(tmp, "w") as f:
            f.create_dataset(key, data=np.asarray(array), compression="gzip")
    return _atomic_write(path, write)


# --------------------------------------------------------------------------- npy (Hypersim normals/masks, DIODE)

def read_npy(path, ndim: int | None = None, channels: int | None = None) -> np.ndarray:
    """A ``.npy`` array (never unpickles); checks ``ndim`` and the trailing channel count if given."""
    path = _exists(path)
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise FormatError(f"{path}: cannot read as .npy ({err})") from None
    if ndim is not None and array.ndim != ndim:
        raise FormatError(f"{path}: expected a {ndim}-D array, got shape {array.shape}")
    if channels is not None and array.shape[-1] != channels:
        raise FormatError(f"{path}: expected {channels} channel(s) in the last axis, got shape {array.shape}")
    return array


def write_npy(path, array) -> Path:
    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(array), allow_pickle=False)
    return _atomic_write(path, write)


def read_json_if_present(path) -> dict:
    """A JSON file's object, ``{}`` when the file is absent; a ``FormatError`` naming it when it is not JSON."""
    import json

    path = Path(path)
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise FormatError(f"{path}: not valid JSON ({err})") from None


def read_npz(path, key: str) -> np.ndarray:
    """Array ``key`` of a ``.npz`` archive (FlyingThings3D ``pc/*.npz`` hold ``pc1``); never unpickles."""
    path = _exists(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            if key not in archive.files:
                raise FormatError(f"{path}: no array {key!r} in the archive (it holds {archive.files})")
            return archive[key]
    except (ValueError, OSError, EOFError) as err:
        raise FormatError(f"{path}: cannot read as .npz ({err})") from None


def write_npz(path, **arrays) -> Path:
    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})
    return _atomic_write(path, write)


def read_normal_npy(path) -> np.ndarray:
    """Camera-frame normals ``[H, W, 3]`` float32 (Hypersim preprocessed, vKITTI estimated)."""
    return read_npy(path, ndim=3, channels=3).astype(np.float32)


def _read_npy_hw(path, what: str) -> np.ndarray:
    """A ``[H, W]`` (or ``[H, W, 1]``) ``.npy`` array as ``[H, W]``."""
    array = read_npy(path)
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
    return _read_npy_hw(path, "a DIODE depth map").astype(np.float32)


def write_diode_depth(path, depth) -> Path:
    return write_npy(path, _check_hw(depth, None, "depth", path).astype(np.float32)[..., None])


def read_diode_mask(path) -> np.ndarray:
    """DIODE ``*_depth_mask.npy`` (float 0/1) as bool ``[H, W]``."""
    return read_mask_npy(path)


def write_diode_mask(path, mask) -> Path:
    return write_npy(path, _check_hw(mask, None, "a mask", path).astype(np.float32))


DIODE_NORMAL_FLIP = np.array([-1.0, 1.0, 1.0], dtype=np.float32)


def read_diode_normal(path) -> tuple[np.ndarray, np.ndarray]:
    """DIODE ``*_normal.npy`` -> normals in the kit's convention ``(-nx, ny, nz)`` and the mask
    of pixels whose stored normal has length in (0.5, 1.5); non-finite normals are invalid."""
    raw = read_npy(path, ndim=3, channels=3).astype(np.float32)
    with np.errstate(invalid="ignore"):
        norm = np.linalg.norm(raw, axis=-1)
        valid = (norm > 0.5) & (norm < 1.5)
    return raw * DIODE_NORMAL_FLIP, valid


def write_diode_normal(path, normal) -> Path:
    """Inverse of ``read_diode_normal`` (the x flip is its own inverse)."""
    return write_npy(path, _check_hw(normal, 3, "normals", path).astype(np.float32) * DIODE_NORMAL_FLIP)


# --------------------------------------------------------------------------- Cityscapes

# labelId -> the kit's class id: road 7, building 11, pole 17, traffic light 19,
# traffic sign 20, vegetation 21, sky 23, vehicle = car 26 + bus 28; else ignore.
CITYSCAPES_TO_CLASS = {7: 0, 11: 1, 17: 2, 19: 3, 20: 4, 21: 5, 23: 6, 26: 7, 28: 7}


def read_cityscapes_label_ids(path) -> np.ndarray:
    """A ``*_gtFine_labelIds.png`` as its raw Cityscapes label ids (uint8 ``[H, W]``)."""
    return _read_png(path, np.uint8, 1, "a Cityscapes 8-bit labelIds PNG")


def write_cityscapes_label_ids(path, label_ids) -> Path:
    label_ids = _check_hw(label_ids, None, "label ids", path)
    if label_ids.min() < 0 or label_ids.max() > 255:
        raise ValueError(f"{path}: Cityscapes label ids are 0..255 (-1 'license plate' is stored as 255)")
    return _write_png(path, label_ids.astype(np.uint8))


def cityscapes_to_classes(label_ids) -> np.ndarray:
    """Map raw Cityscapes label ids to the kit's 8 classes (int64, 250 = ignore)."""
    lut = np.full(256, IGNORE_INDEX, dtype=np.int64)
    for label_id, cls in CITYSCAPES_TO_CLASS.items():
        lut[label_id] = cls
    return lut[np.asarray(label_ids, dtype=np.uint8)]


def read_cityscapes_labels(path) -> np.ndarray:
    """A ``*_gtFine_labelIds.png`` as the kit's class ids (int64, 250 = ignore)."""
    return cityscapes_to_classes(read_cityscapes_label_ids(path))


# --------------------------------------------------------------------------- OpenEXR (MID)

_EXR_ORDER = ("R", "G", "B", "A")


def read_exr(path, channels: tuple[str, ...] | None = None) -> np.ndarray:
    """An OpenEXR image as float32 ``[H, W, C]``: channels R, G, B(, A) in that order, else by name;
    ``channels=("R", "G", "B")`` returns exactly those, in that order (a missing one is a ``FormatError``
    naming the file and the channels it has)."""
    import OpenEXR

    path = _exists(path)
    try:
        with OpenEXR.File(str(path), separate_channels=True) as f:
            stored = {name: ch.pixels for name, ch in f.channels().items()}
    except (RuntimeError, ValueError, OSError) as err:
        raise FormatError(f"{path}: cannot read as OpenEXR (corrupt or truncated?): {err}") from None
    if not stored:
        raise FormatError(f"{path}: the OpenEXR file holds no channel")
    if channels is not None:
        missing = [c for c in channels if c not in stored]
        if missing:
            raise FormatError(f"{path}: expected the channels {list(channels)}, missing {missing} "
                              f"(the file has {sorted(stored)})")
        return np.stack([np.asarray(stored[n], dtype=np.float32) for n in channels], axis=-1)
    names = [c for c in _EXR_ORDER if c in stored] + sorted(set(stored) - set(_EXR_ORDER))
    return np.stack([np.asarray(stored[n], dtype=np.float32) for n in names], axis=-1)


def write_exr(path, image, channels: tuple[str, ...] | None = None, half: bool = False) -> Path:
    """Write ``[H, W]`` or ``[H, W, C]`` floats as ZIP-compressed OpenEXR (float32, or half)."""
    import OpenEXR

    image = np.asarray(image, dtype=np.float16 if half else np.float32)
    image = image[..., None] if image.ndim == 2 else image
    if image.ndim != 3:
        raise ValueError(f"{path}: EXR images are [H, W] or [H, W, C], got shape {image.shape}")
    names = channels or {1: ("Y",), 3: ("R", "G", "B"), 4: ("R", "G", "B", "A")}.get(image.shape[2])
    if names is None or len(names) != image.shape[2]:
        raise ValueError(f"{path}: give one channel name per channel ({image.shape[2]} channels)")
    data = {n: np.ascontiguousarray(image[..., i]) for i, n in enumerate(names)}
    header = {"compression": OpenEXR.ZIP_COMPRESSION, "type": OpenEXR.scanlineimage}

    def write(tmp):
        with OpenEXR.File(header, data) as f:
            f.write(tmp)
    return _atomic_write(path, write)
