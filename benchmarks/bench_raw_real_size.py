"""The data path at the real datasets' resolutions: raw miniatures written, prepared and read.

For each of the eight datasets: ``raw.write_raw_miniature`` at ``raw.REAL_SIZES`` (``--images``
frames; MID: scenes of 2 lights), ``prepare.prepare`` (KITTI Eigen with the tree's own
``eigen_test_files_with_gt.txt``), then every sample read by its loader as the paper preset
reads it: training sources per task at the training resolution with augmentation and encoded
targets (two epochs), benchmarks at their evaluation resolution. Prints one JSON line per
dataset: seconds to write, prepare and read (``read_s_per_sample``), the render scale, and the
geometry overrides the trees carry (none at the real sizes).

    .venv/bin/python benchmarks/bench_raw_real_size.py [--work outputs/bench_raw] [--images 2]
        [--render-scale 4] [--scale vkitti=2 ...] [--datasets hypersim,vkitti]
"""

import argparse
import json
import shutil
import time
from pathlib import Path

from stablemtl.data import prepare as P
from stablemtl.data import raw as R
from stablemtl.data import sources as S
from stablemtl.data.convert.common import RAW_META
from stablemtl.benchmarks import BENCHMARKS
from stablemtl.presets import load_preset


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="outputs/bench_raw")
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--render-scale", type=int, default=4)
    parser.add_argument("--scale", action="append", default=[], help="dataset=s: another render scale for one")
    parser.add_argument("--datasets", default=",".join(R.RAW_DATASETS))
    args = parser.parse_args()
    scales = {d: int(s) for d, s in (item.split("=") for item in args.scale)}
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    train = load_preset("paper")["train"]["resolution"]
    for dataset in args.datasets.split(","):
        scale = scales.get(dataset, args.render_scale)
        start = time.perf_counter()
        raw = R.write_raw_miniature(dataset, work / "raw" / dataset, count=max(1, args.images // 2) if dataset == "mid"
                                    else args.images, size=R.REAL_SIZES[dataset], render_scale=scale)
        written = time.perf_counter()
        eigen = raw / "eigen_test_files_with_gt.txt" if dataset == "kitti_depth" else None
        manifest = P.prepare(dataset, raw, work / "out" / dataset, progress=False, eigen_list=eigen)
        prepared = time.perf_counter()
        cls, reads = S.SOURCES[dataset], 0
        if dataset in train:
            for task in cls.tasks_provided:
                source = cls(work / "out" / dataset, tasks=[task], resolution=train[dataset], augment=True,
                             encode_targets=True)
                for index in range(len(source)):
                    for epoch in range(2):
                        source[(index, epoch)]
                        reads += 1
        for b in (b for b in BENCHMARKS.values() if b.dataset == dataset):
            source = cls(work / "out" / dataset, tasks=[b.task], resolution=b.resolution, rescale_flow=not b.native_units)
            for index in range(len(source)):
                source[index]
                reads += 1
        read = time.perf_counter()
        print(json.dumps({
            "dataset": dataset, "size": R.REAL_SIZES[dataset], "render_scale": scale,
            "write_s": round(written - start, 2), "prepare_s": round(prepared - written, 2),
            "read_s_per_sample": round((read - prepared) / max(reads, 1), 3), "samples_read": reads,
            "raw_geometry": json.loads((raw / RAW_META).read_text())["geometry"],
            "loader_overrides": manifest["geometry"]}), flush=True)


if __name__ == "__main__":
    main()
