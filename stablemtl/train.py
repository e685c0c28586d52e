"""Training of the single-stream and multi-stream models (docs/method.md, "Training"), under accelerate.

One plain configuration (``TrainConfig``; presets supply the numbers) drives
one loop that runs as one CPU process or as ``accelerate launch`` across GPUs:

- each optimizer step trains one task, round-robin (``stablemtl.data.mixing``);
  its micro-batches (gradient accumulation) share the task, each micro-batch
  comes from one dataset drawn with the release's probabilities; gradients are
  zeroed between steps, so tasks never mix in one update;
- loss: MSE between predicted and target latents over valid latent elements,
  a latent pixel being valid when its whole VAE window is (``~maxpool(~valid)``);
- Adam (lr 1e-4, no weight decay), the release's linear warm-up (factor
  step / warmup, 0 at the first step) then exponential decay towards 0.01x,
  gradient-norm clipping at 5.0, fp32 by default;
- targets as the release builds them: each sample augmented and encoded at its
  file's resolution, then resized; invalid pixels keep their raw annotation
  and only the loss mask leaves them out; normals as the files store them
  (``target_order``, ``invalid_targets``, ``normals``: ``stablemtl.options``);
- each draw of a sample gets the flips, crop and jitter of its stream's epoch,
  so an image is augmented anew every epoch, reproducibly from the seed;
- ``checkpoint/latest`` every ``checkpoint_every`` steps and backups
  ``checkpoint/iter_XXXXXX``: trainable weights (safetensors), optimizer,
  LR scheduler, sampler and RNG states, written into a partial folder and
  renamed, so a kill during the write never leaves a broken ``latest``; a run
  resumes from ``latest`` automatically and continues exactly (bitwise on CPU);
- ``train_log.csv``: step, task, dataset, loss, lr, seconds per step, data time.
- ``num_workers`` DataLoader worker processes (pinned memory with CUDA) read and prefetch exactly
  the micro-batches of the synchronous path (0, the default), in order; the sampler advances only as
  micro-batches are consumed, so checkpoints and resumes are the same with and without workers;
- ``mixed_precision="bf16"``: the trainable weights stay float32 (the optimizer's master copy) and
  run under autocast, while the modules a training never updates (the VAE, the text encoder, a
  multi stream's auxiliary UNet) compute with bfloat16 copies (``half_frozen``); the prompts are
  embedded in float32 first and ``save_model`` writes the float32 originals, so a saved model's
  frozen parts are the base's, bit for bit. ``"fp16"`` keeps the frozen parts in float32 (the SD
  VAE overflows in float16);
- memory: ``gradient_checkpointing`` of the trainable UNet, ``optimizer`` ``"adam_fused"`` (CUDA) or
  ``"adam8bit"`` (bitsandbytes); the optimizer is part of a checkpoint's identity, workers and
  checkpointing may change on resume (``RESUMABLE_CHANGES``).
"""

from __future__ import annotations

import contextlib
import copy
import csv
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from stablemtl import options
from stablemtl.data.mixing import TASK_DATASET_PROBS, TaskMixingSampler, micro_batch_loader
from stablemtl.paths import KINDS, StageError, Study, require
from stablemtl.tasks import FLOW_TASKS, TASK_NAMES, get_task

# what may change between a checkpoint and its resumption: the length and bookkeeping of the run,
# where files live (the base and init weights themselves are compared by fingerprint), and how the data
# is read and the activations are kept: num_workers and prefetch_factor give the very same micro-batches,
# gradient checkpointing recomputes the same forward (same RNG draws; equal up to float rounding)
RESUMABLE_CHANGES = ("iterations", "checkpoint_every", "backup_every", "keep_backups", "output_dir", "tensorboard",
                     "base", "init", "data_root", "num_workers", "prefetch_factor", "gradient_checkpointing")
# how the data is read and the run is watched: never a bit of the trained model (``stablemtl run`` leaves
# them out of the training stage's hash, so changing them does not retrain)
SAME_RESULT = ("num_workers", "prefetch_factor", "tensorboard", "keep_backups")
OPTIMIZERS = ("adam", "adam_fused", "adam8bit")
LOG_FIELDS = ("step", "task", "dataset", "loss", "lr", "step_s", "data_s")
STATS_FILE = "train_stats.json"  # the device and the process's peak memory of the last training call


class CheckpointMismatch(ValueError):
    """The checkpoint in a training folder was written by other settings; it is never continued."""


class CheckpointError(RuntimeError):
    """No checkpoint of a training folder can be read (each named with why); never silently restarted."""


CHECKPOINT_FILES = ("state.json", "weights.safetensors", "optimizer.pt", "states.pt", "sampler.json")


