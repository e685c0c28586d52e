"""Raw downloads -> the preprocessed layouts the loaders read (``stablemtl prepare <dataset>``).

``prepare(dataset, raw, out)`` turns a dataset as its authors distribute it into
the files ``stablemtl.data.sources`` reads, with the numbers and the order of
operations of the StableMTL release's preprocessing (astra-vision/StableMTL,
``dataset_preprocess/`` and ``depth-to-normal-translator/``; the code here is the
kit's own):

- ``hypersim``: per-frame HDF5 (``ai_XXX_YYY/images/scene_cam_ZZ_{final,geometry}_hdf5``)
  -> tone-mapped RGB, planar depth, camera-frame normals and their mask, albedo and
  shading PNGs, and the per-task split lists from ``metadata_images_split_scene_v1.csv``;
- ``vkitti``: Virtual KITTI 2 depth -> normals estimated with D2NT v3 (``normal_estimated/``);
- ``flying_things_3d``: the FlyingThings3D subset's .flo / .pfm -> the KITTI-style flow PNG
  (|flow| >= 500 px invalid), the point cloud ``pc1`` and its scene flow (points nearer than 35 m);
- ``mid``: MID test EXRs -> tone-mapped inputs, the albedo, and shading = clip(scale x rgb / albedo);
- ``cityscapes``, ``kitti_depth``, ``kitti_flow``, ``diode``: nothing to convert; the layout is
  checked and every problem is listed at once (the split lists are built when missing).

A preparation is resumable: every file is written atomically, each finished frame
is recorded in a journal (``.stablemtl_prepare.jsonl``) and a rerun skips the frames
whose inputs are unchanged (names, sizes, modification times) and whose recorded
outputs are all present; the manifest (``stablemtl_prepare.json``: counts per kind,
the numbers used, the source, the version) is removed when work starts and written
last. Frames run in a process pool (``workers``). Outputs are a pure function of the
inputs, so a killed and resumed preparation writes the same bytes as an uninterrupted one.

A raw tree written by ``stablemtl.data.raw.write_raw_miniature`` carries
``stablemtl_raw.json`` with the camera of the procedural world at its reduced size
(for KITTI: the benchmark crop, to scale); its numbers then replace the real datasets'
intrinsics, and the output gets the loader overrides (``stablemtl_dataset.json``'s
``geometry``). At the real datasets' sizes (``raw.REAL_SIZES``) a miniature has the real
cameras and crops and carries none. Real downloads have no such file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np

from stablemtl.data import formats

PREPARE_VERSION = 1  # bump when an output changes for the same input
MANIFEST = "stablemtl_prepare.json"
JOURNAL = ".stablemtl_prepare.jsonl"
RAW_META = "stablemtl_raw.json"  # written by raw.write_raw_miniature: the world's camera at its size
RELEASE = "astra-vision/StableMTL"

CONVERTED = ("hypersim", "vkitti", "flying_things_3d", "mid")
CHECKED = ("cityscapes", "kitti_depth", "kitti_flow", "diode")
DATASETS = CONVERTED + CHECKED

# --------------------------------------------------------------------------- the release's numbers
# Each block names the release file it comes from.

# dataset_preprocess/hypersim/preprocess_hypersim.py and hypersim_util.py
HYPERSIM = {
    "width": 1024, "height": 768, "focal": 886.81,  # IMG_WIDTH, IMG_HEIGHT, FOCAL_LENGTH
    "percentile": 90, "brightness": 0.8, "gamma": 1 / 2.2, "eps": 1e-4,  # tone_map / get_tonemap_scale
    "shading_eps": 1e-6,  # shading = rgb / (reflectance + 1e-6)
    "depth_scale": 1000.0, "depth_max": 65.535,  # uint16 millimetres
    "invalid_normal": -987654321.0,  # written at invalid pixels before normalising: (-1, -1, -1) / sqrt(3)
    "partition": "train",  # the release prepares the train partition only
}
HYPERSIM_FILTERED_OUT = (  # frames the release leaves out (filtered_out_list)
    "ai_004_009/rgb_cam_01_fr0000.png", "ai_008_001/rgb_cam_01_fr0000.png", "ai_008_001/rgb_cam_02_fr0000.png",
    "ai_011_005/rgb_cam_01_fr0000.png", "ai_016_009/rgb_cam_00_fr0000.png", "ai_052_002/rgb_cam_01_fr0021.png",
)
HYPERSIM_SPLIT_CSV = "metadata_images_split_scene_v1.csv"
HYPERSIM_LIST_ALL = "filename_list_train.txt"  # 2 columns: rgb, depth
HYPERSIM_LIST_NO_NAN = "filename_list_train_no_nandepth.txt"  # 5 columns; depth, albedo, shading
HYPERSIM_LIST_NORMAL = "filename_list_train_normal.txt"  # 5 columns; normals

# depth-to-normal-translator/python/process_vkitti2.py and utils/myApis.py (D2NT v3)
VKITTI = {"fx": 725.0087, "fy": 725.0087, "cx": 620.5, "cy": 187.0, "depth_scale": 100.0,
          "version": "d2nt_v3", "soft_min_base": float(np.e), "eps": 1e-8}

# dataset_preprocess/flying_things_3D/preprocess.py and utils.py
FT3D = {"baseline": 1.0, "focal": 1050.0, "cx": 479.5, "cy": 269.5, "max_depth": 35.0, "max_flow": 500.0,
        "disparity_eps": 1e-5, "disparity_sign": -1.0, "flow_scale": 64.0}

# dataset_preprocess/mid_intrinsics/preprocess.py
MID = {"percentile": 90, "brightness": 0.8, "gamma": 1 / 2.2, "eps": 1e-4, "jpeg_quality": 75}

RELEASE_FILES = {
    "hypersim": ["dataset_preprocess/hypersim/preprocess_hypersim.py", "dataset_preprocess/hypersim/hypersim_util.py",
                 "dataset_preprocess/hypersim/remove_nan_depth.py"],
    "vkitti": ["depth-to-normal-translator/python/process_vkitti2.py",
               "depth-to-normal-translator/python/utils/myApis.py"],
    "flying_things_3d": ["dataset_preprocess/flying_things_3D/preprocess.py",
                         "dataset_preprocess/flying_things_3D/utils.py"],
    "mid": ["dataset_preprocess/mid_intrinsics/preprocess.py"],
}

# Where the kit's output differs from the release's on purpose (recorded in the manifest).
DEVIATIONS = {
    "hypersim": [
        "normals are saved as float32 .npy (the release saved float64; the loader reads float32 either way)",
        "the normal visualisation PNG is 8-bit RGB (the release's plt.imsave wrote RGBA)",
        "planar depth beyond 65.535 m is written as 0 (invalid) instead of wrapping around in uint16",
        "non-finite normals at otherwise valid pixels are invalid (the release would have stopped)",
        "split lists are written in the csv's order (the release's lists were generated elsewhere)",
        "a frame without any valid pixel is skipped whole (the release still wrote its RGB, with scale 1, and an "
        "all-zero depth)",
    ],
    "vkitti": ["normals are saved as float32 .npy (the release saved float64; the loader reads float32)",
               "the normal visualisation PNG is 8-bit RGB (the release's plt.imsave wrote RGBA)"],
    "flying_things_3d": [
        "only the images the frames use (N and N + 1) are copied (the release copied image_clean/left whole)",
        "the disparity of frame N + 1 is not read: the release used it only for pc2, which it did not save",
        "the empty occ_mask_3d/ folder is not created",
    ],
    "mid": ["JPEGs are encoded with OpenCV at quality 75 (the release used PIL's default, also 75)",
            "0 / 0 in rgb / albedo is written as shading 0 (the release's NaN cast to uint8)"],
}

RAW_TREES = {
    "hypersim": """<raw>/                                  ml-hypersim's scenes folder (evermotion_dataset/scenes)
  metadata_images_split_scene_v1.csv    the official scene split (or pass split_csv= / --split-csv)
  ai_XXX_YYY/
    images/scene_cam_ZZ_final_hdf5/frame.NNNN.color.hdf5
    images/scene_cam_ZZ_final_hdf5/frame.NNNN.diffuse_reflectance.hdf5
    images/scene_cam_ZZ_geometry_hdf5/frame.NNNN.depth_meters.hdf5
    images/scene_cam_ZZ_geometry_hdf5/frame.NNNN.normal_cam.hdf5
    images/scene_cam_ZZ_geometry_hdf5/frame.NNNN.normal_world.hdf5
    images/scene_cam_ZZ_geometry_hdf5/frame.NNNN.position.hdf5
    images/scene_cam_ZZ_geometry_hdf5/frame.NNNN.render_entity_id.hdf5
    _detail/cam_ZZ/camera_keyframe_positions.hdf5""",
    "vkitti": """<raw>/original/SceneXX/<variation>/frames/depth/Camera_K/depth_NNNNN.png
      (vkitti_2.0.3_depth for Scene02, 06, 18, 20 x 15-deg-left, 15-deg-right, clone, morning,
       overcast, sunset x Camera_0, 1; the other parts, rgb/ classSegmentation/ forwardFlow/
       forwardSceneFlow/, beside depth/ for the loader)""",
    "flying_things_3d": """<raw>/train/ (and val/)                the FlyingThings3D subset
  image_clean/left/NNNNNNN.png
  disparity/left/NNNNNNN.pfm
  disparity_change/left/into_future/NNNNNNN.pfm
  flow/left/into_future/NNNNNNN.flo
  flow_occlusions/left/into_future/NNNNNNN.png""",
    "mid": """<raw>/test/<scene>/dir_K_mip2.exr        the MID test set, one EXR per light direction
