"""Batched all-task inference versus the reference's scheme, on the demo model.

Prints one JSON object:
- ``multistream_batched_s``: seconds for all 7 tasks with the multi-stream
  model, batched (1 auxiliary call for the features of all tasks + 1 main call);
- ``multistream_reference_s``: the reference's scheme (for each main task, one
  auxiliary pass per other task, then the main pass: 49 UNet passes);
- ``multistream_speedup`` (target >= 3) and ``multistream_max_abs_diff`` (latents);
- ``singlestream_batched_s`` / ``singlestream_sequential_s`` /
  ``singlestream_speedup``: 1 UNet call for all tasks versus one per task;
- ``unet_calls``: UNet forward calls counted in each scheme.

Times are medians of ``--repeat`` runs, measured in one process. The base is the
demo tiny base (built if missing, kept under ``--base``); the task attention's
output projection is randomised so that it takes part in the comparison.

    .venv/bin/python benchmarks/bench_pipeline.py [--base outputs/bench/base] [--batch 2] [--size 64 208]
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from stablemtl.model import base as B
from stablemtl.model import streams as S
from stablemtl.tasks import TASK_NAMES

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the reference scheme is a test helper
from reference_model import predict_latents_reference  # noqa: E402


def timed(fn, repeat):
    times, out = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        with torch.no_grad():
            out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def count_calls(unets, fn):
    calls = []
    handles = [u.register_forward_pre_hook(lambda m, a: calls.append(1)) for u in unets]
    with torch.no_grad():
        fn()
    for h in handles:
        h.remove()
    return len(calls)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="outputs/bench/base_demo")
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, nargs=2, default=(64, 208))
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if not (Path(args.base) / "model_index.json").is_file():  # built once, kept under --base
        B.build_tiny_base(args.base, args.preset)
    base = B.load_base(args.base)
    torch.manual_seed(0)
    single = S.SingleStream.from_base(base).eval()
    multi = S.MultiStream.from_single_stream(single, query_hidden=128).eval()
    for module in multi.task_attention.values():
        torch.nn.init.normal_(module.out.weight, std=0.05)
    f = base.vae_factor
    z = torch.randn(args.batch, 4, args.size[0] // f, args.size[1] // f)
    z_next = torch.randn_like(z)
    tasks = list(TASK_NAMES)

    def single_sequential():
        return torch.cat([single.predict_latents(z, z_next, [t]) for t in tasks])

    results = {}
    results["multistream_batched_s"], batched = timed(lambda: multi.predict_latents(z, z_next, tasks), args.repeat)
    results["multistream_reference_s"], reference = timed(lambda: predict_latents_reference(multi, z, z_next, tasks), args.repeat)
    results["multistream_speedup"] = round(results["multistream_reference_s"] / results["multistream_batched_s"], 2)
    results["multistream_max_abs_diff"] = float((batched - reference).abs().max())
    results["singlestream_batched_s"], s_batched = timed(lambda: single.predict_latents(z, z_next, tasks), args.repeat)
    results["singlestream_sequential_s"], s_seq = timed(single_sequential, args.repeat)
    results["singlestream_speedup"] = round(results["singlestream_sequential_s"] / results["singlestream_batched_s"], 2)
    results["singlestream_max_abs_diff"] = float((s_batched - s_seq).abs().max())
    results["unet_calls"] = {
        "multistream_batched": count_calls([multi.unet, multi.aux_unet], lambda: multi.predict_latents(z, z_next, tasks)),
        "multistream_reference": count_calls([multi.unet, multi.aux_unet], lambda: predict_latents_reference(multi, z, z_next, tasks)),
        "singlestream_batched": count_calls([single.unet], lambda: single.predict_latents(z, z_next, tasks)),
    }
    results.update(batch=args.batch, image_size=list(args.size), latent_size=list(z.shape[-2:]),
                   threads=torch.get_num_threads(), device="cpu")
    for k, v in results.items():
        if isinstance(v, float):
            results[k] = round(v, 6) if "diff" not in k else v
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