@dataclass
class TrainConfig:
    """Every number of a training run; defaults are the release's (the ``paper`` preset)."""

    kind: str = "single_stream"  # or "multi_stream"; a single-task baseline is single_stream with one task
    tasks: list = field(default_factory=lambda: list(TASK_NAMES))
    base: str = ""  # base model directory (SD2 layout)
    init: str | None = None  # multi_stream: the trained single-stream checkpoint it starts from
    unet_init: str = "base"  # single_stream: "base" (the pretrained UNet) or "random" (re-initialised: the ablation)
    data_root: str = ""  # $PREPROCESSED_DIR: the dataset directories below it
    resolution: dict = field(default_factory=lambda: {"hypersim": [288, 384], "vkitti": [187, 621],
                                                      "flying_things_3d": [268, 480]})
    probabilities: dict = field(default_factory=lambda: {t: dict(p) for t, p in TASK_DATASET_PROBS.items()})
    effective_batch: int = 32
    batch_per_device: int = 16
    iterations: int = 20000
    lr: float = 1e-4
    warmup: int = 100
    decay_steps: int = 25000
    decay_to: float = 0.01
    grad_clip: float = 5.0
    seed: int = 2024
    mixed_precision: str = "no"  # "no" (fp32, the release), "fp16", "bf16"
    checkpoint_every: int = 500
    backup_every: int = 1000
    # how many iter_* backups stay (the oldest beyond are deleted); None: all. At SD2's size one checkpoint
    # (weights and Adam state) is 10 GB for the single stream and 15 GB for the multi stream
    keep_backups: int | None = None
    output_dir: str = "outputs/run/single_stream"
    augment: bool = True
    loss: str = "latent"  # the release's latent MSE; "pixel" = per-task pixel-space losses (loss ablation)
    cache_latents: bool = False  # keep frozen-VAE latents of targets (and of un-jittered images) in memory
    normals: str = "as_stored"  # the release; "facing": negated to face the camera (stablemtl.options)
    target_order: str = "normalise_then_resize"  # the release; or "resize_then_normalise"
    invalid_targets: str = "keep"  # the release; or "fill"
    tensorboard: bool = False
    task_attention: dict = field(default_factory=lambda: {"query_hidden": 640, "heads": 4, "mask_prob": 0.4})
    num_workers: int = 0  # DataLoader worker processes; 0: samples read in the training loop (same batches)
    prefetch_factor: int = 2  # micro-batches in flight per worker (num_workers > 0)
    gradient_checkpointing: bool = False  # recompute the trainable UNet's activations in the backward pass
    optimizer: str = "adam"  # the release; "adam_fused" (CUDA), "adam8bit" (bitsandbytes)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training option(s) {unknown}; valid: {sorted(known)}")
        return cls(**values)

    def accumulation(self, num_processes: int = 1) -> int:
        per_step = self.batch_per_device * num_processes
        if self.effective_batch % per_step:
            raise ValueError(f"effective batch {self.effective_batch} is not a multiple of {self.batch_per_device} "
                             f"per device x {num_processes} process(es) = {per_step}; choose a batch_per_device "
                             f"or a process count that divides it")
        return self.effective_batch // per_step

    def validate(self, num_processes: int = 1) -> None:
        """Fail before any work starts, naming the bad value."""
        from stablemtl.data.sources import SOURCES

        if self.kind not in KINDS:
            raise ValueError(f"unknown model kind {self.kind!r}; valid: {', '.join(KINDS)}")
        if not self.tasks:
            raise ValueError("no task to train")
        if self.unet_init not in ("base", "random") or (self.unet_init == "random" and self.kind != "single_stream"):
            raise ValueError(f"unet_init={self.unet_init!r}: expected 'base', or 'random' for a single stream "
                             f"(a multi stream starts from a trained single stream)")
        for task in self.tasks:
            get_task(task)  # an unknown name: a ValueError listing the valid ones
            if task not in self.probabilities:
                raise ValueError(f"no dataset probabilities for task {task!r}")
            for dataset in self.probabilities[task]:
                if dataset not in SOURCES:
                    raise ValueError(f"unknown dataset {dataset!r} for task {task!r}; valid: {', '.join(SOURCES)}")
                if task not in SOURCES[dataset].tasks_provided:
                    raise ValueError(f"dataset {dataset!r} does not annotate {task!r}")
        if self.kind == "multi_stream" and len(self.tasks) < 2:
            raise ValueError("a multi-stream model needs at least 2 tasks")
        self.accumulation(num_processes)
        if self.loss not in ("latent", "pixel"):
            raise ValueError(f"loss must be 'latent' (the release) or 'pixel', got {self.loss!r}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be 'no', 'fp16' or 'bf16', got {self.mixed_precision!r}")
        self._validate_memory_and_data()
        for name in ("normals", "target_order", "invalid_targets"):
            options.check(name, getattr(self, name))
        if not self.base or not Path(self.base).is_dir():
            raise FileNotFoundError(f"base model directory {self.base!r} does not exist; build the tiny one with "
                                    f"stablemtl.model.base.build_tiny_base or set BASE_CKPT_DIR for SD2")
        if self.kind == "multi_stream":
            if not self.init or not (Path(self.init) / "stablemtl_model.json").is_file():
                raise FileNotFoundError(f"a multi-stream run starts from a trained single-stream checkpoint; "
                                        f"init={self.init!r} is not one (train the single stream first)")
        if not self.data_root or not Path(self.data_root).is_dir():
            raise FileNotFoundError(f"data root {self.data_root!r} does not exist (write the mini datasets with "
                                    f"stablemtl.data.mini.write_mini_datasets or set PREPROCESSED_DIR)")

    def _validate_memory_and_data(self) -> None:
        for name, low in (("num_workers", 0), ("prefetch_factor", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if not isinstance(self.gradient_checkpointing, bool):
            raise ValueError(f"gradient_checkpointing must be true or false, got {self.gradient_checkpointing!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(map(repr, OPTIMIZERS))}, got {self.optimizer!r}")
        if self.optimizer == "adam_fused" and not torch.cuda.is_available():
            raise ValueError("optimizer 'adam_fused' (torch.optim.Adam(fused=True)) needs a CUDA device; none is "
                             "available here: use optimizer 'adam'")
        if self.optimizer == "adam8bit":
            import importlib.util

            if importlib.util.find_spec("bitsandbytes") is None:
                raise ValueError("optimizer 'adam8bit' needs the bitsandbytes package (pip install bitsandbytes), "
                                 "which is not installed; or use optimizer 'adam'")


def make_optimizer(params, config: TrainConfig) -> torch.optim.Optimizer:
    """Adam (lr ``config.lr``, no weight decay) as ``config.optimizer`` names it."""
    if config.optimizer == "adam8bit":
        import bitsandbytes as bnb

        return bnb.optim.Adam8bit(params, lr=config.lr, weight_decay=0.0)
    fused = {"fused": True} if config.optimizer == "adam_fused" else {}
    return torch.optim.Adam(params, lr=config.lr, weight_decay=0.0, **fused)


def frozen_modules(model) -> list[tuple]:
    """``(owner, attribute)`` of the modules a training never updates: the VAE, the text encoder and,
    in a multi stream, the auxiliary UNet."""
    owners = [(model.frozen, "vae"), (model.frozen, "text_encoder")]
    return owners + ([(model, "aux_unet")] if hasattr(model, "aux_unet") else [])


def half_frozen(model, dtype: torch.dtype = torch.bfloat16) -> list[tuple]:
    """Replace the frozen modules of ``model`` by copies in ``dtype`` (half the memory, the fast
    kernels) after embedding its task prompts in float32; returns ``(owner, attribute, original)``
    for each, the float32 modules ``restore_frozen`` puts back."""
    for task in model.tasks:
        model.frozen.prompt(task)  # cached: the text encoder is not called again
    originals = []
    for owner, name in frozen_modules(model):
        module = getattr(owner, name)
        originals.append((owner, name, module))
        # nn.Module.to: diffusers' own .to(dtype) warns about float32-kept modules even when it has none
        setattr(owner, name, torch.nn.Module.to(copy.deepcopy(module), dtype))
    return originals


@contextlib.contextmanager
def restore_frozen(originals: list[tuple]):
    """Within the block, the float32 originals of ``half_frozen`` are in place (to save the model)."""
    halves = [(owner, name, getattr(owner, name)) for owner, name, _ in originals]
    for owner, name, module in originals:
        setattr(owner, name, module)
    try:
        yield
    finally:
        for owner, name, module in halves:
            setattr(owner, name, module)


def encode_frozen(frozen, images: torch.Tensor) -> torch.Tensor:
    """Latents of ``images`` in [-1, 1] by the frozen VAE in its own dtype, returned as float32."""
    return frozen.encode(images.to(frozen.vae.dtype)).float()


def lr_factor(step: int, warmup: int, decay_steps: int, decay_to: float) -> float:
    """The release's schedule at optimizer step ``step`` (from 0): linear warm-up ``step / warmup``
    (0 at step 0, 1 at ``warmup``), then exponential decay reaching ``decay_to`` at ``decay_steps``."""
    if step < warmup:
        return step / warmup
    progress = min(1.0, (step - warmup) / max(1, decay_steps - warmup))
    return decay_to ** progress


def latent_valid(valid: torch.Tensor, factor: int) -> torch.Tensor:
    """A latent pixel is valid when every pixel of its ``factor x factor`` window is: ``~maxpool(~valid)``."""
    invalid = (~valid.bool()).float()
    return torch.nn.functional.max_pool2d(invalid, factor, factor) == 0


def masked_latent_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.expand_as(target).to(pred.dtype)
    return ((pred - target) ** 2 * mask).sum() / mask.sum().clamp_min(1.0)


def pixel_loss(decoded: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, task: str) -> torch.Tensor:
    """Per-task pixel-space losses on decoded predictions, for the loss ablation: affine-invariant L1
    for depth (least-squares scale and shift per image), mean angular error for normals, L1 otherwise."""
    valid = valid.bool()
    if task == "depth":
        losses = []
        for p, t, v in zip(decoded.mean(1), target[:, 0], valid[:, 0]):
            if v.sum() < 2:
                continue
            x, y = p[v], t[v]
            a = torch.stack([x, torch.ones_like(x)], 1)
            sol = torch.linalg.lstsq(a, y[:, None]).solution
            losses.append((a @ sol - y[:, None]).abs().mean())
        return torch.stack(losses).mean() if losses else decoded.sum() * 0
    mask = valid.expand_as(decoded)
    if task == "normal":
        cos = (torch.nn.functional.normalize(decoded, dim=1) * target).sum(1, keepdim=True)
        angle = torch.acos(cos.clamp(-1 + 1e-6, 1 - 1e-6))
        return angle[valid].mean() if valid.any() else decoded.sum() * 0
    return (decoded - target).abs()[mask].mean() if mask.any() else decoded.sum() * 0


def training_identity(config: TrainConfig) -> dict:
    """What a checkpoint must share with a training to be resumed by it (JSON-normalised)."""
    from stablemtl.model.base import weights_fingerprint

    values = {k: v for k, v in asdict(config).items() if k not in RESUMABLE_CHANGES}
    values["base_weights"] = weights_fingerprint(config.base)
    values["init_weights"] = weights_fingerprint(config.init) if config.init else None
    if config.kind == "multi_stream":
        from stablemtl.model.streams import TASK_ATTENTION_LAYOUT

        values["task_attention_layout"] = TASK_ATTENTION_LAYOUT
    return json.loads(json.dumps(values))


def finished_training(folder: Path, config: TrainConfig) -> bool:
    """``folder`` holds this very training, finished: its model, and a last checkpoint of the same
    identity at ``config.iterations`` steps."""
    state = Path(folder) / "checkpoint" / "latest" / "state.json"
    if not (Path(folder) / "model" / "stablemtl_model.json").is_file() or not state.is_file():
        return False
    try:
        saved = json.loads(state.read_text())
    except (OSError, ValueError):
        return False
    return saved.get("step") == config.iterations and saved.get("identity") == training_identity(config)


def _allow_precision(mixed_precision: str) -> None:
    """accelerate keeps one process-wide state and refuses an Accelerator of another mixed precision
    (a notebook that trains in fp32, then in bf16); in a single process nothing else shares that
    state, so it is cleared for the new precision. A launched (multi-process) run has one config."""
    from accelerate.state import AcceleratorState, PartialState

    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") != mixed_precision and PartialState().num_processes == 1:
        AcceleratorState._reset_state()


def _collate(samples: list[dict], task: str) -> dict:
    keys = ["rgb", f"{task}_target", f"{task}_valid"] + (["rgb_next"] if task in FLOW_TASKS else [])
    batch = {k: torch.stack([s[k] for s in samples]) for k in keys}
    # what makes a sample's rasters: the image and its augmentation (the latent cache's key)
    batch["keys"] = [(s["index"], tuple(s["flip"]), s["crop"]) for s in samples]
    return batch


class Trainer:
    """Builds the model, data, optimizer and schedule of a ``TrainConfig`` and runs or resumes it."""

    def __init__(self, config: TrainConfig, accelerator=None, progress: bool = True):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        from stablemtl.data.sources import SOURCES
        from stablemtl.model.base import load_base
        from stablemtl.model.streams import MultiStream, SingleStream, load_model

        if accelerator is None:
            _allow_precision(config.mixed_precision)
        self.accelerator = accelerator or Accelerator(
            cpu=not torch.cuda.is_available(),  # several CPU processes (gloo) when launched without GPUs
            mixed_precision=config.mixed_precision,
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
        config.validate(self.accelerator.num_processes)
        self.config, self.progress = config, progress
        self.out = Path(config.output_dir)
        self.accumulation = config.accumulation(self.accelerator.num_processes)
        torch.manual_seed(config.seed)
        base = load_base(config.base)
        if config.kind == "single_stream":
            model = SingleStream.from_base(base, config.tasks, normals=config.normals)
            if config.unet_init == "random":  # the same architecture without the generative prior
                model.unet = type(model.unet).from_config(model.unet.config)
        else:
            single = load_model(config.init, base, expect="single_stream")
            if single.normals != config.normals:
                raise ValueError(f"{config.init} was trained with normals={single.normals!r}; a multi stream "
                                 f"from it must use the same convention, not normals={config.normals!r}")
            model = MultiStream.from_single_stream(single, **config.task_attention)
        if config.gradient_checkpointing:  # the trainable UNet (the multi stream's main one)
            model.unet.enable_gradient_checkpointing()
        # bf16: the frozen modules compute in bfloat16; their float32 originals stay on the CPU for saving
        self.full_precision = half_frozen(model) if config.mixed_precision == "bf16" else []
        self.model = model
        self.sources = {}
        for task in config.tasks:
            for dataset in config.probabilities[task]:
                cls = SOURCES[dataset]
                self.sources[(task, dataset)] = cls(
                    Path(config.data_root) / cls.root_hint, tasks=[task], resolution=config.resolution.get(dataset),
                    augment=config.augment, seed=config.seed, normals=config.normals, encode_targets=True,
                    target_order=config.target_order, invalid_targets=config.invalid_targets)
        self.sampler = TaskMixingSampler({k: len(v) for k, v in self.sources.items()}, config.tasks,
                                         config.batch_per_device, self.accumulation, config.probabilities,
                                         config.seed, self.accelerator.num_processes, self.accelerator.process_index)
        params = model.trainable_parameters()
        self.optimizer = make_optimizer(params, config)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, config.warmup, config.decay_steps, config.decay_to))
        self.ddp_model, self.optimizer = self.accelerator.prepare(model, self.optimizer)
        self.step = 0
        self.latent_cache: dict = {}
        self.writer = None
        self.identity = self._identity()
        self.resumed_from = self.load_checkpoint()
        if self.step > config.iterations:
            raise ValueError(f"{self.resumed_from} is at step {self.step}, past iterations={config.iterations}; "
                             f"raise iterations to continue it, or move {self.out} away to train anew")

    # ----------------------------------------------------------------- checkpoints
    def _identity(self) -> dict:
        return training_identity(self.config)

    def _trainable_state(self) -> dict:
        state = {f"unet.{k}": v for k, v in self.model.unet.state_dict().items()}
        if hasattr(self.model, "task_attention"):
            state.update({f"task_attention.{k}": v for k, v in self.model.task_attention.state_dict().items()})
        return {k: v.detach().contiguous().cpu() for k, v in state.items()}

    def save_checkpoint(self) -> Path:
        """Write ``checkpoint/latest`` atomically (and a backup every ``backup_every`` steps)."""
        from safetensors.torch import save_file

        self.accelerator.wait_for_everyone()
        root = self.out / "checkpoint"
        latest = root / "latest"
        if self.accelerator.is_main_process:
            tmp, previous = root / ".latest.partial", root / ".latest.previous"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            save_file(self._trainable_state(), str(tmp / "weights.safetensors"))
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save({"scheduler": self.scheduler.state_dict(), "rng": torch.get_rng_state()}, tmp / "states.pt")
            (tmp / "sampler.json").write_text(json.dumps(self.sampler.state_dict()))
            # the marker goes last: a folder without it is never loaded
            (tmp / "state.json").write_text(json.dumps({"step": self.step, "config": asdict(self.config),
                                                        "identity": self.identity}, indent=1))
            if latest.exists():
                shutil.rmtree(previous, ignore_errors=True)
                os.replace(latest, previous)
            os.replace(tmp, latest)
            shutil.rmtree(previous, ignore_errors=True)
            if self.config.backup_every and self.step % self.config.backup_every == 0:
                backup = root / f"iter_{self.step:06d}"
                shutil.rmtree(backup, ignore_errors=True)
                shutil.copytree(latest, backup)
                if self.config.keep_backups is not None:  # the newest ones stay (latest is always there too)
                    backups = sorted((p for p in root.glob("iter_*") if p.name[len("iter_"):].isdigit()),
                                     key=lambda p: int(p.name[len("iter_"):]))
                    for old in backups[:max(0, len(backups) - self.config.keep_backups)]:
                        shutil.rmtree(old)
        self.accelerator.wait_for_everyone()
        return latest

    def _checkpoint_dirs(self) -> list[Path]:
        """The checkpoints to resume from, best first: ``latest``, ``.latest.previous`` (a kill between the
        two renames of a save leaves the last good one there), then the ``iter_*`` backups, newest first.
        Only folders holding ``state.json`` (written last) count; ``*.corrupt`` ones are set aside."""
        root = self.out / "checkpoint"
        backups = sorted((p for p in root.glob("iter_*") if p.name[len("iter_"):].isdigit()),
                         key=lambda p: int(p.name[len("iter_"):]), reverse=True)
        return [p for p in (root / "latest", root / ".latest.previous", *backups) if (p / "state.json").is_file()]

    def _checkpoint_dir(self) -> Path | None:
        """The first checkpoint folder to try (``_checkpoint_dirs``), ``None`` when there is none."""
        found = self._checkpoint_dirs()
        return found[0] if found else None

    @staticmethod
    def _read_checkpoint(path: Path) -> dict:
        """Every file of the checkpoint ``path``, read into memory before any is applied (so that a
        corrupt file leaves the model as it was); a ``CheckpointError`` naming the file that fails."""
        from safetensors.torch import load_file

        readers = {"state.json": lambda f: json.loads(f.read_text()),
                   "weights.safetensors": lambda f: load_file(str(f)),
                   "optimizer.pt": lambda f: torch.load(f, weights_only=True),
                   "states.pt": lambda f: torch.load(f, weights_only=True),
                   "sampler.json": lambda f: json.loads(f.read_text())}
        read = {}
        for name in CHECKPOINT_FILES:
            file = path / name
            try:
                read[name] = readers[name](file)
            except Exception as err:  # noqa: BLE001 - json, safetensors, torch and zip each raise their own
                raise CheckpointError(f"{file}: cannot be read ({type(err).__name__}: {str(err)[:200]})") from None
        for name, keys in (("state.json", ("step",)), ("states.pt", ("scheduler", "rng"))):
            missing = [k for k in keys if not isinstance(read[name], dict) or k not in read[name]]
            if missing:
                raise CheckpointError(f"{path / name}: cannot be read (no {', '.join(missing)})")
        return read

    def load_checkpoint(self) -> Path | None:
        """Resume from ``checkpoint/latest`` when there is one; returns its path.

        A checkpoint with a file that cannot be read (truncated, corrupt) is set aside as
        ``<name>.corrupt`` with a message naming the file, and the next one is used (``.latest.previous``,
        then the newest ``iter_*`` backup). When checkpoints exist but none can be read, a
        ``CheckpointError`` names each file and says how to train anew: a training never restarts
        from scratch on its own while it has checkpoints."""
        from stablemtl.data.formats import set_aside_corrupt

        failures: list[tuple[Path, str]] = []
        for path in self._checkpoint_dirs():
            try:
                self._apply_checkpoint(path, self._read_checkpoint(path))
            except CheckpointError as err:
                failures.append((path, str(err)))
                continue
            for bad, why in failures:  # set aside only once a good one is found: never a silent restart
                if self.accelerator.is_main_process:
                    set_aside_corrupt(bad, why.removeprefix(f"{bad}/"), then=f"resuming from {path} instead",
                                      log=lambda m: print(m, flush=True))
            return path
        if failures:
            raise CheckpointError(
                f"{self.out}: no checkpoint can be read: " + "; ".join(why for _, why in failures) + ". To train "
                f"from scratch, move or delete {self.out / 'checkpoint'} (or give another output_dir) and run again")
        return None

    def _apply_checkpoint(self, path: Path, read: dict) -> None:
        """Load a checkpoint's files (``_read_checkpoint``) into the model, optimizer, schedule and sampler;
        a file whose content does not fit (a ``CheckpointError`` naming it) may leave some of them loaded:
        the next checkpoint tried loads every one of them again."""
        saved = read["state.json"].get("identity")
        if saved is not None and saved != self.identity:
            changed = sorted(k for k in set(saved) | set(self.identity) if saved.get(k) != self.identity.get(k))
            raise CheckpointMismatch(f"{path} was written by a different training ({', '.join(changed)} changed) and "
                                     f"is not resumed; move or delete {self.out} to train anew, or give another "
                                     f"output_dir")
        state = read["weights.safetensors"]

        def weights():
            unet = {k[len("unet."):]: v for k, v in state.items() if k.startswith("unet.")}
            self.model.unet.load_state_dict(unet, strict=True)
            if hasattr(self.model, "task_attention"):
                ta = {k[len("task_attention."):]: v for k, v in state.items() if k.startswith("task_attention.")}
                self.model.task_attention.load_state_dict(ta, strict=True)

        def states():
            self.scheduler.load_state_dict(read["states.pt"]["scheduler"])
            torch.set_rng_state(read["states.pt"]["rng"])

        for name, apply in (("weights.safetensors", weights), ("optimizer.pt", lambda: self.optimizer.load_state_dict(
                read["optimizer.pt"])), ("states.pt", states), ("sampler.json", lambda: self.sampler.load_state_dict(
                read["sampler.json"]))):
            try:
                apply()
            except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as err:
                raise CheckpointError(f"{path / name}: does not fit this training ({type(err).__name__}: "
                                      f"{str(err)[:200]})") from None
        self.step = int(read["state.json"]["step"])

    # ----------------------------------------------------------------- training
    def _encode_cached(self, images: torch.Tensor, keys: list | None) -> torch.Tensor:
        """Frozen-VAE latents, from the in-memory cache when ``keys`` (one per image) are given."""
        frozen = self.model.frozen
        if keys is None:
            return encode_frozen(frozen, images)
        missing = [i for i, k in enumerate(keys) if k not in self.latent_cache]
        if missing:
            fresh = encode_frozen(frozen, images[missing])
            for i, z in zip(missing, fresh):
                self.latent_cache[keys[i]] = z.detach().cpu()
        return torch.stack([self.latent_cache[k] for k in keys]).to(images.device)

    def next_batch(self) -> tuple:
        """The next micro-batch of the sampler and its collated samples, augmented for the epoch of
        their stream (a new draw every epoch, the same draw after a resume)."""
        mb = self.sampler.next()
        source = self.sources[(mb.task, mb.dataset)]
        return mb, _collate([source[(i, mb.epoch)] for i in mb.indices], mb.task)

    def _batches(self, stop: int):
        """The micro-batches up to step ``stop``, in the sampler's order: read here (``num_workers=0``) or
        prefetched by worker processes from a copy of the sampler; either way ``self.sampler`` advances
        only as a micro-batch is consumed, so a checkpoint holds the state after what was trained on."""
        cfg = self.config
        if not cfg.num_workers:
            while True:
                yield self.next_batch()
        loader = micro_batch_loader(self.sampler, self.sources, _collate, cfg.num_workers, cfg.prefetch_factor,
                                    limit=stop * self.accumulation, pin_memory=torch.cuda.is_available())
        for mb, batch in loader:
            expected = self.sampler.next()
            if mb != expected:
                raise RuntimeError(f"the data loader gave {mb}, the sampler expected {expected}")
            yield mb, batch

    def loss(self, batch: dict, task: str, dataset: str | None = None) -> torch.Tensor:
        frozen = self.model.frozen
        device = self.accelerator.device
        cache = self.config.cache_latents and dataset is not None
        source = self.sources.get((task, dataset)) if dataset is not None else None
        image_keys = None
        if cache and source is not None and not source.jitters():
            image_keys = [("rgb", dataset, *k) for k in batch["keys"]]
        z = self._encode_cached(batch["rgb"].to(device) * 2 - 1, image_keys)
        z_next = encode_frozen(frozen, batch["rgb_next"].to(device) * 2 - 1) if task in FLOW_TASKS else None
        target, valid = batch[f"{task}_target"].to(device), batch[f"{task}_valid"].to(device)
        target_keys = [(task, dataset, *k) for k in batch["keys"]] if cache else None
        pred = self.ddp_model(z, z_next, [task])[0]
        if self.config.loss == "pixel":
            vae = frozen.vae
            decoded = vae.decode((pred / vae.config.scaling_factor).to(vae.dtype)).sample.float()
            return pixel_loss(decoded, target, valid, task)
        z_target = self._encode_cached(target, target_keys)
        return masked_latent_mse(pred, z_target, latent_valid(valid, frozen.vae_factor))

    def _append_log(self, rows: list[dict]) -> None:
        if not self.accelerator.is_main_process or not rows:
            return
        path = self.out / "train_log.csv"
        new = not path.is_file()
        with open(path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=LOG_FIELDS)
            if new:
                writer.writeheader()
            writer.writerows(rows)

    def _trim_log(self) -> None:
        """After a resume, drop log rows of steps that will be trained again."""
        path = self.out / "train_log.csv"
        if not self.accelerator.is_main_process or not path.is_file():
            return
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r["step"]) < self.step]
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=LOG_FIELDS)
            writer.writeheader()
            writer.writerows(rows)

    def train(self, until: int | None = None) -> dict:
        """Train to ``config.iterations`` (or ``until``) steps; returns a summary."""
        from tqdm.auto import tqdm

        cfg = self.config
        stop = cfg.iterations if until is None else min(until, cfg.iterations)
        self.out.mkdir(parents=True, exist_ok=True)
        self._trim_log()
        if cfg.tensorboard and self.writer is None and self.accelerator.is_main_process:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ImportError("tensorboard=True needs the tensorboard package (pip install tensorboard)") from err
            self.writer = SummaryWriter(str(self.out / "tensorboard"))
        self.ddp_model.train()
        bar = tqdm(total=stop, initial=self.step, desc=f"train {cfg.kind}", unit="step",
                   disable=not (self.progress and self.accelerator.is_main_process))
        rows, losses = [], []
        with contextlib.closing(self._batches(stop)) as batches:  # closing it stops any worker processes
            while self.step < stop:
                start = time.perf_counter()
                mb, step_loss, lr, data_s = self._train_step(batches)
                losses.append(step_loss)
                self._after_step(rows, bar, mb, step_loss, lr, start, data_s, stop)
        self._append_log(rows)
        bar.close()
        if self.accelerator.is_main_process:
            from stablemtl.data.formats import _write_bytes
            from stablemtl.devices import peak_memory

            _write_bytes(self.out / STATS_FILE, (json.dumps({"device": str(self.accelerator.device),
                                                             **peak_memory(self.accelerator.device)}) + "\n").encode())
        return {"step": self.step, "losses": losses}

    def _train_step(self, batches) -> tuple:
        """One optimizer step over ``accumulation`` micro-batches of ``batches``; returns the last
        micro-batch, the step's loss, its learning rate and the seconds spent waiting for data."""
        data_s, step_loss = 0.0, 0.0
        self.optimizer.zero_grad(set_to_none=True)
        for micro in range(self.accumulation):
            t0 = time.perf_counter()
            mb, batch = next(batches)
            data_s += time.perf_counter() - t0
            sync = micro == self.accumulation - 1
            context = self.accelerator.no_sync(self.ddp_model) if not sync else contextlib.nullcontext()
            with context:
                loss = self.loss(batch, mb.task, mb.dataset)
                if not torch.isfinite(loss):
                    last = self._checkpoint_dir()
                    raise FloatingPointError(
                        f"non-finite loss {loss.item()} at step {self.step}, task {mb.task!r}, dataset "
                        f"{mb.dataset!r}; stopped; the last good checkpoint is {last or 'none (none written yet)'}")
                self.accelerator.backward(loss / self.accumulation)
            step_loss += loss.item() / self.accumulation
        if self.config.grad_clip:
            self.accelerator.clip_grad_norm_(self.model.trainable_parameters(), self.config.grad_clip)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return mb, step_loss, lr, data_s

    def _after_step(self, rows: list, bar, mb, step_loss: float, lr: float, start: float, data_s: float,
                    stop: int) -> None:
        """Log the step (``rows`` are written out at each checkpoint) and checkpoint when it is time."""
        cfg = self.config
        rows.append({"step": self.step - 1, "task": mb.task, "dataset": mb.dataset, "loss": f"{step_loss:.6g}",
                     "lr": f"{lr:.6g}", "step_s": f"{time.perf_counter() - start:.4f}", "data_s": f"{data_s:.4f}"})
        bar.update()
        bar.set_postfix(task=mb.task, loss=f"{step_loss:.4f}")
        if self.writer is not None:
            self.writer.add_scalar(f"loss/{mb.task}", step_loss, self.step)
            self.writer.add_scalar("lr", lr, self.step)
        if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 or self.step == stop:
            self._append_log(rows)
            rows.clear()
            self.save_checkpoint()

    def save_model(self, path=None) -> Path:
        """The trained model in the ``save_pretrained`` layout (default ``<output_dir>/model``)."""
        path = Path(path) if path is not None else self.out / "model"
        if self.accelerator.is_main_process:
            with restore_frozen(self.full_precision):  # the float32 frozen parts, never their bf16 copies
                self.model.save_pretrained(path)
        self.accelerator.wait_for_everyone()
        return path


