"""The paper path at Stable Diffusion 2's exact size on this machine: ``stablemtl rehearse --width 1.0``.

Runs (or resumes) the rehearsal of the paper preset with SD2's architecture (random weights, the
real tokenizer) on the real-size miniatures, then prints one JSON line with the figures docs/paper.md's
GPU section quotes: per stage the wall seconds, peak resident memory (GiB) and status or error; the
single- and multi-stream training's seconds per optimizer step and per micro-batch; the evaluation's
seconds per image; the 576 x 768 seven-task prediction's seconds per image and peak memory of each
stream; and the counted memory of each training (``stablemtl.train_config.memory_count``).

    .venv/bin/python benchmarks/bench_rehearse.py [--out outputs/rehearsal-sd2] [--width 1.0] [--steps 1]
                                                  [--images 1] [--device auto]

On 2 CPU cores it takes about an hour at width 1.0 (most of it the single stream's 32 micro-batches and the
evaluation); on a GPU, minutes.
"""

import argparse
import json

from stablemtl.rehearse import Rehearsal
from stablemtl.train_config import TrainConfig, memory_count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="outputs/rehearsal-sd2")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--images", type=int, default=1)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    rehearsal = Rehearsal(args.out, width=args.width, steps=args.steps, images=args.images, device=args.device,
                          quiet=True)
    report = rehearsal.run()
    counted = {}
    for kind in ("single_stream", "multi_stream"):
        config = TrainConfig(kind=kind, base=str(rehearsal.base), batch_per_device=report["settings"]["batch_per_device"])
        counted[kind] = {k: round(v, 2) if isinstance(v, float) else v for k, v in memory_count(config).items()}
    stages = {name: {k: r.get(k) for k in ("status", "wall_s", "peak_rss_gib", "error") if r.get(k) is not None}
              for name, r in report["stages"].items() if name != "notes"}
    predict = {name.removeprefix("predict "): {k: r.get(k) for k in ("s_per_image", "load_s", "peak_rss_gib",
                                                                      "cuda_peak_gib")}
               for name, r in report["stages"].items() if name.startswith("predict ")}
    print(json.dumps({"settings": report["settings"], "machine": report["machine"], "ok": report["ok"],
                      "wall_s": report["wall_s"], "stages": stages, "training": report["training"],
                      "evaluation": report["evaluation"], "predict_576x768_7_tasks": predict,
                      "counted_memory": counted}))


if __name__ == "__main__":
    main()
