"""``stablemtl predict``: a trained model's outputs for one's own images, written as files.

``predict(images, model)`` runs a saved ``StableMTLPipeline`` (``outputs/<run>/{single,multi}_stream/model``)
on image files of any size and writes, per image ``<stem>`` and task::

    <out>/<stem>/<task>.png          the colourised output (the kit's colours: stablemtl.tasks)
    <out>/<stem>/<task>.npy          the raw output, float32 at the image's size, channels last
    <out>/<stem>/depth_16bit.png     relative depth as uint16: depth = png / 65535
    <out>/<stem>/contact_sheet.png   the input and every task, titled

The raw outputs are the decoded model outputs (``stablemtl.tasks``): ``depth`` ``[H, W]`` relative
depth in [0, 1] (affine-invariant: near = 0, far = 1 up to an unknown scale and shift), ``normal``
``[H, W, 3]`` camera-frame unit normals, ``semantic`` ``[H, W]`` class ids 0..7 (exact integers
stored as float32; ``stablemtl.tasks.SEMANTIC_CLASSES``), ``optical_flow`` ``[H, W, 2]`` and
``scene_flow`` ``[H, W, 3]``, ``albedo`` ``[H, W, 3]`` in [0, 1], ``shading`` ``[H, W]`` in [0, 1].
The flows are scale-free, as the model predicts them (each axis divided by its largest |value|
over the image, so in [-1, 1]; the paper's evaluation fits the scale): they are not in pixels,
and resizing leaves them unchanged (a resize multiplies the flow and its per-axis maximum alike).

Sizes. The model runs at the image's size rounded to the nearest multiple of the VAE factor
(``2 ** (VAE blocks - 1)``, 8 for SD2; read from the VAE's config), or smaller with ``max_side``
(the longer side at most that many pixels: SD2's memory grows with the pixel count); the input
is resized bilinearly with antialiasing. Every output is resized back to the image's size:
bilinear for continuous outputs (depth, shading, albedo, normals, which are then re-normalised,
and the flows), nearest for the semantic class ids (interpolating ids would invent classes
between two regions, e.g. "pole" between road and sky).

Frames. Images are sorted by name (numbers compared as numbers: ``frame_2`` before
``frame_10``); optical_flow and scene_flow read frame ``i`` with frame ``i + 1``. A frame with no
next frame (the last one, a single image, or one whose next image failed or has another size)
gets the other tasks, and a note printed once says why. Give one sequence per call: two unrelated
photos next to each other are paired all the same. (A multi-stream model's other outputs read the
flow tasks' features too: without a next frame those see the frame paired with itself.)

Input. PNG, JPEG, BMP, TIFF, WebP (anything Pillow decodes), oriented by its EXIF tag. Images
that are not RGB are converted, with a note: grey -> RGB by repeating the channel (16-bit grey
scaled to [0, 1]), RGBA (or grey + alpha) -> RGB by dropping the alpha channel (transparent
pixels keep their stored colour), palette, CMYK and other modes through Pillow's RGB conversion.
A file that cannot be read (not an image, corrupt or truncated, missing) is reported by name with
the reason, and the other images are predicted all the same; the returned records (and the
summary printed at the end) say which failed and why. A requested task the model lacks is
reported once, naming the model's tasks, and the other tasks are predicted. Errors that stop
the whole call (``PredictError``): a folder that is not a model, an unknown task or device, no
image given.

Devices: ``device="auto"`` is the GPU when there is one, else the CPU (``stablemtl.devices``);
``dtype=torch.bfloat16`` (``--bf16``) halves memory and time on a GPU (float32 outputs all the
same). Nothing is downloaded; the same files give the same outputs.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
import sys
from pathlib import Path

import numpy as np
import torch

from stablemtl import devices
from stablemtl.data import formats
from stablemtl.data.formats import incomplete, write_bytes
from stablemtl.model.pipeline import StableMTLPipeline
from stablemtl.tasks import FLOW_TASKS, TASK_NAMES, get_task

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
DEFAULT_OUT = Path("predictions")
DEPTH_16BIT = "depth_16bit.png"
CONTACT_SHEET = "contact_sheet.png"
LACKS = "the model has no such task"  # the reason recorded for a requested task the model lacks

# contact-sheet layout, in pixels (dpi 100): a header, then rows of titled panels, each image fitted in a
# PANEL x PANEL box, GAP pixels apart, at most COLUMNS panels per row
PANEL, TITLE, HEADER, GAP, COLUMNS, DPI = 256, 24, 28, 8, 4, 100


class PredictError(ValueError):
    """A problem that stops the whole call (model folder, device, task names, no images)."""


class ImageError(ValueError):
    """One input image cannot be used; the message names the file and why."""


# --------------------------------------------------------------------------- inputs

def _natural_key(path: Path) -> tuple:
    parts = re.split(r"(\d+)", path.name)
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p.lower()) for p in parts), str(path)


def list_images(images) -> list[Path]:
    """The files of ``images`` (a folder, a file, or a list of both), sorted by name (numbers as
    numbers). A folder contributes its files (not its subfolders or hidden files), whatever their
    type, so that a file which is not an image is reported rather than silently left out."""
    items = [images] if isinstance(images, (str, Path)) else list(images)
    files: list[Path] = []
    for item in items:
        path = Path(item).expanduser()
        if path.is_dir():
            found = [p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")]
            if not found:
                raise PredictError(f"{path}: the folder holds no file; expected images ({', '.join(IMAGE_SUFFIXES)})")
            files += found
        else:
            files.append(path)  # a missing file is reported with the other failures
    if not files:
        raise PredictError("no image given; pass image files or a folder of images")
    unique = {f.resolve() if f.exists() else f: f for f in files}  # a file given twice is predicted once
    return sorted(unique.values(), key=_natural_key)


def load_image(path) -> tuple[np.ndarray, list[str]]:
    """An image file as float32 RGB ``[H, W, 3]`` in [0, 1] and the notes on its conversion
    (module docstring); an ``ImageError`` naming the file when it cannot be used."""
    from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: no such file")
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise ImageError(f"{path}: not an image file (suffix {path.suffix or 'none'!r}); "
                         f"expected one of {', '.join(IMAGE_SUFFIXES)}")
    # Pillow refuses truncated files by itself unless LOAD_TRUNCATED_IMAGES was switched on (by another library)
    reason = incomplete(path) if ImageFile.LOAD_TRUNCATED_IMAGES else None
    if reason is not None:
        raise ImageError(f"{path}: cannot decode the image (corrupt or truncated?): {reason}")
    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image Pillow can decode (a {path.suffix} file with other content?)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageError(f"{path}: cannot decode the image (corrupt or truncated?): {err}") from None
    notes = []
    mode = img.mode
    if mode == "F":  # 32-bit float grey (TIFF): NaN or inf would make every output NaN
        values = np.asarray(img, dtype=np.float32)
        if not np.isfinite(values).all():
            y, x = np.argwhere(~np.isfinite(values))[0]
            raise ImageError(f"{path}: {int((~np.isfinite(values)).sum())} non-finite pixel(s) (NaN or inf), the "
                             f"first {values[y, x]} at row {y}, column {x}; fix or fill them before predicting")
    if mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grey (PNG)
        grey = np.asarray(img, dtype=np.float32) / 65535.0
        notes.append(f"16-bit grey image ({mode}): scaled to [0, 1] and repeated to RGB")
        rgb = np.repeat(np.clip(grey, 0.0, 1.0)[..., None], 3, axis=2)
        return rgb, notes
    if mode in ("L", "1"):
        notes.append("grey image: its channel repeated to RGB")
    elif mode in ("LA", "La"):
        notes.append("grey image with alpha: alpha dropped, grey repeated to RGB")
    elif mode in ("RGBA", "RGBa"):
        notes.append("RGBA image: alpha channel dropped (transparent pixels keep their stored colour)")
    elif mode == "P":
        notes.append("palette image: converted to RGB" + (" (its transparency dropped)"
                                                           if "transparency" in img.info else ""))
    elif mode != "RGB":
        notes.append(f"{mode} image: converted to RGB")
    if mode in ("RGBA", "RGBa", "LA", "La"):
        arr = np.asarray(img)[..., :-1]  # drop alpha, keep the stored colour under it
        arr = np.repeat(arr, 3, axis=2) if arr.shape[2] == 1 else arr
    else:
        arr = np.asarray(img.convert("RGB"))
    rgb = np.ascontiguousarray(arr, dtype=np.float32) / 255.0
    if rgb.ndim != 3 or rgb.shape[2] != 3 or 0 in rgb.shape:
        raise ImageError(f"{path}: decoded to shape {rgb.shape}, expected [H, W, 3] with H, W > 0")
    return rgb, notes


# --------------------------------------------------------------------------- sizes

def model_size(height: int, width: int, factor: int, max_side: int | None = None) -> tuple[int, int]:
    """The size the model runs at: ``(height, width)`` (scaled down to ``max_side`` when given) rounded
    to the nearest multiple of the VAE ``factor`` (at least one factor)."""
    scale = min(1.0, max_side / max(height, width)) if max_side else 1.0
    return tuple(max(factor, int(s * scale / factor + 0.5) * factor) for s in (height, width))


def _resize_input(rgb: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None]
    if tuple(x.shape[-2:]) != size:
        x = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    return x.clamp(0.0, 1.0)


def resize_output(task: str, output: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A decoded output ``[1, C, h, w]`` at the image's ``size``: nearest for class ids, bilinear
    otherwise (normals re-normalised; the scale-free flows need no rescaling, module docstring)."""
    output = output.float()
    if tuple(output.shape[-2:]) == tuple(size):
        return output
    if task == "semantic":
        return torch.nn.functional.interpolate(output, size=size, mode="nearest-exact")
    out = torch.nn.functional.interpolate(output, size=size, mode="bilinear", align_corners=False)
    if task == "normal":
        out = out / out.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return out


