"""Training of the single-stream and multi-stream models (docs/method.md, "Training"), under accelerate.

One plain configuration (``TrainConfig``; presets supply the numbers) drives one loop that runs as one CPU
process or as ``accelerate launch`` across GPUs:

- each optimizer step trains one task, round-robin (``stablemtl.data.mixing``); its micro-batches (gradient
  accumulation) share the task, each micro-batch comes from one dataset drawn with the release's probabilities;
  gradients are zeroed between steps, so tasks never mix in one update;
- loss: MSE between predicted and target latents over valid latent elements, a latent pixel being valid when its
  whole VAE window is (``~maxpool(~valid)``);
- Adam (lr 1e-4, no weight decay), the release's linear warm-up (factor step / warmup, 0 at the first step) then
  exponential decay towards 0.01x, gradient-norm clipping at 5.0, fp32 by default;
- targets as the release builds them: each sample augmented and encoded at its file's resolution, then resized;
  invalid pixels keep their raw annotation and only the loss mask leaves them out; normals as the files store
  them (``target_order``, ``invalid_targets``, ``normals``: ``stablemtl.options``);
- each draw of a sample gets the flips, crop and jitter of its stream's epoch, so an image is augmented anew
  every epoch, reproducibly from the seed;
- ``checkpoint/latest`` every ``checkpoint_every`` steps and backups ``checkpoint/iter_XXXXXX``: trainable
  weights (safetensors), optimizer, LR scheduler, sampler and RNG states, written into a partial folder and
  renamed, so a kill during the write never leaves a broken ``latest``; a run resumes from ``latest``
  automatically and continues exactly (bitwise on CPU);
- ``train_log.csv``: step, task, dataset, loss, lr, seconds per step, data time.
- ``num_workers`` DataLoader worker processes (pinned memory with CUDA) read and prefetch exactly the
  micro-batches of the synchronous path (0, the default), in order; the sampler advances only as micro-batches
  are consumed, so checkpoints and resumes are the same with and without workers;
- ``mixed_precision="bf16"``: the trainable weights stay float32 (the optimizer's master copy) and the model's
  forward runs under ``torch.autocast`` (the trainer's own, exactly where accelerate would put it, so that one
  process can train in float32 and then in bfloat16: accelerate keeps one precision per process and has no
  public way to change it), while the modules a training never updates (the VAE, the text encoder, a multi
  stream's auxiliary UNet) compute with bfloat16 copies (``half_frozen``); the prompts are embedded in float32
  first and ``save_model`` writes the float32 originals, so a saved model's frozen parts are the base's, bit for
  bit. ``"fp16"`` (accelerate's autocast and gradient scaler) keeps the frozen parts in float32 (the SD VAE
  overflows in float16);
- memory: ``gradient_checkpointing`` of the trainable UNet, ``optimizer`` ``"adam_fused"`` (CUDA) or
  ``"adam8bit"`` (bitsandbytes); the optimizer is part of a checkpoint's identity, workers and checkpointing may
  change on resume (``RESUMABLE_CHANGES``).
"""

from __future__ import annotations

import contextlib
import copy
import csv
import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

from stablemtl.data.formats import folder_bytes, partial_folder, set_aside_corrupt, write_bytes
from stablemtl.data.mixing import TaskMixingSampler, micro_batch_loader
from stablemtl.data.sources import SOURCES
from stablemtl.devices import peak_memory
from stablemtl.guard import exit_status
from stablemtl.model.base import load_base
from stablemtl.model.pipeline import load_model, save_model
from stablemtl.model.streams import MultiStream, SingleStream
from stablemtl.paths import STATS_FILE, TRAIN_LOG
from stablemtl.progress import bar as progress_bar
from stablemtl.tasks import FLOW_TASKS
from stablemtl.train_config import TrainConfig, read_config, training_identity

LOG_FIELDS = ("step", "task", "dataset", "loss", "lr", "step_s", "data_s")
class CheckpointMismatch(ValueError):
    """The checkpoint in a training folder was written by other settings; it is never continued."""


class CheckpointError(RuntimeError):
    """No checkpoint of a training folder can be read (each named with why); never silently restarted."""


CHECKPOINT_FILES = ("state.json", "weights.safetensors", "optimizer.pt", "states.pt", "sampler.json")


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


def accelerate_precision(mixed_precision: str) -> str:
    """The precision accelerate manages for ``TrainConfig.mixed_precision``: ``"fp16"`` (autocast and its
    gradient scaler); bf16 needs no scaler and runs under the trainer's own ``torch.autocast``, so that one
    process (a notebook's kernel) can train in float32 and in bfloat16 one after the other: accelerate
    keeps one precision per process."""
    return "fp16" if mixed_precision == "fp16" else "no"


