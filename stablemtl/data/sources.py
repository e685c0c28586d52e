"""One ``torch.utils.data.Dataset`` per dataset, reading the dataset's real layout.

Each source reads a split list (see ``stablemtl.data.splits``) under a root
directory laid out as the real dataset (or its StableMTL preprocessing), and
returns samples as dicts of tensors:

- ``rgb`` (and ``rgb_next`` for the flow tasks): float32 ``[3, H, W]`` in [0, 1];
- per task ``t``: ``sample[t]`` the annotation in natural units (depth ``[1]``
  metres, normal ``[3]`` unit vectors, semantic ``[1]`` int64 class ids with 250
  = ignore, albedo ``[3]`` and shading ``[3]`` in [0, 1], optical_flow ``[2]``
  pixels, scene_flow ``[3]`` metres) and ``sample[f"{t}_valid"]`` bool ``[1, H, W]``;
  with ``encode_targets=True`` (training) ``sample[f"{t}_target"]`` ``[3, H, W]``
  in [-1, 1] replaces the annotation (``stablemtl.tasks``);
- ``dataset``, ``id`` (the split line's first file), ``index``, ``K`` (3 x 3
  intrinsics of the returned raster, NaN where the dataset does not give them),
  ``depth_range`` (the dataset's valid depth range), ``flip`` and ``crop`` (the
  augmentation drawn).

The StableMTL release's behaviour is the default everywhere (docs/method.md,
"Release parity"); each alternative is a named option (``stablemtl.options``):

- annotations keep their raw values at invalid pixels (the vKITTI sky's 655.35 m,
  scene flow where the flow is invalid); only non-finite values become 0;
- normals are returned as the files store them (``normals="as_stored"``; camera
  frame x right, y down, z forward, pointing away from the camera: Hypersim
  preprocessed, vKITTI estimated, DIODE after its (-nx, ny, nz) conversion);
  ``normals="facing"`` negates them to face the camera;
- a sample is augmented at the file's resolution (flips, the vKITTI optical-flow
  crop, colour jitter), its targets are encoded there and then resized
  (``target_order="normalise_then_resize"``; the alternative resizes the
  annotation first);
- resizing (``resolution=(H, W)``) samples every raster nearest-exact; the
  annotation's flow vectors are rescaled with the image (``rescale_flow=True``,
  a documented fix of the release; the KITTI flow benchmark keeps full-resolution
  pixels, as the release scores it) and ``rgb_resize="antialias"`` resizes the
  images with antialiasing instead.

Augmentation is a function of (seed, epoch, index): ``source[(index, epoch)]``
draws that epoch's flips, crop and jitter (``source[index]`` uses ``set_epoch``).

Geometry constants (crops, intrinsics) default to the real datasets' values.
A dataset root may carry ``stablemtl_dataset.json`` whose ``geometry`` entry
overrides them: the procedural miniatures do, as they are rendered smaller.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from stablemtl import options
from stablemtl.data import formats, transforms
from stablemtl.data.transforms import eigen_crop_mask
from stablemtl.metrics import IGNORE_INDEX
from stablemtl.tasks import ALBEDO_MIN, FLOW_TASKS, get_task

META_FILE = "stablemtl_dataset.json"
README_DATA = "README.md, section 'Real datasets'"
REPO_SPLITS = Path(__file__).resolve().parents[2] / "data_split"


class DatasetLayoutError(FileNotFoundError):
    """A dataset root, split list or listed file is missing or not where the layout says."""


class Source(Dataset):
    """Common machinery: root and split checks, per-task loading, augmentation, target encoding, resize."""

    name = ""  # the kit's dataset name (data_split/<name>/)
    root_hint = ""  # the directory under $PREPROCESSED_DIR, for messages
    tasks_provided: tuple[str, ...] = ()
    default_split = "train"  # the split the study uses (training sources: train; benchmarks: their test set)
    split_files: dict[str, str] = {}
    layout = ""  # one line describing the expected layout, for messages
    depth_range = (1e-5, math.inf)
    geometry: dict = {}
    jitter: tuple[float, float, float, float] | None = None  # brightness, contrast, saturation, hue
    jitter_tasks: tuple[str, ...] = ()  # the tasks whose training samples the release colour-jitters
    crop_tasks: tuple[str, ...] = ()  # the tasks whose training samples the release crops (geometry "train_crop")
    vertical_flip = False

    def __init__(self, root, split: str | None = None, tasks=None, resolution=None, augment: bool = False,
                 rgb_resize: str = "nearest-exact", resize_targets: bool = True, seed: int = 2024,
                 normals: str = "as_stored", encode_targets: bool = False,
                 target_order: str = "normalise_then_resize", invalid_targets: str = "keep",
                 rescale_flow: bool = True):
        root = Path(root)
        if not root.is_dir():
            raise DatasetLayoutError(
                f"{type(self).__name__}: dataset root {root} does not exist; expected {self.layout} "
                f"(usually $PREPROCESSED_DIR/{self.root_hint}); see {README_DATA} for how to obtain it, "
                f"or write the procedural miniature with stablemtl.data.mini.write_mini_datasets"
            )
        self.root = root
        tasks = list(self.tasks_provided) if tasks is None else [tasks] if isinstance(tasks, str) else list(tasks)
        for task in tasks:
            get_task(task)  # an unknown name: a ValueError listing the valid ones
            if task not in self.tasks_provided:
                raise ValueError(f"{type(self).__name__} does not provide {task!r}; it provides: "
                                 f"{', '.join(self.tasks_provided)}")
        if not tasks:
            raise ValueError(f"{type(self).__name__}: no task requested")
        self.tasks = tasks
        split = self.default_split if split is None else split
        self.split = split
        self.resolution = None if resolution is None else (int(resolution[0]), int(resolution[1]))
        if rgb_resize not in ("nearest-exact", "antialias"):
            raise ValueError(f"rgb_resize must be 'nearest-exact' (the release) or 'antialias', got {rgb_resize!r}")
        self.rgb_resize = rgb_resize
        self.resize_targets = resize_targets
        self.normals = options.check("normals", normals)
        self.encode_targets = bool(encode_targets)
        self.target_order = options.check("target_order", target_order)
        self.invalid_targets = options.check("invalid_targets", invalid_targets)
        self.rescale_flow = bool(rescale_flow)
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self.meta = self._read_meta()
        self.geometry = {**type(self).geometry, **self.meta.get("geometry", {})}
        self.entries = self._read_split(split)

    # ----------------------------------------------------------------- split and layout
    def _read_meta(self) -> dict:
        return formats.read_json_if_present(self.root / META_FILE)

    def split_paths(self, split: str, file: str | None = None) -> list[Path]:
        """Where a split list is looked for, in order: a path given as ``split``, the dataset's
        own ``<root>/data_split/``, then the repository's ``data_split/<dataset>/``."""
        if Path(split).suffix == ".txt" and Path(split).is_file():
            return [Path(split)]
        name = file or self.split_files.get(split, f"{split}.txt")
        return [self.root / "data_split" / name, REPO_SPLITS / self.name / name]

    def _split_lines(self, split: str, file: str | None = None) -> list[list[str]]:
        """The entries (columns) of a split list, blank and ``#`` lines left out. A file listed twice
        (the same first column on two lines) is a ``FormatError`` naming the list and both line
        numbers: it would weight that image several times. Records each entry's line number."""
        candidates = self.split_paths(split, file)
        for path in candidates:
            if path.is_file():
                self.split_file = path
                try:
                    text = path.read_text()
                except UnicodeDecodeError as err:
                    raise formats.FormatError(f"{path}: not a text split list ({err})") from None
                entries, seen = [], {}
                for number, raw in enumerate(text.splitlines(), 1):
                    line = raw.split()
                    if not line or line[0].startswith("#"):
                        continue
                    if line[0] in seen:
                        raise formats.FormatError(
                            f"{path}: lines {seen[line[0]]} and {number} both list {line[0]!r}; a split list "
                            f"names each file once (remove line {number}, or rebuild the list with "
                            f"stablemtl.data.splits.build_split('{self.name}', root))")
                    seen[line[0]] = number
                    entries.append(line)
                if not hasattr(self, "line_of"):
                    self.line_of = {}
                for line in entries:  # the first list an entry came from names it in messages
                    self.line_of.setdefault(line[0], (path, seen[line[0]]))
                return entries
        raise DatasetLayoutError(
            f"{type(self).__name__}: no split list {split!r}; looked for "
            + ", ".join(str(p) for p in candidates)
            + f" (the dataset is expected as {self.layout}). Build the list from the dataset with "
            f"stablemtl.data.splits.build_split('{self.name}', root) or see {README_DATA}"
        )

    def _read_split(self, split: str) -> list[tuple[str, ...]]:
        return [tuple(line) for line in self._split_lines(split)]

    def path(self, relative: str) -> Path:
        return self.root / relative

    def __len__(self) -> int:
        return len(self.entries)

    def __repr__(self) -> str:
        res = "native" if self.resolution is None else f"{self.resolution[0]}x{self.resolution[1]}"
        return (f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, n={len(self)}, "
                f"tasks={self.tasks}, resolution={res}, augment={self.augment})")

    def set_epoch(self, epoch: int) -> None:
        """Augmentations are a function of (seed, epoch, index): set the epoch for a new pass."""
        self.epoch = int(epoch)

    # ----------------------------------------------------------------- loading
    def _load(self, entry: tuple[str, ...]) -> dict:
        """Numpy arrays at native resolution: ``rgb`` [H, W, 3] in [0, 1], per task the annotation
        ([H, W] or [H, W, C]) and ``<task>_valid`` [H, W]; ``K`` (3 x 3) if known."""
        raise NotImplementedError

    def needs_next_frame(self) -> bool:
        return any(t in FLOW_TASKS for t in self.tasks)

    def __getitem__(self, index) -> dict:
        """Sample ``index`` (an int, or ``(index, epoch)`` to draw that epoch's augmentation)."""
        index, epoch = index if isinstance(index, tuple) else (index, self.epoch)
        if not 0 <= index < len(self):
            raise IndexError(f"{type(self).__name__}: index {index} out of range (n={len(self)})")
        entry = self.entries[index]
        try:
            raw = self._load(entry)
            self._check_sizes(raw)
        except (FileNotFoundError, formats.FormatError) as err:
            raise type(err)(f"{type(self).__name__} sample {index} ({self._where(entry)}): {err}") from None
        sample = self._to_tensors(raw)
        sample["flip"] = (False, False)  # (horizontal, vertical), set by the augmentation
        sample["crop"] = None  # (top, left) of a training crop, set by the augmentation
        if self.augment:  # at the file's resolution, as the release
            sample = self._augment(sample, index, int(epoch))
        if self.encode_targets and self.target_order == "normalise_then_resize":
            self._encode_targets(sample)
        if self.resolution is not None:
            sample = self._resize(sample, self.resolution)
        if self.encode_targets and self.target_order == "resize_then_normalise":
            self._encode_targets(sample)
        sample.update(dataset=self.name, id=entry[0], index=index,
                      depth_range=tuple(float(v) for v in self.depth_range))
        return sample

    def _where(self, entry: tuple[str, ...]) -> str:
        """``line N of <list>: '<line>'`` for an entry (the split line it came from), for messages."""
        path, number = getattr(self, "line_of", {}).get(entry[0], (getattr(self, "split_file", "?"), "?"))
        return f"line {number} of {path}: {' '.join(entry)!r}"

    def _check_sizes(self, raw: dict) -> None:
        """Every raster of a loaded sample must have the image's size: a label of another size would be
        resized without a word. ``raw["files"]`` (``{key: relative path}``) names the files; a source
        whose annotations are stored at another scale declares it in ``geometry["annotation_scale"]``
        (``{task: factor}``, annotation size = image size x factor), and that relation is then required."""
        files = raw.pop("files", {})
        h, w = np.shape(raw["rgb"])[:2]
        scales = self.geometry.get("annotation_scale", {})
        for key in ("rgb_next", *self.tasks, *(f"{t}_valid" for t in self.tasks)):
            if key not in raw:
                continue
            factor = scales.get(key.removesuffix("_valid"), 1) if key != "rgb_next" else 1
            want = (round(h * factor), round(w * factor))
            have = tuple(np.shape(raw[key])[:2])
            if have != want:
                label = self.path(files[key]) if key in files else f"the {key} annotation"
                relation = f" (declared scale {factor})" if factor != 1 else ""
                raise formats.FormatError(
                    f"{label} is {have[0]}x{have[1]} but its image {self.path(files.get('rgb', '?'))} is "
                    f"{h}x{w}{relation}; the {self.name} layout has them the same size. A stale or "
                    f"resized copy? If the dataset stores its annotations at another scale, declare it in "
                    f"{self.root / META_FILE} as geometry.annotation_scale")

    def _encode_targets(self, sample: dict) -> None:
        """Replace each task's annotation by its target ``<task>_target`` (and the target's mask)."""
        for task in self.tasks:
            target, valid = get_task(task).encode(sample.pop(task)[None], sample[f"{task}_valid"][None],
                                                  invalid_targets=self.invalid_targets)
            sample[f"{task}_target"], sample[f"{task}_valid"] = target[0], valid[0]

    def _to_tensors(self, raw: dict) -> dict:
        out = {}
        for key in ("rgb", "rgb_next"):
            if key in raw:
                out[key] = torch.from_numpy(np.ascontiguousarray(raw[key], dtype=np.float32)).permute(2, 0, 1)
        for task in self.tasks:
            value = np.asarray(raw[task])
            value = value[..., None] if value.ndim == 2 else value
            dtype = np.int64 if task == "semantic" else np.float32
            out[task] = torch.from_numpy(np.ascontiguousarray(value, dtype=dtype)).permute(2, 0, 1)
            valid = np.asarray(raw[f"{task}_valid"], dtype=bool)
            out[f"{task}_valid"] = torch.from_numpy(np.ascontiguousarray(valid))[None]
        out["K"] = torch.as_tensor(raw.get("K", np.full((3, 3), np.nan)), dtype=torch.float64)
        return out

    def _resize(self, sample: dict, size: tuple[int, int]) -> dict:
        return transforms.resize(sample, size, self.tasks if self.resize_targets else (), self.rgb_resize,
                                 self.rescale_flow)

    def _augment(self, sample: dict, index: int, epoch: int) -> dict:
        """Flips (p = 0.5, with the sign changes), the release's training crop and colour jitter, drawn
        from (seed, epoch, index)."""
        state = np.random.SeedSequence([self.seed, epoch, index]).generate_state(1)[0]
        g = torch.Generator().manual_seed(int(state))
        flips = [(-1, 0)]  # (tensor axis, vector component to negate)
        if self.vertical_flip:
            flips.append((-2, 1))
        flipped = [False, False]
        for axis, component in flips:
            if torch.rand((), generator=g) < 0.5:
                flipped[component] = True
                transforms.flip(sample, axis, component)
        sample["flip"] = tuple(flipped)
        if any(t in self.crop_tasks for t in self.tasks):  # a random window of the release's size
            ch, cw = self.geometry["train_crop"]
            h, w = sample["rgb"].shape[-2:]
            if ch > h or cw > w:
                raise ValueError(f"{type(self).__name__}: training crop {ch}x{cw} is larger than the image {h}x{w}")
            top = int(torch.randint(h - ch + 1, (), generator=g))
            left = int(torch.randint(w - cw + 1, (), generator=g))
            transforms.crop(sample, top, left, ch, cw)
            sample["crop"] = (top, left)
        if self.jitters():
            params = transforms.color_jitter_params(self.jitter, g)
            for key in ("rgb", "rgb_next"):
                if key in sample:
                    sample[key] = transforms.color_jitter(sample[key], *params)
        return sample

    def jitters(self) -> bool:
        """Whether augmented RGB differs beyond flips and crops (colour jitter), i.e. image latents
        cannot be cached."""
        return self.augment and self.jitter is not None and any(t in self.jitter_tasks for t in self.tasks)

    # helpers for subclasses
    def _same_size(self, file_a: str, a: np.ndarray, file_b: str, b: np.ndarray) -> None:
        """Two rasters combined pixel by pixel (a map and its mask) must have one size; else a
        ``FormatError`` naming both files and sizes (numpy would broadcast or fail without names)."""
        if np.shape(a)[:2] != np.shape(b)[:2]:
            (ha, wa), (hb, wb) = np.shape(a)[:2], np.shape(b)[:2]
            raise formats.FormatError(f"{self.path(file_a)} is {ha}x{wa} but {self.path(file_b)} is {hb}x{wb}; "
                                      f"the {self.name} layout has them the same size (a stale or resized copy?)")

    def _rgb(self, relative: str) -> np.ndarray:
        return formats.read_rgb(self.path(relative)).astype(np.float32) / 255.0

    def _depth_valid(self, depth: np.ndarray) -> np.ndarray:
        lo, hi = self.depth_range
        return np.isfinite(depth) & (depth > lo) & (depth < hi)

    def _oriented(self, normal: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Stored normals -> the ``normals`` convention; invalid where non-finite or of zero length.
        Invalid pixels keep their stored vector (non-finite ones become 0)."""
        finite = np.isfinite(normal).all(-1)
        normal = np.where(finite[..., None], normal, 0.0)
        valid = valid & finite & (np.linalg.norm(normal, axis=-1) > 1e-6)
        return (normal if self.normals == "as_stored" else -normal).astype(np.float32), valid


def _albedo_valid(albedo: np.ndarray) -> np.ndarray:
    return (albedo >= ALBEDO_MIN).all(axis=-1)


# --------------------------------------------------------------------------- training sources

class Hypersim(Source):
    """Hypersim, StableMTL-preprocessed: ``<scene>/rgb_cam_XX_frNNNN.png`` with ``depth_plane_``
    (uint16 mm), ``normal_cam_`` (.npy) + ``normal_valid_mask_`` (.npy), ``albedo_`` and ``shading_`` PNGs.

    The release's split lists drop in under their own names, one per task
    (``HYPERSIM_LISTS``): for training ``filename_list_train_no_nandepth.txt``
    (depth, albedo, shading) and ``filename_list_train_normal.txt`` (normal).
    A line has 2 columns (rgb, depth: the depth-only lists) or 5 (rgb, depth,
    normal npy, normal png, normal mask npy); normals need the 5. With several
    tasks, the frames listed for all of them are used. Albedo is read from
    ``albedo_*.png``, the name the preprocessing writes (the release's loader
    looked for ``reflectance_*``: a documented fix).
    """

    name = "hypersim"
    root_hint = "hypersim/train"
    default_split = "train"
    tasks_provided = ("depth", "normal", "albedo", "shading")
    layout = "<root>/<scene>/{rgb,depth_plane,normal_cam,normal_valid_mask,albedo,shading}_cam_XX_frNNNN.*"
    depth_range = (1e-5, 65.0)
    geometry = {"focal": 886.81, "size": [768, 1024]}

    def _read_split(self, split):
        frames: dict[str, tuple[str, ...]] | None = None
        for task in self.tasks:
            lists = HYPERSIM_LISTS.get(split)
            file = lists.get(task) if isinstance(lists, dict) else lists
            lines = self._split_lines(split, file)
            expected = HYPERSIM_COLUMNS[task]
            for number, line in enumerate(lines, 1):
                if len(line) not in expected:
                    raise formats.FormatError(
                        f"{self.split_file}: line {number} has {len(line)} column(s); a Hypersim {task} list "
                        f"needs {' or '.join(str(c) for c in expected)} ({HYPERSIM_COLUMN_NAMES[max(expected)]})")
            listed = {line[0]: tuple(line) for line in lines}
            if frames is None:
                frames = listed
            else:  # keep the frames of every task's list, with the longest line of each
                frames = {k: max(v, listed[k], key=len) for k, v in frames.items() if k in listed}
        return list(frames.values())

    def _load(self, entry):
        rgb_path = entry[0]
        out = {"rgb": self._rgb(rgb_path)}
        h, w = out["rgb"].shape[:2]
        folder, file = rgb_path.rsplit("/", 1) if "/" in rgb_path else ("", rgb_path)
        sibling = lambda prefix: f"{folder}/{file.replace('rgb_', prefix + '_', 1)}".lstrip("/")  # noqa: E731
        files = out["files"] = {"rgb": rgb_path}
        if "depth" in self.tasks:
            d = formats.read_hypersim_depth(self.path(entry[1]))
            out["depth"], out["depth_valid"] = d, self._depth_valid(d)
            files["depth"] = files["depth_valid"] = entry[1]
        if "normal" in self.tasks:
            n = formats.read_normal_npy(self.path(entry[2]))
            mask = formats.read_mask_npy(self.path(entry[4]))
            self._same_size(entry[2], n, entry[4], mask)
            out["normal"], out["normal_valid"] = self._oriented(n, mask)
            files["normal"], files["normal_valid"] = entry[2], entry[4]
        if "albedo" in self.tasks or "shading" in self.tasks:
            albedo = formats.read_rgb(self.path(sibling("albedo"))).astype(np.float32) / 255.0
            out["albedo"], out["albedo_valid"] = albedo, _albedo_valid(albedo)
            files["albedo"] = files["albedo_valid"] = files["shading_valid"] = sibling("albedo")
            if "shading" in self.tasks:
                out["shading"] = formats.read_rgb(self.path(sibling("shading"))).astype(np.float32) / 255.0
                out["shading_valid"] = out["albedo_valid"]
                files["shading"] = sibling("shading")
        f = self.geometry["focal"] * w / self.geometry["size"][1]
        out["K"] = np.array([[f, 0, (w - 1) / 2], [0, f, (h - 1) / 2], [0, 0, 1]])
        return out


# split -> the release's list file (per task for training), and the columns each task's lines need
_NO_NAN_DEPTH, _NORMAL = "filename_list_train_no_nandepth.txt", "filename_list_train_normal.txt"
HYPERSIM_LISTS = {
    "train": {"depth": _NO_NAN_DEPTH, "albedo": _NO_NAN_DEPTH, "shading": _NO_NAN_DEPTH, "normal": _NORMAL},
    "val": "filename_list_val_filtered.txt",
    "test": "filename_list_test_filtered.txt",
}
HYPERSIM_COLUMNS = {"depth": (2, 5), "albedo": (2, 5), "shading": (2, 5), "normal": (5,)}
HYPERSIM_COLUMN_NAMES = {2: "rgb depth", 5: "rgb depth normal.npy normal.png normal_mask.npy"}


_VKITTI_RGB = re.compile(r"^original/(Scene\d+)/([^/]+)/frames/rgb/(Camera_\d)/rgb_(\d{5})\.jpg$")
_VKITTI_ANNOTATIONS = {  # task -> (folder under frames/, file prefix, extension, top directory)
    "depth": ("depth", "depth", "png", "original"),
    "normal": ("normal", "normal", "npy", "normal_estimated"),
    "semantic": ("classSegmentation", "classgt", "png", "original"),
    "optical_flow": ("forwardFlow", "flow", "png", "original"),
    "scene_flow": ("forwardSceneFlow", "sceneFlow", "png", "original"),
}


class VirtualKITTI2(Source):
    """Virtual KITTI 2 under ``vkitti_v2/``: ``original/SceneXX/<variation>/frames/<kind>/Camera_k/``
    (rgb jpg, depth png cm, classSegmentation colour png, forwardFlow and forwardSceneFlow 16-bit
    png) and ``normal_estimated/.../frames/normal/Camera_k/normal_NNNNN.npy``.

    The split is per task as the release's lists (``vkitti_<task>_<split>.txt``, one
    annotation path per line); with several tasks the frames listed for all of them are used.
    Augmented as the release trains: a horizontal flip for every task; for optical flow
    also colour jitter and a random 256 x 1024 window (``geometry["train_crop"]``) before
    the resize; scene flow gets no jitter and no crop.
    """

    name = "vkitti"
    root_hint = "vkitti_v2"
    default_split = "train"
    tasks_provided = ("depth", "normal", "semantic", "optical_flow", "scene_flow")
    layout = "<root>/original/SceneXX/<variation>/frames/{rgb,depth,classSegmentation,forwardFlow,forwardSceneFlow}/Camera_k/ and <root>/normal_estimated/"
    depth_range = (1e-5, 80.0)
    geometry = {"focal": 725.0087, "cx": 620.5, "cy": 187.0, "train_crop": [256, 1024]}
    jitter = (0.4, 0.4, 0.2, 0.127)
    jitter_tasks = crop_tasks = ("optical_flow",)

    def _read_split(self, split):
        frames = None
        for task in self.tasks:
            keys = []
            for line in self._split_lines(split, f"vkitti_{task}_{split}.txt"):
                parts = line[0].split("/")  # <top>/SceneXX/<variation>/frames/<kind>/Camera_k/<prefix>_NNNNN.<ext>
                number = re.search(r"_(\d{5})\.\w+$", parts[-1])
                if len(parts) != 7 or parts[3] != "frames" or number is None:
                    raise formats.FormatError(f"{self.split_file}: not a vKITTI 2 frame path "
                                              f"(<top>/SceneXX/<variation>/frames/<kind>/Camera_k/<name>_NNNNN.<ext>): {line[0]!r}")
                keys.append((parts[1], parts[2], parts[5], int(number.group(1))))
            listed = set(keys)
            frames = keys if frames is None else [k for k in frames if k in listed]
        return [(f"original/{s}/{v}/frames/rgb/{c}/rgb_{n:05d}.jpg",) for s, v, c, n in frames]

    def annotation_path(self, rgb_path: str, task: str, frame_offset: int = 0) -> str:
        m = _VKITTI_RGB.match(rgb_path)
        scene, variation, camera, number = m.group(1), m.group(2), m.group(3), int(m.group(4)) + frame_offset
        if task == "rgb":
            return f"original/{scene}/{variation}/frames/rgb/{camera}/rgb_{number:05d}.jpg"
        folder, prefix, ext, top = _VKITTI_ANNOTATIONS[task]
        return f"{top}/{scene}/{variation}/frames/{folder}/{camera}/{prefix}_{number:05d}.{ext}"

    def _load(self, entry):
        rgb_path = entry[0]
        out = {"rgb": self._rgb(rgb_path)}
        files = out["files"] = {"rgb": rgb_path}
        for task in self.tasks:
            files[task] = files[f"{task}_valid"] = self.annotation_path(rgb_path, task)
        if self.needs_next_frame():
            files["rgb_next"] = self.annotation_path(rgb_path, "rgb", 1)
            out["rgb_next"] = self._rgb(files["rgb_next"])
            files["scene_flow_valid"] = self.annotation_path(rgb_path, "optical_flow")
        if "depth" in self.tasks or "normal" in self.tasks:
            depth_file = self.annotation_path(rgb_path, "depth")
            depth = formats.read_vkitti_depth(self.path(depth_file))
            depth_valid = self._depth_valid(depth)
            if "depth" in self.tasks:  # raw: the sky keeps 655.35 m (its target is +1, as the release's)
                out["depth"], out["depth_valid"] = depth, depth_valid
            if "normal" in self.tasks:
                n = formats.read_normal_npy(self.path(files["normal"]))
                self._same_size(files["normal"], n, depth_file, depth)
                out["normal"], out["normal_valid"] = self._oriented(n, depth_valid)
                files["normal_valid"] = depth_file
        if "semantic" in self.tasks:
            labels = formats.read_vkitti_semantic(self.path(self.annotation_path(rgb_path, "semantic")))
            out["semantic"], out["semantic_valid"] = labels, labels != IGNORE_INDEX
        if self.needs_next_frame():
            flow, flow_valid = formats.read_vkitti_flow(self.path(self.annotation_path(rgb_path, "optical_flow")))
            if "optical_flow" in self.tasks:
                out["optical_flow"], out["optical_flow_valid"] = flow, flow_valid
            if "scene_flow" in self.tasks:
                sf, _ = formats.read_vkitti_scene_flow(self.path(self.annotation_path(rgb_path, "scene_flow")))
                out["scene_flow"], out["scene_flow_valid"] = sf, flow_valid  # raw where the flow is invalid
        g = self.geometry
        out["K"] = np.array([[g["focal"], 0, g["cx"]], [0, g["focal"], g["cy"]], [0, 0, 1]])
        return out


class FlyingThings3D(Source):
    """FlyingThings3D as StableMTL preprocesses it: ``<split>/image_clean/NNNNNNN.png`` (frame 2 =
    id + 1), ``flow_2d/`` (KITTI-style 16-bit flow png), ``pc/`` (.npz, ``pc1`` N x 3) and
    ``flow_3d/`` (.npy, N x 3). Split lines name the flow_2d file.

    Everything is centre-cropped to 536 x 960. Scene flow is splatted onto the
    crop by projecting ``pc1`` with f = 1050, cx = 479.5, cy = 269.5 and the
    crop offset (the release ignored the 2-row offset: a documented fix).
    Augmented as the release trains: horizontal and vertical flips and colour
    jitter, for both tasks.
    """

    name = "flying_things_3d"
    root_hint = "FlyingThings3D_preprocessed"
    default_split = "train"
    tasks_provided = ("optical_flow", "scene_flow")
    layout = "<root>/<split>/{image_clean,flow_2d,pc,flow_3d}/NNNNNNN.{png,npz,npy}"
    depth_range = (1e-5, 35.0)
    geometry = {"focal": 1050.0, "cx": 479.5, "cy": 269.5, "crop": [536, 960]}
    jitter = (0.3, 0.3, 0.3, 0.159)
    jitter_tasks = ("optical_flow", "scene_flow")
    vertical_flip = True

    def _load(self, entry):
        flow_path = entry[0]
        folder, file = flow_path.rsplit("/flow_2d/", 1)
        number = int(Path(file).stem)
        image = lambda n: f"{folder}/image_clean/{n:07d}.png"  # noqa: E731
        rgb, rgb_next = self._rgb(image(number)), self._rgb(image(number + 1))
        self._same_size(image(number + 1), rgb_next, image(number), rgb)
        h, w = rgb.shape[:2]
        top, left = transforms.center_crop(h, w, self.geometry["crop"])
        ch, cw = self.geometry["crop"]
        crop = lambda a: a[top:top + ch, left:left + cw]  # noqa: E731
        out = {"rgb": crop(rgb), "rgb_next": crop(rgb_next)}
        out["files"] = {"rgb": image(number), "rgb_next": image(number + 1), "optical_flow": flow_path,
                        "optical_flow_valid": flow_path, "scene_flow": f"{folder}/flow_3d/{number:07d}.npy",
                        "scene_flow_valid": f"{folder}/pc/{number:07d}.npz"}
        g = self.geometry
        if "optical_flow" in self.tasks:
            flow, valid = formats.read_kitti_flow(self.path(flow_path))
            self._same_size(flow_path, flow, image(number), rgb)
            out["optical_flow"], out["optical_flow_valid"] = crop(flow), crop(valid)
        if "scene_flow" in self.tasks:
            pc1 = formats.read_npz(self.path(f"{folder}/pc/{number:07d}.npz"), "pc1").reshape(-1, 3)
            sf = formats.read_npy(self.path(f"{folder}/flow_3d/{number:07d}.npy"), ndim=2, channels=3)
            if len(sf) != len(pc1):
                raise formats.FormatError(f"{folder}/flow_3d/{number:07d}.npy has {len(sf)} vectors for {len(pc1)} points")
            scene_flow = np.zeros((ch, cw, 3), np.float32)
            valid = np.zeros((ch, cw), bool)
            z = pc1[:, 2]
            ok = z > 0
            u = np.round(g["focal"] * pc1[ok, 0] / z[ok] + g["cx"]).astype(np.int64) - left
            v = np.round(g["focal"] * pc1[ok, 1] / z[ok] + g["cy"]).astype(np.int64) - top
            inside = (u >= 0) & (u < cw) & (v >= 0) & (v < ch)
            scene_flow[v[inside], u[inside]] = sf[ok][inside]
            valid[v[inside], u[inside]] = True
            out["scene_flow"], out["scene_flow_valid"] = scene_flow, valid
        out["K"] = np.array([[g["focal"], 0, g["cx"] - left], [0, g["focal"], g["cy"] - top], [0, 0, 1]])
        return out


# --------------------------------------------------------------------------- evaluation sources

class Cityscapes(Source):
    """Cityscapes: ``leftImg8bit/<split>/<city>/*_leftImg8bit.png`` and ``gtFine/<split>/<city>/*_gtFine_labelIds.png``,
    label ids mapped to the 8 classes (car and bus -> vehicle, everything else ignore).

    Resized as the release reads it: the image and the labels are first halved with
    nearest sampling (pixel 2i + 1), then resized nearest-exact, so at 256 x 512 pixel
    (i, j) is full-resolution pixel (4i + 3, 4j + 3).
    """

    name = "cityscapes"
    root_hint = "cityscapes"
    default_split = "val"
    tasks_provided = ("semantic",)
    split_files = {"val": "cityscapes_val_full.txt"}
    layout = "<root>/leftImg8bit/val/<city>/*_leftImg8bit.png and <root>/gtFine/val/<city>/*_gtFine_labelIds.png"

    @staticmethod
    def label_path(rgb_path: str) -> str:
        return rgb_path.replace("leftImg8bit/", "gtFine/", 1).replace("_leftImg8bit.png", "_gtFine_labelIds.png")

    def _load(self, entry):
        label = self.label_path(entry[0])
        labels = formats.read_cityscapes_labels(self.path(label))
        return {"rgb": self._rgb(entry[0]), "semantic": labels, "semantic_valid": labels != IGNORE_INDEX,
                "files": {"rgb": entry[0], "semantic": label, "semantic_valid": label}}

    def _resize(self, sample: dict, size: tuple[int, int]) -> dict:
        h, w = sample["rgb"].shape[-2:]
        halved = super()._resize(sample, (h // 2, w // 2))  # PIL's nearest halving = nearest-exact
        return super()._resize(halved, size)


class KittiDepth(Source):
    """KITTI Eigen test split (Marigold's ``kitti_eigen_split_test`` layout): lines
    ``<date>/<drive>/image_02/data/N.png <drive>/proj_depth/groundtruth/image_02/N.png <focal>``;
    lines whose depth is ``None`` are skipped (and counted in ``n_skipped``). Depth png / 256 m,
    KITTI benchmark crop 352 x 1216, valid 1e-5..80 m and (``eigen_crop=True``) the release's
    Eigen window (``eigen_crop_mask``: built on the original image, then cropped)."""

    name = "kitti_depth"
    root_hint = "kitti/kitti_eigen_split_test"
    default_split = "test"
    tasks_provided = ("depth",)
    split_files = {"test": "eigen_test_files_with_gt.txt"}
    layout = "<root>/<date>/<drive>/image_02/data/*.png and <root>/<drive>/proj_depth/groundtruth/image_02/*.png"
    depth_range = (1e-5, 80.0)
    geometry = {"kb_crop": [352, 1216]}

    def __init__(self, *args, eigen_crop: bool = True, **kwargs):
        self.eigen_crop = eigen_crop
        super().__init__(*args, **kwargs)

    def _read_split(self, split):
        lines = self._split_lines(split)
        kept = [tuple(line) for line in lines if len(line) >= 2 and line[1] != "None"]
        self.n_skipped = len(lines) - len(kept)
        return kept

    def _load(self, entry):
        rgb = self._rgb(entry[0])
        depth = formats.read_kitti_depth(self.path(entry[1]))
        self._same_size(entry[1], depth, entry[0], rgb)
        crop_size = tuple(self.geometry["kb_crop"])
        top, left = transforms.kb_crop(*depth.shape, crop_size)
        ch, cw = crop_size
        valid = self._depth_valid(depth[top:top + ch, left:left + cw])
        if self.eigen_crop:
            valid &= eigen_crop_mask(*depth.shape, crop_size)
        rgb, depth = rgb[top:top + ch, left:left + cw], depth[top:top + ch, left:left + cw]
        out = {"rgb": rgb, "depth": depth, "depth_valid": valid,
               "files": {"rgb": entry[0], "depth": entry[1], "depth_valid": entry[1]}}
        if len(entry) >= 3:
            f = float(entry[2])
            out["K"] = np.array([[f, 0, np.nan], [0, f, np.nan], [0, 0, 1]])
        return out


class KittiFlow(Source):
    """KITTI 2015 scene flow, ``training/``: ``image_2/N_10.png`` and ``_11``, ``flow_occ`` (16-bit),
    ``disp_occ_0`` / ``disp_occ_1`` (/256, the latter in the reference frame's pixels),
    ``calib_cam_to_cam/N.txt`` (P_rect_02). Scene flow = backprojection of (pixel + flow, disp1)
    minus backprojection of (pixel, disp0), baseline 0.54 m, depth = f b / (disparity + 1e-5),
    in float32 as the release. Everything KB-cropped.

    Optical flow keeps its own valid mask (the release overwrote it with the
    scene-flow mask: a documented fix); scene flow needs flow and both disparities.
    """

    name = "kitti_flow"
    root_hint = "kitti/flow_2015"
    default_split = "train"
    tasks_provided = ("optical_flow", "scene_flow")
    split_files = {"train": "training.txt"}
    layout = "<root>/training/{image_2,flow_occ,disp_occ_0,disp_occ_1,calib_cam_to_cam}/"
    geometry = {"kb_crop": [352, 1216], "baseline": 0.54}

    def _load(self, entry):
        flow_path = entry[0]
        rgb_path = flow_path.replace("flow_occ/", "image_2/", 1)
        rgb, rgb_next = self._rgb(rgb_path), self._rgb(rgb_path.replace("_10.", "_11."))
        flow, flow_valid = formats.read_kitti_flow(self.path(flow_path))
        self._same_size(flow_path, flow, rgb_path, rgb)
        self._same_size(rgb_path.replace("_10.", "_11."), rgb_next, rgb_path, rgb)
        h, w = flow.shape[:2]
        top, left = transforms.kb_crop(h, w, self.geometry["kb_crop"])
        ch, cw = self.geometry["kb_crop"]
        crop = lambda a: a[top:top + ch, left:left + cw]  # noqa: E731
        calib_path = flow_path.replace("flow_occ/", "calib_cam_to_cam/", 1).replace("_10.png", ".txt")
        calib = formats.read_kitti_calib(self.path(calib_path))
        if "P_rect_02" not in calib:
            raise formats.FormatError(f"{self.path(calib_path)}: no P_rect_02 line")
        P = np.asarray(calib["P_rect_02"], dtype=np.float32).reshape(3, 4)
        f, cx, cy = P[0, 0], P[0, 2], P[1, 2]
        out = {"rgb": crop(rgb), "rgb_next": crop(rgb_next),
               "files": {"rgb": rgb_path, "rgb_next": rgb_path.replace("_10.", "_11."), "optical_flow": flow_path,
                         "optical_flow_valid": flow_path, "scene_flow": flow_path, "scene_flow_valid": flow_path}}
        if "optical_flow" in self.tasks:
            out["optical_flow"], out["optical_flow_valid"] = crop(flow), crop(flow_valid)
        if "scene_flow" in self.tasks:
            disp0, disp1 = (flow_path.replace("flow_occ/", f"disp_occ_{k}/", 1) for k in (0, 1))
            d0, v0 = formats.read_kitti_disparity(self.path(disp0))
            d1, v1 = formats.read_kitti_disparity(self.path(disp1))
            self._same_size(disp0, d0, flow_path, flow)
            self._same_size(disp1, d1, flow_path, flow)
            valid = v0 & v1 & flow_valid
            fb = np.float32(self.geometry["baseline"]) * f
            vv, uu = np.mgrid[0:h, 0:w].astype(np.float32)
            z0, z1 = fb / (d0 + np.float32(1e-5)), fb / (d1 + np.float32(1e-5))
            p1 = np.stack([(uu - cx) * z0 / f, (vv - cy) * z0 / f, z0], -1)
            p2 = np.stack([(uu + flow[..., 0] - cx) * z1 / f, (vv + flow[..., 1] - cy) * z1 / f, z1], -1)
            sf = np.where(valid[..., None], p2 - p1, np.float32(0.0))
            out["scene_flow"], out["scene_flow_valid"] = crop(sf), crop(valid)
        f, cx, cy = float(f), float(cx), float(cy)
        out["K"] = np.array([[f, 0, cx - left], [0, f, cy - top], [0, 0, 1]])
        return out


class DIODE(Source):
    """DIODE val (indoors + outdoor): lines ``<rgb>.png <rgb>_depth.npy <rgb>_depth_mask.npy``;
    normals in ``<rgb>_normal.npy``. Depth valid = the depth mask (the only depth mask, as the
    release); normals converted to (-nx, ny, nz) as the release (``normals="facing"`` negates
    them), valid where |n| in (0.5, 1.5)."""

    name = "diode"
    root_hint = "diode/diode_val"
    default_split = "val"
    tasks_provided = ("depth", "normal")
    split_files = {"val": "diode_val_all_filename_list.txt"}
    layout = "<root>/{indoors,outdoor}/scene_XXXXX/scan_XXXXX/*.png with _depth.npy, _depth_mask.npy, _normal.npy"
    depth_range = (0.6, 350.0)

    def _load(self, entry):
        if len(entry) != 3:
            raise formats.FormatError(f"expected 3 columns (rgb depth.npy depth_mask.npy), got {len(entry)}")
        out = {"rgb": self._rgb(entry[0])}
        normal_file = entry[1].replace("_depth.npy", "_normal.npy")
        out["files"] = {"rgb": entry[0], "depth": entry[1], "depth_valid": entry[2], "normal": normal_file,
                        "normal_valid": normal_file}
        if "depth" in self.tasks:
            out["depth"] = formats.read_diode_depth(self.path(entry[1]))
            mask = formats.read_diode_mask(self.path(entry[2]))
            self._same_size(entry[2], mask, entry[1], out["depth"])
            out["depth_valid"] = mask & np.isfinite(out["depth"])
        if "normal" in self.tasks:
            n, valid = formats.read_diode_normal(self.path(normal_file))
            out["normal"], out["normal_valid"] = self._oriented(n, valid)
        return out


class MIDIntrinsics(Source):
    """MIT multi-illumination (MID) test set as StableMTL preprocesses it: ``test/<scene>_dir_K_mip2.jpg``
    (tone-mapped), ``..._albedo.jpg`` and ``..._shading.jpg``; both masked where albedo < 0.004."""

    name = "mid"
    root_hint = "mid_intrinsics"
    default_split = "test"
    tasks_provided = ("albedo", "shading")
    layout = "<root>/test/<scene>_dir_K_mip2.jpg with _albedo.jpg and _shading.jpg"

    def _load(self, entry):
        stem = entry[0][: -len(".jpg")]
        albedo = self._rgb(f"{stem}_albedo.jpg")
        valid = _albedo_valid(albedo)
        out = {"rgb": self._rgb(entry[0])}
        out["files"] = {"rgb": entry[0], "albedo": f"{stem}_albedo.jpg", "albedo_valid": f"{stem}_albedo.jpg",
                        "shading": f"{stem}_shading.jpg", "shading_valid": f"{stem}_albedo.jpg"}
        if "albedo" in self.tasks:
            out["albedo"], out["albedo_valid"] = albedo, valid
        if "shading" in self.tasks:
            out["shading"], out["shading_valid"] = self._rgb(f"{stem}_shading.jpg"), valid
        return out


SOURCES = {cls.name: cls for cls in (Hypersim, VirtualKITTI2, FlyingThings3D, Cityscapes, KittiDepth,
                                     KittiFlow, DIODE, MIDIntrinsics)}

