"""File plumbing and the generic file formats of the StableMTL datasets.

Every writer writes atomically (``atomic_write``: temporary file + rename), so an
interrupted run never leaves a half-written file under the final name. Arrays are
numpy, channels last (``[H, W, C]``), RGB order (OpenCV's BGR never leaks out).
The formats here are the generic ones: images through OpenCV (``read_png`` /
``write_png`` at any bit depth, 8-bit RGB and masks), PFM, Middlebury ``.flo``,
HDF5, ``.npy`` / ``.npz``, JSON and OpenEXR. Each dataset's own conventions on top
of them (units, scales, invalid codes, class colours) are in
``stablemtl.data.annotations``.

A missing file raises ``FileNotFoundError``; a corrupt, truncated or
mis-typed file raises ``FormatError`` naming the file and what was expected;
a dataset root, split list or listed file that is not where the layout says
raises ``DatasetLayoutError``.
Decoders that would return partial data without a word are checked first:
a JPEG must end with its EOI marker and a PNG with its IEND chunk (OpenCV
fills a truncated image with grey and says nothing), and a fixed-size binary
file (``.flo``, PFM) must hold exactly the bytes its header announces (a
``.flo`` written with a float64 body is twice as long and would decode as noise).
``set_aside_corrupt`` renames a kit-written file that cannot be read (a cache
entry, a state file) so that the next run recomputes it instead of failing again.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from stablemtl.guard import check_free_space, disk_full


class FormatError(ValueError):
    """A file exists but does not hold what its format promises."""


class DatasetLayoutError(FileNotFoundError):
    """A dataset root, split list or listed file is missing or not where the layout says."""


# --------------------------------------------------------------------------- plumbing

_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once: the process's file-creation mask


def atomic_write(path, write) -> Path:
    """Call ``write(tmp_path)`` then rename the temporary file to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix or ".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp's 0600, else: a file as open() would create it
        os.replace(tmp, path)
    except BaseException as err:
        written = os.path.getsize(tmp) if os.path.exists(tmp) else 0
        if os.path.exists(tmp):
            os.unlink(tmp)
        if out_of_space(err):
            raise disk_full(path, written) from None
        raise
    return path


def out_of_space(err: BaseException) -> bool:
    """An ``OSError`` ENOSPC, or a library's error that wraps one (torch's serialisation says only
    'file write failed')."""
    import errno

    seen = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


@contextlib.contextmanager
def partial_folder(tmp: Path, needed: int, what: str):
    """``tmp`` made afresh for writing ``what`` (about ``needed`` bytes) into it; refused first when its
    disk has less free space, and removed when the writing fails, with a ``DiskFullError`` naming it when
    the disk filled up."""
    tmp = Path(tmp)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        check_free_space(tmp.parent, needed, what)
        yield tmp
    except BaseException as err:
        written = folder_bytes(tmp)
        shutil.rmtree(tmp, ignore_errors=True)  # a partial folder never stays
        if out_of_space(err):
            raise disk_full(tmp, written, what) from None
        raise


def folder_bytes(folder) -> int:
    """The size of the files under ``folder`` (0 when it does not exist)."""
    folder = Path(folder)
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def write_bytes(path, data: bytes) -> Path:
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
    return atomic_write(path, write)


def existing_file(path) -> Path:
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


def read_png(path, dtype, channels: int, what: str) -> np.ndarray:
    """Decode an image with OpenCV and check bit depth and channel count; returns RGB order."""
    import cv2

    path = existing_file(path)
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


def write_png(path, img: np.ndarray, jpeg_quality: int | None = None) -> Path:
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
    return write_bytes(path, buf.tobytes())


def check_hw(array, channels: int | None, what: str, path) -> np.ndarray:
    array = np.asarray(array)
    ok = array.ndim == 2 if channels is None else (array.ndim == 3 and array.shape[2] == channels)
    if not ok:
        shape = "[H, W]" if channels is None else f"[H, W, {channels}]"
        raise ValueError(f"{path}: {what} must be {shape}, got shape {array.shape}")
    return array