# --------------------------------------------------------------------------- outputs

def depth_to_16bit(depth: np.ndarray) -> np.ndarray:
    """Relative depth in [0, 1] -> uint16 over the full range (``round(depth * 65535)``)."""
    return np.round(np.clip(depth, 0.0, 1.0) * 65535.0).astype(np.uint16)


def contact_sheet_size(height: int, width: int, panels: int) -> tuple[int, int]:
    """``(width, height)`` in pixels of the contact sheet of ``panels`` panels of an ``height x width`` image."""
    s = PANEL / max(height, width)
    pw, ph = max(1, round(width * s)), max(1, round(height * s))
    columns = min(COLUMNS, panels)
    rows = math.ceil(panels / columns)
    return columns * (pw + GAP), HEADER + rows * (TITLE + ph)


def _fit(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """``img`` (uint8, or floats in [0, 1]) as uint8 ``[height, width, 3]``: area averaging when shrinking,
    nearest when enlarging (each pixel stays a crisp block)."""
    import cv2

    img = np.asarray(img)
    if img.dtype != np.uint8:
        img = (np.clip(img, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    shrink = height * width < img.shape[0] * img.shape[1]
    return cv2.resize(img, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_NEAREST)


def write_contact_sheet(path, panels: dict[str, np.ndarray], title: str) -> Path:
    """The ``{title: uint8 or [0, 1] RGB [H, W, 3]}`` panels (all of one size) in a grid under a header,
    written as PNG (size: ``contact_sheet_size``). The grid is composed in numpy and placed pixel for
    pixel (``figimage``); matplotlib's Figure API (no pyplot state) writes the titles."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    h, w = next(iter(panels.values())).shape[:2]
    width, height = contact_sheet_size(h, w, len(panels))
    columns = min(COLUMNS, len(panels))
    pw, ph = width // columns - GAP, (height - HEADER) // math.ceil(len(panels) / columns) - TITLE
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, facecolor="white")
    FigureCanvasAgg(fig)
    fig.text(0.5, 1 - HEADER / 2 / height, title, ha="center", va="center", fontsize=9)
    for i, (name, img) in enumerate(panels.items()):
        row, col = divmod(i, columns)
        top = HEADER + row * (TITLE + ph)
        left = col * (pw + GAP) + GAP // 2
        canvas[top + TITLE: top + TITLE + ph, left: left + pw] = _fit(img, ph, pw)
        fig.text((left + pw / 2) / width, 1 - (top + TITLE / 2) / height, name, ha="center", va="center",
                 fontsize=8)
    fig.figimage(canvas, origin="upper", zorder=0)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return write_bytes(path, buffer.getvalue())


def _channels_last(output: torch.Tensor) -> np.ndarray:
    x = output[0].float().cpu().numpy()
    return np.ascontiguousarray(x[0] if x.shape[0] == 1 else x.transpose(1, 2, 0), dtype=np.float32)


def _write_outputs(folder: Path, rgb: np.ndarray, outputs: dict[str, torch.Tensor], title: str) -> dict[str, Path]:
    files: dict[str, Path] = {}
    panels = {"input": rgb}
    for task, output in outputs.items():
        array = _channels_last(output)
        files[f"{task}.npy"] = formats.write_npy(folder / f"{task}.npy", array)
        colour = get_task(task).colorize(output)[0]
        files[f"{task}.png"] = formats.write_rgb(folder / f"{task}.png", colour)
        panels[task] = colour
        if task == "depth":
            files[DEPTH_16BIT] = formats.write_png(folder / DEPTH_16BIT, depth_to_16bit(array))
    files[CONTACT_SHEET] = write_contact_sheet(folder / CONTACT_SHEET, panels, title)
    return files


# --------------------------------------------------------------------------- the model

@contextlib.contextmanager
def _quiet_loading():
    """No "Loading pipeline components" / "Loading weights" bars from diffusers and transformers."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    states = [(m, m.is_progress_bar_enabled()) for m in (diffusers_logging, transformers_logging)]
    for m, _ in states:
        m.disable_progress_bar()
    try:
        yield
    finally:
        for m, enabled in states:
            if enabled:
                m.enable_progress_bar()


def _load(model, device, dtype):
    try:
        dev = devices.resolve_device(None if device in (None, "auto") else device)
    except ValueError as err:
        raise PredictError(f"{err}; or use device='auto' (the GPU when there is one, else the CPU)") from None
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise PredictError(f"unknown dtype {dtype!r}; expected 'float32' or 'bfloat16'")
        dtype = getattr(torch, dtype)
    try:
        devices.check_dtype(dtype, dev)
        with _quiet_loading():
            pipe = StableMTLPipeline.from_pretrained(model, torch_dtype=dtype)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise PredictError(f"cannot load the model {model}: {err}; expected a model folder written by "
                           "save_pretrained, e.g. outputs/<run>/multi_stream/model") from None
    return pipe.to(dev), dev


def _requested_tasks(tasks, model_tasks: list[str]) -> tuple[list[str], list[str]]:
    """(the tasks to predict, the requested ones the model lacks); unknown names stop the call."""
    if tasks is None:
        return list(model_tasks), []
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else [str(t).strip() for t in tasks]
    names = [t for t in dict.fromkeys(names) if t]
    unknown = [t for t in names if t not in TASK_NAMES]
    if unknown or not names:
        raise PredictError(f"unknown task(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
                           f"valid tasks: {', '.join(TASK_NAMES)}")
    missing = [t for t in names if t not in model_tasks]
    kept = [t for t in names if t in model_tasks]
    if not kept:
        raise PredictError(f"the model has none of the tasks {', '.join(names)}; its tasks: {', '.join(model_tasks)}")
    return kept, missing


def _folder_names(files: list[Path]) -> dict[Path, str]:
    """Output folder per file: its stem; ``<stem>_<suffix>`` when two files share a stem (``a.png``,
    ``a.jpg``), and a number after that when they still collide (``a.png`` in two folders)."""
    stems = [f.stem for f in files]
    names, used = {}, set()
    for f in files:
        name = f.stem if stems.count(f.stem) == 1 else f"{f.stem}_{f.suffix.lstrip('.')}"
        base, n = name, 2
        while name in used:
            name, n = f"{base}_{n}", n + 1
        names[f] = name
        used.add(name)
    return names


# --------------------------------------------------------------------------- the call

def predict(images, model, tasks=None, out=None, device="auto", dtype=None, progress: bool = True,
            max_side: int | None = None) -> list[dict]:
    """Predict ``tasks`` (default: the model's) for ``images`` with the model folder ``model``; write the
    files into ``out`` (default ``./predictions``); see the module docstring for what and how.

    ``images``: a folder, an image file, or a list of both (sorted by name). ``tasks``: a list or a
    comma-separated string. ``device``: ``"auto"``, ``"cpu"``, ``"cuda:1"``, ... ``dtype``:
    ``None`` (float32) or ``torch.bfloat16``. ``max_side``: run the model at most at this longer side.

    Returns one record per input file, in order: ``image``, ``ok``, ``error`` (the reason, for a
    failed image), ``notes``, ``size`` (H, W), ``model_size``, ``next_frame``, ``tasks`` (predicted),
    ``skipped`` (``{task: why}``), ``folder`` and ``files`` (``{name: path}``). Raises ``PredictError``
    for what stops the whole call (module docstring).
    """
    from tqdm.auto import tqdm

    files = list_images(images)
    if max_side is not None and (not isinstance(max_side, int) or max_side < 1):
        raise PredictError(f"max_side={max_side!r}: expected a positive number of pixels (or None)")
    _requested_tasks(tasks, TASK_NAMES)  # unknown names: an error before the model loads
    pipe, dev = _load(model, device, dtype)
    model_tasks = list(pipe.config.tasks)
    wanted, missing = _requested_tasks(tasks, model_tasks)
    flows = [t for t in wanted if t in FLOW_TASKS]
    out = Path(DEFAULT_OUT if out is None else out)
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)  # the VAE's downsampling: 8 for SD2
    kind, folders = pipe.config.kind, _folder_names(files)

    def say(text: str, err: bool = False) -> None:
        tqdm.write(text, file=sys.stderr if err else sys.stdout)  # keeps the progress bar intact

    lacks = f"{LACKS} ({model}); its tasks: {', '.join(model_tasks)}"
    if missing:
        say(f"stablemtl predict: {', '.join(missing)}: {lacks}; predicting the other tasks", err=True)
    records = [{"image": f, "ok": False, "error": None, "notes": [], "size": None, "model_size": None,
                "next_frame": None, "tasks": [], "skipped": {t: lacks for t in missing}, "folder": None,
                "files": {}} for f in files]
    cache: dict[int, np.ndarray | None] = {}  # at most this frame and the next one

    def read(i: int) -> np.ndarray | None:
        if i not in cache:
            try:
                cache[i], records[i]["notes"] = load_image(files[i])
                records[i]["size"] = cache[i].shape[:2]
            except ImageError as err:
                cache[i], records[i]["error"] = None, str(err)
                say(f"stablemtl predict: skipped {err}", err=True)
        return cache[i]

    noted = False
    for i in tqdm(range(len(files)), desc="predict", unit="img", disable=not progress):
        cache.pop(i - 1, None)
        rgb, path = read(i), files[i]
        if rgb is None:
            continue
        for note in records[i]["notes"]:
            say(f"note: {path}: {note}")
        # frame i's next frame: image i + 1, when it exists, could be read and has the same size
        nxt = read(i + 1) if i + 1 < len(files) else None
        why = None
        if i + 1 == len(files):
            why = "it is the last image (no next frame)" if len(files) > 1 else "it is a single image (no next frame)"
        elif nxt is None:
            why = f"its next image, {files[i + 1].name}, could not be read"
        elif nxt.shape != rgb.shape:
            why = (f"its next image, {files[i + 1].name}, has another size ({nxt.shape[0]}x{nxt.shape[1]} vs "
                   f"{rgb.shape[0]}x{rgb.shape[1]}), so it is not its next frame")
        record = records[i]
        if why and flows:
            record["skipped"].update({t: f"needs the next frame: {why}" for t in flows})
            if not noted:
                say(f"note: {' and '.join(flows)} read image i with image i + 1 (in name order); {path.name} gets "
                    f"the other tasks because {why}" + (" (said once; each record's 'skipped' says why)"
                                                       if len(files) > 1 else ""))
                noted = True
        run_tasks = [t for t in wanted if not (why and t in FLOW_TASKS)]
        if not run_tasks:  # only flow tasks were asked for: nothing to do without a next frame
            record["ok"] = True
            continue
        h, w = rgb.shape[:2]
        size = model_size(h, w, factor, max_side)
        folder = out / folders[path]
        try:
            pair = None if why else _resize_input(nxt, size).to(dev)
            result = pipe(_resize_input(rgb, size).to(dev), tasks=run_tasks, next_images=pair)
            outputs = {t: resize_output(t, result.predictions[t], (h, w)).cpu() for t in run_tasks}
            title = (f"{path.name}  ({w}x{h}; {kind}, run at {size[1]}x{size[0]}"
                     + (f"; next frame {files[i + 1].name}" if not why and flows else "") + ")")
            record["files"] = _write_outputs(folder, rgb, outputs, title)
        except (RuntimeError, ValueError, OSError) as err:
            hint = "; try a smaller max_side (--max-side) or --bf16" if "out of memory" in str(err).lower() else ""
            record["error"] = f"{path}: prediction failed: {type(err).__name__}: {err}{hint}"
            say(f"stablemtl predict: {record['error']}", err=True)
            continue
        record.update(ok=True, model_size=size, next_frame=None if why else files[i + 1], tasks=run_tasks,
                      folder=folder)
    print(summary(records, out))
    return records


def summary(records: list[dict], out) -> str:
    """What ``predict`` did: how many images, where the files are, which failed and why."""
    ok = [r for r in records if r["ok"]]
    lines = [f"stablemtl predict: {len(ok)} of {len(records)} image(s) predicted; outputs in {Path(out).resolve()}/"
             "<image>/ (<task>.png, <task>.npy, depth_16bit.png, contact_sheet.png)"]
    failed = [r for r in records if not r["ok"]]
    if failed:
        lines.append(f"failed ({len(failed)}):")
        lines += [f"  {r['image']}: {str(r['error']).removeprefix(str(r['image']) + ': ')}" for r in failed]
    lacking = sorted({t for r in records for t, why in r["skipped"].items() if why.startswith(LACKS)})
    if lacking:
        lines.append(f"not predicted (the model lacks them): {', '.join(lacking)}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line

def cmd_predict(args) -> int:
    """``stablemtl predict``: 0 when every image got every requested task, 1 when some image failed or
    a task is missing from the model, 2 when nothing could run (the message says why)."""
    try:
        records = predict(args.images, args.model, tasks=args.tasks, out=args.out, device=args.device,
                          dtype=torch.bfloat16 if args.bf16 else None, progress=not args.quiet,
                          max_side=args.max_side)
    except PredictError as err:
        print(f"stablemtl predict: {err}", file=sys.stderr)
        return 2
    lacking = any(why.startswith(LACKS) for r in records for why in r["skipped"].values())
    return 0 if all(r["ok"] for r in records) and not lacking else 1
