"""``StableMTLPipeline``: images -> predictions of any set of tasks, in one batched pass.

A ``diffusers.DiffusionPipeline`` (as diffusers' Marigold pipelines). Its components:
``unet`` (the single stream's, or the multi stream's main UNet), ``aux_unet`` and
``task_attention`` (multi stream only, else ``None``), and the frozen ``vae``,
``text_encoder``, ``tokenizer``, with a ``scheduler`` that only records the fixed
single-step use (``prediction_type = sample``). Its config: ``kind``
(``"single_stream"`` / ``"multi_stream"``), ``tasks``, ``normals`` and, for the multi
stream, ``query_hidden``, ``heads``, ``mask_prob``.

``save_pretrained(folder)`` writes one self-contained folder, with no absolute path
in it::

    model_index.json  stablemtl_model.json  unet/  vae/  text_encoder/  tokenizer/  scheduler/
    aux_unet/  task_attention/            (multi stream)

and ``StableMTLPipeline.from_pretrained(folder)`` loads it from anywhere, offline
(``local_files_only``). The kit's older checkpoints (``stablemtl_model.json`` +
``unet/`` [+ ``aux_unet/``, ``task_attention.safetensors``], the frozen parts in the
base directory recorded at save time) load too (``streams.checkpoint_layout``).

``pipe.model`` is the ``SingleStream`` / ``MultiStream`` over the pipeline's own
modules (training and evaluation use it); ``StableMTLPipeline.from_model(model)``
wraps a model, sharing its modules.

Speed (opt-in; the defaults change nothing): ``torch_dtype=torch.bfloat16`` runs the whole call
in bfloat16 (latents, prompts, task attention) and still returns float32 predictions;
float16 is refused on the CPU (``stablemtl.devices.check_dtype``). ``compile=True`` (or
``pipe.compile()``) compiles the UNet(s) and the VAE encoder and decoder with ``torch.compile``;
where compilation fails (no working compiler), one message says so and the pipeline runs
uncompiled. ``memory_format=torch.channels_last`` lays out the convolutional weights for the GPU.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline, UNet2DConditionModel
from diffusers.utils import BaseOutput
from transformers import CLIPTextModel, CLIPTokenizer

from stablemtl import devices, options
from stablemtl.model.streams import (MODEL_FILE, MultiStream, SingleStream, TaskAttentionSites, checkpoint_layout,
                                     load_kit_checkpoint, make_scheduler, model_record)
from stablemtl.tasks import FLOW_TASKS, TASK_NAMES, get_task

KINDS = (SingleStream.kind, MultiStream.kind)
HALF = (torch.float16, torch.bfloat16)  # computed in, returned as float32


@dataclass
class StableMTLOutput(BaseOutput):
    """What ``StableMTLPipeline`` returns.

    Args:
        predictions: ``{task: output}``, each task's decoded output (``stablemtl.tasks``: relative
            depth ``[B, 1]``, unit normals ``[B, 3]``, class ids ``[B, 1]``, scale-free flow
            ``[B, 2]`` / scene flow ``[B, 3]``, albedo ``[B, 3]``, shading ``[B, 1]``).
        latents: ``{task: [B, 4, h, w]}`` the predicted task latents (``return_latents=True``).
        colorized: ``{task: uint8 [B, H, W, 3]}`` RGB renderings (numpy; ``colorize=True``).
    """

    predictions: dict[str, torch.Tensor]
    latents: dict[str, torch.Tensor] | None = None
    colorized: dict | None = None

    def __post_init__(self) -> None:
        # not BaseOutput's: with only ``predictions`` given it would make the tasks the output's keys
        for field in fields(self):
            value = getattr(self, field.name)
            if value is not None:
                self[field.name] = value


def _strip_local_paths(folder: Path) -> None:
    """Remove the ``_name_or_path`` records (where a component was loaded from) from the saved JSON files."""
    for file in folder.rglob("*.json"):
        try:
            data = json.loads(file.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(data, dict) and any(k in data for k in ("_name_or_path", "name_or_path")):
            for key in ("_name_or_path", "name_or_path"):
                data.pop(key, None)
            file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


class StableMTLPipeline(DiffusionPipeline):
    """Predict dense tasks with a single-stream or multi-stream StableMTL model.

    ``pipe(images, tasks=None, next_images=None, return_latents=False, colorize=False)`` takes
    RGB ``[B, 3, H, W]`` in [0, 1] (H and W multiples of the VAE factor; the next frame is
    required for optical_flow and scene_flow) and returns a ``StableMTLOutput``. Everything
    runs in one batch: the image latents are encoded once, the model predicts every requested
    task together (single stream: 1 UNet call; multi stream: 2), and all task latents are
    decoded in one VAE call.
    """

    _optional_components = ["aux_unet", "task_attention"]

    def __init__(self, unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoder: CLIPTextModel,
                 tokenizer: CLIPTokenizer, scheduler: DDIMScheduler, aux_unet: UNet2DConditionModel | None = None,
                 task_attention: TaskAttentionSites | None = None, kind: str = SingleStream.kind,
                 tasks=TASK_NAMES, normals: str = "as_stored", query_hidden: int | None = None,
                 heads: int | None = None, mask_prob: float | None = None):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown model kind {kind!r}; expected {' or '.join(KINDS)}")
        options.check("normals", normals)
        multi = kind == MultiStream.kind
        if multi and (aux_unet is None or task_attention is None):
            raise ValueError("a multi-stream pipeline needs aux_unet and task_attention")
        if not multi and (aux_unet is not None or task_attention is not None):
            raise ValueError("a single-stream pipeline has no aux_unet or task_attention")
        if multi:
            query_hidden = task_attention.config.query_hidden if query_hidden is None else query_hidden
            heads = task_attention.config.heads if heads is None else heads
            mask_prob = 0.4 if mask_prob is None else mask_prob
        self.register_modules(unet=unet, aux_unet=aux_unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              scheduler=scheduler, task_attention=task_attention)
        self.register_to_config(kind=kind, tasks=list(tasks), normals=normals, query_hidden=query_hidden,
                                heads=heads, mask_prob=mask_prob)
        self._model = None  # built on first use over these modules (``model``)
        self._compile_pending = False  # compiled, first call not yet made (``compile``)

    # ---------------------------------------------------------------- the model over the components
    def _build_model(self):
        c = self.config
        if c.kind == SingleStream.kind:
            return SingleStream(self.unet, self.vae, self.text_encoder, self.tokenizer, c.tasks, normals=c.normals)
        return MultiStream(self.unet, self.aux_unet, self.vae, self.text_encoder, self.tokenizer, c.tasks,
                           c.query_hidden, c.heads, c.mask_prob, normals=c.normals, task_attention=self.task_attention)

    @property
    def model(self) -> SingleStream | MultiStream:
        """The ``SingleStream`` / ``MultiStream`` over this pipeline's modules (no copies)."""
        m = self._model
        if m is not None:
            parts = [(self.unet, m.unet), (self.vae, m.frozen.vae), (self.text_encoder, m.frozen.text_encoder),
                     (self.tokenizer, m.frozen.tokenizer)]
            if isinstance(m, MultiStream):
                parts += [(self.aux_unet, m.aux_unet), (self.task_attention, m.task_attention)]
            if m.kind == self.config.kind and all(a is b for a, b in parts):
                return m
        m = self._model = self._build_model()  # first use, or a component was replaced
        return m

    @classmethod
    def from_model(cls, model: SingleStream | MultiStream, compile: bool = False,
                   memory_format=None) -> "StableMTLPipeline":
        """The pipeline of a ``SingleStream`` / ``MultiStream`` (its modules, shared; ``pipe.model is model``);
        ``compile`` and ``memory_format``: see ``compile`` and the module's docstring."""
        if not isinstance(model, (SingleStream, MultiStream)):
            raise TypeError(f"expected a SingleStream or MultiStream model, got {type(model).__name__}")
        f = model.frozen
        multi = isinstance(model, MultiStream)
        pipe = cls(unet=model.unet, vae=f.vae, text_encoder=f.text_encoder, tokenizer=f.tokenizer,
                   scheduler=make_scheduler(), aux_unet=model.aux_unet if multi else None,
                   task_attention=model.task_attention if multi else None, kind=model.kind, tasks=model.tasks,
                   normals=model.normals, **(model.settings if multi else {}))
        pipe._model = model
        return pipe._speed_up(compile, memory_format)

    # ---------------------------------------------------------------- speed (opt-in)
    def _compile_targets(self) -> list[torch.nn.Module]:
        return [m for m in (self.unet, self.aux_unet, self.vae.encoder, self.vae.decoder) if m is not None]

    def compile(self, **kwargs) -> "StableMTLPipeline":
        """Compile the UNet(s) and the VAE encoder and decoder in place (``torch.compile``'s keywords).

        Compilation happens at the first call; when it fails (no working compiler), one message
        says so and the pipeline runs uncompiled, with the same outputs."""
        try:
            for module in self._compile_targets():
                module.compile(**kwargs)
        except Exception as err:  # noqa: BLE001 - any failure of the compiler: run uncompiled, say so
            self._uncompile(err)
            return self
        self._compile_pending = True
        return self

    def uncompile(self) -> "StableMTLPipeline":
        """Undo ``compile`` (the modules are shared with ``pipe.model`` and ``from_model``'s model)."""
        for module in self._compile_targets():
            module._compiled_call_impl = None
        self._compile_pending = False
        return self

    def _uncompile(self, err: BaseException) -> None:
        self.uncompile()
        message = str(err).strip().splitlines()[0] if str(err).strip() else ""
        print(f"StableMTLPipeline: torch.compile failed ({type(err).__name__}: {message[:200]}); "
              "running uncompiled (slower, same outputs)")

    def _speed_up(self, compile: bool = False, memory_format=None) -> "StableMTLPipeline":
        if memory_format is not None:
            for module in (self.unet, self.aux_unet, self.vae):
                if module is not None:
                    module.to(memory_format=memory_format)
        return self.compile() if compile else self

    # ---------------------------------------------------------------- persistence
    def save_pretrained(self, save_directory, **kwargs) -> Path:
        """Write the self-contained folder (safetensors and JSON only) and its ``stablemtl_model.json``."""
        if not kwargs.pop("safe_serialization", True):
            raise ValueError("StableMTLPipeline saves safetensors only")
        path = Path(save_directory)
        super().save_pretrained(path, safe_serialization=True, **kwargs)
        _strip_local_paths(path)
        c = self.config
        settings = ({k: c[k] for k in ("query_hidden", "heads", "mask_prob")} if c.kind == MultiStream.kind
                    else None)
        (path / MODEL_FILE).write_text(json.dumps(model_record(c.kind, c.tasks, c.normals, settings), indent=1)
                                       + "\n")
        return path

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, base=None, **kwargs) -> "StableMTLPipeline":
        """Load a saved folder, offline by default (``local_files_only=True``).

        ``base`` (a ``stablemtl.model.base.Base`` or a base directory): the frozen VAE, text
        encoder and tokenizer to use instead of the folder's own; needed for a checkpoint of the
        kit's older layout whose recorded base directory is gone. ``torch_dtype`` (or ``dtype``,
        diffusers' newer name) casts every component (a given ``base``'s modules too, in place);
        ``torch.bfloat16`` halves memory and time on a GPU, ``torch.float16`` is refused where no GPU
        can run it. ``compile=True`` and ``memory_format`` (e.g. ``torch.channels_last``): opt-in
        speed-ups (module docstring). Move the pipeline with ``pipe.to(device)``.
        """
        path = Path(pretrained_model_name_or_path)
        speed = {k: kwargs.pop(k) for k in ("compile", "memory_format") if k in kwargs}
        local_only = kwargs.setdefault("local_files_only", True)
        torch_dtype, dtype = kwargs.pop("torch_dtype", None), kwargs.pop("dtype", None)
        if torch_dtype is not None and dtype is not None and torch_dtype != dtype:
            raise ValueError(f"torch_dtype={torch_dtype} and dtype={dtype} disagree; give one")
        dtype = dtype if dtype is not None else torch_dtype
        if dtype == torch.float16 and devices.available_devices() == ["cpu"]:
            devices.check_dtype(dtype, "cpu")
        if not path.is_dir() and local_only:
            raise FileNotFoundError(f"model folder {path} does not exist")
        if path.is_dir() and checkpoint_layout(path) == "kit":
            unused = set(kwargs) - {"local_files_only"}
            if unused:
                raise ValueError(f"{path}: a checkpoint of the kit's older layout takes only base= and "
                                 f"torch_dtype=, not {', '.join(sorted(unused))}")
            pipe = cls.from_model(load_kit_checkpoint(path, base))
        else:
            if base is not None:
                from stablemtl.model.base import Base, load_base

                base = base if isinstance(base, Base) else load_base(base)
                for name in ("vae", "text_encoder", "tokenizer"):
                    kwargs.setdefault(name, getattr(base, name))
            if dtype is not None:
                kwargs["dtype"] = dtype
            pipe = super().from_pretrained(str(path) if path.is_dir() else pretrained_model_name_or_path, **kwargs)
            if base is None:  # diffusers has cast every component
                return pipe._speed_up(**speed)
        if dtype is not None:
            pipe.to(dtype)
        return pipe._speed_up(**speed)

    # ---------------------------------------------------------------- prediction
    def _check(self, images, what: str) -> torch.Tensor:
        """``images`` as ``[B, 3, H, W]`` on the pipeline's device and dtype, or an error naming the
        argument and the bad shape or value: a NaN or inf pixel would make every prediction NaN, an
        empty or channels-last tensor would fail deep inside the VAE, values outside [0, 1] would be
        predicted from a wrongly scaled image."""
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"{what}: expected a torch tensor [B, 3, H, W] in [0, 1], got {type(images).__name__}")
        if not images.is_floating_point():
            raise TypeError(f"{what}: expected floats in [0, 1], got {images.dtype} (divide uint8 images by 255)")
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[1] != 3:
            hint = (" (channels last? use images.permute(0, 3, 1, 2))"
                    if images.ndim == 4 and images.shape[-1] == 3 else "")
            raise ValueError(f"{what}: expected [B, 3, H, W] RGB (3 channels), got shape {tuple(images.shape)}{hint}")
        if images.numel() == 0:
            raise ValueError(f"{what}: empty tensor of shape {tuple(images.shape)}; expected at least one "
                             f"image of at least one pixel")
        finite = torch.isfinite(images)
        if not bool(finite.all()):
            bad = (~finite).nonzero()[0].tolist()
            raise ValueError(f"{what}: {int((~finite).sum())} non-finite value(s) (NaN or inf), the first "
                             f"{float(images[tuple(bad)])} at [batch {bad[0]}, channel {bad[1]}, y {bad[2]}, "
                             f"x {bad[3]}]; every prediction would be NaN: fix or mask the input image")
        factor = self.model.frozen.vae_factor
        h, w = images.shape[-2:]
        if h % factor or w % factor:
            raise ValueError(f"{what}: size {h}x{w} is not a multiple of the VAE factor {factor}; "
                             f"resize to e.g. {h // factor * factor or factor}x{w // factor * factor or factor}")
        if images.min() < -1e-3 or images.max() > 1 + 1e-3:
            raise ValueError(f"{what}: expected values in [0, 1], got {float(images.min()):.3g}..{float(images.max()):.3g}")
        return images.to(self._execution_device, self.vae.dtype)

    @torch.no_grad()
    def _predict(self, model, images, next_images, tasks) -> tuple[torch.Tensor, torch.Tensor]:
        """Task latents ``[T, B, 4, h, w]`` and their decodings ``[T, B, 3, H, W]``, in the pipeline's dtype."""
        frozen = model.frozen
        was_training = model.training
        model.eval()
        try:
            pair = images if next_images is None else torch.cat([images, next_images])
            z = frozen.encode(pair * 2 - 1)
            z_image, z_next = (z, None) if next_images is None else z.chunk(2)
            latents = model.predict_latents(z_image, z_next, tasks)  # [T, B, 4, h, w]
            decoded = frozen.decode(latents.flatten(0, 1)).view(len(tasks), images.shape[0], 3, *images.shape[-2:])
        finally:
            model.train(was_training)
        return latents, decoded

    @torch.no_grad()
    def __call__(self, images, tasks=None, next_images=None, return_latents: bool = False,
                 colorize: bool = False) -> StableMTLOutput:
        """Predictions of ``tasks`` (default: every task of the model) for ``images``; see the class."""
        model = self.model
        tasks = list(model.tasks if tasks is None else [tasks] if isinstance(tasks, str) else tasks)
        for task in tasks:
            get_task(task)  # unknown task -> a ValueError listing the valid ones
        images = self._check(images, "images")
        if next_images is None and any(t in FLOW_TASKS for t in tasks):
            raise ValueError(f"{', '.join(t for t in tasks if t in FLOW_TASKS)} need the next frame: pass next_images")
        if next_images is not None:  # a multi stream's auxiliary pass reads it for the flow tasks' features too
            next_images = self._check(next_images, "next_images")
            if next_images.shape != images.shape:
                raise ValueError(f"next_images {tuple(next_images.shape)} must match images {tuple(images.shape)}")
        devices.check_dtype(self.vae.dtype, images.device)
        try:
            latents, decoded = self._predict(model, images, next_images, tasks)
        except Exception as err:  # noqa: BLE001 - only a first compiled call is retried, uncompiled
            if not self._compile_pending:
                raise
            self._uncompile(err)
            latents, decoded = self._predict(model, images, next_images, tasks)
        self._compile_pending = False
        if decoded.dtype in HALF:  # computed in half precision, returned as float32
            latents, decoded = latents.float(), decoded.float()
        predictions = {task: get_task(task).decode(decoded[i]) for i, task in enumerate(tasks)}
        return StableMTLOutput(
            predictions=predictions,
            latents={task: latents[i] for i, task in enumerate(tasks)} if return_latents else None,
            colorized={task: get_task(task).colorize(predictions[task]) for task in tasks} if colorize else None)

