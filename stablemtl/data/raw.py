"""Raw-format miniatures: the procedural world written as the datasets' authors distribute them.

``write_raw_miniature(dataset, root)`` renders a few samples with
``stablemtl.data.synthetic`` and writes them in the *raw* layout and formats that
``stablemtl.data.prepare`` converts (``prepare.RAW_TREES``), so that every
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

Each root gets ``stablemtl_raw.json``: the world's camera at this size (the loader
overrides ``prepare`` copies into the output) and, per output sample id, the
render parameters and what was done to it, so tests can re-render the ground truth.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from stablemtl.data import formats, mini, synthetic

RAW_DATASETS = ("hypersim", "vkitti", "flying_things_3d", "mid")
DEFAULTS = {  # (samples, [height, width]); MID: scenes x 2 lights
    "hypersim": (4, (24, 32)),
    "vkitti": (2, (32, 104)),
    "flying_things_3d": (3, (36, 64)),
    "mid": (2, (24, 32)),
}
METERS_PER_ASSET_UNIT = 0.0254  # Evermotion scenes are modelled in inches


def _hypersim(root: Path, count: int, size: tuple[int, int], seed: int) -> dict:
    h, w = size
    samples, keyframes, rows = {}, {}, []
    focal = None
    for i in range(count):
        scene, camera, frame = f"ai_001_{1 + i // 2:03d}", "cam_00", i % 2
        params = dict(kind="indoor", seed=synthetic.stable_seed(seed, "raw_hypersim", i), domain="train",
                      height=h, width=w)
        s = synthetic.render_sample(**params)
        K = s["K"]
        focal = float(K[0, 0])
        rng = np.random.default_rng(synthetic.stable_seed(seed, "raw_hypersim_camera", i))
        exposure = 0.6 + 0.1 * (i % 4)
        # the camera in a Hypersim world frame: camera-to-world rotation, position in asset units
        rotation = synthetic.rotation(*rng.uniform(-np.pi, np.pi, 3))
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
    formats._write_bytes(root / "metadata_images_split_scene_v1.csv", (csv + "\n".join(rows) + "\n").encode())
    return {"geometry": {"focal": focal, "size": [h, w]}, "samples": samples}


def _vkitti(root: Path, count: int, size: tuple[int, int], seed: int) -> dict:
    spec = {"size": list(size), "count": count}
    samples = {}
    for i in range(count):
        sample, params = mini._render("vkitti", i, spec, seed)
        _, sample_id = mini._write_vkitti(root, i, sample, spec)
        samples[sample_id] = {"render": params}
    shutil.rmtree(root / "normal_estimated", ignore_errors=True)  # the raw download has no normals
    return {"geometry": mini._geometry("vkitti", spec, seed), "samples": samples}


def _flying_things_3d(root: Path, count: int, size: tuple[int, int], seed: int) -> dict:
    h, w = size
    spec = {"size": [h, w], "count": count, "crop": [h - 4, w]}
    geometry = dict(mini._geometry("flying_things_3d", spec, seed), baseline=1.0)
    samples = {}
    for i in range(count):
        s, params = mini._render("flying_things_3d", i, spec, seed)
        split = "val" if count > 1 and i == count - 1 else "train"
        number, top = 2 * i, root / split
        fb = geometry["focal"] * geometry["baseline"]
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
        formats.write_rgb(top / f"image_clean/left/{number:07d}.png", mini._u8(s["rgb"]))
        formats.write_rgb(top / f"image_clean/left/{number + 1:07d}.png", mini._u8(s["rgb_next"]))
        formats.write_pfm(top / f"disparity/left/{number:07d}.pfm", -disparity)  # the subset stores -disparity
        formats.write_pfm(top / f"disparity_change/left/into_future/{number:07d}.pfm", -(later - disparity))
        formats.write_flo(top / f"flow/left/into_future/{number:07d}.flo", flow)
        formats.write_mask_png(top / f"flow_occlusions/left/into_future/{number:07d}.png", defined & ~s["valid_flow"])
        samples[f"{split}/flow_2d/{number:07d}.png"] = {"render": params, "fast_pixel": fast}
    return {"geometry": geometry, "samples": samples}


def _mid(root: Path, count: int, size: tuple[int, int], seed: int) -> dict:
    spec = {"scenes": count, "lights": 2, "size": list(size)}
    samples = {}
    for i in range(count * spec["lights"]):
        s, params = mini._render("mid", i, spec, seed)
        scene, light = divmod(i, spec["lights"])
        folder = root / "test" / f"everett_room{scene:02d}"
        exposure = 2.0 + light  # HDR: values above 1
        formats.write_exr(folder / f"dir_{light}_mip2.exr", exposure * s["rgb_linear"], half=True)
        if light == 0:  # the scene's albedo, the same under every light
            formats.write_exr(folder / "albedo.exr", s["albedo"], half=True)
        samples[f"test/everett_room{scene:02d}_dir_{light}_mip2.jpg"] = {"render": params, "exposure": exposure}
    return {"geometry": {}, "samples": samples}


_WRITERS = {"hypersim": _hypersim, "vkitti": _vkitti, "flying_things_3d": _flying_things_3d, "mid": _mid}


def write_raw_miniature(dataset: str, root, count: int | None = None, size=None, seed: int = 2024) -> Path:
    """Write the raw miniature of ``dataset`` into ``root`` (created; must be empty or absent) and
    return it; ``count`` samples (MID: scenes, 2 lights each) of ``size`` = (height, width)."""
    if dataset not in _WRITERS:
        raise ValueError(f"no raw miniature for {dataset!r}; valid: {', '.join(RAW_DATASETS)} "
                         f"(the others need no conversion: stablemtl.data.mini writes them)")
    root = Path(root)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty; write a raw miniature into a new folder")
    default_count, default_size = DEFAULTS[dataset]
    count = default_count if count is None else int(count)
    size = tuple(int(v) for v in (size or default_size))
    root.mkdir(parents=True, exist_ok=True)
    meta = _WRITERS[dataset](root, count, size, seed)
    meta.update(dataset=dataset, count=count, size=list(size), seed=seed, world_version=mini.WORLD_VERSION)
    from stablemtl.data.prepare import RAW_META

    formats._write_bytes(root / RAW_META, json.dumps(meta, indent=1, sort_keys=True).encode())
    return root
