"""MID (the MIT multi-illumination test set): the release's preprocessing (``dataset_preprocess/mid_intrinsics/``)
of the HDR EXRs into tone-mapped inputs, the albedo, and shading = clip(scale x rgb / albedo), as JPEGs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stablemtl.data import formats
from stablemtl.data.convert.common import PREPARE_VERSION, missing_error, run_frames
from stablemtl.data.imaging import TONEMAP, to_uint8, tonemap, tonemap_scale

# dataset_preprocess/mid_intrinsics/preprocess.py: Hypersim's tone mapping, JPEG quality 75
MID = {**TONEMAP, "jpeg_quality": 75}
RELEASE_FILES = ["dataset_preprocess/mid_intrinsics/preprocess.py"]
# Where the kit's output differs from the release's on purpose (recorded in the manifest).
DEVIATIONS = ["JPEGs are encoded with OpenCV at quality 75 (the release used PIL's default, also 75)",
              "0 / 0 in rgb / albedo is written as shading 0 (the release's NaN cast to uint8)"]


def convert_frame(job: dict) -> dict:
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


def convert(raw: Path, out: Path, meta: dict, workers, progress) -> dict:
    """Convert every light direction of every test scene; returns the preparation's numbers, records, lists,
    geometry and details."""
    numbers = dict(MID)
    scenes = sorted(p for p in (raw / "test").glob("*") if p.is_dir())
    if not scenes:
        raise missing_error("mid", raw, [raw / "test" / "<scene>" / "dir_0_mip2.exr"])
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
        raise missing_error("mid", raw, missing)
    config = {"dataset": "mid", "numbers": numbers, "version": PREPARE_VERSION}
    records = run_frames("mid", jobs, convert_frame, out, config, workers, progress)
    lists = {"test.txt": sorted(r["written"]["rgb"] for r in records.values())}
    return dict(numbers=numbers, records=records, lists=lists, geometry=meta.get("geometry") or {}, extra={})
