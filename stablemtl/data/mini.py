"""Procedural miniatures of the eight datasets, written in each dataset's own layout and formats.

``write_mini_datasets(root, preset)`` renders samples with ``synthetic.render_sample``
and writes them exactly where and how the real dataset (or its StableMTL
preprocessing) keeps them, annotated only for the tasks the real dataset
provides, with split lists under ``<dataset root>/data_split/``. The loaders in
``stablemtl.data.sources`` then read a miniature exactly as the real thing.

Each dataset root gets ``stablemtl_dataset.json``: the parameters it was written
with, the geometry overrides
the loaders need at this reduced scale, and, per sample id, the render
parameters, so tests can re-render a sample and compare it with what the
loader returns. A dataset is written into a temporary folder and renamed into
place, so an interrupted run never leaves a half-written dataset behind.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from stablemtl.data import annotations, formats, synthetic
from stablemtl.data.jobs import ordered_map
from stablemtl.data.source_base import META_FILE
from stablemtl.data.sources import SOURCES
from stablemtl.data.splits import (CITYSCAPES_LIST, DIODE_LIST, HYPERSIM_LISTS, KITTI_DEPTH_LIST, KITTI_FLOW_LIST,
                                   VKITTI_SCENES, VKITTI_VARIATIONS)
from stablemtl.guard import claim
from stablemtl.metrics import IGNORE_INDEX
from stablemtl.presets import DEFAULT_SEED, load_preset
from stablemtl.progress import bar as progress_bar

WORLD_VERSION = 4  # bump when the renderer or a writer changes what is written

# dataset -> (scene kind, domain); each is written under its source's directory (``Source.root_hint``)
MINI_SCENES = {
    "hypersim": ("indoor", "train"),
    "vkitti": ("street", "train"),
    "flying_things_3d": ("flying", "train"),
    "cityscapes": ("street", "real"),
    "kitti_depth": ("street", "real"),
    "kitti_flow": ("street", "real"),
    "diode": ("indoor", "real"),  # every second sample is outdoor (street)
    "mid": ("indoor", "real"),
}
_CLASS_TO_VKITTI = {0: "Road", 1: "Building", 2: "Pole", 3: "TrafficLight", 4: "TrafficSign", 5: "Vegetation",
                    6: "Sky", 7: "Car", IGNORE_INDEX: "Terrain"}
_CLASS_TO_CITYSCAPES = {0: 7, 1: 11, 2: 17, 3: 19, 4: 20, 5: 21, 6: 23, 7: 26, IGNORE_INDEX: 8}  # 8 = sidewalk
KITTI_BASELINE = SOURCES["kitti_flow"].geometry["baseline"]  # the stereo baseline the KITTI flow loader assumes
HYPERSIM_TRAIN_LISTS = sorted(set(HYPERSIM_LISTS["train"].values()))  # the release's per-task list names


def round_u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(np.asarray(x) * 255.0), 0, 255).astype(np.uint8)


def render(dataset: str, index: int, spec: dict, seed: int) -> tuple[dict, dict]:
    """Render sample ``index`` of a mini dataset; returns (sample, its render parameters)."""
    kind, domain = MINI_SCENES[dataset]
    light_seed = None
    if dataset == "diode" and index % 2 == 1:
        kind = "street"
    if dataset == "mid":  # one scene under several lights, as the multi-illumination dataset
        scene, light = divmod(index, spec["lights"])
        params = dict(kind=kind, seed=synthetic.stable_seed(seed, dataset, scene), domain=domain,
                      light_seed=synthetic.stable_seed(seed, dataset, scene, "light", light))
    else:
        params = dict(kind=kind, seed=synthetic.stable_seed(seed, dataset, index), domain=domain, light_seed=light_seed)
    h, w = spec["size"]
    params.update(height=int(h), width=int(w))
    for key in ("K", "render_scale"):  # a raw miniature's camera and ray spacing (the presets set neither)
        if spec.get(key) not in (None, 1):
            params[key] = spec[key]
    return synthetic.render_sample(**params), params


def sample_count(dataset: str, spec: dict) -> int:
    return spec["scenes"] * spec["lights"] if dataset == "mid" else spec["count"]


# --------------------------------------------------------------------------- one writer per dataset
# Each writes sample ``i`` under ``root`` and returns ({split file: [lines]}, sample id).

def write_hypersim(root: Path, i: int, s: dict, spec: dict):
    scene, frame = f"ai_{1 + i // 8:03d}_{1 + (i // 4) % 2:03d}", i % 8
    name = lambda kind, ext: f"{scene}/{kind}_cam_00_fr{frame:04d}.{ext}"  # noqa: E731
    hit = s["depth"] > 0
    formats.write_rgb(root / name("rgb", "png"), round_u8(s["rgb"]))
    annotations.write_hypersim_depth(root / name("depth_plane", "png"), np.where(hit, s["depth"], np.nan))
    stored = -s["normal"]  # the preprocessing's convention points away from the camera
    formats.write_npy(root / name("normal_cam", "npy"), stored.astype(np.float32))
    formats.write_rgb(root / name("normal_cam", "png"), round_u8((stored + 1) / 2))
    formats.write_npy(root / name("normal_valid_mask", "npy"), hit)
    formats.write_rgb(root / name("albedo", "png"), round_u8(s["albedo"]))
    formats.write_rgb(root / name("shading", "png"), round_u8(s["shading"]))
    line = " ".join(name(k, e) for k, e in [("rgb", "png"), ("depth_plane", "png"), ("normal_cam", "npy"),
                                            ("normal_cam", "png"), ("normal_valid_mask", "npy")])
    return {file: [line] for file in HYPERSIM_TRAIN_LISTS}, name("rgb", "png")


def write_vkitti(root: Path, i: int, s: dict, spec: dict):
    scene, variation = VKITTI_SCENES[i % 4], VKITTI_VARIATIONS[(i // 4) % 6]
    camera, number = f"Camera_{(i // 24) % 2}", 2 * (i // 48)
    path = lambda top, kind, prefix, ext, n=number: f"{top}/{scene}/{variation}/frames/{kind}/{camera}/{prefix}_{n:05d}.{ext}"  # noqa: E731
    hit = s["depth"] > 0
    formats.write_rgb(root / path("original", "rgb", "rgb", "jpg"), round_u8(s["rgb"]))
    formats.write_rgb(root / path("original", "rgb", "rgb", "jpg", number + 1), round_u8(s["rgb_next"]))
    annotations.write_vkitti_depth(root / path("original", "depth", "depth", "png"), np.where(hit, s["depth"], np.inf))
    formats.write_npy(root / path("normal_estimated", "normal", "normal", "npy"), (-s["normal"]).astype(np.float32))
    categories = np.vectorize(_CLASS_TO_VKITTI.get, otypes=[object])(s["semantic"])
    annotations.write_vkitti_semantic(root / path("original", "classSegmentation", "classgt", "png"), categories)
    h, w = s["depth"].shape
    flow = s["optical_flow"]
    flow_valid = s["flow_defined"] & (np.abs(flow[..., 0]) <= w - 1) & (np.abs(flow[..., 1]) <= h - 1)
    annotations.write_vkitti_flow(root / path("original", "forwardFlow", "flow", "png"), flow, flow_valid)
    annotations.write_vkitti_scene_flow(root / path("original", "forwardSceneFlow", "sceneFlow", "png"),
                                        np.clip(np.where(flow_valid[..., None], s["scene_flow"], 0.0), -10, 10))
    lists = {
        "vkitti_depth_train.txt": [path("original", "depth", "depth", "png")],
        "vkitti_normal_train.txt": [path("normal_estimated", "normal", "normal", "npy")],
        "vkitti_semantic_train.txt": [path("original", "classSegmentation", "classgt", "png")],
        "vkitti_optical_flow_train.txt": [path("original", "forwardFlow", "flow", "png")],
        "vkitti_scene_flow_train.txt": [path("original", "forwardSceneFlow", "sceneFlow", "png")],
    }
    return lists, path("original", "rgb", "rgb", "jpg")


def write_flying_things_3d(root: Path, i: int, s: dict, spec: dict):
    number = 2 * i
    formats.write_rgb(root / f"train/image_clean/{number:07d}.png", round_u8(s["rgb"]))
    formats.write_rgb(root / f"train/image_clean/{number + 1:07d}.png", round_u8(s["rgb_next"]))
    flow = s["optical_flow"]
    flow_valid = s["flow_defined"] & (np.abs(flow) < 500).all(-1)  # the preprocessing drops |flow| >= 500
    annotations.write_kitti_flow(root / f"train/flow_2d/{number:07d}.png", flow, flow_valid)
    formats.write_mask_png(root / f"train/occ_mask_2d/{number:07d}.png", s["flow_defined"] & ~s["valid_flow"])
    keep = s["flow_defined"] & (s["depth"] < 35.0)  # the preprocessing keeps points nearer than 35 m
    v, u = np.nonzero(keep)
    K = s["K"]
    z = s["depth"][keep].astype(np.float64)
    pc1 = np.stack([(u - K[0, 2]) * z / K[0, 0], (v - K[1, 2]) * z / K[1, 1], z], 1).astype(np.float32)
    formats.write_npz(root / f"train/pc/{number:07d}.npz", pc1=pc1)
    formats.write_npy(root / f"train/flow_3d/{number:07d}.npy", s["scene_flow"][keep].astype(np.float32))
    return {"train.txt": [f"train/flow_2d/{number:07d}.png"]}, f"train/flow_2d/{number:07d}.png"


def write_cityscapes(root: Path, i: int, s: dict, spec: dict):
    city = ("frankfurt", "lindau", "munster")[i % 3]
    stem = f"{city}_000000_{i:06d}"
    rgb = f"leftImg8bit/val/{city}/{stem}_leftImg8bit.png"
    formats.write_rgb(root / rgb, round_u8(s["rgb"]))
    lut = np.zeros(256, np.uint8)
    for cls, label_id in _CLASS_TO_CITYSCAPES.items():
        lut[cls] = label_id
    annotations.write_cityscapes_label_ids(root / f"gtFine/val/{city}/{stem}_gtFine_labelIds.png", lut[s["semantic"]])
    return {CITYSCAPES_LIST: [rgb]}, rgb


def write_kitti_depth(root: Path, i: int, s: dict, spec: dict):
    drive = f"2011_09_26_drive_{2 + i // 8:04d}_sync"
    rgb = f"2011_09_26/{drive}/image_02/data/{i:010d}.png"
    gt = f"{drive}/proj_depth/groundtruth/image_02/{i:010d}.png"
    formats.write_rgb(root / rgb, round_u8(s["rgb"]))
    depth = s["depth"]
    # projected LiDAR: sparse (a third of the pixels), no returns from the sky or beyond 80 m
    keep = np.random.default_rng(s["seed"]).random(depth.shape) < 0.35
    annotations.write_kitti_depth(root / gt, np.where(keep & (depth > 0) & (depth < 80), depth, 0.0))
    lines = [f"{rgb} {gt} {s['K'][0, 0]:.4f}"]
    if i < spec.get("none_lines", 0):  # the Eigen list names frames without ground truth: "None"
        extra = f"2011_09_26/{drive}/image_02/data/{1_000_000 + i:010d}.png"
        formats.write_rgb(root / extra, round_u8(s["rgb_next"]))
        lines.append(f"{extra} None {s['K'][0, 0]:.4f}")
    return {KITTI_DEPTH_LIST: lines}, rgb


def write_kitti_flow(root: Path, i: int, s: dict, spec: dict):
    name = f"{i:06d}"
    formats.write_rgb(root / f"training/image_2/{name}_10.png", round_u8(s["rgb"]))
    formats.write_rgb(root / f"training/image_2/{name}_11.png", round_u8(s["rgb_next"]))
    # KITTI's 16-bit PNGs hold |flow| <= 32767 / 64 px and disparities <= 65535 / 256 px: a point
    # beyond (at the real size, a car passing close to the camera) is left unannotated, as in KITTI
    defined = s["flow_defined"]
    fits = defined & (np.abs(s["optical_flow"]) <= 32767 / 64).all(-1)
    annotations.write_kitti_flow(root / f"training/flow_occ/{name}_10.png", s["optical_flow"], fits)
    K = s["K"]
    fb = K[0, 0] * KITTI_BASELINE
    hit = s["depth"] > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        disp0 = np.where(hit, fb / np.where(hit, s["depth"], 1.0), np.nan)
        z2 = s["depth"] + s["scene_flow"][..., 2]  # the point's depth in camera 2 at time 2
        disp1 = np.where(defined, fb / np.where(defined, z2, 1.0), np.nan)
        disp0, disp1 = (np.where(d <= 65535 / 256, d, np.nan) for d in (disp0, disp1))
    annotations.write_kitti_disparity(root / f"training/disp_occ_0/{name}_10.png", disp0)
    annotations.write_kitti_disparity(root / f"training/disp_occ_1/{name}_10.png", disp1)
    P = np.array([[K[0, 0], 0, K[0, 2], 0], [0, K[1, 1], K[1, 2], 0], [0, 0, 1, 0]])
    annotations.write_kitti_calib(root / f"training/calib_cam_to_cam/{name}.txt",
                                  {"P_rect_00": P, "R_rect_00": np.eye(3), "P_rect_02": P})
    return {KITTI_FLOW_LIST: [f"training/flow_occ/{name}_10.png"]}, f"training/flow_occ/{name}_10.png"


def write_diode(root: Path, i: int, s: dict, spec: dict):
    place = "outdoor" if s["kind"] == "street" else "indoors"
    scene, scan = 10 + i // 4, 100 + i
    stem = f"{place}/scene_{scene:05d}/scan_{scan:05d}/{scene:05d}_{scan:05d}_{place}_{100 + 10 * (i % 5)}_{20 * (i % 4):03d}"
    formats.write_rgb(root / f"{stem}.png", round_u8(s["rgb"]))
    depth = s["depth"]
    valid = (depth > 0.6) & (depth < 350)
    annotations.write_diode_depth(root / f"{stem}_depth.npy", np.where(valid, depth, 0.0))
    annotations.write_diode_mask(root / f"{stem}_depth_mask.npy", valid)
    # DIODE stores (-nx, ny, nz) of the release's convention (normals away from the camera); no normal = 0
    annotations.write_diode_normal(root / f"{stem}_normal.npy", np.where((depth > 0)[..., None], -s["normal"], 0.0))
    return {DIODE_LIST: [f"{stem}.png {stem}_depth.npy {stem}_depth_mask.npy"]}, f"{stem}.png"


def write_mid(root: Path, i: int, s: dict, spec: dict):
    scene, light = divmod(i, spec["lights"])
    stem = f"test/everett_room{scene:02d}_dir_{light}_mip2"
    formats.write_rgb(root / f"{stem}.jpg", round_u8(s["rgb"]))
    formats.write_rgb(root / f"{stem}_albedo.jpg", round_u8(s["albedo"]))
    formats.write_rgb(root / f"{stem}_shading.jpg", round_u8(s["shading"]))
    return {"test.txt": [f"{stem}.jpg"]}, f"{stem}.jpg"


WRITERS = {
    "hypersim": write_hypersim, "vkitti": write_vkitti, "flying_things_3d": write_flying_things_3d,
    "cityscapes": write_cityscapes, "kitti_depth": write_kitti_depth, "kitti_flow": write_kitti_flow,
    "diode": write_diode, "mid": write_mid,
}


def loader_geometry(dataset: str, spec: dict, seed: int) -> dict:
    """Loader overrides for the reduced scale: crops and the training domain's fixed intrinsics."""
    if dataset in ("kitti_depth", "kitti_flow"):
        return {"kb_crop": list(spec["kb_crop"])}
    if dataset in ("hypersim", "vkitti", "flying_things_3d"):
        kind, domain = MINI_SCENES[dataset]
        h, w = spec["size"]
        K = synthetic.intrinsics(synthetic.make_scene(kind, 0, domain), h, w)  # fixed in the training domain
        if dataset == "hypersim":
            return {"focal": float(K[0, 0]), "size": [h, w]}
        geometry = {"focal": float(K[0, 0]), "cx": float(K[0, 2]), "cy": float(K[1, 2])}
        if dataset == "flying_things_3d":
            geometry["crop"] = list(spec["crop"])
        if dataset == "vkitti":  # the release's 256 x 1024 optical-flow crop of 375 x 1242, to scale
            geometry["train_crop"] = [round(h * 256 / 375), round(w * 1024 / 1242)]
        return geometry
    return {}