<raw>/test/<scene>/albedo.exr            the release's albedo of the scene""",
    "cityscapes": """<root>/leftImg8bit/val/<city>/<name>_leftImg8bit.png
<root>/gtFine/val/<city>/<name>_gtFine_labelIds.png
<root>/data_split/cityscapes_val_full.txt   (written when missing)""",
    "kitti_depth": """<root>/<date>/<date>_drive_XXXX_sync/image_02/data/NNNNNNNNNN.png
<root>/<date>_drive_XXXX_sync/proj_depth/groundtruth/image_02/NNNNNNNNNN.png
<root>/data_split/eigen_test_files_with_gt.txt   (the release's list; or pass eigen_list= / --eigen-list)""",
    "kitti_flow": """<root>/training/image_2/NNNNNN_10.png, NNNNNN_11.png
<root>/training/flow_occ/NNNNNN_10.png
<root>/training/disp_occ_0/NNNNNN_10.png, disp_occ_1/NNNNNN_10.png
<root>/training/calib_cam_to_cam/NNNNNN.txt
<root>/data_split/training.txt   (written when missing)""",
    "diode": """<root>/{indoors,outdoor}/scene_XXXXX/scan_XXXXX/<name>.png
  with <name>_depth.npy, <name>_depth_mask.npy, <name>_normal.npy
<root>/data_split/diode_val_all_filename_list.txt   (written when missing)""",
}


def _layout_error(message: str):
    from stablemtl.data.sources import DatasetLayoutError

    return DatasetLayoutError(message)


def _missing_error(dataset: str, raw: Path, missing: list[Path]):
    more = f" (and {len(missing) - 1} more missing)" if len(missing) > 1 else ""
    return _layout_error(f"{dataset}: the raw folder {raw} is not in the expected layout: missing {missing[0]}{more}. "
                         f"Expected:\n{RAW_TREES[dataset]}")


# --------------------------------------------------------------------------- the release's operations

def brightness(rgb: np.ndarray) -> np.ndarray:
    """CCIR601 YIQ brightness 0.3 R + 0.59 G + 0.11 B (Hypersim's and the release's tone mapping)."""
    return 0.3 * rgb[..., 0] + 0.59 * rgb[..., 1] + 0.11 * rgb[..., 2]


def tonemap_scale(rgb: np.ndarray, valid: np.ndarray | None = None, percentile: float = 90,
                  target: float = 0.8, gamma: float = 1 / 2.2, eps: float = 1e-4) -> float:
    """The scale that makes the ``percentile`` brightness of the (valid) pixels ``target`` after the
    gamma: ``target ** (1 / gamma) / p``; 0 when ``p < eps``, 1 without a valid pixel."""
    values = brightness(rgb)
    if valid is not None:
        values = values[valid]
    if values.size == 0:
        return 1.0
    current = float(np.percentile(values, percentile))
    return 0.0 if current < eps else float(np.power(target, 1 / gamma) / current)


