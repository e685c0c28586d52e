"""Raw-format miniatures: the procedural world written as the datasets' authors distribute them.

``write_raw_miniature(dataset, root)`` renders a few samples with
``stablemtl.data.synthetic`` and writes them in the *raw* layout and formats that
``stablemtl.data.prepare`` converts or checks (``convert.common.RAW_TREES``), so that every
preparation can run, and be checked against the world's ground truth, without
the real downloads:

- ``hypersim``: per-frame HDF5 in float16 (HDR colour = exposure x the linear
  render, diffuse reflectance and illumination, distance to the camera centre,
  ``normal_cam`` in Hypersim's camera frame (x right, y up, z backward),
  ``normal_world`` and ``position`` in a world frame of asset units (inches),
  ``render_entity_id``), the camera keyframes, and ``metadata_images_split_scene_v1.csv``
  (with a ``val`` frame and a frame left out of the public release, neither written).
  Normals of every other object are written back-facing, as Hypersim's sometimes
  are; frame 0 has a window without geometry (render_entity_id -1), frame 1 a NaN
  distance at one valid pixel (the release's ``depth_nan`` case).
- ``vkitti``: Virtual KITTI 2 ``original/`` (rgb, depth, classSegmentation, flows), no normals.
- ``flying_things_3d``: the FlyingThings3D subset: clean PNGs, disparity and disparity
  change PFMs (negated, as the subset stores them; baseline 1), ``.flo`` flow, occlusion
  PNGs; the last sample goes to ``val/``; sample 0 has one pixel of 600 px flow.
- ``mid``: MID test EXRs (half float; exposure x the linear render) and one ``albedo.exr`` per scene.
- ``cityscapes``, ``kitti_depth``, ``kitti_flow``, ``diode``: the downloads' own layouts
  (``stablemtl.data.mini``'s writers) without the split lists, which ``prepare`` builds;
  ``kitti_depth`` has the official-style Eigen list ``eigen_test_files_with_gt.txt``
  (rgb, ground truth or ``None``, focal) at the tree's root, to pass as ``eigen_list=``,
  with one image that has no ground truth.

Sizes are (height, width). ``REAL_SIZES`` holds the real datasets' own; at that size
the training datasets are rendered through the real dataset's camera (the release's
intrinsics, ``convert.hypersim.HYPERSIM`` / ``convert.vkitti.VKITTI`` /
``convert.flying_things_3d.FT3D``: within 0.05 % of the world's focal) and KITTI keeps
the real benchmark crop, so the tree needs no geometry override:
``prepare`` and the loaders run on their own constants, as on the downloads. At any other
size the world's camera is used and recorded. ``render_scale`` s casts one ray per
s x s block and upsamples (``synthetic.render_sample``): the real sizes in seconds.

Each root gets ``stablemtl_raw.json``: ``geometry`` (the loader overrides ``prepare``
copies into the output's ``stablemtl_dataset.json``; empty at the real size),
``render_scale``, ``camera`` (``world`` or ``real``) and, per output sample id, the render
parameters (``synthetic.render_sample(**render)`` renders the sample again) and what
was done to it, so tests can compare a prepared sample with the world's ground truth.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from stablemtl.data import formats, mini, raycast, synthetic
from stablemtl.data.convert import flying_things_3d, hypersim, vkitti
from stablemtl.data.convert.common import RAW_META
from stablemtl.data.layout import CHECKED
from stablemtl.data.prepare import DATASETS
from stablemtl.data.splits import HYPERSIM_SPLIT_CSV, KITTI_DEPTH_LIST
from stablemtl.data.training_sources import Hypersim
from stablemtl.data.transforms import KB_CROP
from stablemtl.presets import DEFAULT_SEED

RAW_DATASETS = DATASETS  # all eight: the four converted, then the four checked
DEFAULTS = {  # (samples, (height, width)); MID: scenes x 2 lights
    "hypersim": (4, (24, 32)),
    "vkitti": (2, (32, 104)),
    "flying_things_3d": (3, (36, 64)),
    "mid": (2, (24, 32)),
    "cityscapes": (3, (64, 128)),
    "kitti_depth": (3, (36, 112)),
    "kitti_flow": (3, (36, 112)),
    "diode": (4, (48, 64)),  # every second sample outdoor
}
REAL_SIZES = {  # (height, width) of the real datasets' images
    "hypersim": tuple(Hypersim.geometry["size"]),  # 768 x 1024
    "vkitti": (375, 1242),
    "flying_things_3d": (540, 960),
    "cityscapes": (1024, 2048),
    "kitti_depth": (375, 1242),  # KITTI's frames are 370..376 x 1224..1242; 375 x 1242 the most common
    "kitti_flow": (375, 1242),
    "diode": (768, 1024),
    "mid": (1000, 1500),  # dir_K_mip2: the 4000 x 6000 captures at mip level 2
}
METERS_PER_ASSET_UNIT = 0.0254  # Evermotion scenes are modelled in inches


def real_camera(dataset: str) -> np.ndarray | None:
    """The real dataset's intrinsics at ``REAL_SIZES[dataset]`` as ``prepare`` and the loaders assume
    them (the release's numbers), for the training datasets; ``None`` for the others (their
    cameras come with the files, or are not needed)."""
    h, v, f = hypersim.HYPERSIM, vkitti.VKITTI, flying_things_3d.FT3D
    n = {"hypersim": (h["focal"], (h["width"] - 1) / 2, (h["height"] - 1) / 2),
         "vkitti": (v["fx"], v["cx"], v["cy"]),
         "flying_things_3d": (f["focal"], f["cx"], f["cy"])}.get(dataset)
    return None if n is None else np.array([[n[0], 0, n[1]], [0, n[0], n[2]], [0, 0, 1.0]])


def _spec(dataset: str, count: int, size: tuple[int, int], scale: int, real: bool) -> dict:
    """``mini``'s writer spec: size and count, the ray spacing and, at the real size, the real camera."""
    h, w = size
    spec = {"size": [h, w], "count": count, "render_scale": scale}
    if real and real_camera(dataset) is not None:
        spec["K"] = real_camera(dataset).tolist()
    return spec


