"""Split lists: where they are looked for, how they are read, and how they are built from a
dataset directory (docs/method.md, "Datasets").

The lists use the release's file names and line formats (so its published lists
can be dropped into ``data_split/<dataset>/``) and paths relative to the dataset root.
A source (``stablemtl.data.sources``) looks for its list in ``<root>/data_split/``, then
in the repository's ``data_split/<dataset>/`` (``list_paths``), and reads it with
``read_split_list``. The procedural miniatures write their own lists under ``<root>/data_split/``;
building a list from a miniature's directory reproduces that list (a test
checks it). ``build_split(name, root)`` writes the files and returns
``{file name: lines}``. Hypersim's official scene split (``HYPERSIM_SPLIT_CSV``) is read
by ``hypersim_split_rows``.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from stablemtl.data.formats import DatasetLayoutError, FormatError, write_bytes
from stablemtl.tasks import FLOW_TASKS

REPO_SPLITS = Path(__file__).resolve().parents[2] / "data_split"

# dataset -> the layout its split lists index (one line, for messages: ``Source.layout``)
LAYOUTS = {
    "hypersim": "<root>/<scene>/{rgb,depth_plane,normal_cam,normal_valid_mask,albedo,shading}_cam_XX_frNNNN.*",
    "vkitti": "<root>/original/SceneXX/<variation>/frames/{rgb,depth,classSegmentation,forwardFlow,forwardSceneFlow}"
              "/Camera_k/ and <root>/normal_estimated/",
    "flying_things_3d": "<root>/<split>/{image_clean,flow_2d,pc,flow_3d}/NNNNNNN.{png,npz,npy}",
    "cityscapes": "<root>/leftImg8bit/val/<city>/*_leftImg8bit.png and <root>/gtFine/val/<city>/*_gtFine_labelIds.png",
    "kitti_depth": "<root>/<date>/<drive>/image_02/data/*.png and <root>/<drive>/proj_depth/groundtruth/image_02/*.png",
    "kitti_flow": "<root>/training/{image_2,flow_occ,disp_occ_0,disp_occ_1,calib_cam_to_cam}/",
    "diode": "<root>/{indoors,outdoor}/scene_XXXXX/scan_XXXXX/*.png with _depth.npy, _depth_mask.npy, _normal.npy",
    "mid": "<root>/test/<scene>_dir_K_mip2.jpg with _albedo.jpg and _shading.jpg",
}

# Hypersim: ml-hypersim's official scene split, and the release's lists (split -> file, per task for training)
HYPERSIM_SPLIT_CSV = "metadata_images_split_scene_v1.csv"
HYPERSIM_LIST_ALL = "filename_list_train.txt"  # 2 columns: rgb, depth
HYPERSIM_LIST_NO_NAN = "filename_list_train_no_nandepth.txt"  # 5 columns; depth, albedo, shading
HYPERSIM_LIST_NORMAL = "filename_list_train_normal.txt"  # 5 columns; normals
HYPERSIM_LISTS = {
    "train": {"depth": HYPERSIM_LIST_NO_NAN, "albedo": HYPERSIM_LIST_NO_NAN, "shading": HYPERSIM_LIST_NO_NAN,
              "normal": HYPERSIM_LIST_NORMAL},
    "val": "filename_list_val_filtered.txt",
    "test": "filename_list_test_filtered.txt",
}

# the evaluation datasets' lists (the release's file names)
CITYSCAPES_LIST = "cityscapes_val_full.txt"
KITTI_DEPTH_LIST = "eigen_test_files_with_gt.txt"  # the Eigen test split, "None" where no ground truth
KITTI_FLOW_LIST = "training.txt"
DIODE_LIST = "diode_val_all_filename_list.txt"

VKITTI_ANNOTATIONS = {  # task -> (folder under frames/, file prefix, extension, top directory)
    "depth": ("depth", "depth", "png", "original"),
    "normal": ("normal", "normal", "npy", "normal_estimated"),
    "semantic": ("classSegmentation", "classgt", "png", "original"),
    "optical_flow": ("forwardFlow", "flow", "png", "original"),
    "scene_flow": ("forwardSceneFlow", "sceneFlow", "png", "original"),
}
VKITTI_SCENES = ("Scene02", "Scene06", "Scene18", "Scene20")  # Scene01 is held out by the release
VKITTI_VARIATIONS = ("15-deg-left", "15-deg-right", "clone", "morning", "overcast", "sunset")  # no fog, rain


# --------------------------------------------------------------------------- finding and reading a list

def list_paths(root, dataset: str, file: str) -> list[Path]:
    """Where the split list ``file`` of ``dataset`` is looked for, in order: the dataset's own
    ``<root>/data_split/``, then the repository's ``data_split/<dataset>/``."""
    return [Path(root) / "data_split" / file, REPO_SPLITS / dataset / file]