def tonemap(rgb: np.ndarray, scale: float, gamma: float = 1 / 2.2) -> np.ndarray:
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


# --------------------------------------------------------------------------- per-frame work

def _hdf5(path: Path, dtype=np.float64) -> np.ndarray:
    return np.asarray(formats.read_hdf5(path), dtype=dtype)


def _copy(src: Path, dst: Path) -> Path:
    return formats._atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))


def _hypersim_frame(job: dict) -> dict:
    """One Hypersim frame: the release's preprocessing of it (albedo and shading first, then RGB and
    depth, then normals; a step without a valid pixel ends the frame)."""
    raw, out, scene, camera, frame, n = Path(job["raw"]), Path(job["out"]), job["scene"], job["camera"], \
        job["frame"], job["numbers"]
    final = raw / scene / "images" / f"scene_{camera}_final_hdf5"
    geometry = raw / scene / "images" / f"scene_{camera}_geometry_hdf5"
    src = lambda folder, kind: folder / f"frame.{frame:04d}.{kind}.hdf5"  # noqa: E731
    name = lambda prefix, ext: f"{scene}/{prefix}_{camera}_fr{frame:04d}.{ext}"  # noqa: E731
    record: dict = {"written": {}, "counts": {}, "depth_nan": False}

    def write(kind: str, rel: str, writer, value) -> None:
        writer(out / rel, value)
        record["written"][kind] = rel

    color = _hdf5(src(final, "color"))
    entity_path = src(geometry, "render_entity_id")
    entity = _hdf5(entity_path, np.int64)
    if (entity == 0).any():
        raise formats.FormatError(f"{entity_path}: render_entity_id holds 0; Hypersim writes -1 (no geometry) "
                                  f"or a positive id")
    hit = entity != -1
    if not hit.any():
        record["skipped"] = "no valid pixel"
        return record
    scale = tonemap_scale(color, hit, n["percentile"], n["brightness"], n["gamma"], n["eps"])
    reflectance = _hdf5(src(final, "diffuse_reflectance"))
    with np.errstate(divide="ignore", invalid="ignore"):
        shading = np.clip(color / (reflectance + n["shading_eps"]), 0, 1)
    write("shading", name("shading", "png"), formats.write_rgb, to_uint8(shading))
    write("albedo", name("albedo", "png"), formats.write_rgb, to_uint8(np.clip(scale * reflectance, 0, 1)))

    distance = _hdf5(src(geometry, "depth_meters"))
    record["depth_nan"] = bool(np.isnan(distance).any())  # the release's depth_nan.txt: NaN anywhere in the file
    write("rgb", name("rgb", "png"), formats.write_rgb, to_uint8(tonemap(color, scale, n["gamma"])))
    h, w = distance.shape
    planar = distance_to_planar(distance, n["focal"] * w / n["width"])
    planar[~hit] = 0
    planar = np.nan_to_num(planar, nan=0.0)
    far = planar > n["depth_max"]
    record["counts"].update(depth_nan_pixels=int(np.isnan(distance[hit]).sum()), depth_beyond_max=int(far.sum()))
    write("depth", name("depth_plane", "png"), formats.write_hypersim_depth, np.where(far, np.nan, planar))

    normal_cam, normal_world = _hdf5(src(geometry, "normal_cam")), _hdf5(src(geometry, "normal_world"))
    position = _hdf5(src(geometry, "position"))
    keyframes_path = raw / scene / "_detail" / camera / "camera_keyframe_positions.hdf5"
    keyframes = _hdf5(keyframes_path)
    if keyframes.ndim != 2 or keyframes.shape[1] != 3 or frame >= len(keyframes):
        raise formats.FormatError(f"{keyframes_path}: expected one camera position (x, y, z) per frame up to "
                                  f"frame {frame}, got shape {keyframes.shape}")
    zero = lambda v: np.all(np.isclose(v, 0.0), axis=-1)  # noqa: E731
    finite = lambda v: np.isfinite(v).all(axis=-1)  # noqa: E731
    valid = hit & finite(position) & ~zero(normal_cam) & ~zero(normal_world) & finite(normal_cam) & finite(normal_world)
    record["counts"]["normal_valid_pixels"] = int(valid.sum())
    if not valid.any():
        record["skipped"] = "no valid normal"
        return record
    normal_cam = normalize_rows(np.where(valid[..., None], normal_cam, n["invalid_normal"]))
    normal_world = normalize_rows(np.where(valid[..., None], normal_world, n["invalid_normal"]))
    to_camera = normalize_rows(np.where(valid[..., None], keyframes[frame] - position, 0.0))
    back = valid & ((normal_world * to_camera).sum(-1) < 0)  # facing away from the camera: flipped
    normal_cam[back] *= -1
    normal_cam[valid, 0] *= -1  # then x negated: the stored normals point away from the camera
    record["counts"]["normal_flipped_pixels"] = int(back.sum())
    write("normal_npy", name("normal_cam", "npy"), formats.write_npy, normal_cam.astype(np.float32))
    write("normal_png", name("normal_cam", "png"), formats.write_rgb, normal_to_rgb(normal_cam))
    write("normal_mask", name("normal_valid_mask", "npy"), formats.write_npy, valid)
    return record


def _vkitti_frame(job: dict) -> dict:
    """One Virtual KITTI 2 depth map -> D2NT v3 normals (.npy and the visualisation .png)."""
    n = job["numbers"]
    depth_path = Path(job["source"]) / job["depth"]
    depth = formats._read_png(depth_path, np.uint16, 1, "a vKITTI 2 16-bit depth PNG (cm)").astype(np.float64)
    normal = d2nt_normals(depth / n["depth_scale"], n["fx"], n["fy"], n["cx"], n["cy"], n["soft_min_base"], n["eps"])
    stem = job["depth"].replace("/depth/", "/normal/").replace("depth_", "normal_")[: -len(".png")]
    record: dict = {"written": {"normal_npy": f"normal_estimated/{stem}.npy",
                                "normal_png": f"normal_estimated/{stem}.png"}, "counts": {}}
    out = Path(job["out"])
    formats.write_npy(out / record["written"]["normal_npy"], normal.astype(np.float32))
    formats.write_rgb(out / record["written"]["normal_png"], normal_to_rgb(normal))
    return record


