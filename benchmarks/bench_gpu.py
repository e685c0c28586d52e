"""Paper-scale speed and memory on one device: inference, training steps, evaluation, peak memory.

Builds the model from the published Stable Diffusion 2 component configs with random weights
(timing and memory only; ``--base DIR`` loads a real base directory instead), then prints one
JSON line:

- ``infer_ms``: milliseconds per image, image in -> decoded outputs out, at ``--size`` (576 x 768),
  for the single and the multi stream, 1 task (depth) and all 7, in fp32 and bf16 (bf16 weights
  for inference), each also compiled with ``--compile``;
- ``train_step_s``: seconds per optimizer step of the single and the multi stream (one task, 2
  micro-batches of 16 images at 288 x 384, each encoding its images and targets with the frozen
  VAE, Adam), in fp32 and in the trainer's bf16 (frozen parts in bf16 weights, the trainable UNet
  in float32 under autocast), and ``single_recipe_24gib``: docs/gpu.md's recipe for a 24 GiB GPU
  (4 micro-batches of 8, bf16, gradient checkpointing, 8-bit Adam when bitsandbytes is
  installed); ``peak_gib`` the device's peak memory of each (CUDA only);
- ``eval_s_per_image``: one multi-stream prediction at DIODE's 384 x 512 (fp32), and
  ``eval_hours_all``: the implied time of the 8 benchmarks x 2 models (about 6,600 predictions);
- ``paper_training_hours``: 20,000 single-stream plus 11,000 multi-stream steps at the fp32 and
  the bf16 step times;
- ``device``: the device's name.

``--tiny`` runs the same code with the smoke preset's tiny components at small sizes on the CPU,
in seconds (the test suite does). The data wait of a real training is measured by
``benchmarks/bench_train.py`` (``data_s`` in ``train_log.csv``).

    .venv/bin/python benchmarks/bench_gpu.py [--tiny] [--device cuda] [--compile] [--base DIR]
"""

import argparse
import importlib.util
import json
import time

import torch

from stablemtl import train as T
from stablemtl.train_config import TrainConfig
from stablemtl.model import base as B
from stablemtl.model import sd2
from stablemtl.model import streams as S
from stablemtl.model.pipeline import StableMTLPipeline
from stablemtl.tasks import TASK_NAMES

