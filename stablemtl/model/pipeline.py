"""``StableMTLPipeline``: images -> predictions of any set of tasks, in one batched pass; and
saving and loading a model.

A ``diffusers.DiffusionPipeline`` (as diffusers' Marigold pipelines). Its components:
``unet`` (the single stream's, or the multi stream's main UNet), ``aux_unet`` and
``task_attention`` (multi stream only, else ``None``), and the frozen ``vae``,
``text_encoder``, ``tokenizer``, with a ``scheduler`` that only records the fixed
single-step use (``prediction_type = sample``). Its config: ``kind``
(``"single_stream"`` / ``"multi_stream"``), ``tasks``, ``normals`` and, for the multi
stream, ``query_hidden``, ``heads``, ``mask_prob``.

Saving: ``save_model(model, folder)`` (``StableMTLPipeline.from_model(model).save_pretrained(folder)``)
writes one self-contained folder, with no absolute path in it::

    model_index.json  stablemtl_model.json  unet/  vae/  text_encoder/  tokenizer/  scheduler/
    aux_unet/  task_attention/            (multi stream)

``stablemtl_model.json`` is the model's record (``model_record``: kind, tasks, task-attention
settings, normal convention), for code that needs a model's tasks or normals without loading it.

Loading, one path: ``load_model(folder)`` -> ``StableMTLPipeline.from_pretrained(folder)`` (the
folder checked by ``read_model_index``; the stock components loaded by diffusers, offline:
``local_files_only``; the task attention strictly by ``load_task_attention``) -> ``pipe.model``.
The kit's earlier formats are refused with a ``ModelFormatError`` naming the folder, what was
found and what to do (this version reads none of them): the older layout of trained weights
over a base directory (``read_model_index``), the first task-attention layout
(``load_task_attention``), a record without its normal convention (``saved_normals``).

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
from stablemtl.model.base import Base, load_base
from stablemtl.model.streams import TASK_ATTENTION, TIMESTEP, MultiStream, SingleStream, TaskAttentionSites
from stablemtl.paths import KINDS, PIPELINE_FILE
from stablemtl.tasks import FLOW_TASKS, TASK_NAMES, get_task

MODEL_FILE = "stablemtl_model.json"  # a saved model's record (``model_record``)
PIPELINE_CLASS = "StableMTLPipeline"  # the ``_class_name`` of a saved model's ``model_index.json``
HALF = (torch.float16, torch.bfloat16)  # computed in, returned as float32
# what to do with a model folder of an earlier format (``ModelFormatError``)
RESAVE = ("re-train it with this version, or load it with the kit at commit d41c318 (the last that reads it) and "
          "save it again there (save_pretrained writes the folder this version reads)")


def make_scheduler() -> DDIMScheduler:
    """The scheduler only records the fixed single-step use: ``prediction_type = sample``."""
    return DDIMScheduler(num_train_timesteps=TIMESTEP + 1, prediction_type="sample")


# --------------------------------------------------------------------------- a saved model's files

class ModelFileError(ValueError):
    """A file of a saved model exists but cannot be read (truncated or corrupt JSON or weights)."""


class ModelFormatError(ValueError):
    """A model folder in a format of an earlier kit version, which this version no longer reads."""


def _read_json(file: Path) -> dict:
    """A model folder's JSON record; a ``ModelFileError`` naming the file when it is not a JSON object."""
    try:
        value = json.loads(Path(file).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelFileError(f"{file}: not valid JSON ({err}); the model folder is damaged: copy it again, "
                             f"or save the model anew (save_pretrained)") from None
    if not isinstance(value, dict):
        raise ModelFileError(f"{file}: expected a JSON object, got {type(value).__name__}")
    return value


def _load_safetensors(file: Path) -> dict:
    """A safetensors file's tensors; a ``ModelFileError`` naming it when it is truncated or corrupt."""
    from safetensors.torch import load_file

    if not Path(file).is_file():
        raise FileNotFoundError(f"{file}: no such file; the model folder is incomplete")
    try:
        return load_file(str(file))
    except Exception as err:  # noqa: BLE001 - safetensors raises its own SafetensorError (and OSError)
        raise ModelFileError(f"{file}: cannot be read as safetensors ({type(err).__name__}: {err}); "
                             f"truncated or corrupt: copy the model folder again") from None


def model_record(kind: str, tasks, normals: str, settings: dict | None = None) -> dict:
    """What a saved model's ``stablemtl_model.json`` holds: kind, tasks, task-attention settings
    (multi stream), normal convention. Code that needs a model's tasks or normals reads this file."""
    return {"kind": kind, "tasks": list(tasks), **(settings or {}), "normals": normals}


def saved_normals(record: dict, where=None) -> str:
    """The normal convention a saved model's record (``stablemtl_model.json``, read from ``where``)
    holds; a ``ModelFormatError`` when it records none (a model of an earlier kit version)."""
    if "normals" not in record:
        raise ModelFormatError(
            f"{where or MODEL_FILE}: the model records no normal convention (written by an earlier version of the "
            f"kit, whose models learned camera-facing normals), which this version no longer reads: {RESAVE}")
    return record["normals"]


def read_model_index(path) -> dict:
    """The ``model_index.json`` of a saved ``StableMTLPipeline`` folder (``save_model``); an error
    that names the folder and what it holds when it is not one: missing, a base model directory,
    or a model of the kit's older layout (``ModelFormatError``)."""
    path = Path(path)
    index = path / PIPELINE_FILE
    if index.is_file():
        record = _read_json(index)
        name = record.get("_class_name")
        if name != PIPELINE_CLASS:
            raise ValueError(f"{path}: {PIPELINE_FILE} describes a {name}, not a {PIPELINE_CLASS}; not a stablemtl "
                             f"model (a base model directory?)")
        return record
    if (path / MODEL_FILE).is_file():
        raise ModelFormatError(
            f"{path}: a model in the kit's older layout ({MODEL_FILE} and the trained weights only: unet/ [+ aux_unet/, "
            f"task_attention.safetensors], the frozen parts read from a base directory), which this version no longer "
            f"reads (it loads the self-contained folder that save_model writes: {PIPELINE_FILE}, {MODEL_FILE} and every "
            f"component): {RESAVE}")
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {path} does not exist")
    raise FileNotFoundError(f"{path}: no {PIPELINE_FILE} or {MODEL_FILE}; not a stablemtl model checkpoint")


def load_task_attention(folder, dtype=None) -> TaskAttentionSites:
    """A saved ``task_attention/`` folder, loaded strictly: every saved tensor is used and every
    parameter filled, or the error names the keys (diffusers' own loader would fill missing weights
    at random and only warn); weights of the kit's first task-attention layout (``kv_norm``,
    ``query_norm``) are a ``ModelFormatError``. ``dtype``: cast to it."""
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if len(files) != 1:
        raise FileNotFoundError(f"{folder}: expected one .safetensors file of task-attention weights, found "
                                f"{len(files)}")
    model = TaskAttentionSites.from_config(TaskAttentionSites.load_config(folder))
    state = _load_safetensors(files[0])
    first = [k for k in state if ".kv_norm." in k or ".query_norm." in k]
    if first:
        raise ModelFormatError(
            f"{files[0]}: task attention of the kit's first layout ({len(first)} shared-norm key(s) such as "
            f"{first[0]!r}: one LayerNorm for a task's keys and values, one query LayerNorm for all tasks), which this "
            f"version no longer reads (it reads the release's per-task norm_k, norm_v, norm_q) in the model folder "
            f"{folder.parent}: {RESAVE}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{files[0]} does not fit the task attention of {folder / TaskAttentionSites.config_name}: "
                         f"{len(missing)} missing key(s) {missing[:3]}, {len(unexpected)} unexpected key(s) "
                         f"{unexpected[:3]}")
    return (model.to(dtype) if dtype is not None else model).eval()


# --------------------------------------------------------------------------- the pipeline

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
                 task_attention: TaskAttentionSites | None = None, kind: str = KINDS[0],
                 tasks=TASK_NAMES, normals: str = options.DEFAULTS["normals"], query_hidden: int | None = None,
                 heads: int | None = None, mask_prob: float | None = None):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown model kind {kind!r}; expected {' or '.join(KINDS)}")
        options.check("normals", normals)
        multi = kind == KINDS[1]
        if multi and (aux_unet is None or task_attention is None):
            raise ValueError("a multi-stream pipeline needs aux_unet and task_attention")
        if not multi and (aux_unet is not None or task_attention is not None):
            raise ValueError("a single-stream pipeline has no aux_unet or task_attention")
        if multi:
            query_hidden = task_attention.config.query_hidden if query_hidden is None else query_hidden
            heads = task_attention.config.heads if heads is None else heads
            mask_prob = TASK_ATTENTION["mask_prob"] if mask_prob is None else mask_prob
        self.register_modules(unet=unet, aux_unet=aux_unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              scheduler=scheduler, task_attention=task_attention)
        self.register_to_config(kind=kind, tasks=list(tasks), normals=normals, query_hidden=query_hidden,
                                heads=heads, mask_prob=mask_prob)
        self._model = None  # built on first use over these modules (``model``)
        self._compile_pending = False  # compiled, first call not yet made (``compile``)

    # ---------------------------------------------------------------- the model over the components
    def _build_model(self):
        c = self.config
        if c.kind == KINDS[0]:
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
        settings = {k: c[k] for k in TASK_ATTENTION} if c.kind == KINDS[1] else None
        (path / MODEL_FILE).write_text(json.dumps(model_record(c.kind, c.tasks, c.normals, settings), indent=1)
                                       + "\n")
        return path

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, base=None, **kwargs) -> "StableMTLPipeline":
        """Load a saved folder, offline by default (``local_files_only=True``).

        ``base`` (a ``stablemtl.model.base.Base`` or a base directory): the frozen VAE, text
        encoder and tokenizer to use instead of the folder's own (the same base, loaded once).
        A folder that is not a saved model, or one of an earlier format, is refused
        (``read_model_index``, ``load_task_attention``). ``torch_dtype`` (or ``dtype``,
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
        index = read_model_index(path) if path.is_dir() else {}
        if base is not None:
            base = base if isinstance(base, Base) else load_base(base)
            for name in ("vae", "text_encoder", "tokenizer"):
                kwargs.setdefault(name, getattr(base, name))
        if (index.get("task_attention") or [None])[0] is not None:  # a multi stream: ours, loaded strictly
            kwargs.setdefault("task_attention", load_task_attention(path / "task_attention", dtype))
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


# --------------------------------------------------------------------------- saving and loading a model

def save_model(model: SingleStream | MultiStream, path) -> Path:
    """Write ``model`` as a self-contained ``StableMTLPipeline`` folder (module docstring); returns ``path``."""
    return StableMTLPipeline.from_model(model).save_pretrained(path)


def load_model(path, base=None, expect: str | None = None) -> SingleStream | MultiStream:
    """Load a saved ``SingleStream`` or ``MultiStream`` (safetensors + JSON only; nothing is unpickled).

    ``path``: a ``StableMTLPipeline`` folder (``save_model``), self-contained. ``base`` (a ``Base``
    or a base directory): the frozen VAE, text encoder and tokenizer to use instead of the folder's
    own (the same base, loaded once). ``expect``: the kind the folder must hold.
    """
    path = Path(path)
    kind = read_model_index(path).get("kind")
    if expect is not None and kind != expect:
        raise ValueError(f"{path} holds a {kind!r} model, not a {expect!r} one")
    return StableMTLPipeline.from_pretrained(path, base=base).model