def _ft3d_frame(job: dict) -> dict:
    """One FlyingThings3D subset frame: the point cloud of frame N, its scene flow and the flow PNG."""
    split, i, n = job["split"], job["index"], job["numbers"]
    raw, out = Path(job["raw"]) / split, Path(job["out"])
    sign = np.float32(n["disparity_sign"])  # the subset stores disparities negated
    disp1 = sign * formats.read_pfm(raw / "disparity" / "left" / f"{i:07d}.pfm")
    change = sign * formats.read_pfm(raw / "disparity_change" / "left" / "into_future" / f"{i:07d}.pfm")
    flow = formats.read_flo(raw / "flow" / "left" / "into_future" / f"{i:07d}.flo")
    if disp1.ndim != 2 or disp1.shape != change.shape or disp1.shape != flow.shape[:2]:
        raise formats.FormatError(f"{raw}: frame {i:07d}: disparity {disp1.shape}, disparity change {change.shape} "
                                  f"and flow {flow.shape[:2]} must be single-channel maps of one size")
    disparities = disp1[np.isfinite(disp1)]
    if disparities.size and np.median(disparities) <= 0:
        raise formats.FormatError(
            f"{raw / 'disparity' / 'left' / f'{i:07d}.pfm'}: the disparities are positive as stored, but the "
            f"FlyingThings3D subset stores them negated (the release negates them): is this the full FlyingThings3D?")
    b, f, cx, cy, eps = n["baseline"], n["focal"], n["cx"], n["cy"], n["disparity_eps"]
    pc1 = disparity_to_points(disp1, b, f, cx, cy, eps=eps)
    flow_3d = disparity_to_points(disp1 + change, b, f, cx, cy, flow, eps) - pc1
    near = pc1[..., 2] < n["max_depth"]
    pc1, flow_3d = pc1[near], flow_3d[near]
    finite = ~np.isnan(pc1.sum(-1) + flow_3d.sum(-1))
    pc1, flow_3d = pc1[finite], flow_3d[finite]
    fast = ~((np.abs(flow[..., 0]) < n["max_flow"]) & (np.abs(flow[..., 1]) < n["max_flow"]))
    written = {"image": f"{split}/image_clean/{i:07d}.png", "image_next": f"{split}/image_clean/{i + 1:07d}.png",
               "occ_mask_2d": f"{split}/occ_mask_2d/{i:07d}.png", "flow_2d": f"{split}/flow_2d/{i:07d}.png",
               "pc": f"{split}/pc/{i:07d}.npz", "flow_3d": f"{split}/flow_3d/{i:07d}.npy"}
    _copy(raw / "image_clean" / "left" / f"{i:07d}.png", out / written["image"])
    _copy(raw / "image_clean" / "left" / f"{i + 1:07d}.png", out / written["image_next"])
    _copy(raw / "flow_occlusions" / "left" / "into_future" / f"{i:07d}.png", out / written["occ_mask_2d"])
    formats.write_kitti_flow(out / written["flow_2d"], np.where(fast[..., None], 0.0, flow), ~fast)
    formats.write_npz(out / written["pc"], pc1=pc1)
    formats.write_npy(out / written["flow_3d"], flow_3d)
    counts = {"points": int(len(pc1)), "points_beyond_max_depth": int((~near).sum()),
              "points_not_finite": int((~finite).sum()), "flow_pixels_too_fast": int(fast.sum())}
    return {"written": written, "counts": counts}


def _mid_image(job: dict) -> dict:
    """One MID image: tone-mapped input (and the scaled-only one), the albedo, shading = rgb / albedo."""
    raw, out, scene, stem, n = Path(job["raw"]), Path(job["out"]), job["scene"], job["stem"], job["numbers"]
    hdr = formats.read_exr(raw / "test" / scene / f"{stem}.exr", channels=("R", "G", "B"))
    albedo = formats.read_exr(raw / "test" / scene / "albedo.exr", channels=("R", "G", "B"))
    if albedo.shape != hdr.shape:
        raise formats.FormatError(f"{raw / 'test' / scene / 'albedo.exr'}: size {albedo.shape[:2]} differs from "
                                  f"{stem}.exr's {hdr.shape[:2]}")
    scale = tonemap_scale(hdr, None, n["percentile"], n["brightness"], n["gamma"], n["eps"])
    scaled = np.clip(scale * hdr, 0, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        shading = np.nan_to_num(np.clip(scaled / albedo, 0, 1), nan=0.0)
    prefix = f"test/{scene}_{stem}"
    written = {"rgb": f"{prefix}.jpg", "rgb_scaled_only": f"{prefix}_scaled_only.jpg",
               "albedo": f"{prefix}_albedo.jpg", "shading": f"{prefix}_shading.jpg"}
    q = n["jpeg_quality"]
    formats.write_rgb(out / written["rgb_scaled_only"], to_uint8(scaled), quality=q)
    formats.write_rgb(out / written["rgb"], to_uint8(tonemap(hdr, scale, n["gamma"])), quality=q)
    formats.write_rgb(out / written["albedo"], to_uint8(np.clip(albedo, 0, 1)), quality=q)
    formats.write_rgb(out / written["shading"], to_uint8(shading), quality=q)
    return {"written": written, "counts": {"albedo_zero_pixels": int((albedo == 0).any(-1).sum())}}


# --------------------------------------------------------------------------- the resumable frame runner

def _config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _read_journal(path: Path, config: str) -> dict[str, dict]:
    """Finished frames of a previous run with the same configuration (a torn last line is ignored)."""
    done: dict[str, dict] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(entry, dict) and entry.get("config") == config and "key" in entry:
                done[entry["key"]] = entry["record"]
    return done


def _complete(out: Path, record: dict, inputs: str) -> bool:
    """A frame is done when its inputs are unchanged and every output it recorded is present."""
    return record.get("inputs") == inputs and all(
        (out / rel).is_file() and (out / rel).stat().st_size > 0 for rel in record["written"].values())


def _fingerprint(paths) -> str:
    """The inputs' names, sizes and modification times: a changed raw file makes its frame run again."""
    stats = []
    for path in paths:
        try:
            stat = os.stat(path)
            stats.append((str(path), stat.st_size, stat.st_mtime_ns))
        except OSError:
            stats.append((str(path), None, None))
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:16]