def _accelerator(mixed_precision: str):
    """The Accelerator of a training in this process; a clear error when the process already trained in a
    precision that accelerate cannot change (fp16 after float32 or bf16, or the reverse)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    try:
        return Accelerator(cpu=not torch.cuda.is_available(),  # several CPU processes (gloo) when launched without GPUs
                           mixed_precision=accelerate_precision(mixed_precision),
                           kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    except ValueError as err:
        if "mixed_precision" not in str(err):
            raise
        raise RuntimeError(
            f"mixed_precision={mixed_precision!r}: this process already trained in another precision and accelerate "
            f"keeps one per process (fp16 uses its gradient scaler); restart the kernel, or run the training in its "
            f"own process (python -m stablemtl.train --config)") from None


def collate(samples: list[dict], task: str) -> dict:
    """Stack the samples of one micro-batch (its task's tensors) and keep each one's augmentation key."""
    keys = ["rgb", f"{task}_target", f"{task}_valid"] + (["rgb_next"] if task in FLOW_TASKS else [])
    batch = {k: torch.stack([s[k] for s in samples]) for k in keys}
    # what makes a sample's rasters: the image and its augmentation (the latent cache's key)
    batch["keys"] = [(s["index"], tuple(s["flip"]), s["crop"]) for s in samples]
    return batch


class Trainer:
    """Builds the model, data, optimizer and schedule of a ``TrainConfig`` and runs or resumes it."""

    def __init__(self, config: TrainConfig, accelerator=None, progress: bool = True):
        self.accelerator = accelerator or _accelerator(config.mixed_precision)
        # bf16 runs under the trainer's own autocast (``loss``), as accelerate would run the prepared model
        self.autocast = torch.bfloat16 if config.mixed_precision == "bf16" else None
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
            # about the weights and Adam's two moments in float32 (after the first: the last checkpoint's size)
            needed = folder_bytes(latest) or 3 * sum(4 * p.numel() for p in self.model.trainable_parameters())
            with partial_folder(tmp, needed, f"the checkpoint of step {self.step}"):
                save_file(self._trainable_state(), str(tmp / "weights.safetensors"))
                torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
                torch.save({"scheduler": self.scheduler.state_dict(), "rng": torch.get_rng_state()},
                           tmp / "states.pt")
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

    def checkpoint_dir(self) -> Path | None:
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
        return mb, collate([source[(i, mb.epoch)] for i in mb.indices], mb.task)

    def _batches(self, stop: int):
        """The micro-batches up to step ``stop``, in the sampler's order: read here (``num_workers=0``) or
        prefetched by worker processes from a copy of the sampler; either way ``self.sampler`` advances
        only as a micro-batch is consumed, so a checkpoint holds the state after what was trained on."""
        cfg = self.config
        if not cfg.num_workers:
            while True:
                yield self.next_batch()
        loader = micro_batch_loader(self.sampler, self.sources, collate, cfg.num_workers, cfg.prefetch_factor,
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
            # the task too: each (task, dataset) source numbers the images of its own split list, and two
            # tasks' lists of one dataset differ with real data (vKITTI scene flow has fewer lines than depth)
            image_keys = [("rgb", task, dataset, *k) for k in batch["keys"]]
        z = self._encode_cached(batch["rgb"].to(device) * 2 - 1, image_keys)
        z_next = encode_frozen(frozen, batch["rgb_next"].to(device) * 2 - 1) if task in FLOW_TASKS else None
        target, valid = batch[f"{task}_target"].to(device), batch[f"{task}_valid"].to(device)
        target_keys = [(task, dataset, *k) for k in batch["keys"]] if cache else None
        autocast = (torch.autocast(device.type, dtype=self.autocast) if self.autocast is not None else
                    contextlib.nullcontext())
        with autocast:
            pred = self.ddp_model(z, z_next, [task])[0]
        pred = pred.float()  # as accelerate returns a prepared model's outputs
        if self.config.loss == "pixel":
            vae = frozen.vae
            decoded = vae.decode((pred / vae.config.scaling_factor).to(vae.dtype)).sample.float()
            return pixel_loss(decoded, target, valid, task)
        z_target = self._encode_cached(target, target_keys)
        return masked_latent_mse(pred, z_target, latent_valid(valid, frozen.vae_factor))

    def _append_log(self, rows: list[dict]) -> None:
        if not self.accelerator.is_main_process or not rows:
            return
        path = self.out / TRAIN_LOG
        new = not path.is_file()
        with open(path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=LOG_FIELDS)
            if new:
                writer.writeheader()
            writer.writerows(rows)

    def _trim_log(self) -> None:
        """After a resume, drop log rows of steps that will be trained again."""
        path = self.out / TRAIN_LOG
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
        bar = progress_bar(total=stop, initial=self.step, desc=f"train {cfg.kind}", unit="step",
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
            write_bytes(self.out / STATS_FILE, (json.dumps({"device": str(self.accelerator.device),
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
                    last = self.checkpoint_dir()
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
                save_model(self.model, path)
        self.accelerator.wait_for_everyone()
        return path


def train(config: TrainConfig | dict, until: int | None = None, progress: bool = True) -> Trainer:
    """Run (or resume) a training configuration; returns the trainer (``.model``, ``.step``)."""
    config = TrainConfig.from_dict(config) if isinstance(config, dict) else config
    trainer = Trainer(config, progress=progress)
    trainer.train(until)
    return trainer


def main(argv=None) -> int:
    """``python -m stablemtl.train --config run.json``: the entry ``accelerate launch`` runs on every GPU."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m stablemtl.train", description=main.__doc__)
    parser.add_argument("--config", required=True, help="a JSON file of TrainConfig fields")
    parser.add_argument("--until", type=int, default=None, help="stop at this step (resumable)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    def run() -> int:
        train(read_config(args.config), until=args.until, progress=not args.no_progress).save_model()
        return 0

    return exit_status(parser.prog, run, writable="the configuration's output_dir")


if __name__ == "__main__":
    raise SystemExit(main())