def _job(args) -> tuple[dict, str, dict]:
    dataset, tmp_root, index, spec, seed = args
    sample, params = render(dataset, index, spec, seed)
    lists, sample_id = WRITERS[dataset](Path(tmp_root), index, sample, spec)
    return lists, sample_id, params


def _params(dataset: str, spec: dict, seed: int) -> dict:
    return {"dataset": dataset, "spec": spec, "seed": seed, "world_version": WORLD_VERSION}


def is_mini_root(root: Path) -> bool:
    """An earlier kit data root without a ``.stablemtl`` marker: it holds the kit's mini-dataset meta files."""
    return any((Path(root) / cls.root_hint / META_FILE).is_file() for cls in SOURCES.values())


def write_mini_dataset(root, dataset: str, spec: dict, seed: int = DEFAULT_SEED, workers: int | None = None,
                       progress: bool = True) -> Path:
    """Write one mini dataset under ``root``, replacing an earlier miniature there; returns its directory.
    (``stablemtl run`` skips stage 01 when the data was written with the same parameters.)"""
    if dataset not in MINI_SCENES:
        raise ValueError(f"unknown dataset {dataset!r}; valid: {', '.join(MINI_SCENES)}")
    final = Path(root) / SOURCES[dataset].root_hint
    if final.exists() and not (final / META_FILE).is_file():
        raise FileExistsError(f"{final} exists and is not a procedural mini dataset (no {META_FILE}); "
                              f"refusing to overwrite it: choose another root")
    for stale in final.parent.glob(f".{final.name}.partial-*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    tmp = final.parent / f".{final.name}.partial-{os.getpid()}"
    tmp.mkdir(parents=True)
    jobs = [(dataset, str(tmp), i, spec, seed) for i in range(sample_count(dataset, spec))]
    workers = workers if workers is not None else min(len(jobs), os.cpu_count() or 1)
    bar = progress_bar(total=len(jobs), desc=f"mini {dataset}", unit="img", disable=not progress, leave=False)
    lists: dict[str, list[str]] = {}
    samples = {}
    try:
        results = []
        for result in ordered_map(_job, jobs, workers, chunksize=max(1, len(jobs) // (4 * max(workers, 1)))):
            results.append(result)
            bar.update()
        for part, sample_id, params in results:
            for file, lines in part.items():
                lists.setdefault(file, []).extend(lines)
            samples[sample_id] = params
        for file, lines in lists.items():
            formats.write_bytes(tmp / "data_split" / file, ("\n".join(lines) + "\n").encode())
        meta = {"params": _params(dataset, spec, seed), "procedural": True, "source": SOURCES[dataset].__name__,
                "geometry": loader_geometry(dataset, spec, seed), "samples": samples}
        formats.write_bytes(tmp / META_FILE, json.dumps(meta, indent=1).encode())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def write_mini_datasets(root, preset="demo", datasets=None, workers: int | None = None,
                        progress: bool = True) -> dict[str, Path]:
    """Write every mini dataset of ``preset`` under ``root``; returns name -> directory. ``root`` carries
    the kit's marker; a non-empty folder of other files is refused (``stablemtl.guard.InputError``)."""
    config = load_preset(preset)
    specs = config.get("data")
    if not isinstance(specs, dict):
        raise ValueError(f"preset {config.get('name', preset)!r} has no 'data' section of mini dataset sizes")
    unknown = set(datasets or []) - set(specs)
    if unknown:
        raise ValueError(f"datasets {sorted(unknown)} are not in preset {config.get('name', preset)!r}; it has {list(specs)}")
    claim(root, "data", is_mini_root)  # a folder of other files is refused before anything is written
    out = {}
    start = time.perf_counter()
    for dataset, spec in specs.items():
        if datasets is None or dataset in datasets:
            seed = int(config.get("seed", DEFAULT_SEED))
            out[dataset] = write_mini_dataset(root, dataset, spec, seed, workers, progress)
    if progress:
        print(f"mini datasets ready under {root} ({time.perf_counter() - start:.1f} s)")
    return out