def _run_frames(dataset: str, jobs: list[tuple[str, dict]], work: Callable[[dict], dict], out: Path, config: dict,
                workers: int | None, progress: bool) -> dict[str, dict]:
    """Run ``work`` on every job not finished before (journal + outputs present); returns key -> record."""
    from concurrent.futures import ProcessPoolExecutor

    from tqdm.auto import tqdm

    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # a manifest always describes a finished preparation
    digest = _config_hash(config)
    journal = out / JOURNAL
    previous = _read_journal(journal, digest)
    inputs = {key: _fingerprint(job.get("inputs", ())) for key, job in jobs}
    records = {key: previous[key] for key, _ in jobs if key in previous and _complete(out, previous[key], inputs[key])}
    todo = [(key, {k: v for k, v in job.items() if k != "inputs"}) for key, job in jobs if key not in records]
    workers = max(1, min(workers or os.cpu_count() or 1, len(todo) or 1))
    bar = tqdm(total=len(jobs), initial=len(records), desc=f"prepare {dataset}", unit="frame",
               disable=not progress, leave=False)
    try:
        with open(journal, "a") as log:
            def finished(key: str, record: dict) -> None:
                records[key] = record = {**record, "inputs": inputs[key]}
                log.write(json.dumps({"config": digest, "key": key, "record": record}, sort_keys=True) + "\n")
                log.flush()
                bar.update()

            if workers > 1:
                with ProcessPoolExecutor(workers) as pool:
                    try:
                        for (key, _), record in zip(todo, pool.map(work, [job for _, job in todo])):
                            finished(key, record)
                    except BaseException:
                        pool.shutdown(wait=True, cancel_futures=True)
                        raise
            else:
                for key, job in todo:
                    finished(key, work(job))
    finally:
        bar.close()
    return {key: records[key] for key, _ in jobs}


# --------------------------------------------------------------------------- datasets

def _raw_meta(raw: Path) -> dict:
    return formats.read_json_if_present(raw / RAW_META)


def _find_split_csv(raw: Path, split_csv) -> Path:
    if split_csv is not None:
        if not Path(split_csv).is_file():
            raise _layout_error(f"hypersim: split csv {split_csv} does not exist")
        return Path(split_csv)
    candidates = [raw / HYPERSIM_SPLIT_CSV, raw.parent / "analysis" / HYPERSIM_SPLIT_CSV]
    for path in candidates:
        if path.is_file():
            return path
    raise _layout_error(f"hypersim: no {HYPERSIM_SPLIT_CSV} (the official scene split of ml-hypersim); looked for "
                        + ", ".join(str(p) for p in candidates) + "; pass split_csv= (--split-csv). Expected:\n"
                        + RAW_TREES["hypersim"])


