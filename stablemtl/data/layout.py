"""The layout checks of the evaluation datasets (``stablemtl prepare`` checks, nothing to convert):
Cityscapes, the KITTI Eigen depth split, KITTI 2015 flow and DIODE.

``check_layout`` lists every problem of a dataset's folder at once: its split list (read, or built
from the folder when it has none) and every file each line needs, as the loader reads them.
"""

from __future__ import annotations

from pathlib import Path

from stablemtl.data import splits
from stablemtl.data.evaluation_sources import Cityscapes
from stablemtl.data.sources import SOURCES

CHECKED = ("cityscapes", "kitti_depth", "kitti_flow", "diode")
# dataset -> its split list (the one its source reads by default)
CHECK_LISTS = {name: SOURCES[name].split_files[SOURCES[name].default_split] for name in CHECKED}
EXPECTED_IMAGES = {"cityscapes": 500, "kitti_depth": 652, "kitti_flow": 200, "diode": 771}


def _line_files(dataset: str, line: list[str]) -> list[str]:
    """The files one split-list line needs (the loader's reads)."""
    if dataset == "cityscapes":
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
    if dataset not in CHECKED:
        raise ValueError(f"check_layout checks {', '.join(CHECKED)}; got {dataset!r}")
    root = Path(root)
    if not root.is_dir():
        return [f"the folder {root} does not exist"], {}, {}
    file = CHECK_LISTS[dataset]
    found = next((p for p in splits.list_paths(root, dataset, file) if p.is_file()), None)
    problems: list[str] = []
    build: dict[str, list[str]] = {}
    if found is not None:
        lines = splits.list_columns(found)
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