# --------------------------------------------------------------------------- 8-bit images

def read_rgb(path) -> np.ndarray:
    """An 8-bit RGB image (png or jpg) as uint8 ``[H, W, 3]``."""
    return read_png(path, np.uint8, 3, "an 8-bit RGB image")


def write_rgb(path, image, quality: int = 95) -> Path:
    """Write uint8 RGB, or floats in [0, 1] converted as ``uint8(x * 255)``; jpg uses ``quality``."""
    image = check_hw(image, 3, "an RGB image", path)
    if image.dtype != np.uint8:
        image = np.asarray(image, dtype=np.float64)
        if not np.isfinite(image).all() or image.min() < 0 or image.max() > 1:
            raise ValueError(f"{path}: float images must be finite and in [0, 1] (got {image.min():.4g}..{image.max():.4g})")
        image = (image * 255.0).astype(np.uint8)
    is_jpeg = Path(path).suffix.lower() in (".jpg", ".jpeg")
    return write_png(path, image, jpeg_quality=quality if is_jpeg else None)


def read_mask_png(path) -> np.ndarray:
    """A single-channel 8-bit mask (e.g. FlyingThings3D occlusions) as bool, non-zero = True."""
    return read_png(path, np.uint8, 1, "an 8-bit single-channel mask PNG") > 0


def write_mask_png(path, mask) -> Path:
    """Write a bool mask as an 8-bit PNG with 0 / 255."""
    mask = check_hw(mask, None, "a mask", path)
    return write_png(path, np.where(mask.astype(bool), 255, 0).astype(np.uint8))


# --------------------------------------------------------------------------- PFM (FlyingThings3D)

def read_pfm(path) -> np.ndarray:
    """A PFM image (``Pf`` grey or ``PF`` colour) as float32 ``[H, W]`` / ``[H, W, 3]``, top row first.

    Values are returned as stored (inf/NaN included); loaders decide validity.
    """
    path = existing_file(path)
    data = path.read_bytes()
    header = re.match(rb"(P[Ff])\s+(\d+)\s+(\d+)\s+(-?[0-9.eE+-]+)\s", data)
    if header is None:
        raise FormatError(f"{path}: not a PFM file (expected a 'PF' or 'Pf' header with width, height and scale)")
    kind, width, height, scale = header.groups()
    channels = 3 if kind == b"PF" else 1
    width, height, scale = int(width), int(height), float(scale)
    if width == 0 or height == 0:
        raise FormatError(f"{path}: the PFM header says {width} x {height} pixels: an empty image "
                          f"(expected at least 1 x 1)")
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
    return write_bytes(path, header + np.flipud(image).astype("<f4").tobytes())


# --------------------------------------------------------------------------- Middlebury .flo

FLO_MAGIC = 202021.25  # the float32 whose bytes spell "PIEH"


def read_flo(path) -> np.ndarray:
    """A Middlebury ``.flo`` file as float32 ``[H, W, 2]`` (u, v) in pixels, as stored."""
    path = existing_file(path)
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
    flow = check_hw(flow, 2, "optical flow", path).astype("<f4")
    header = b"PIEH" + np.array([flow.shape[1], flow.shape[0]], "<i4").tobytes()
    return write_bytes(path, header + flow.tobytes())


# --------------------------------------------------------------------------- HDF5 (raw Hypersim)

def read_hdf5(path, key: str = "dataset") -> np.ndarray:
    """One dataset of an HDF5 file (raw Hypersim frames store theirs under ``dataset``)."""
    import h5py

    path = existing_file(path)
    try:
        with h5py.File(path, "r") as f:
            if key not in f:
                raise FormatError(f"{path}: HDF5 file has no dataset {key!r} (has {sorted(f.keys())})")
            if not isinstance(f[key], h5py.Dataset):
                raise FormatError(f"{path}: {key!r} is an HDF5 group (holding {sorted(f[key].keys())}), not a "
                                  f"dataset of numbers")
            array = f[key][()]
    except OSError as err:
        raise FormatError(f"{path}: cannot read as HDF5 ({err})") from None
    return check_numbers(np.asarray(array), path, f"HDF5 dataset {key!r}")


