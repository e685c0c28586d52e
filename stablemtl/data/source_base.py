"""``Source``: the machinery every dataset source shares (``stablemtl.data.sources`` lists the sources
and the conventions of the samples they return).

A source checks its root and reads its split list (``stablemtl.data.splits``), loads a
sample with the dataset's own readers (``_load``, per source), checks that its rasters have
one size, converts it to tensors, augments it (a function of seed, epoch and index), encodes
its targets (``stablemtl.tasks``) and resizes it (``stablemtl.data.transforms``). A dataset root
may carry ``META_FILE`` whose ``geometry`` entry overrides the source's geometry constants.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from stablemtl import options
from stablemtl.data import formats, splits, transforms
from stablemtl.data.formats import DatasetLayoutError
from stablemtl.presets import DEFAULT_SEED
from stablemtl.tasks import ALBEDO_MIN, FLOW_TASKS, get_task

META_FILE = "stablemtl_dataset.json"
DATA_DOC = "docs/paper.md, section 'Real datasets'"


class Source(Dataset):
    """Common machinery: root and split checks, per-task loading, augmentation, target encoding, resize."""

    name = ""  # the kit's dataset name (data_split/<name>/)
    root_hint = ""  # the directory under $PREPROCESSED_DIR, for messages
    tasks_provided: tuple[str, ...] = ()
    default_split = "train"  # the split the study uses (training sources: train; benchmarks: their test set)
    split_files: dict[str, str] = {}
    layout = ""  # one line describing the expected layout, for messages (``splits.LAYOUTS``)
    depth_range = (1e-5, math.inf)
    geometry: dict = {}
    jitter: tuple[float, float, float, float] | None = None  # brightness, contrast, saturation, hue
    jitter_tasks: tuple[str, ...] = ()  # the tasks whose training samples the release colour-jitters
    crop_tasks: tuple[str, ...] = ()  # the tasks whose training samples the release crops (geometry "train_crop")
    vertical_flip = False

    def __init__(self, root, split: str | None = None, tasks=None, resolution=None, augment: bool = False,
                 rgb_resize: str = "nearest-exact", resize_targets: bool = True, seed: int = DEFAULT_SEED,
                 normals: str = options.DEFAULTS["normals"], encode_targets: bool = False,
                 target_order: str = options.DEFAULTS["target_order"],
                 invalid_targets: str = options.DEFAULTS["invalid_targets"], rescale_flow: bool = True):
        root = Path(root)
        if not root.is_dir():
            raise DatasetLayoutError(
                f"{type(self).__name__}: dataset root {root} does not exist; expected {self.layout} "
                f"(usually $PREPROCESSED_DIR/{self.root_hint}); see {DATA_DOC} for how to obtain it, "
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
        self.geometry = {**type(self).geometry, **self._checked_geometry()}
        self.entries = self._read_split(split)
        if not self.entries:
            raise DatasetLayoutError(f"{type(self).__name__}: the split list {self.split_file} is empty (no "
                                     f"sample of split {split!r}); list the samples in it, one per line, or "
                                     f"rebuild it with stablemtl.data.splits.build_split('{self.name}', root)")

    # ----------------------------------------------------------------- split and layout
    def _read_meta(self) -> dict:
        return formats.read_json_if_present(self.root / META_FILE)

    def _checked_geometry(self) -> dict:
        """The ``geometry`` of the dataset's ``stablemtl_dataset.json``, each field of the type of the
        class's default (a number, or a list of as many numbers; a field without a default: a number, a
        list of numbers or an object of numbers), else a ``FormatError`` naming the file."""
        found = self.meta.get("geometry", {})
        where = self.root / META_FILE
        if not isinstance(found, dict):
            raise formats.FormatError(f"{where}: 'geometry' is {type(found).__name__} {found!r}; expected an "
                                      f"object of fields such as {type(self).geometry}")
        number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
        for key, value in found.items():
            default = type(self).geometry.get(key)
            if default is None:  # a field of the files (size, annotation_scale: a number per task, ...)
                ok = number(value) or isinstance(value, list) and all(map(number, value)) or \
                    isinstance(value, dict) and all(map(number, value.values()))
            elif isinstance(default, list):
                ok = isinstance(value, list) and len(value) == len(default) and all(map(number, value))
            else:
                ok = number(value)
            if not ok:
                expected = f"a list of {len(default)} numbers" if isinstance(default, list) else "a number"
                raise formats.FormatError(f"{where}: geometry field {key!r} is {value!r}; expected {expected} "
                                          f"(the class's default: {default!r})")
        return found

    def split_paths(self, split: str, file: str | None = None) -> list[Path]:
        """Where a split list is looked for, in order: a path given as ``split``, the dataset's
        own ``<root>/data_split/``, then the repository's ``data_split/<dataset>/`` (``splits.list_paths``)."""
        if Path(split).suffix == ".txt" and Path(split).is_file():
            return [Path(split)]
        name = file or self.split_files.get(split, f"{split}.txt")
        return splits.list_paths(self.root, self.name, name)

    def _split_lines(self, split: str, file: str | None = None) -> list[list[str]]:
        """The entries (columns) of a split list, read by ``splits.read_split_list`` (a file listed twice
        is a ``FormatError``). Records the list and each entry's line number, for messages."""
        candidates = self.split_paths(split, file)
        for path in candidates:
            if path.is_file():
                self.split_file = path
                entries, seen = splits.read_split_list(path, self.name)
                if not hasattr(self, "line_of"):
                    self.line_of = {}
                for line in entries:  # the first list an entry came from names it in messages
                    self.line_of.setdefault(line[0], (path, seen[line[0]]))
                return entries
        raise DatasetLayoutError(
            f"{type(self).__name__}: no split list {split!r}; looked for "
            + ", ".join(str(p) for p in candidates)
            + f" (the dataset is expected as {self.layout}). Build the list from the dataset with "
            f"stablemtl.data.splits.build_split('{self.name}', root) or see {DATA_DOC}"
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
        try:  # an image smaller than the protocol's crops or halving (formats.FormatError) included
            raw = self._load(entry)
            self._check_sizes(raw)
            sample = self._to_tensors(raw)
            sample["flip"] = (False, False)  # (horizontal, vertical), set by the augmentation
            sample["crop"] = None  # (top, left) of a training crop, set by the augmentation
            if self.augment:  # at the file's resolution, as the release
                sample = self._augment(sample, index, int(epoch))
            if self.encode_targets and self.target_order == "normalise_then_resize":
                self._encode_targets(sample)
            if self.resolution is not None:
                sample = self._resize(sample, self.resolution)
        except (FileNotFoundError, formats.FormatError) as err:
            raise type(err)(f"{type(self).__name__} sample {index} ({self._where(entry)}): {err}") from None
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
                raise formats.FormatError(f"image {h}x{w} is smaller than the training crop {ch}x{cw} (geometry "
                                          f"train_crop of {self.root / META_FILE} or of the class)")
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


def albedo_valid(albedo: np.ndarray) -> np.ndarray:
    """Where an albedo is defined (every channel at least ``tasks.ALBEDO_MIN``): the albedo and shading masks."""
    return (albedo >= ALBEDO_MIN).all(axis=-1)