def preset_config(preset, kind: str = "single_stream", **overrides) -> TrainConfig:
    """The ``TrainConfig`` of a preset's ``train`` section for ``kind``, with ``overrides`` on top."""
    from stablemtl.presets import load_preset

    config = load_preset(preset)
    section = dict(config.get("train") or {})
    if not section:
        raise ValueError(f"preset {config.get('name', preset)!r} has no train section")
    per_kind = {k: section.pop(k, {}) for k in KINDS}
    values = {**section, **per_kind.get(kind, {}), "kind": kind, "seed": int(config.get("seed", 2024))}
    if kind == "multi_stream" and "task_attention" in config.get("model", {}):
        values["task_attention"] = dict(config["model"]["task_attention"])
    values.update(overrides)
    return TrainConfig.from_dict(values)


def train(config: TrainConfig | dict, until: int | None = None, progress: bool = True) -> Trainer:
    """Run (or resume) a training configuration; returns the trainer (``.model``, ``.step``)."""
    config = TrainConfig.from_dict(config) if isinstance(config, dict) else config
    trainer = Trainer(config, progress=progress)
    trainer.train(until)
    return trainer


def train_config(study: Study, kind: str, name: str | None = None, **overrides) -> TrainConfig:
    """The preset's ``TrainConfig`` for ``kind`` in this run's folder ``name`` (default: the kind) of its
    seed (``Study.train_dir``); ``None`` overrides are ignored. A multi stream starts from the single
    stream of its seed and learns the normals in that model's convention."""
    from stablemtl.model.streams import MODEL_FILE, saved_normals

    values = {k: v for k, v in overrides.items() if v is not None}
    seed = values.get("seed")
    values.setdefault("base", str(study.base_dir))
    values.setdefault("data_root", str(study.data_root))
    values.setdefault("output_dir", str(study.train_dir(name or kind, seed)))
    if kind == "multi_stream":
        values.setdefault("init", str(study.model_dir("single_stream", seed)))
        record = Path(values["init"]) / MODEL_FILE
        if "normals" not in values and record.is_file():
            values["normals"] = saved_normals(json.loads(record.read_text()))
    return preset_config(study.preset, kind, **values)