def write_hdf5(path, array, key: str = "dataset") -> Path:
    """Write ``array`` as dataset ``key`` of a gzip-compressed HDF5 file."""
    import h5py

    def write(tmp):
        with h5py.File(tmp, "w") as f:
            f.create_dataset(key, data=np.asarray(array), compression="gzip")
    return atomic_write(path, write)


# --------------------------------------------------------------------------- npy, npz and JSON

KIND_NAMES = {"b": "booleans", "i": "integers", "u": "unsigned integers", "f": "floating-point numbers"}


def check_numbers(array: np.ndarray, path, what: str, kinds: str = "biuf") -> np.ndarray:
    """``array`` when it is non-empty and its dtype is of ``kinds`` (numpy kind letters), else a
    ``FormatError`` naming ``path``, what it holds and what was expected."""
    if array.dtype.kind not in kinds:
        expected = " or ".join(KIND_NAMES[k] for k in kinds)
        raise FormatError(f"{path}: {what} holds {array.dtype} values ({array.dtype.kind!r}); expected {expected}")
    if array.size == 0:
        raise FormatError(f"{path}: {what} is empty (shape {array.shape})")
    return array


def read_npy(path, ndim: int | None = None, channels: int | None = None, kinds: str = "biuf") -> np.ndarray:
    """A ``.npy`` array (never unpickles) of numbers of ``kinds`` (numpy kind letters: ``"f"`` floats
    only), non-empty; checks ``ndim`` and the trailing channel count if given."""
    path = existing_file(path)
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise FormatError(f"{path}: cannot read as .npy ({err})") from None
    check_numbers(array, path, "the array", kinds)
    if ndim is not None and array.ndim != ndim:
        raise FormatError(f"{path}: expected a {ndim}-D array, got shape {array.shape}")
    if channels is not None and array.shape[-1] != channels:
        raise FormatError(f"{path}: expected {channels} channel(s) in the last axis, got shape {array.shape}")
    return array


def write_npy(path, array) -> Path:
    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(array), allow_pickle=False)
    return atomic_write(path, write)


def read_json_if_present(path) -> dict:
    """A JSON file's object, ``{}`` when the file is absent; a ``FormatError`` naming it when it is not JSON."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise FormatError(f"{path}: not valid JSON ({err})") from None


def read_npz(path, key: str) -> np.ndarray:
    """Array ``key`` of a ``.npz`` archive (FlyingThings3D ``pc/*.npz`` hold ``pc1``); never unpickles."""
    path = existing_file(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            if key not in archive.files:
                raise FormatError(f"{path}: no array {key!r} in the archive (it holds {archive.files})")
            return check_numbers(archive[key], path, f"array {key!r}")
    except FormatError:  # a readable archive without the array, or not of numbers: said as it is
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise FormatError(f"{path}: cannot read as .npz ({type(err).__name__}: {err}; a truncated or "
                          f"damaged archive)") from None


def write_npz(path, **arrays) -> Path:
    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})
    return atomic_write(path, write)


# --------------------------------------------------------------------------- OpenEXR (MID)

_EXR_ORDER = ("R", "G", "B", "A")


def read_exr(path, channels: tuple[str, ...] | None = None) -> np.ndarray:
    """An OpenEXR image as float32 ``[H, W, C]``: channels R, G, B(, A) in that order, else by name;
    ``channels=("R", "G", "B")`` returns exactly those, in that order (a missing one is a ``FormatError``
    naming the file and the channels it has)."""
    import OpenEXR

    path = existing_file(path)
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
    return atomic_write(path, write)
