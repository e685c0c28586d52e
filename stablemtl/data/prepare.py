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

Here: the entry point ``prepare`` and its command line. Each converted dataset's numbers and
work are in ``stablemtl.data.convert.<dataset>`` (shared parts: ``convert.common``), the release's
image operations in ``stablemtl.data.imaging``, the resumable runner in ``stablemtl.data.jobs``
and the layout checks in ``stablemtl.data.layout``.

A raw tree written by ``stablemtl.data.raw.write_raw_miniature`` carries
``stablemtl_raw.json`` with the camera of the procedural world at its reduced size
(for KITTI: the benchmark crop, to scale); its numbers then replace the real datasets'
intrinsics, and the output gets the loader overrides (``stablemtl_dataset.json``'s
``geometry``). At the real datasets' sizes (``raw.REAL_SIZES``) a miniature has the real
cameras and crops and carries none. Real downloads have no such file.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import stablemtl
from stablemtl.data import formats
from stablemtl.data.convert import flying_things_3d, hypersim, mid, vkitti
from stablemtl.data.convert.common import MANIFEST, PREPARE_VERSION, RAW_TREES, raw_meta
from stablemtl.data.formats import DatasetLayoutError
from stablemtl.data.layout import CHECKED, check_layout
from stablemtl.data.source_base import META_FILE
from stablemtl.data.sources import SOURCES

RELEASE = "astra-vision/StableMTL"
CONVERTERS = {"hypersim": hypersim, "vkitti": vkitti, "flying_things_3d": flying_things_3d, "mid": mid}
CONVERTED = tuple(CONVERTERS)
DATASETS = CONVERTED + CHECKED


# --------------------------------------------------------------------------- the entry point

def _check(dataset: str, raw: Path, eigen_list=None) -> dict:
    """A checked dataset's result: its split lists to write, or every problem of its folder in one error."""
    problems, build, counts = check_layout(dataset, raw, eigen_list)
    if problems:
        shown = "\n".join(f"  - {p}" for p in problems)
        raise DatasetLayoutError(f"{dataset}: {len(problems)} problem(s) in {raw}:\n{shown}\n"
                                 f"Expected:\n{RAW_TREES[dataset]}")
    geometry = raw_meta(raw).get("geometry") or {}  # a procedural miniature's crops at its size (KITTI's)
    return dict(numbers={}, records={}, lists=build, geometry=geometry, extra=counts)


def default_out(dataset: str, base=None) -> Path:
    """``<base>/<the source's directory>``, ``base`` defaulting to ``$PREPROCESSED_DIR``; an error naming
    the fix when neither is given."""
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
            raise DatasetLayoutError(f"{dataset}: {out} exists and is not the dataset {raw}; nothing is converted "
                                     f"for {dataset}, so give --out {raw} (or a folder that does not exist yet: it "
                                     f"becomes a link)")
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
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; valid: {', '.join(DATASETS)}")
    raw = Path(raw)
    if not raw.is_dir():
        raise DatasetLayoutError(f"{dataset}: the raw folder {raw} does not exist. Expected:\n{RAW_TREES[dataset]}")
    out = Path(out) if out is not None else default_out(dataset)
    if dataset in CHECKED:
        result = _check(dataset, raw, eigen_list)
        _link_in_place(dataset, raw, out)
    else:
        kwargs = {"split_csv": split_csv} if dataset == "hypersim" else {}
        result = CONVERTERS[dataset].convert(raw, out, raw_meta(raw), workers, progress, **kwargs)
    records = result["records"]
    for file, lines in result["lists"].items():
        formats.write_bytes(out / "data_split" / file, "".join(line + "\n" for line in lines).encode())
    if result["geometry"]:  # a procedural miniature: the loader's overrides for its size
        formats.write_bytes(out / META_FILE, json.dumps(
            {"procedural": True, "prepared": True, "source": SOURCES[dataset].__name__,
             "geometry": result["geometry"]}, indent=1, sort_keys=True).encode())
    skipped: dict[str, int] = {}
    for record in records.values():
        if record.get("skipped"):
            skipped[record["skipped"]] = skipped.get(record["skipped"], 0) + 1
    converter = CONVERTERS.get(dataset)
    manifest = {
        "dataset": dataset, "source": SOURCES[dataset].__name__, "raw": str(raw.resolve()), "out": str(out.resolve()),
        "action": "check" if dataset in CHECKED else "convert",
        "prepare_version": PREPARE_VERSION, "kit_version": stablemtl.__version__,
        "release": {"repository": RELEASE, "files": converter.RELEASE_FILES if converter else []},
        "numbers": result["numbers"], "geometry": result["geometry"] or None,
        "frames": {"total": len(records), "skipped": dict(sorted(skipped.items()))},
        "written": _kinds(records), "counts": _summed(records),
        "lists": {file: len(lines) for file, lines in sorted(result["lists"].items())},
        "details": result["extra"], "deviations_from_release": converter.DEVIATIONS if converter else [],
    }
    formats.write_bytes(out / MANIFEST, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
    return manifest


# --------------------------------------------------------------------------- the command line

def cmd_prepare(args) -> int:
    """``stablemtl prepare``: prepare one dataset and print what was written (exit 2 on bad input)."""
    try:
        manifest = prepare(args.dataset, args.raw, args.out, args.workers, progress=not args.quiet,
                           split_csv=args.split_csv, eigen_list=args.eigen_list)
    except (DatasetLayoutError, formats.FormatError, ValueError) as err:
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