OPTIMIZER_STATE_BYTES = {"adam": 8, "adam_fused": 8, "adam8bit": 2}  # per trainable parameter: Adam's two moments


def memory_count(config: TrainConfig) -> dict:
    """The memory a training needs before any activation, counted from the base's component configs
    (modules built on the meta device: nothing allocated), in GiB: the trainable UNet (and the multi
    stream's task attention) in float32 with its gradients and optimizer state, and the frozen VAE,
    text encoder (and the multi stream's auxiliary UNet) in float32, plus their bfloat16 copies with
    ``mixed_precision="bf16"``. Keys: ``trainable`` and ``frozen`` (parameters), ``static_gib``."""
    from stablemtl.model.base import base_configs, count_parameters

    ta = config.task_attention
    counts = count_parameters(configs=base_configs(config.base), tasks=config.tasks,
                              query_hidden=ta.get("query_hidden", 640), heads=ta.get("heads", 4))
    trainable, frozen = counts["unet_widened"], counts["vae"] + counts["text_encoder"]
    if config.kind == "multi_stream":  # the task attention trains with the main UNet; the auxiliary UNet is frozen
        trainable, frozen = trainable + counts["task_attention"], frozen + counts["unet_widened"]
    per_trainable = 4 + 4 + OPTIMIZER_STATE_BYTES.get(config.optimizer, 8)  # an unknown one: validate() names it
    per_frozen = 4 + (2 if config.mixed_precision == "bf16" else 0)
    return {"trainable": trainable, "frozen": frozen, "bytes_per_trainable": per_trainable,
            "bytes_per_frozen": per_frozen, "static_gib": (trainable * per_trainable + frozen * per_frozen) / 1024 ** 3}


