"""Split lists: build them from a dataset directory (docs/method.md, "Datasets").

The lists use the release's file names and line formats (so its published lists
can be dropped into ``data_split/<dataset>/``) and paths relative to the dataset root.
The procedural miniatures write their own lists under ``<root>/data_split/``;
building a list from a miniature's directory reproduces that list (a test
checks it). ``build_split(name, root)`` writes the files and returns
``{file name: lines}``.
"""

from __future__ import annotations

import re
from pathlib import Path

from stablemtl.data import formats
from stablemtl.data.sources import HYPERSIM_LISTS, REPO_SPLITS, SOURCES, DatasetLayoutError
from stablemtl.tasks import FLOW_TASKS

VKITTI_SCENES = ("Scene02", "Scene06", "Scene18", "Scene20")  # Scene01 is held out by the release
VKITTI_VARIATIONS = ("15-deg-left", "15-deg-right", "clone", "morning", "overcast", "sunset")  # no fog, rain


def _rel(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


def _hypersim_official(split_csv, partition: str) -> set[tuple[str, str, int]]:
    """(scene, camera, frame) of ``partition`` in ml-hypersim's ``metadata_images_split_scene_v1.csv``."""
    import csv

    with open(split_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    need = {"scene_name", "camera_name", "frame_id", "included_in_public_release", "split_partition_name"}
    if not rows or not need <= set(rows[0]):
        raise formats.FormatError(f"{split_csv}: expected the columns {sorted(need)} of metadata_images_split_scene_v1.csv")
    return {(r["scene_name"], r["camera_name"], int(r["frame_id"])) for r in rows
            if r["split_partition_name"] == partition and r["included_in_public_release"].strip().lower() == "true"}


def hypersim_lines(root: Path, split_csv=None, partition: str = "train") -> dict[str, list[str]]:
    """Every preprocessed frame with its files, 5 columns, in the release's two training lists
    (``filename_list_train_no_nandepth.txt`` for depth, albedo and shading,
    ``filename_list_train_normal.txt`` for normals: the same frames, as the preprocessing
    writes every file of a frame); with ``split_csv`` (ml-hypersim's official scene split)
    only the frames of ``partition`` included in the public release."""

    official = _hypersim_official(split_csv, partition) if split_csv is not None else None
    lines = []
    for rgb in sorted(root.glob("*/rgb_cam_*_fr*.png")):
        stem = rgb.name[len("rgb_"):-len(".png")]  # cam_XX_frNNNN
        camera, frame = stem.rsplit("_fr", 1)
        if official is not None and (rgb.parent.name, camera, int(frame)) not in official:
            continue
        cols = [rgb, rgb.parent / f"depth_plane_{stem}.png", rgb.parent / f"normal_cam_{stem}.npy",
                rgb.parent / f"normal_cam_{stem}.png", rgb.parent / f"normal_valid_mask_{stem}.npy"]
        if all(c.is_file() for c in cols[:3]) and cols[4].is_file():
            lines.append(" ".join(_rel(root, c) for c in cols))
    return {file: list(lines) for file in sorted(set(HYPERSIM_LISTS["train"].values()))}


def vkitti_lines(root: Path) -> dict[str, list[str]]:
    """Per-task lists over Scenes 02/06/18/20 x 6 variations x Camera_0/1; flow tasks need the next frame."""
    out = {f"vkitti_{t}_train.txt": [] for t in ("depth", "normal", "semantic", "optical_flow", "scene_flow")}
    kinds = {"depth": ("original", "depth", "depth", "png"), "normal": ("normal_estimated", "normal", "normal", "npy"),
             "semantic": ("original", "classSegmentation", "classgt", "png"),
             "optical_flow": ("original", "forwardFlow", "flow", "png"),
             "scene_flow": ("original", "forwardSceneFlow", "sceneFlow", "png")}
    for scene in VKITTI_SCENES:
        for variation in VKITTI_VARIATIONS:
            for camera in ("Camera_0", "Camera_1"):
                rgb_dir = root / "original" / scene / variation / "frames" / "rgb" / camera
                for rgb in sorted(rgb_dir.glob("rgb_*.jpg")):
                    number = int(re.search(r"(\d{5})", rgb.name).group(1))
                    has_next = (rgb_dir / f"rgb_{number + 1:05d}.jpg").is_file()
                    for task, (top, folder, prefix, ext) in kinds.items():
                        path = root / top / scene / variation / "frames" / folder / camera / f"{prefix}_{number:05d}.{ext}"
                        if path.is_file() and (has_next or task not in FLOW_TASKS):
                            out[f"vkitti_{task}_train.txt"].append(_rel(root, path))
    return out


def flying_things_3d_lines(root: Path, split: str = "train") -> dict[str, list[str]]:
    lines = []
    for flow in sorted((root / split / "flow_2d").glob("*.png")):
        number = int(flow.stem)
        if (root / split / "image_clean" / f"{number + 1:07d}.png").is_file():
            lines.append(_rel(root, flow))
    return {f"{split}.txt": lines}


def cityscapes_lines(root: Path) -> dict[str, list[str]]:
    return {"cityscapes_val_full.txt": [_rel(root, p) for p in sorted((root / "leftImg8bit" / "val").glob("*/*_leftImg8bit.png"))]}


def kitti_depth_lines(root: Path, eigen_list=None) -> dict[str, list[str]]:
    """With ``eigen_list`` (the Eigen test file list: one image path per line, optionally the
    ground truth and the focal length, as the release's ``eigen_test_files_with_gt.txt``), follow
    it and write ``None`` where the ground truth is missing, as the release's list, keeping the
    columns after the second (the focal). Without it, list every image with ground truth under
    ``root`` (not the official split)."""
    if eigen_list is not None:
        rows = [line.split() for line in Path(eigen_list).read_text().splitlines() if line.strip()]
    else:
        rows = [[_rel(root, p)] for p in sorted(root.glob("*/*/image_02/data/*.png"))]
    lines = []
    for image, *rest in rows:
        drive, frame = image.split("/")[1], Path(image).name
        gt = f"{drive}/proj_depth/groundtruth/image_02/{frame}"
        if (root / gt).is_file() or eigen_list is not None:
            lines.append(" ".join([image, gt if (root / gt).is_file() else "None", *rest[1:]]))
    return {"eigen_test_files_with_gt.txt": lines}


def kitti_flow_lines(root: Path) -> dict[str, list[str]]:
    return {"training.txt": [_rel(root, p) for p in sorted((root / "training" / "flow_occ").glob("*_10.png"))]}


def diode_lines(root: Path) -> dict[str, list[str]]:
    lines = []
    for place in ("indoors", "outdoor"):
        for rgb in sorted((root / place).glob("scene_*/scan_*/*.png")):
            depth, mask = rgb.with_name(rgb.stem + "_depth.npy"), rgb.with_name(rgb.stem + "_depth_mask.npy")
            if depth.is_file() and mask.is_file():
                lines.append(" ".join(_rel(root, p) for p in (rgb, depth, mask)))
    return {"diode_val_all_filename_list.txt": lines}


def mid_lines(root: Path) -> dict[str, list[str]]:
    names = [p for p in sorted((root / "test").glob("*_mip2.jpg"))]
    return {"test.txt": [_rel(root, p) for p in names]}


BUILDERS = {
    "hypersim": hypersim_lines, "vkitti": vkitti_lines, "flying_things_3d": flying_things_3d_lines,
    "cityscapes": cityscapes_lines, "kitti_depth": kitti_depth_lines, "kitti_flow": kitti_flow_lines,
    "diode": diode_lines, "mid": mid_lines,
}


def build_split(name: str, root, out_dir=None, **kwargs) -> dict[str, list[str]]:
    """Build the split lists of dataset ``name`` from ``root`` and write them to ``out_dir``
    (default ``data_split/<name>/`` of the repository)."""
    if name not in BUILDERS:
        raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(BUILDERS)}")
    root = Path(root)
    if not root.is_dir():
        cls = SOURCES[name]
        raise DatasetLayoutError(f"{name}: dataset root {root} does not exist; expected {cls.layout}")
    lists = BUILDERS[name](root, **kwargs)
    if not any(lists.values()):
        raise DatasetLayoutError(f"{name}: found no samples under {root}; expected {SOURCES[name].layout}")
    out_dir = Path(out_dir) if out_dir is not None else REPO_SPLITS / name
    for file, lines in lists.items():
        formats._write_bytes(out_dir / file, ("\n".join(lines) + "\n").encode())
    return lists
