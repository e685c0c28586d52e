"""Evaluation throughput on the demo model: images per second per benchmark.

Prints one JSON object: ``images_per_s`` {benchmark: images/s} for the single-stream and the
multi-stream model (batch 1, the protocol), and for the two reference rows (trivial, VAE
ceiling), at the demo preset's evaluation resolutions on the demo miniatures; ``images`` per
benchmark. The models are untrained (speed does not depend on the weights); the demo base and
data are built if missing under ``--work``.

    .venv/bin/python benchmarks/bench_evaluate.py [--work outputs/bench] [--max-images 12]
"""

import argparse
import json
import shutil
import time
from pathlib import Path

from stablemtl import evaluate as E
from stablemtl.benchmarks import BENCHMARKS
from stablemtl.data import mini
from stablemtl.model import base as B
from stablemtl.model import streams as S
from stablemtl.presets import load_preset


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="outputs/bench")
    parser.add_argument("--max-images", type=int, default=12)
    args = parser.parse_args()
    work = Path(args.work)
    mini.write_mini_datasets(work / "data", "demo", progress=False)
    base = B.load_base(B.build_tiny_base(work / "base_demo", "demo", progress=False))
    resolution = load_preset("demo")["evaluate"]["resolution"]
    single = S.SingleStream.from_base(base)
    multi = S.MultiStream.from_single_stream(single, query_hidden=128)
    out = work / "eval_runs"
    shutil.rmtree(out, ignore_errors=True)
    rates, images = {}, {}
    for label, model in (("single_stream", single), ("multi_stream", multi), ("trivial", "trivial"),
                         ("vae_ceiling", ("vae_ceiling", single.frozen))):
        rates[label] = {}
        for name in BENCHMARKS:
            start = time.perf_counter()
            E.evaluate(model, [name], out / label, work / "data", model_name=label, resolution=resolution,
                       max_images=args.max_images, progress=False)
            seconds = time.perf_counter() - start
            n = len(list((out / label / "predictions" / label / name).glob("*.npz")))
            rates[label][name] = round(n / seconds, 2)
            images[name] = n
    print(json.dumps({"images_per_s": rates, "images": images, "resolution": resolution}, indent=1))


if __name__ == "__main__":
    main()
