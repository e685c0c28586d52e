"""FlyingThings3D (the subset): the release's preprocessing (``dataset_preprocess/flying_things_3D/``) of
the .flo / .pfm files into the KITTI-style flow PNG (|flow| >= 500 px invalid), the point cloud
``pc1`` and its scene flow (points nearer than 35 m), with the images the frames use.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stablemtl.data import annotations, formats
from stablemtl.data.convert.common import PREPARE_VERSION, copy_file, missing_error, run_frames
from stablemtl.data.imaging import disparity_to_points
from stablemtl.data.training_sources import FlyingThings3D

# dataset_preprocess/flying_things_3D/preprocess.py and utils.py; the camera is the one the loader assumes
# too (``FlyingThings3D.geometry``)
_CAMERA = FlyingThings3D.geometry
FT3D = {"baseline": 1.0, "focal": _CAMERA["focal"], "cx": _CAMERA["cx"], "cy": _CAMERA["cy"], "max_depth": 35.0,
        "max_flow": 500.0, "disparity_eps": 1e-5, "disparity_sign": -1.0, "flow_scale": 64.0}
RELEASE_FILES = ["dataset_preprocess/flying_things_3D/preprocess.py", "dataset_preprocess/flying_things_3D/utils.py"]
# Where the kit's output differs from the release's on purpose (recorded in the manifest).
DEVIATIONS = [
    "only the images the frames use (N and N + 1) are copied (the release copied image_clean/left whole)",
    "the disparity of frame N + 1 is not read: the release used it only for pc2, which it did not save",
    "the empty occ_mask_3d/ folder is not created",
]
FT3D_INPUTS = ("disparity/left/{i:07d}.pfm", "disparity_change/left/into_future/{i:07d}.pfm",
               "flow/left/into_future/{i:07d}.flo", "flow_occlusions/left/into_future/{i:07d}.png",
               "image_clean/left/{i:07d}.png", "image_clean/left/{n:07d}.png")


def convert_frame(job: dict) -> dict:
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
    copy_file(raw / "image_clean" / "left" / f"{i:07d}.png", out / written["image"])
    copy_file(raw / "image_clean" / "left" / f"{i + 1:07d}.png", out / written["image_next"])
    copy_file(raw / "flow_occlusions" / "left" / "into_future" / f"{i:07d}.png", out / written["occ_mask_2d"])
    annotations.write_kitti_flow(out / written["flow_2d"], np.where(fast[..., None], 0.0, flow), ~fast)
    formats.write_npz(out / written["pc"], pc1=pc1)
    formats.write_npy(out / written["flow_3d"], flow_3d)
    counts = {"points": int(len(pc1)), "points_beyond_max_depth": int((~near).sum()),
              "points_not_finite": int((~finite).sum()), "flow_pixels_too_fast": int(fast.sum())}
    return {"written": written, "counts": counts}


def convert(raw: Path, out: Path, meta: dict, workers, progress) -> dict:
    """Convert every frame of ``train/`` (and ``val/``), one per ``.flo`` file; returns the preparation's
    numbers, records, lists, geometry and details."""
    geometry = meta.get("geometry") or {}
    numbers = dict(FT3D)
    if geometry:
        numbers.update({k: float(geometry[k]) for k in ("focal", "cx", "cy", "baseline") if k in geometry})
    splits_found = [s for s in ("train", "val") if (raw / s).is_dir()]
    if not splits_found:
        raise missing_error("flying_things_3d", raw, [raw / "train" / "flow" / "left" / "into_future"])
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
        raise missing_error("flying_things_3d", raw, missing)
    config = {"dataset": "flying_things_3d", "numbers": numbers, "version": PREPARE_VERSION}
    records = run_frames("flying_things_3d", jobs, convert_frame, out, config, workers, progress)
    return dict(numbers=numbers, records=records, lists=lists, geometry=geometry, extra={"splits": splits_found})