def check_cpu_memory(config: TrainConfig, available: int | None = None) -> dict:
    """On the CPU, refuse a training whose counted memory (``memory_count``) exceeds the memory this
    machine has available, with the numbers and what would fit, instead of meeting the OOM killer
    hours in; returns the count. ``available``: bytes (default: psutil's available memory)."""
    import psutil

    count = memory_count(config)
    available = psutil.virtual_memory().available if available is None else available
    if count["static_gib"] * 1024 ** 3 <= available:
        return count
    adam8 = (count["trainable"] * (8 + OPTIMIZER_STATE_BYTES["adam8bit"]) + count["frozen"] * 4) / 1024 ** 3
    raise StageError(
        f"{config.kind} training does not fit in this machine's memory: it needs {count['static_gib']:.1f} GiB before "
        f"any activation (counted from {config.base}: {count['trainable'] / 1e6:,.0f} M trainable parameters x "
        f"{count['bytes_per_trainable']} bytes for the float32 weights, gradients and {config.optimizer} state, "
        f"{count['frozen'] / 1e6:,.0f} M frozen parameters x {count['bytes_per_frozen']} bytes) and "
        f"{available / 1024 ** 3:.1f} GiB is available. gradient_checkpointing and a smaller batch_per_device only "
        f"reduce the activations on top of this; optimizer='adam8bit' (bitsandbytes) counts {adam8:.1f} GiB; "
        f"otherwise train on a machine (or GPU) with more memory")