def _hypersim(root: Path, spec: dict, seed: int) -> dict:
    h, w = spec["size"]
    samples, keyframes, rows = {}, {}, []
    focal = None
    for i in range(spec["count"]):
        scene, camera, frame = f"ai_001_{1 + i // 2:03d}", "cam_00", i % 2
        params = dict(kind="indoor", seed=synthetic.stable_seed(seed, "raw_hypersim", i), domain="train",
                      height=h, width=w)
        params.update({k: spec[k] for k in ("K", "render_scale") if spec.get(k) not in (None, 1)})
        s = synthetic.render_sample(**params)
        K = s["K"]
        focal = float(K[0, 0])
        rng = np.random.default_rng(synthetic.stable_seed(seed, "raw_hypersim_camera", i))
        exposure = 0.6 + 0.1 * (i % 4)
        # the camera in a Hypersim world frame: camera-to-world rotation, position in asset units
        rotation = raycast.rotation(*rng.uniform(-np.pi, np.pi, 3))
        centre = rng.uniform(-300, 300, 3)
        v, u = np.mgrid[0:h, 0:w].astype(np.float64)
        ray = np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones_like(u)], -1)
        depth = s["depth"].astype(np.float64)
        flip = np.array([1.0, -1.0, -1.0])  # the kit's camera frame (y down, z forward) -> Hypersim's
        point = depth[..., None] * ray * flip
        normal = s["normal"].astype(np.float64) * flip
        back = (s["object_id"] % 2 == 1)[..., None]  # every other object's normals written back-facing
        normal = np.where(back, -normal, normal)
        entity = np.where(depth > 0, s["object_id"] + 1, -1).astype(np.int32)
        distance = depth * np.linalg.norm(ray, axis=-1)
        window = nan_pixel = None
        if i == 0:  # a window without geometry: no entity, no normal, no position (the distance stays finite)
            window = [0, max(1, h // 6), w // 3, w // 2]
            entity[window[0]:window[1], window[2]:window[3]] = -1
        if i == 1:  # a NaN in the distance at a valid pixel: the frame leaves the no-NaN-depth list
            nan_pixel = [h // 2, w // 2]
            distance[nan_pixel[0], nan_pixel[1]] = np.nan
        void = entity == -1
        position = centre + (point / METERS_PER_ASSET_UNIT) @ rotation.T
        normal_world = normal @ rotation.T
        for a in (normal, normal_world, position):
            a[void] = np.nan
        final = root / scene / "images" / f"scene_{camera}_final_hdf5"
        geometry = root / scene / "images" / f"scene_{camera}_geometry_hdf5"
        half = lambda a: np.asarray(a, dtype=np.float16)  # noqa: E731
        stem = f"frame.{frame:04d}"
        formats.write_hdf5(final / f"{stem}.color.hdf5", half(exposure * s["rgb_linear"]))
        formats.write_hdf5(final / f"{stem}.diffuse_reflectance.hdf5", half(s["albedo"]))
        formats.write_hdf5(final / f"{stem}.diffuse_illumination.hdf5", half(exposure * s["shading"]))
        formats.write_hdf5(geometry / f"{stem}.depth_meters.hdf5", half(distance))
        formats.write_hdf5(geometry / f"{stem}.normal_cam.hdf5", half(normal))
        formats.write_hdf5(geometry / f"{stem}.normal_world.hdf5", half(normal_world))
        formats.write_hdf5(geometry / f"{stem}.position.hdf5", half(position))
        formats.write_hdf5(geometry / f"{stem}.render_entity_id.hdf5", entity)
        keyframes.setdefault((scene, camera), {})[frame] = (centre, rotation)
        rows.append(f"{scene},{camera},{frame},True,,train")
        samples[f"{scene}/rgb_{camera}_fr{frame:04d}.png"] = {
            "render": params, "exposure": exposure, "window": window, "nan_pixel": nan_pixel,
            "back_facing": "odd object ids"}
    for (scene, camera), frames in keyframes.items():
        order = sorted(frames)
        detail = root / scene / "_detail" / camera
        formats.write_hdf5(detail / "camera_keyframe_positions.hdf5", np.stack([frames[f][0] for f in order]))
        formats.write_hdf5(detail / "camera_keyframe_orientations.hdf5", np.stack([frames[f][1] for f in order]))
    rows += ["ai_002_001,cam_00,0,True,,val", "ai_003_001,cam_00,0,False,bad scene,train"]  # neither is written
    csv = "scene_name,camera_name,frame_id,included_in_public_release,exclude_reason,split_partition_name\n"
    formats.write_bytes(root / HYPERSIM_SPLIT_CSV, (csv + "\n".join(rows) + "\n").encode())
    return {"geometry": {"focal": focal, "size": [h, w]}, "samples": samples}


def _vkitti(root: Path, spec: dict, seed: int) -> dict:
    samples = {}
    for i in range(spec["count"]):
        sample, params = mini.render("vkitti", i, spec, seed)
        _, sample_id = mini.write_vkitti(root, i, sample, spec)
        samples[sample_id] = {"render": params}
    shutil.rmtree(root / "normal_estimated", ignore_errors=True)  # the raw download has no normals
    return {"geometry": mini.loader_geometry("vkitti", spec, seed), "samples": samples}


def _flying_things_3d(root: Path, spec: dict, seed: int) -> dict:
    h, w = spec["size"]
    count = spec["count"]
    spec = {**spec, "crop": [h - 4, w]}  # 536 x 960 of 540 x 960, to scale
    geometry = dict(mini.loader_geometry("flying_things_3d", spec, seed), baseline=1.0)
    samples = {}
    for i in range(count):
        s, params = mini.render("flying_things_3d", i, spec, seed)
        split = "val" if count > 1 and i == count - 1 else "train"
        number, top = 2 * i, root / split
        fb = float(s["K"][0, 0]) * geometry["baseline"]
        depth = s["depth"].astype(np.float64)
        defined = s["flow_defined"]
        with np.errstate(divide="ignore"):
            disparity = fb / depth
            later = np.where(defined, fb / np.where(defined, depth + s["scene_flow"][..., 2], 1.0), disparity)
        flow = s["optical_flow"].copy()
        fast = None
        if i == 0:  # one pixel moving faster than the release keeps (|flow| >= 500 px)
            fast = [h // 2, w // 2]
            flow[h // 2, w // 2] = (600.0, 0.0)
        formats.write_rgb(top / f"image_clean/left/{number:07d}.png", mini.round_u8(s["rgb"]))
        formats.write_rgb(top / f"image_clean/left/{number + 1:07d}.png", mini.round_u8(s["rgb_next"]))
        formats.write_pfm(top / f"disparity/left/{number:07d}.pfm", -disparity)  # the subset stores -disparity
        formats.write_pfm(top / f"disparity_change/left/into_future/{number:07d}.pfm", -(later - disparity))
        formats.write_flo(top / f"flow/left/into_future/{number:07d}.flo", flow)
        formats.write_mask_png(top / f"flow_occlusions/left/into_future/{number:07d}.png", defined & ~s["valid_flow"])
        samples[f"{split}/flow_2d/{number:07d}.png"] = {"render": params, "fast_pixel": fast}
    return {"geometry": geometry, "samples": samples}


def _mid(root: Path, spec: dict, seed: int) -> dict:
    spec = {**spec, "scenes": spec["count"], "lights": 2}
    samples = {}
    for i in range(spec["scenes"] * spec["lights"]):
        s, params = mini.render("mid", i, spec, seed)
        scene, light = divmod(i, spec["lights"])
        folder = root / "test" / f"everett_room{scene:02d}"
        exposure = 2.0 + light  # HDR: values above 1
        formats.write_exr(folder / f"dir_{light}_mip2.exr", exposure * s["rgb_linear"], half=True)
        if light == 0:  # the scene's albedo, the same under every light
            formats.write_exr(folder / "albedo.exr", s["albedo"], half=True)
        samples[f"test/everett_room{scene:02d}_dir_{light}_mip2.jpg"] = {"render": params, "exposure": exposure}
    return {"geometry": {}, "samples": samples}


def _checked(dataset: str):
    """The writer of an evaluation dataset: ``mini``'s, which writes the download's layout; its split
    lines are dropped (``prepare`` builds the lists), but KITTI's Eigen list goes to the tree's root."""
    def write(root: Path, spec: dict, seed: int) -> dict:
        h, w = spec["size"]
        if dataset.startswith("kitti"):  # the benchmark crop, to scale (352 x 1216 of 375 x 1242)
            spec = {**spec, "kb_crop": [min(h, round(h * KB_CROP[0] / 375)), min(w, round(w * KB_CROP[1] / 1242))],
                    "none_lines": 1}
        samples, eigen = {}, []
        for i in range(spec["count"]):
            sample, params = mini.render(dataset, i, spec, seed)
            lists, sample_id = mini.WRITERS[dataset](root, i, sample, spec)
            eigen += lists.get(KITTI_DEPTH_LIST, [])
            samples[sample_id] = {"render": params}
        if eigen:
            formats.write_bytes(root / KITTI_DEPTH_LIST, ("\n".join(eigen) + "\n").encode())
        geometry = {"kb_crop": spec["kb_crop"]} if "kb_crop" in spec else {}
        return {"geometry": geometry, "samples": samples}
    return write


_WRITERS = {"hypersim": _hypersim, "vkitti": _vkitti, "flying_things_3d": _flying_things_3d, "mid": _mid,
            **{d: _checked(d) for d in CHECKED}}


def write_raw_miniature(dataset: str, root, count: int | None = None, size=None, seed: int = DEFAULT_SEED,
                        render_scale: int = 1) -> Path:
    """Write the raw miniature of ``dataset`` into ``root`` (created; must be empty or absent) and
    return it; ``count`` samples (MID: scenes, 2 lights each) of ``size`` = (height, width)
    (default ``DEFAULTS[dataset]``; ``REAL_SIZES[dataset]`` for the real datasets' own), rendered
    one ray per ``render_scale`` x ``render_scale`` block (``synthetic.render_sample``)."""
    if dataset not in _WRITERS:
        raise ValueError(f"no raw miniature for {dataset!r}; valid: {', '.join(RAW_DATASETS)}")
    if isinstance(render_scale, bool) or int(render_scale) != render_scale or render_scale < 1:
        raise ValueError(f"render_scale must be an integer >= 1 (one ray per s x s pixels), got {render_scale!r}")
    root = Path(root)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty; write a raw miniature into a new folder")
    default_count, default_size = DEFAULTS[dataset]
    count = default_count if count is None else int(count)
    size = tuple(int(v) for v in (size or default_size))
    if len(size) != 2 or min(size) < 8:
        raise ValueError(f"size must be (height, width) of at least 8 x 8, got {size}")
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    real = size == REAL_SIZES[dataset]
    root.mkdir(parents=True, exist_ok=True)
    meta = _WRITERS[dataset](root, _spec(dataset, count, size, int(render_scale), real), seed)
    if real:  # the real camera and crops: prepare and the loaders need no override
        meta["geometry"] = {}
    meta.update(dataset=dataset, count=count, size=list(size), seed=seed, world_version=mini.WORLD_VERSION,
                render_scale=int(render_scale), camera="real" if real and real_camera(dataset) is not None else "world")
    formats.write_bytes(root / RAW_META, json.dumps(meta, indent=1, sort_keys=True).encode())
    return root
