"""Hypersim: the release's preprocessing (``dataset_preprocess/hypersim/``) of the per-frame HDF5 of
ml-hypersim's scenes into tone-mapped RGB, planar depth, camera-frame normals and their mask,
albedo and shading PNGs, and the per-task split lists of the official scene split's
``train`` partition (``splits.HYPERSIM_SPLIT_CSV``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stablemtl.data import annotations, formats
from stablemtl.data.convert.common import PREPARE_VERSION, RAW_TREES, missing_error, run_frames
from stablemtl.data.formats import DatasetLayoutError
from stablemtl.data.imaging import (TONEMAP, distance_to_planar, normal_to_rgb, normalize_rows, to_uint8, tonemap,
                                    tonemap_scale)
from stablemtl.data.splits import (HYPERSIM_LIST_ALL, HYPERSIM_LIST_NO_NAN, HYPERSIM_LIST_NORMAL, HYPERSIM_SPLIT_CSV,
                                   hypersim_split_rows)
from stablemtl.data.training_sources import Hypersim

# dataset_preprocess/hypersim/preprocess_hypersim.py and hypersim_util.py
HYPERSIM = {
    # IMG_WIDTH, IMG_HEIGHT, FOCAL_LENGTH: the camera the loader assumes too (``Hypersim.geometry``)
    "width": Hypersim.geometry["size"][1], "height": Hypersim.geometry["size"][0], "focal": Hypersim.geometry["focal"],
    **TONEMAP,  # tone_map / get_tonemap_scale
    "shading_eps": 1e-6,  # shading = rgb / (reflectance + 1e-6)
    "depth_scale": annotations.HYPERSIM_DEPTH_SCALE, "depth_max": annotations.HYPERSIM_DEPTH_MAX,  # uint16 millimetres
    "invalid_normal": -987654321.0,  # written at invalid pixels before normalising: (-1, -1, -1) / sqrt(3)
    "partition": "train",  # the release prepares the train partition only
}
HYPERSIM_FILTERED_OUT = (  # frames the release leaves out (filtered_out_list)
    "ai_004_009/rgb_cam_01_fr0000.png", "ai_008_001/rgb_cam_01_fr0000.png", "ai_008_001/rgb_cam_02_fr0000.png",
    "ai_011_005/rgb_cam_01_fr0000.png", "ai_016_009/rgb_cam_00_fr0000.png", "ai_052_002/rgb_cam_01_fr0021.png",
)
RELEASE_FILES = ["dataset_preprocess/hypersim/preprocess_hypersim.py", "dataset_preprocess/hypersim/hypersim_util.py",
                 "dataset_preprocess/hypersim/remove_nan_depth.py"]
# Where the kit's output differs from the release's on purpose (recorded in the manifest).
DEVIATIONS = [
    "normals are saved as float32 .npy (the release saved float64; the loader reads float32 either way)",
    "the normal visualisation PNG is 8-bit RGB (the release's plt.imsave wrote RGBA)",
    "planar depth beyond 65.535 m is written as 0 (invalid) instead of wrapping around in uint16",
    "non-finite normals at otherwise valid pixels are invalid (the release would have stopped)",
    "split lists are written in the csv's order (the release's lists were generated elsewhere)",
    "a frame without any valid pixel is skipped whole (the release still wrote its RGB, with scale 1, and an "
    "all-zero depth)",
]
HYPERSIM_INPUTS = (("final", "color"), ("final", "diffuse_reflectance"), ("geometry", "depth_meters"),
                   ("geometry", "normal_cam"), ("geometry", "normal_world"), ("geometry", "position"),
                   ("geometry", "render_entity_id"))


def _hdf5(path: Path, dtype=np.float64) -> np.ndarray:
    return np.asarray(formats.read_hdf5(path), dtype=dtype)


def convert_frame(job: dict) -> dict:
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
    write("depth", name("depth_plane", "png"), annotations.write_hypersim_depth, np.where(far, np.nan, planar))

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


def _find_split_csv(raw: Path, split_csv) -> Path:
    """``split_csv``, or the official split beside the raw scenes (or in ml-hypersim's ``analysis/``)."""
    if split_csv is not None:
        if not Path(split_csv).is_file():
            raise DatasetLayoutError(f"hypersim: split csv {split_csv} does not exist")
        return Path(split_csv)
    candidates = [raw / HYPERSIM_SPLIT_CSV, raw.parent / "analysis" / HYPERSIM_SPLIT_CSV]
    for path in candidates:
        if path.is_file():
            return path
    raise DatasetLayoutError(f"hypersim: no {HYPERSIM_SPLIT_CSV} (the official scene split of ml-hypersim); "
                             "looked for " + ", ".join(str(p) for p in candidates) + "; pass split_csv= (--split-csv). "
                             "Expected:\n" + RAW_TREES["hypersim"])


def convert(raw: Path, out: Path, meta: dict, workers, progress, split_csv=None) -> dict:
    """Convert the frames of the official split's train partition (``split_csv``, else found beside
    ``raw``); returns the preparation's numbers, records, lists, geometry and details."""
    geometry = meta.get("geometry") or {}
    numbers = dict(HYPERSIM)
    if geometry:  # a procedural miniature: its focal at its own width
        numbers.update(focal=float(geometry["focal"]), width=int(geometry["size"][1]), height=int(geometry["size"][0]))
    csv_path = _find_split_csv(raw, split_csv)
    rows = hypersim_split_rows(csv_path, numbers["partition"])
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
        raise missing_error("hypersim", raw, sorted(set(missing), key=missing.index))
    config = {"dataset": "hypersim", "numbers": numbers, "version": PREPARE_VERSION}
    records = run_frames("hypersim", jobs, convert_frame, out, config, workers, progress)
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