def is_training_folder(folder: Path) -> bool:
    """An earlier kit training folder without a ``.stablemtl`` marker: a checkpoint and a log, or a model."""
    return ((folder / "checkpoint").is_dir() and (folder / "train_log.csv").is_file()) or \
        (folder / "model" / "stablemtl_model.json").is_file()


def _older(folder: Path) -> list[Path]:
    """The generations set aside before ``<folder>.previous`` and kept until a new first checkpoint."""
    return sorted(folder.parent.glob(f"{folder.name}.previous.older*"))


def drop_older_when_checkpointed(folder) -> list[Path]:
    """Delete the older generations (``<folder>.previous.older*``, the kit's only) once ``folder`` holds a
    checkpoint of its own; returns what was deleted."""
    from stablemtl.guard import is_own

    folder = Path(folder)
    if not (folder / "checkpoint" / "latest" / "state.json").is_file():
        return []
    gone = [p for p in _older(folder) if is_own(p) or is_training_folder(p)]
    for path in gone:
        shutil.rmtree(path)
    return gone


def set_aside(folder) -> Path | None:
    """Move a training folder to ``<folder>.previous`` so that a new training starts from scratch; returns
    the new place, or ``None`` when there was nothing. Nothing is deleted here: an earlier ``.previous``
    becomes ``.previous.older`` and stays until the new training has written its first checkpoint
    (``drop_older_when_checkpointed``). Folders the kit did not write are refused (``InputError``)."""
    from stablemtl.guard import claim

    folder = Path(folder)
    if not folder.exists():
        return None
    claim(folder, "training", is_training_folder)
    drop_older_when_checkpointed(folder)  # a training killed after its first checkpoint
    previous = folder.with_name(folder.name + ".previous")
    if previous.exists():
        claim(previous, "training", is_training_folder)
        older, n = folder.with_name(folder.name + ".previous.older"), 1
        while older.exists():
            older, n = folder.with_name(f"{folder.name}.previous.older-{n}"), n + 1
        previous.rename(older)
    folder.rename(previous)
    return previous


