"""A training's configuration (``TrainConfig``: every number of a run; the presets supply them), what a
checkpoint must share with a training to be resumed by it, and the memory a training needs.

``stablemtl.train`` runs a configuration; ``stablemtl.stages`` makes one from a run's preset and folders.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import psutil
import torch

from stablemtl import options
from stablemtl.data.mixing import TASK_DATASET_PROBS
from stablemtl.data.sources import SOURCES
from stablemtl.guard import InputError, StageError
from stablemtl.model.base import base_configs
from stablemtl.model.fingerprint import weights_fingerprint
from stablemtl.model.pipeline import MODEL_FILE
from stablemtl.model.sd2 import count_parameters
from stablemtl.model.streams import TASK_ATTENTION, TASK_ATTENTION_LAYOUT
from stablemtl.paths import KINDS
from stablemtl.presets import DEFAULT_SEED, load_preset
from stablemtl.tasks import TASK_NAMES, get_task

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
    seed: int = DEFAULT_SEED
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
    # the release-parity options (stablemtl.options; each default is the release's behaviour)
    normals: str = options.DEFAULTS["normals"]  # or "facing": negated to face the camera
    target_order: str = options.DEFAULTS["target_order"]  # or "resize_then_normalise"
    invalid_targets: str = options.DEFAULTS["invalid_targets"]  # or "fill"
    tensorboard: bool = False
    task_attention: dict = field(default_factory=lambda: dict(TASK_ATTENTION))
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
        self._check_types()
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
            if not self.init or not (Path(self.init) / MODEL_FILE).is_file():
                raise FileNotFoundError(f"a multi-stream run starts from a trained single-stream checkpoint; "
                                        f"init={self.init!r} is not one (train the single stream first)")
        if not self.data_root or not Path(self.data_root).is_dir():
            raise FileNotFoundError(f"data root {self.data_root!r} does not exist (write the mini datasets with "
                                    f"stablemtl.data.mini.write_mini_datasets or set PREPROCESSED_DIR)")

    def _check_types(self) -> None:
        """Each field of the type its annotation names (a JSON configuration can hold anything)."""
        kinds = {"int": ((int,), "an integer"), "float": ((int, float), "a number"), "bool": ((bool,), "true or false"),
                 "str": ((str,), "a string"), "list": ((list,), "a list"), "dict": ((dict,), "a mapping"),
                 "None": ((type(None),), "null")}
        for f in fields(self):
            value, names = getattr(self, f.name), [n.strip() for n in str(f.type).split("|")]
            allowed = tuple(t for n in names for t in kinds[n][0])
            if (isinstance(value, bool) and bool not in allowed) or not isinstance(value, allowed):
                expected = " or ".join(kinds[n][1] for n in names)
                raise ValueError(f"training option {f.name}={value!r}: expected {expected}")
        if not all(isinstance(task, str) for task in self.tasks):
            raise ValueError(f"training option tasks={self.tasks!r}: expected a list of task names")

    def _validate_memory_and_data(self) -> None:
        for name, low in (("num_workers", 0), ("prefetch_factor", 1)):  # integers (``_check_types``)
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {getattr(self, name)!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(map(repr, OPTIMIZERS))}, got {self.optimizer!r}")
        if self.optimizer == "adam_fused" and not torch.cuda.is_available():
            raise ValueError("optimizer 'adam_fused' (torch.optim.Adam(fused=True)) needs a CUDA device; none is "
                             "available here: use optimizer 'adam'")
        if self.optimizer == "adam8bit":
            if importlib.util.find_spec("bitsandbytes") is None:
                raise ValueError("optimizer 'adam8bit' needs the bitsandbytes package (pip install bitsandbytes), "
                                 "which is not installed; or use optimizer 'adam'")




def read_config(path) -> TrainConfig:
    """The training configuration in JSON file ``path`` (``dataclasses.asdict`` of a ``TrainConfig``: what
    ``python -m stablemtl.train --config`` reads), validated for ``$WORLD_SIZE`` processes (what
    ``accelerate launch`` sets); an ``InputError`` naming the file and what is wrong with it otherwise."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no training configuration at {path}: expected a JSON file of TrainConfig fields "
                         f"(a training on several GPUs writes one as config.json in its folder)")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not UTF-8 text (byte {err.start}); a training configuration is a JSON file "
                         f"of TrainConfig fields") from None
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: not valid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    if not isinstance(values, dict):
        raise InputError(f"{path}: expected a JSON object of TrainConfig fields, found a {type(values).__name__}")
    try:
        config = TrainConfig.from_dict(values)
        config.validate(int(os.environ.get("WORLD_SIZE") or 1))
    except (ValueError, FileNotFoundError) as err:
        raise InputError(f"{path}: {err}") from None
    return config


def training_identity(config: TrainConfig) -> dict:
    """What a checkpoint must share with a training to be resumed by it (JSON-normalised)."""
    values = {k: v for k, v in asdict(config).items() if k not in RESUMABLE_CHANGES}
    values["base_weights"] = weights_fingerprint(config.base)
    values["init_weights"] = weights_fingerprint(config.init) if config.init else None
    if config.kind == "multi_stream":
        values["task_attention_layout"] = TASK_ATTENTION_LAYOUT
    return json.loads(json.dumps(values))


def finished_training(folder: Path, config: TrainConfig) -> bool:
    """``folder`` holds this very training, finished: its model, and a last checkpoint of the same
    identity at ``config.iterations`` steps."""
    state = Path(folder) / "checkpoint" / "latest" / "state.json"
    if not (Path(folder) / "model" / MODEL_FILE).is_file() or not state.is_file():
        return False
    try:
        saved = json.loads(state.read_text())
    except (OSError, ValueError):
        return False
    return saved.get("step") == config.iterations and saved.get("identity") == training_identity(config)


def preset_config(preset, kind: str = "single_stream", **overrides) -> TrainConfig:
    """The ``TrainConfig`` of a preset's ``train`` section for ``kind``, with ``overrides`` on top."""
    config = load_preset(preset)
    section = dict(config.get("train") or {})
    if not section:
        raise ValueError(f"preset {config.get('name', preset)!r} has no train section")
    per_kind = {k: section.pop(k, {}) for k in KINDS}
    values = {**section, **per_kind.get(kind, {}), "kind": kind, "seed": int(config.get("seed", DEFAULT_SEED))}
    if kind == "multi_stream" and "task_attention" in config.get("model", {}):
        values["task_attention"] = dict(config["model"]["task_attention"])
    values.update(overrides)
    return TrainConfig.from_dict(values)


OPTIMIZER_STATE_BYTES = {"adam": 8, "adam_fused": 8, "adam8bit": 2}  # per trainable parameter: Adam's two moments


def memory_count(config: TrainConfig) -> dict:
    """The memory a training needs before any activation, counted from the base's component configs
    (modules built on the meta device: nothing allocated), in GiB: the trainable UNet (and the multi
    stream's task attention) in float32 with its gradients and optimizer state, and the frozen VAE,
    text encoder (and the multi stream's auxiliary UNet) in float32, plus their bfloat16 copies with
    ``mixed_precision="bf16"``. Keys: ``trainable`` and ``frozen`` (parameters), ``static_gib``."""
    ta = config.task_attention
    counts = count_parameters(configs=base_configs(config.base), tasks=config.tasks,
                              query_hidden=ta.get("query_hidden", TASK_ATTENTION["query_hidden"]),
                              heads=ta.get("heads", TASK_ATTENTION["heads"]))
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