def _hypersim_rows(split_csv: Path, partition: str) -> list[tuple[str, str, int]]:
    """(scene, camera, frame) of ``partition`` included in the public release, in the csv's order."""
    import csv

    with open(split_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    need = {"scene_name", "camera_name", "frame_id", "included_in_public_release", "split_partition_name"}
    if not rows or not need <= set(rows[0]):
        raise formats.FormatError(f"{split_csv}: expected the columns {sorted(need)} of {HYPERSIM_SPLIT_CSV}")
    try:
        return [(r["scene_name"], r["camera_name"], int(r["frame_id"])) for r in rows
                if r["split_partition_name"] == partition and r["included_in_public_release"].strip().lower() == "true"]
    except ValueError as err:
        raise formats.FormatError(f"{split_csv}: a frame_id is not an integer ({err})") from None


HYPERSIM_INPUTS = (("final", "color"), ("final", "diffuse_reflectance"), ("geometry", "depth_meters"),
                   ("geometry", "normal_cam"), ("geometry", "normal_world"), ("geometry", "position"),
                   ("geometry", "render_entity_id"))


def _prepare_hypersim(raw: Path, out: Path, meta: dict, workers, progress, split_csv=None) -> dict:
    geometry = meta.get("geometry") or {}
    numbers = dict(HYPERSIM)
    if geometry:  # a procedural miniature: its focal at its own width
        numbers.update(focal=float(geometry["focal"]), width=int(geometry["size"][1]), height=int(geometry["size"][0]))
    csv_path = _find_split_csv(raw, split_csv)
    rows = _hypersim_rows(csv_path, numbers["partition"])
    if not rows:
        raise formats.FormatError(f"{csv_path}: no frame of the {numbers['partition']!r} partition is in the "
                                  f"public release")
    missing, jobs, filtered = [], [], []
    for scene, camera, frame in rows:
        if f"{scene}/rgb_{camera}_fr{frame:04d}.png" in HYPERSIM_FILTERED_OUT:
            filtered.append(f"{scene}/{camera}/{frame:04d}")
            continue
        folder = raw / scene / "images"
        inputs = [folder / f"scene_{camera}_{kind}_hdf5" / f"frame.{frame:04d}.{name}.hdf5" for kind, name in
                  HYPERSIM_INPUTS] + [raw / scene / "_detail" / camera / "camera_keyframe_positions.hdf5"]
        missing += [path for path in inputs if not path.is_file()]
        jobs.append((f"{scene}/{camera}/{frame:04d}", dict(raw=str(raw), out=str(out), scene=scene, camera=camera,
                                                           frame=frame, numbers=numbers, inputs=inputs)))
    if missing:
        raise _missing_error("hypersim", raw, sorted(set(missing), key=missing.index))
    config = {"dataset": "hypersim", "numbers": numbers, "version": PREPARE_VERSION}
    records = _run_frames("hypersim", jobs, _hypersim_frame, out, config, workers, progress)
    lists: dict[str, list[str]] = {HYPERSIM_LIST_ALL: [], HYPERSIM_LIST_NO_NAN: [], HYPERSIM_LIST_NORMAL: []}
    five = ("rgb", "depth", "normal_npy", "normal_png", "normal_mask")
    for record in records.values():
        w = record["written"]
        if "rgb" in w and "depth" in w:
            lists[HYPERSIM_LIST_ALL].append(f"{w['rgb']} {w['depth']}")
        if all(k in w for k in five):
            line = " ".join(w[k] for k in five)
            lists[HYPERSIM_LIST_NORMAL].append(line)
            if not record["depth_nan"] and "albedo" in w and "shading" in w:
                lists[HYPERSIM_LIST_NO_NAN].append(line)
    extra = {"split_csv": str(csv_path), "frames_filtered_out": filtered,
             "frames_with_nan_depth": sum(r["depth_nan"] for r in records.values())}
    return dict(numbers=numbers, records=records, lists=lists, geometry=geometry, extra=extra)


def _vkitti_source(raw: Path) -> Path:
    """The folder holding SceneXX/: ``<raw>/original`` (the kit's layout) or ``<raw>`` itself."""
    if (raw / "original").is_dir():
        return raw / "original"
    if any(raw.glob("Scene*")):
        return raw
    raise _missing_error("vkitti", raw, [raw / "original"])


def _prepare_vkitti(raw: Path, out: Path, meta: dict, workers, progress) -> dict:
    from stablemtl.data import splits

    geometry = meta.get("geometry") or {}
    numbers = dict(VKITTI)
    if geometry:
        numbers.update(fx=float(geometry["focal"]), fy=float(geometry["focal"]), cx=float(geometry["cx"]),
                       cy=float(geometry["cy"]))
    source = _vkitti_source(raw)
    folders = [f"{s}/{v}/frames/depth/Camera_{c}" for s in splits.VKITTI_SCENES for v in splits.VKITTI_VARIATIONS
               for c in (0, 1)]
    depths = [p.relative_to(source).as_posix() for f in folders for p in sorted((source / f).glob("depth_*.png"))]
    if not depths:
        raise _missing_error("vkitti", raw, [source / folders[0] / "depth_00000.png"])
    original = out / "original"
    if not original.exists():  # the loader reads original/ beside normal_estimated/
        out.mkdir(parents=True, exist_ok=True)
        original.symlink_to(source.resolve(), target_is_directory=True)
    elif not original.resolve().samefile(source):
        raise _layout_error(f"vkitti: {original} exists and is not the raw data {source}; give --out a new folder "
                            f"or the folder that holds original/")
    jobs = [(d, dict(source=str(source), out=str(out), depth=d, numbers=numbers, inputs=[source / d])) for d in depths]
    config = {"dataset": "vkitti", "numbers": numbers, "version": PREPARE_VERSION}
    records = _run_frames("vkitti", jobs, _vkitti_frame, out, config, workers, progress)
    lists = splits.vkitti_lines(out)
    found = {f for f in folders if (source / f).is_dir()}
    extra = {"depth_folders_found": len(found), "depth_folders_missing": sorted(set(folders) - found)}
    return dict(numbers=numbers, records=records, lists=lists, geometry=geometry, extra=extra)


FT3D_INPUTS = ("disparity/left/{i:07d}.pfm", "disparity_change/left/into_future/{i:07d}.pfm",
               "flow/left/into_future/{i:07d}.flo", "flow_occlusions/left/into_future/{i:07d}.png",
               "image_clean/left/{i:07d}.png", "image_clean/left/{n:07d}.png")


def _prepare_ft3d(raw: Path, out: Path, meta: dict, workers, progress) -> dict:
    geometry = meta.get("geometry") or {}
    numbers = dict(FT3D)
    if geometry:
        numbers.update({k: float(geometry[k]) for k in ("focal", "cx", "cy", "baseline") if k in geometry})
    splits_found = [s for s in ("train", "val") if (raw / s).is_dir()]
    if not splits_found:
        raise _missing_error("flying_things_3d", raw, [raw / "train" / "flow" / "left" / "into_future"])
    jobs, missing, lists = [], [], {}
    for split in splits_found:
        flows = sorted((raw / split / "flow" / "left" / "into_future").glob("*.flo"))
        if not flows:
            missing.append(raw / split / "flow" / "left" / "into_future" / "0000000.flo")
        for flo in flows:
            i = int(flo.stem)
            inputs = [raw / split / pattern.format(i=i, n=i + 1) for pattern in FT3D_INPUTS]
            missing += [path for path in inputs if not path.is_file()]
            jobs.append((f"{split}/{i:07d}", dict(raw=str(raw), out=str(out), split=split, index=i, numbers=numbers,
                                                  inputs=inputs)))
        lists[f"{split}.txt"] = [f"{split}/flow_2d/{int(f.stem):07d}.png" for f in flows]
    if missing:
        raise _missing_error("flying_things_3d", raw, missing)
    config = {"dataset": "flying_things_3d", "numbers": numbers, "version": PREPARE_VERSION}
    records = _run_frames("flying_things_3d", jobs, _ft3d_frame, out, config, workers, progress)
    return dict(numbers=numbers, records=records, lists=lists, geometry=geometry, extra={"splits": splits_found})


def _prepare_mid(raw: Path, out: Path, meta: dict, workers, progress) -> dict:
    numbers = dict(MID)
    scenes = sorted(p for p in (raw / "test").glob("*") if p.is_dir())
    if not scenes:
        raise _missing_error("mid", raw, [raw / "test" / "<scene>" / "dir_0_mip2.exr"])
    jobs, missing = [], []
    for scene in scenes:
        images = sorted(scene.glob("*mip2.exr"))
        if not images:
            missing.append(scene / "dir_0_mip2.exr")
        if not (scene / "albedo.exr").is_file():
            missing.append(scene / "albedo.exr")
        for image in images:
            stem = image.name.split(".")[0]
            jobs.append((f"{scene.name}/{stem}", dict(raw=str(raw), out=str(out), scene=scene.name, stem=stem,
                                                      numbers=numbers, inputs=[image, scene / "albedo.exr"])))
    if missing:
        raise _missing_error("mid", raw, missing)
    config = {"dataset": "mid", "numbers": numbers, "version": PREPARE_VERSION}
    records = _run_frames("mid", jobs, _mid_image, out, config, workers, progress)
    lists = {"test.txt": sorted(r["written"]["rgb"] for r in records.values())}
    return dict(numbers=numbers, records=records, lists=lists, geometry=meta.get("geometry") or {}, extra={})


# --------------------------------------------------------------------------- the layout checks

_CHECK_LISTS = {"cityscapes": "cityscapes_val_full.txt", "kitti_depth": "eigen_test_files_with_gt.txt",
                "kitti_flow": "training.txt", "diode": "diode_val_all_filename_list.txt"}
EXPECTED_IMAGES = {"cityscapes": 500, "kitti_depth": 652, "kitti_flow": 200, "diode": 771}


def _line_files(dataset: str, line: list[str]) -> list[str]:
    """The files one split-list line needs (the loader's reads)."""
    if dataset == "cityscapes":
        from stablemtl.data.sources import Cityscapes

        return [line[0], Cityscapes.label_path(line[0])]
    if dataset == "kitti_depth":
        return [line[0]] + ([line[1]] if len(line) > 1 and line[1] != "None" else [])
    if dataset == "kitti_flow":
        flow = line[0]
        image = flow.replace("flow_occ/", "image_2/", 1)
        calib = flow.replace("flow_occ/", "calib_cam_to_cam/", 1).replace("_10.png", ".txt")
        return [image, image.replace("_10.", "_11."), flow, flow.replace("flow_occ/", "disp_occ_0/", 1),
                flow.replace("flow_occ/", "disp_occ_1/", 1), calib]
    return list(line[:3]) + [line[1].replace("_depth.npy", "_normal.npy")]  # diode


def check_layout(dataset: str, root, eigen_list=None) -> tuple[list[str], dict[str, list[str]], dict]:
    """Every problem of an evaluation dataset's folder at once: ``(problems, lists to write, counts)``.

    The split list is read from ``<root>/data_split/`` or the repository's ``data_split/<dataset>/``;
    when there is none it is built from the folder (``stablemtl.data.splits``; KITTI Eigen needs the
    official list, ``eigen_list``), and each listed file is checked.
    """
    from stablemtl.data import splits
    from stablemtl.data.sources import REPO_SPLITS

    if dataset not in CHECKED:
        raise ValueError(f"check_layout checks {', '.join(CHECKED)}; got {dataset!r}")
    root = Path(root)
    if not root.is_dir():
        return [f"the folder {root} does not exist"], {}, {}
    file = _CHECK_LISTS[dataset]
    found = next((p for p in (root / "data_split" / file, REPO_SPLITS / dataset / file) if p.is_file()), None)
    problems: list[str] = []
    build: dict[str, list[str]] = {}
    if found is not None:
        lines = [line.split() for line in found.read_text().splitlines() if line.strip() and not line.startswith("#")]
    elif dataset == "kitti_depth" and eigen_list is None:
        problems.append(f"no split list {file} in {root / 'data_split'}: give the official Eigen test list "
                        f"(the release's data_split/kitti/{file}) as eigen_list= / --eigen-list")
        lines = [line.split() for line in splits.kitti_depth_lines(root)[file]]
    else:
        kwargs = {"eigen_list": eigen_list} if dataset == "kitti_depth" else {}
        build = splits.BUILDERS[dataset](root, **kwargs)
        lines = [line.split() for line in build[file]]
    if not lines:
        problems.append(f"no sample found (split list {found or file} is empty)")
    listed = set()
    columns = {"cityscapes": 1, "kitti_depth": 2, "kitti_flow": 1, "diode": 3}[dataset]
    for number, line in enumerate(lines, 1):
        if len(line) < columns:
            problems.append(f"{found or file}: line {number} has {len(line)} column(s), expected {columns}")
            continue
        for rel in _line_files(dataset, line):
            if rel not in listed:
                listed.add(rel)
                if not (root / rel).is_file():
                    problems.append(f"missing {root / rel}")
    samples = sum(1 for line in lines if dataset != "kitti_depth" or (len(line) > 1 and line[1] != "None"))
    counts = {"samples": samples, "expected_samples": EXPECTED_IMAGES[dataset], "files_checked": len(listed),
              "split_list": str(found) if found else f"{root / 'data_split' / file} (built)"}
    return problems, build, counts


def _check(dataset: str, raw: Path, eigen_list=None) -> dict:
    problems, build, counts = check_layout(dataset, raw, eigen_list)
    if problems:
        shown = "\n".join(f"  - {p}" for p in problems)
        raise _layout_error(f"{dataset}: {len(problems)} problem(s) in {raw}:\n{shown}\n"
                            f"Expected:\n{RAW_TREES[dataset]}")
    geometry = _raw_meta(raw).get("geometry") or {}  # a procedural miniature's crops at its size (KITTI's)
    return dict(numbers={}, records={}, lists=build, geometry=geometry, extra=counts)


# --------------------------------------------------------------------------- the entry point

def default_out(dataset: str, base=None) -> Path:
    """``<base>/<the source's directory>``, ``base`` defaulting to ``$PREPROCESSED_DIR``; an error naming
    the fix when neither is given."""
    from stablemtl.data.sources import SOURCES

    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; valid: {', '.join(DATASETS)}")
    hint = SOURCES[dataset].root_hint
    base = base or os.environ.get("PREPROCESSED_DIR")
    if not base:
        raise ValueError(f"prepare {dataset}: give the output folder (out= / --out), or set PREPROCESSED_DIR "
                         f"(the output then goes to $PREPROCESSED_DIR/{hint})")
    return Path(base) / hint


def _kinds(records: dict) -> dict[str, int]:
    counts: dict[str, int] = {}
    for record in records.values():
        for kind in record["written"]:
            counts[kind] = counts.get(kind, 0) + 1
    return dict(sorted(counts.items()))


def _summed(records: dict) -> dict[str, int]:
    total: dict[str, int] = {}
    for record in records.values():
        for key, value in record.get("counts", {}).items():
            total[key] = total.get(key, 0) + value
    return dict(sorted(total.items()))


def _link_in_place(dataset: str, raw: Path, out: Path) -> None:
    """A checked dataset stays where it is: ``out`` becomes a link to ``raw`` (or already is ``raw``)."""
    if out.exists():
        if not out.resolve().samefile(raw):
            raise _layout_error(f"{dataset}: {out} exists and is not the dataset {raw}; nothing is converted for "
                                f"{dataset}, so give --out {raw} (or a folder that does not exist yet: it becomes "
                                f"a link)")
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.symlink_to(raw.resolve(), target_is_directory=True)


def prepare(dataset: str, raw, out=None, workers: int | None = None, progress: bool = True, *,
            split_csv=None, eigen_list=None) -> dict:
    """Prepare ``dataset`` from its raw download in ``raw`` into ``out`` (default
    ``$PREPROCESSED_DIR/<the source's directory>``); returns the manifest, also written to
    ``<out>/stablemtl_prepare.json`` once everything else is.

    ``workers`` processes convert frames in parallel (default: every CPU); a rerun resumes.
    ``split_csv``: Hypersim's ``metadata_images_split_scene_v1.csv`` when it is not in ``raw``;
    ``eigen_list``: the KITTI Eigen test list when ``raw/data_split/`` has none.
    A wrong layout raises ``DatasetLayoutError`` naming the first missing file and the expected tree;
    a corrupt file raises ``FormatError`` naming it.
    """
    import stablemtl
    from stablemtl.data.sources import META_FILE, SOURCES

    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; valid: {', '.join(DATASETS)}")
    raw = Path(raw)
    if not raw.is_dir():
        raise _layout_error(f"{dataset}: the raw folder {raw} does not exist. Expected:\n{RAW_TREES[dataset]}")
    out = Path(out) if out is not None else default_out(dataset)
    if dataset in CHECKED:
        result = _check(dataset, raw, eigen_list)
        _link_in_place(dataset, raw, out)
    else:
        meta = _raw_meta(raw)
        if dataset == "hypersim":
            result = _prepare_hypersim(raw, out, meta, workers, progress, split_csv)
        else:
            result = {"vkitti": _prepare_vkitti, "flying_things_3d": _prepare_ft3d,
                      "mid": _prepare_mid}[dataset](raw, out, meta, workers, progress)
    records = result["records"]
    for file, lines in result["lists"].items():
        formats._write_bytes(out / "data_split" / file, "".join(line + "\n" for line in lines).encode())
    if result["geometry"]:  # a procedural miniature: the loader's overrides for its size
        formats._write_bytes(out / META_FILE, json.dumps(
            {"procedural": True, "prepared": True, "source": SOURCES[dataset].__name__,
             "geometry": result["geometry"]}, indent=1, sort_keys=True).encode())
    skipped: dict[str, int] = {}
    for record in records.values():
        if record.get("skipped"):
            skipped[record["skipped"]] = skipped.get(record["skipped"], 0) + 1
    manifest = {
        "dataset": dataset, "source": SOURCES[dataset].__name__, "raw": str(raw.resolve()), "out": str(out.resolve()),
        "action": "check" if dataset in CHECKED else "convert",
        "prepare_version": PREPARE_VERSION, "kit_version": stablemtl.__version__,
        "release": {"repository": RELEASE, "files": RELEASE_FILES.get(dataset, [])},
        "numbers": result["numbers"], "geometry": result["geometry"] or None,
        "frames": {"total": len(records), "skipped": dict(sorted(skipped.items()))},
        "written": _kinds(records), "counts": _summed(records),
        "lists": {file: len(lines) for file, lines in sorted(result["lists"].items())},
        "details": result["extra"], "deviations_from_release": DEVIATIONS.get(dataset, []),
    }
    formats._write_bytes(out / MANIFEST, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
    return manifest


# --------------------------------------------------------------------------- the command line

def cmd_prepare(args) -> int:
    """``stablemtl prepare``: prepare one dataset and print what was written (exit 2 on bad input)."""
    from stablemtl.data.sources import DatasetLayoutError

    try:
        manifest = prepare(args.dataset, args.raw, args.out, args.workers, progress=not args.quiet,
                           split_csv=args.split_csv, eigen_list=args.eigen_list)
    except (DatasetLayoutError, formats.FormatError, ValueError) as err:
        import sys

        print(f"stablemtl prepare: {err}", file=sys.stderr)
        return 2
    frames = manifest["frames"]
    what = "checked" if manifest["action"] == "check" else f"{frames['total']} frame(s) prepared"
    print(f"{manifest['dataset']}: {what} in {manifest['out']}")
    for kind, count in manifest["written"].items():
        print(f"  {kind:<16} {count}")
    for file, count in manifest["lists"].items():
        print(f"  data_split/{file}: {count} line(s)")
    if frames["skipped"]:
        print(f"  skipped: {frames['skipped']}")
    print(f"  manifest: {Path(manifest['out']) / MANIFEST}")
    return 0


def add_prepare_parser(subparsers) -> None:
    """Register ``stablemtl prepare <dataset> --raw DIR [--out DIR] [--workers N] [--quiet]`` on an
    ``argparse`` sub-parser set; the parsed arguments carry ``func`` (``cmd_prepare``)."""
    p = subparsers.add_parser(
        "prepare", help="convert a raw dataset download into the layout the kit reads",
        description="Convert a raw download (Hypersim HDF5, Virtual KITTI 2 depth, the FlyingThings3D subset, "
                    "MID EXR) into the StableMTL release's preprocessed layout, or check the layout of Cityscapes, "
                    "KITTI and DIODE. Resumable; writes stablemtl_prepare.json last.")
    p.add_argument("dataset", choices=DATASETS)
    p.add_argument("--raw", required=True,
                   help="the raw download's folder (see README.md, 'Preparing the raw datasets')")
    p.add_argument("--out", default=None, help="the output folder (default: $PREPROCESSED_DIR/<dataset's folder>)")
    p.add_argument("--workers", type=int, default=None, help="processes converting frames (default: every CPU)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--split-csv", default=None,
                   help=f"hypersim: {HYPERSIM_SPLIT_CSV} when it is not in the raw folder")
    p.add_argument("--eigen-list", default=None,
                   help="kitti_depth: the official Eigen test list when the folder has no data_split/")
    p.set_defaults(func=cmd_prepare)