def train_stage(study: Study, kind: str, progress: bool = True, name: str | None = None, **overrides) -> Path:
    """Stages 03 and 04: train ``kind`` and save ``<output>/<kind>/model``; returns that folder.

    A training folder is continued only when it holds an unfinished training of the same settings
    (it resumes from its last checkpoint); one that finished (it has ``model/``) or whose checkpoint
    has other settings is moved to ``<kind>.previous`` and training starts from scratch; the generation
    before it is deleted only once the new training has written its first checkpoint. The folder
    carries the kit's marker; a foreign non-empty one is refused. Ctrl-C stops with the last checkpoint
    kept (rerun to resume). With several GPUs the run goes through ``accelerate launch``.
    """
    import subprocess
    import sys

    from stablemtl.guard import claim

    require(study, "01", "02")
    config = train_config(study, kind, name, **overrides)
    if kind == "multi_stream" and not (Path(config.init) / "stablemtl_model.json").is_file():
        raise StageError(f"the multi stream starts from {config.init}, which is not a trained single stream; "
                         f"run notebooks/03_train_single_stream.ipynb (or `stablemtl run --only 03`) with the "
                         f"same preset, run name and seeds first")
    out = claim(config.output_dir, "training", is_training_folder)
    drop_older_when_checkpointed(out)
    if finished_training(out, config):
        print(f"{out} holds this training, finished; kept", flush=True)
        return out / "model"
    if (out / "model").exists():
        print(f"{out} holds a finished training; moved to {set_aside(out)}", flush=True)
        claim(out, "training")
    gpus = torch.cuda.device_count()
    if not gpus:
        check_cpu_memory(config)  # a clear refusal with the counted numbers, not the OOM killer
    if gpus > 1:
        config.validate(gpus)
        (out / "config.json").write_text(json.dumps(asdict(config), indent=1))
        # every launch setting given: a user's accelerate config file (~/.cache/huggingface/accelerate) must not
        # change the precision or add a compiler, and accelerate then does not stop to warn about defaults
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(gpus),
               "--num_machines", "1", "--mixed_precision", config.mixed_precision, "--dynamo_backend", "no",
               "-m", "stablemtl.train", "--config", str(out / "config.json")]
        print("launching:", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        drop_older_when_checkpointed(out)
        return out / "model"
    try:
        trainer = Trainer(config, progress=progress)
    except CheckpointMismatch as err:
        print(f"{err.args[0].split(' and ')[0]}; moved to {set_aside(out)}", flush=True)
        claim(out, "training")
        trainer = Trainer(config, progress=progress)
    if trainer.resumed_from:
        print(f"resuming from {trainer.resumed_from} at step {trainer.step}", flush=True)
    try:
        if _older(out) and trainer.resumed_from is None:  # to the first checkpoint, then drop the older ones
            every = config.checkpoint_every
            trainer.train(until=min(config.iterations, (trainer.step // every + 1) * every if every else
                                    config.iterations))
            drop_older_when_checkpointed(out)
        trainer.train()
    except KeyboardInterrupt:
        last = trainer._checkpoint_dir()
        print(f"interrupted at step {trainer.step}; the last checkpoint is kept ({last or 'none written yet'}); "
              f"run the stage again to resume from it", flush=True)
        raise
    return trainer.save_model()


def stage_jobs(study: Study, kind: str, seeds: int | None = None, random_init: bool | None = None,
               single_task: bool | None = None, **knobs) -> list[tuple[str, dict]]:
    """The trainings of stage 03 (``kind="single_stream"``) or 04 (``"multi_stream"``): (folder name,
    overrides) for every seed of ``study.seeds(seeds, knobs["seed"])``. Stage 03 also trains, as
    ``random_init`` and ``single_task`` say (None: the preset's ``study`` section), the ablation
    ``single_stream_random`` (the same training from a random UNet: the generative prior's effect)
    per seed, and with the first seed one single-task baseline per task (``single_task_<task>``: the
    same recipe for the steps the task gets in the joint run, which gives each optimizer step to one
    task in turn)."""
    from stablemtl.paths import RANDOM_INIT, SINGLE_TASK

    options, all_seeds = study.options, study.seeds(seeds, knobs.get("seed"))
    options.update({k: v for k, v in (("random_init", random_init), ("single_task", single_task)) if v is not None})
    knobs = {k: v for k, v in knobs.items() if v is not None and k != "seed"}
    jobs = []
    for seed in all_seeds:
        jobs.append((kind, {**knobs, "seed": seed}))
        if kind == "single_stream" and options["random_init"]:
            jobs.append((RANDOM_INIT, {**knobs, "seed": seed, "unet_init": "random"}))
    if kind == "single_stream" and options["single_task"]:
        joint = train_config(study, kind, **knobs)
        steps = math.ceil(joint.iterations / len(joint.tasks))
        for task in joint.tasks:
            jobs.append((f"{SINGLE_TASK}_{task}", {**knobs, "seed": all_seeds[0], "tasks": [task],
                                                    "iterations": steps}))
    return jobs


def train_stage_all(study: Study, kind: str, seeds: int | None = None, progress: bool = True,
                    random_init: bool | None = None, single_task: bool | None = None,
                    **knobs) -> dict[tuple[str, int], Path]:
    """Stage 03 or 04: every training of ``stage_jobs``, in order; returns (name, seed) -> model folder.
    Each one resumes or skips as ``train_stage`` does, so a killed stage goes on where it stopped."""
    out = {}
    jobs = stage_jobs(study, kind, seeds, random_init, single_task, **knobs)
    for i, (name, overrides) in enumerate(jobs, 1):
        print(f"[{i}/{len(jobs)}] {name}, seed {overrides['seed']}", flush=True)
        out[(name, overrides["seed"])] = train_stage(study, kind, progress, name, **overrides)
    return out


def main(argv=None) -> int:
    """``python -m stablemtl.train --config run.json``: the entry ``accelerate launch`` runs on every GPU."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m stablemtl.train", description=main.__doc__)
    parser.add_argument("--config", required=True, help="a JSON file of TrainConfig fields")
    parser.add_argument("--until", type=int, default=None, help="stop at this step (resumable)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    path = Path(args.config)
    if not path.is_file():
        parser.error(f"no training configuration at {path}")
    trainer = train(json.loads(path.read_text()), until=args.until, progress=not args.no_progress)
    trainer.save_model()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