PREDICTIONS_ALL = 6600  # 8 benchmarks x 2 models, the real test sets


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeat: int) -> float:
    """Median seconds of ``fn()`` over ``repeat`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def models(base, task_attention: dict):
    torch.manual_seed(0)
    single = S.SingleStream.from_base(base).eval()
    multi = S.MultiStream.from_single_stream(single, **task_attention).eval()
    for module in multi.task_attention.values():  # away from the zero init: the task attention computes
        torch.nn.init.normal_(module.out.weight, std=0.01)
    return single, multi


def inference(single, multi, device, size, repeat, compile_too) -> dict:
    out = {}
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    for dname, dtype in dtypes.items():
        for name, model in (("single", single), ("multi", multi)):
            pipe = StableMTLPipeline.from_model(model.to(device, dtype))
            images = torch.rand(1, 3, *size, device=device)
            for label, tasks in (("1_task", ["depth"]), ("7_tasks", list(TASK_NAMES))):
                def call(pipe=pipe, tasks=tasks):
                    pipe(images, tasks=tasks, next_images=images)
                out[f"{name}_{label}_{dname}"] = round(timed(call, device, repeat) * 1000, 1)
                if compile_too:  # compiled in place, then undone: the modules are shared by what follows
                    pipe.compile()
                    out[f"{name}_{label}_{dname}_compiled"] = round(timed(call, device, repeat) * 1000, 1)
                    pipe.uncompile()
    single.to(device, torch.float32), multi.to(device, torch.float32)
    return out


def train_step(model, device, size, batch, micro, precision: str, repeat: int, checkpointing: bool = False,
               optimizer: str = "adam") -> tuple[float, float | None]:
    """Seconds per optimizer step (``micro`` micro-batches of ``batch`` images, each micro-batch encoding
    its images and targets with the frozen VAE as the trainer does) and the peak memory in GiB.
    ``precision`` "bf16": the trainer's bf16 (frozen parts in bf16 weights, the UNet under autocast)."""
    model.to("cpu", torch.float32)
    originals = T.half_frozen(model) if precision == "bf16" else []  # the float32 originals stay on the CPU
    model.to(device).train()
    model.unet.enable_gradient_checkpointing() if checkpointing else model.unet.disable_gradient_checkpointing()
    config = TrainConfig(optimizer=optimizer, lr=1e-5)
    opt = T.make_optimizer(model.trainable_parameters(), config)
    frozen = model.frozen
    images, targets = (torch.rand(batch, 3, *size, device=device) * 2 - 1 for _ in range(2))
    valid = torch.ones(batch, 1, *size, dtype=torch.bool, device=device)

    def step():
        for _ in range(micro):
            z_image, z_target = T.encode_frozen(frozen, images), T.encode_frozen(frozen, targets)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                pred = model.predict_latents(z_image, None, ["depth"])[0]
            loss = T.masked_latent_mse(pred.float(), z_target, T.latent_valid(valid, frozen.vae_factor))
            (loss / micro).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        seconds = timed(step, device, repeat)
        peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
    finally:
        for owner, name, module in originals:  # the float32 originals back, for good
            setattr(owner, name, module)
        model.unet.disable_gradient_checkpointing()
        model.to(device, torch.float32).eval()
    return seconds, None if peak is None else round(peak, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the smoke preset's tiny components at small sizes")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--base", default=None, help="a base directory to load instead of random SD2 components")
    parser.add_argument("--compile", action="store_true", help="also time the compiled pipelines")
    parser.add_argument("--repeat", type=int, default=None, help="timed calls per measure (median)")
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available on this machine")
    if args.tiny:
        from stablemtl.presets import load_preset

        smoke = load_preset("smoke")["model"]
        base, task_attention = B.random_base(B.tiny_configs(smoke["base"])), smoke["task_attention"]
        size, eval_size, train_size, batch, micro, repeat = (32, 48), (32, 48), (32, 48), 2, 2, args.repeat or 1
    else:
        base = B.load_base(args.base) if args.base else B.random_base(sd2.SD2_CONFIGS)
        task_attention = {}  # the release's: query MLP width 640, 4 heads
        size, eval_size, train_size, batch, micro, repeat = (576, 768), (384, 512), (288, 384), 16, 2, args.repeat or 5
    single, multi = models(base, task_attention)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "tiny": args.tiny, "size": list(size), "infer_ms": inference(single, multi, device, size, repeat,
                                                                             args.compile)}
    steps, peaks = {}, {}
    for name, model in (("single", single), ("multi", multi)):
        for precision in ("fp32", "bf16"):
            steps[f"{name}_{precision}"], peaks[f"{name}_{precision}"] = train_step(
                model, device, train_size, batch, micro, precision, repeat)
    # the 24 GiB recipe (docs/gpu.md): the same effective batch in micro-batches half the size,
    # bf16, gradient checkpointing (and 8-bit Adam when bitsandbytes is installed)
    recipe_optimizer = "adam8bit" if importlib.util.find_spec("bitsandbytes") and device.type == "cuda" else "adam"
    steps["single_recipe_24gib"], peaks["single_recipe_24gib"] = train_step(
        single, device, train_size, max(1, batch // 2), micro * 2, "bf16", repeat, checkpointing=True,
        optimizer=recipe_optimizer)
    result.update(train_step_s={k: round(v, 4) for k, v in steps.items()}, peak_gib=peaks,
                  train_batch=f"{micro} x {batch} at {train_size[0]} x {train_size[1]}",
                  recipe_24gib=f"{micro * 2} x {max(1, batch // 2)}, bf16, gradient checkpointing, {recipe_optimizer}")
    pipe = StableMTLPipeline.from_model(multi.to(device, torch.float32))
    image = torch.rand(1, 3, *eval_size, device=device)
    per_image = timed(lambda: pipe(image, tasks=["depth", "normal"], next_images=image), device, repeat)
    result.update(eval_s_per_image=round(per_image, 4), eval_hours_all=round(per_image * PREDICTIONS_ALL / 3600, 3))
    result["paper_training_hours"] = {
        d: round((20000 * steps[f"single_{d}"] + 11000 * steps[f"multi_{d}"]) / 3600, 2)
        for d in ("fp32", "bf16")}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
