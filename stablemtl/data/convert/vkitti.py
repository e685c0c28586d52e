"""Virtual KITTI 2: the release's normals estimated from depth with D2NT v3
(``depth-to-normal-translator/``), written to ``normal_estimated/`` beside a link to the raw
``original/`` folder, and the per-task split lists.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stablemtl.data import formats, splits
from stablemtl.data.annotations import VKITTI_DEPTH_SCALE
from stablemtl.data.convert.common import PREPARE_VERSION, missing_error, run_frames
from stablemtl.data.formats import DatasetLayoutError
from stablemtl.data.imaging import d2nt_normals, normal_to_rgb
from stablemtl.data.training_sources import VirtualKITTI2

# depth-to-normal-translator/python/process_vkitti2.py and utils/myApis.py (D2NT v3); the camera is the
# one the loader assumes too (``VirtualKITTI2.geometry``)
_CAMERA = VirtualKITTI2.geometry
VKITTI = {"fx": _CAMERA["focal"], "fy": _CAMERA["focal"], "cx": _CAMERA["cx"], "cy": _CAMERA["cy"],
          "depth_scale": VKITTI_DEPTH_SCALE, "version": "d2nt_v3", "soft_min_base": float(np.e), "eps": 1e-8}
RELEASE_FILES = ["depth-to-normal-translator/python/process_vkitti2.py",
                 "depth-to-normal-translator/python/utils/myApis.py"]
# Where the kit's output differs from the release's on purpose (recorded in the manifest).
DEVIATIONS = ["normals are saved as float32 .npy (the release saved float64; the loader reads float32)",
              "the normal visualisation PNG is 8-bit RGB (the release's plt.imsave wrote RGBA)"]


def convert_frame(job: dict) -> dict:
    """One Virtual KITTI 2 depth map -> D2NT v3 normals (.npy and the visualisation .png)."""
    n = job["numbers"]
    depth_path = Path(job["source"]) / job["depth"]
    depth = formats.read_png(depth_path, np.uint16, 1, "a vKITTI 2 16-bit depth PNG (cm)").astype(np.float64)
    normal = d2nt_normals(depth / n["depth_scale"], n["fx"], n["fy"], n["cx"], n["cy"], n["soft_min_base"], n["eps"])
    stem = job["depth"].replace("/depth/", "/normal/").replace("depth_", "normal_")[: -len(".png")]
    record: dict = {"written": {"normal_npy": f"normal_estimated/{stem}.npy",
                                "normal_png": f"normal_estimated/{stem}.png"}, "counts": {}}
    out = Path(job["out"])
    formats.write_npy(out / record["written"]["normal_npy"], normal.astype(np.float32))
    formats.write_rgb(out / record["written"]["normal_png"], normal_to_rgb(normal))
    return record


def _source(raw: Path) -> Path:
    """The folder holding SceneXX/: ``<raw>/original`` (the kit's layout) or ``<raw>`` itself."""
    if (raw / "original").is_dir():
        return raw / "original"
    if any(raw.glob("Scene*")):
        return raw
    raise missing_error("vkitti", raw, [raw / "original"])


def convert(raw: Path, out: Path, meta: dict, workers, progress) -> dict:
    """Estimate the normals of every depth map of the release's scenes, variations and cameras; returns the
    preparation's numbers, records, lists, geometry and details."""
    geometry = meta.get("geometry") or {}
    numbers = dict(VKITTI)
    if geometry:
        numbers.update(fx=float(geometry["focal"]), fy=float(geometry["focal"]), cx=float(geometry["cx"]),
                       cy=float(geometry["cy"]))
    source = _source(raw)
    folders = [f"{s}/{v}/frames/depth/Camera_{c}" for s in splits.VKITTI_SCENES for v in splits.VKITTI_VARIATIONS
               for c in (0, 1)]
    depths = [p.relative_to(source).as_posix() for f in folders for p in sorted((source / f).glob("depth_*.png"))]
    if not depths:
        raise missing_error("vkitti", raw, [source / folders[0] / "depth_00000.png"])
    original = out / "original"
    if not original.exists():  # the loader reads original/ beside normal_estimated/
        out.mkdir(parents=True, exist_ok=True)
        original.symlink_to(source.resolve(), target_is_directory=True)
    elif not original.resolve().samefile(source):
        raise DatasetLayoutError(f"vkitti: {original} exists and is not the raw data {source}; give --out a new "
                                 f"folder or the folder that holds original/")
    jobs = [(d, dict(source=str(source), out=str(out), depth=d, numbers=numbers, inputs=[source / d])) for d in depths]
    config = {"dataset": "vkitti", "numbers": numbers, "version": PREPARE_VERSION}
    records = run_frames("vkitti", jobs, convert_frame, out, config, workers, progress)
    lists = splits.vkitti_lines(out)
    found = {f for f in folders if (source / f).is_dir()}
    extra = {"depth_folders_found": len(found), "depth_folders_missing": sorted(set(folders) - found)}
    return dict(numbers=numbers, records=records, lists=lists, geometry=geometry, extra=extra)
