"""Speed of the procedural world: renderer throughput and writing the demo datasets.

Prints one JSON object:
- ``images_per_s``: rendered samples (both frames, flow, scene flow, all
  annotations) per second in one process at the demo sizes, over the datasets'
  scene kinds, with ``per_dataset`` details;
- ``demo_write_s``: wall time of ``write_mini_datasets(tmp, "demo")`` from
  scratch with the default worker count (target: under 120 s on 2 CPU cores),
  ``demo_images`` and ``demo_bytes``;
- ``parallel_speedup``: single-process render time of all demo images divided by
  ``demo_write_s`` (includes the file encoding in the latter).

    .venv/bin/python benchmarks/bench_world.py [--samples 6] [--preset demo]
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from stablemtl.data import mini
from stablemtl.presets import load_preset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=6, help="samples rendered per dataset for images_per_s")
    parser.add_argument("--preset", default="demo")
    args = parser.parse_args()
    specs = load_preset(args.preset)["data"]
    per_dataset, total_time, total_images, serial_estimate = {}, 0.0, 0, 0.0
    for name, spec in specs.items():
        start = time.perf_counter()
        for i in range(args.samples):
            mini.render(name, i, spec, 2024)
        seconds = (time.perf_counter() - start) / args.samples
        per_dataset[name] = {"size": spec["size"], "s_per_image": round(seconds, 4)}
        total_time += seconds * args.samples
        total_images += args.samples
        serial_estimate += seconds * mini.sample_count(name, spec)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        roots = mini.write_mini_datasets(tmp, args.preset, progress=False)
        write_s = time.perf_counter() - start
        n_bytes = sum(p.stat().st_size for root in roots.values() for p in Path(root).rglob("*") if p.is_file())
    print(json.dumps({
        "preset": args.preset,
        "cpus": os.cpu_count(),
        "images_per_s": round(total_images / total_time, 2),
        "demo_write_s": round(write_s, 1),
        "demo_images": sum(mini.sample_count(n, s) for n, s in specs.items()),
        "demo_bytes": n_bytes,
        "parallel_speedup": round(serial_estimate / write_s, 2),
        "per_dataset": per_dataset,
    }, indent=1))


if __name__ == "__main__":
    main()
