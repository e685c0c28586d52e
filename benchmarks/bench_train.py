"""Training speed on the demo model: seconds per optimizer step and the share spent waiting for data.

Prints one JSON object:
- ``single_step_s``: seconds per optimizer step of the single-stream model (all 7 tasks round-robin);
- ``multi_step_s``: {2, 4, 7: seconds per step} for the multi-stream model trained on that many
  tasks (its auxiliary pass computes the other N-1 tasks' features, so the cost should grow at
  most linearly with N), with ``multi_step_ratio_7_to_2`` and the linear bound ``(7-1)/(2-1)``;
- ``data_wait_share``: data-loading time / step time of the single-stream run (target < 10 %);
- ``latent_cache_speedup``: one micro-batch (forward + backward) with the frozen-VAE latents
  computed versus read from the cache (``cache_latents=True``, after the first epoch).

Demo preset numbers (resolutions, batch 4 x accumulation 2), demo mini datasets and demo base
(built and written if missing, under ``--work``). Steps: ``--steps`` measured after one warm-up step.

    .venv/bin/python benchmarks/bench_train.py [--steps 7] [--work outputs/bench]
"""

import argparse
import csv
import json
import shutil
import time
from pathlib import Path

from stablemtl.model.pipeline import MODEL_FILE
from stablemtl import train as T
from stablemtl.train_config import preset_config
from stablemtl.data import mini
from stablemtl.model import base as B
from stablemtl.model import streams as S
from stablemtl.model.pipeline import save_model
from stablemtl.tasks import TASK_NAMES


def measure(config, steps):
    trainer = T.Trainer(config, progress=False)
    trainer.train(until=1)  # warm-up step (first calls allocate)
    start = time.perf_counter()
    trainer.train(until=1 + steps)
    seconds = (time.perf_counter() - start) / steps
    with open(Path(config.output_dir) / "train_log.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if int(r["step"]) >= 1]
    data = sum(float(r["data_s"]) for r in rows) / sum(float(r["step_s"]) for r in rows)
    return seconds, data


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--work", default="outputs/bench")
    args = parser.parse_args()
    work = Path(args.work)
    mini.write_mini_datasets(work / "data", "demo", progress=False)
    base_dir = B.build_tiny_base(work / "base_demo", "demo", progress=False)
    init = work / "single_init"
    if not (init / MODEL_FILE).is_file():
        save_model(S.SingleStream.from_base(B.load_base(base_dir)), init)
    common = dict(base=str(base_dir), data_root=str(work / "data"), checkpoint_every=0, backup_every=0,
                  iterations=1 + args.steps)
    runs = work / "train_runs"
    shutil.rmtree(runs, ignore_errors=True)
    single_s, data_share = measure(preset_config("demo", "single_stream", output_dir=str(runs / "single"), **common),
                                   args.steps)
    # latent caching: one micro-batch (forward + backward) with a cold cache vs a warm one (after an epoch)
    cache_cfg = preset_config("demo", "single_stream", output_dir=str(runs / "cache"), cache_latents=True, **common)
    trainer = T.Trainer(cache_cfg, progress=False)
    timings = {}
    for task, dataset in (("depth", "hypersim"), ("semantic", "vkitti")):
        source = trainer.sources[(task, dataset)]
        batch = T.collate([source[i] for i in range(cache_cfg.batch_per_device)], task)
        for label in ("cold", "warm"):
            start = time.perf_counter()
            for _ in range(3):
                if label == "cold":
                    trainer.latent_cache.clear()
                trainer.loss(batch, task, dataset).backward()
            timings[(task, label)] = (time.perf_counter() - start) / 3
    cache_speedup = {t: round(timings[(t, "cold")] / timings[(t, "warm")], 2) for t in ("depth", "semantic")}
    multi = {}
    for n in (2, 4, 7):
        tasks = list(TASK_NAMES[:n]) if n < 7 else list(TASK_NAMES)
        cfg = preset_config("demo", "multi_stream", tasks=tasks, init=str(init), output_dir=str(runs / f"multi{n}"),
                              **common)
        multi[n], _ = measure(cfg, args.steps)
    print(json.dumps({
        "single_step_s": round(single_s, 3),
        "multi_step_s": {n: round(s, 3) for n, s in multi.items()},
        "multi_step_ratio_7_to_2": round(multi[7] / multi[2], 2),
        "linear_bound_7_to_2": 6.0,
        "data_wait_share": round(data_share, 3),
        "latent_cache_speedup": cache_speedup,
        "steps_measured": args.steps,
        "batch": "4 per device x 2 accumulation (demo preset)",
    }, indent=1))


if __name__ == "__main__":
    main()