def read_split_list(path: Path, dataset: str) -> tuple[list[list[str]], dict[str, int]]:
    """The entries (columns) of the split list ``path``, blank and ``#`` lines left out, and the line
    number of each entry (by its first column). A file listed twice (the same first column on two
    lines) is a ``FormatError`` naming the list and both line numbers: it would weight that image
    several times."""
    try:
        text = path.read_text()
    except UnicodeDecodeError as err:
        raise FormatError(f"{path}: not a text split list ({err})") from None
    entries, seen = [], {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split()
        if not line or line[0].startswith("#"):
            continue
        if line[0] in seen:
            raise FormatError(
                f"{path}: lines {seen[line[0]]} and {number} both list {line[0]!r}; a split list "
                f"names each file once (remove line {number}, or rebuild the list with "
                f"stablemtl.data.splits.build_split('{dataset}', root))")
        seen[line[0]] = number
        entries.append(line)
    return entries, seen


def list_columns(path: Path) -> list[list[str]]:
    """The columns of every line of a split list, blank lines and lines starting with ``#`` left out,
    nothing else checked (``stablemtl.data.layout.check_layout`` reports each problem itself)."""
    return [line.split() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def hypersim_split_rows(split_csv, partition: str) -> list[tuple[str, str, int]]:
    """(scene, camera, frame) of ``partition`` included in the public release, in the csv's order, from
    ml-hypersim's official scene split ``split_csv`` (``metadata_images_split_scene_v1.csv``)."""
    with open(split_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    need = {"scene_name", "camera_name", "frame_id", "included_in_public_release", "split_partition_name"}
    if not rows or not need <= set(rows[0]):
        raise FormatError(f"{split_csv}: expected the columns {sorted(need)} of {HYPERSIM_SPLIT_CSV}")
    try:
        return [(r["scene_name"], r["camera_name"], int(r["frame_id"])) for r in rows
                if r["split_partition_name"] == partition and r["included_in_public_release"].strip().lower() == "true"]
    except ValueError as err:
        raise FormatError(f"{split_csv}: a frame_id is not an integer ({err})") from None


# --------------------------------------------------------------------------- building the lists

def _rel(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


def hypersim_lines(root: Path, split_csv=None, partition: str = "train") -> dict[str, list[str]]:
    """Every preprocessed frame with its files, 5 columns, in the release's two training lists
    (``filename_list_train_no_nandepth.txt`` for depth, albedo and shading,
    ``filename_list_train_normal.txt`` for normals: the same frames, as the preprocessing
    writes every file of a frame); with ``split_csv`` (ml-hypersim's official scene split)
    only the frames of ``partition`` included in the public release."""

    official = set(hypersim_split_rows(split_csv, partition)) if split_csv is not None else None
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
    out = {f"vkitti_{t}_train.txt": [] for t in VKITTI_ANNOTATIONS}
    for scene in VKITTI_SCENES:
        for variation in VKITTI_VARIATIONS:
            for camera in ("Camera_0", "Camera_1"):
                rgb_dir = root / "original" / scene / variation / "frames" / "rgb" / camera
                for rgb in sorted(rgb_dir.glob("rgb_*.jpg")):
                    number = int(re.search(r"(\d{5})", rgb.name).group(1))
                    has_next = (rgb_dir / f"rgb_{number + 1:05d}.jpg").is_file()
                    for task, (folder, prefix, ext, top) in VKITTI_ANNOTATIONS.items():
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
    return {CITYSCAPES_LIST: [_rel(root, p) for p in sorted((root / "leftImg8bit" / "val").glob("*/*_leftImg8bit.png"))]}


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
    return {KITTI_DEPTH_LIST: lines}


def kitti_flow_lines(root: Path) -> dict[str, list[str]]:
    return {KITTI_FLOW_LIST: [_rel(root, p) for p in sorted((root / "training" / "flow_occ").glob("*_10.png"))]}


def diode_lines(root: Path) -> dict[str, list[str]]:
    lines = []
    for place in ("indoors", "outdoor"):
        for rgb in sorted((root / place).glob("scene_*/scan_*/*.png")):
            depth, mask = rgb.with_name(rgb.stem + "_depth.npy"), rgb.with_name(rgb.stem + "_depth_mask.npy")
            if depth.is_file() and mask.is_file():
                lines.append(" ".join(_rel(root, p) for p in (rgb, depth, mask)))
    return {DIODE_LIST: lines}


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
        raise DatasetLayoutError(f"{name}: dataset root {root} does not exist; expected {LAYOUTS[name]}")
    lists = BUILDERS[name](root, **kwargs)
    if not any(lists.values()):
        raise DatasetLayoutError(f"{name}: found no samples under {root}; expected {LAYOUTS[name]}")
    out_dir = Path(out_dir) if out_dir is not None else REPO_SPLITS / name
    for file, lines in lists.items():
        write_bytes(out_dir / file, ("\n".join(lines) + "\n").encode())
    return lists
