"""What the converters share: the preparation's version and file names, the raw trees they expect
and the error naming a missing file, a raw miniature's meta file, and the resumable frame runner
(``stablemtl.data.jobs``) bound to the preparation's journal and manifest.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from stablemtl.data import formats
from stablemtl.data.formats import DatasetLayoutError
from stablemtl.data.jobs import run_resumable

PREPARE_VERSION = 1  # bump when an output changes for the same input
MANIFEST = "stablemtl_prepare.json"
JOURNAL = ".stablemtl_prepare.jsonl"
RAW_META = "stablemtl_raw.json"  # written by raw.write_raw_miniature: the world's camera at its size

# the raw trees each preparation expects (the checked datasets: their own folders), for messages
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



def missing_error(dataset: str, raw: Path, missing: list[Path]) -> DatasetLayoutError:
    """The error of a raw folder that lacks ``missing``: the first one, how many more, and the expected tree."""
    more = f" (and {len(missing) - 1} more missing)" if len(missing) > 1 else ""
    return DatasetLayoutError(f"{dataset}: the raw folder {raw} is not in the expected layout: missing {missing[0]}"
                              f"{more}. Expected:\n{RAW_TREES[dataset]}")


def raw_meta(raw: Path) -> dict:
    """A raw miniature's ``stablemtl_raw.json`` (``stablemtl.data.raw``); ``{}`` for a real download."""
    return formats.read_json_if_present(raw / RAW_META)


def copy_file(src: Path, dst: Path) -> Path:
    """Copy ``src`` to ``dst`` atomically."""
    return formats.atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))


def run_frames(dataset: str, jobs: list[tuple[str, dict]], work: Callable[[dict], dict], out: Path, config: dict,
               workers: int | None, progress: bool) -> dict[str, dict]:
    """Run ``work`` on every frame not finished before (``jobs.run_resumable``: the journal
    ``<out>/.stablemtl_prepare.jsonl``; the manifest is removed first); returns key -> record."""
    return run_resumable(jobs, work, out, config, journal=out / JOURNAL, summary=out / MANIFEST, workers=workers,
                         progress=progress, desc=f"prepare {dataset}")
