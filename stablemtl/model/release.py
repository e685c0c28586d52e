"""Released StableMTL checkpoints -> kit pipeline folders (``stablemtl convert-release``).

A release training folder (the released ``single_stream`` / ``multi_stream`` tarballs) holds::

    <run>/config.yaml                                   merged training config (tasks, task attention)
    <run>/checkpoint/latest/unet/config.json            the UNet's config (class UNet3DConditionModel)
    <run>/checkpoint/latest/unet/diffusion_pytorch_model.bin   torch.save of the UNet's state dict
    <run>/checkpoint/latest/iter_NNNNNN                 empty marker: the iteration

and nothing of the frozen parts: the VAE, text encoder and tokenizer are Stable Diffusion 2's
(``--base``). The multi-stream model also needs its frozen auxiliary stream, the single-stream UNet
the release downloads as ``single_stream_unet.pth`` (``--child``): its config names a path relative
to the working directory, so the file is an explicit input here. Weights are read with
``torch.load(weights_only=True)``: tensors only, nothing else is unpickled.

The mapping (``release_to_kit``; ``kit_to_release`` is its inverse), applied key by key:

1. a leading ``module.`` is dropped (a wrapped model's save; the release unwraps before saving);
2. the task attention, ``<site>.<part>.<task>.<rest>`` with ``<site>`` a block's
   ``...transformer_blocks.0.attn1``: ``task_to_k.<t>.fc1|fc2`` -> ``key.<t>.0|2``,
   ``task_to_v`` -> ``value`` likewise, ``task_to_q.<t>.net.<i>`` -> ``query.<t>.<i>``,
   ``task_norm_k|v|q.<t>`` -> ``norm_k|v|q.<t>``, ``to_out_task`` -> ``out``; the site's
   module in ``TaskAttentionSites`` is the site with dots as underscores;
3. everything else is the stock ``UNet2DConditionModel``'s key, same name and shape (the
   release's 3-D blocks have 2-D weights under the stock names).

Every key must be used and every kit parameter filled (a strict load), or the conversion
fails naming the keys. The release's config ``unet/config.json`` becomes the stock one by
dropping its ``_`` keys and renaming its 3-D block classes to the 2-D ones.

The converted model keeps the release's task order (``trainer.output_types``) and its normal
convention (``normals="as_stored"``); the kit runs its task attention on all 16 blocks with
the main task left out of the attended tasks, which is what the released configuration does
(``apply_task_attn_to_layers: all``, ``exclude_mainstream_output_type: true``); any other
setting is refused rather than converted into a different model.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch

from stablemtl import options
from stablemtl.model.base import load_base, paper_base_dir
from stablemtl.model.pipeline import save_model
from stablemtl.model.streams import MultiStream, SingleStream, TaskAttentionSites, attention_sites, site_key
from stablemtl.paths import KINDS

WEIGHTS = Path("checkpoint/latest/unet/diffusion_pytorch_model.bin")
UNET_CONFIG = Path("checkpoint/latest/unet/config.json")
BLOCKS_3D = {"CrossAttnDownBlock3D": "CrossAttnDownBlock2D", "DownBlock3D": "DownBlock2D",
             "UpBlock3D": "UpBlock2D", "CrossAttnUpBlock3D": "CrossAttnUpBlock2D",
             "UNetMidBlock3DCrossAttn": "UNetMidBlock2DCrossAttn"}
_TASK_KEY = re.compile(r"^(?P<site>.+\.transformer_blocks\.0\.attn1)\.(?:(?P<part>task_to_k|task_to_v|task_to_q|"
                       r"task_norm_k|task_norm_v|task_norm_q)\.(?P<task>[a-z_]+)\.(?P<rest>.+)|to_out_task\."
                       r"(?P<out>weight|bias))$")
_PARTS = {"task_to_k": "key", "task_to_v": "value", "task_to_q": "query",
          "task_norm_k": "norm_k", "task_norm_v": "norm_v", "task_norm_q": "norm_q"}
_MLP_LAYERS = {"fc1": "0", "fc2": "2"}  # the key and value MLPs; the query MLP's net.<i> keeps <i>


class ReleaseFormatError(ValueError):
    """A folder or file that is not what the release writes."""


def release_to_kit(state: dict) -> tuple[dict, dict]:
    """Split a release state dict into the stock UNet's and ``TaskAttentionSites``' state dicts."""
    unet, task_attention = {}, {}
    for key, value in state.items():
        key = key[len("module."):] if key.startswith("module.") else key
        match = _TASK_KEY.match(key)
        if match is None:
            unet[key] = value
            continue
        site = site_key(match["site"])
        if match["out"]:
            task_attention[f"{site}.out.{match['out']}"] = value
            continue
        part, rest = _PARTS[match["part"]], match["rest"]
        if part in ("key", "value"):
            layer, _, param = rest.partition(".")
            if layer not in _MLP_LAYERS:
                raise ReleaseFormatError(f"unexpected task-attention key {key!r}: the key/value MLPs have fc1 and fc2")
            rest = f"{_MLP_LAYERS[layer]}.{param}"
        elif part == "query":
            if not rest.startswith("net."):
                raise ReleaseFormatError(f"unexpected task-attention key {key!r}: the query MLP is net.<i>")
            rest = rest[len("net."):]
        task_attention[f"{site}.{part}.{match['task']}.{rest}"] = value
    return unet, task_attention


def kit_to_release(unet_state: dict, task_attention_state: dict | None, sites) -> dict:
    """The release's state dict of a kit model: ``release_to_kit`` inverted. ``sites``: the UNet's
    ``attn1`` module names (``streams.attention_sites``)."""
    by_key = {site_key(s): s for s in sites}
    parts = {v: k for k, v in _PARTS.items()}
    layers = {v: k for k, v in _MLP_LAYERS.items()}
    out = dict(unet_state)
    for key, value in (task_attention_state or {}).items():
        site, part, rest = key.split(".", 2)
        if part == "out":
            out[f"{by_key[site]}.to_out_task.{rest}"] = value
            continue
        task, rest = rest.split(".", 1)
        if part in ("key", "value"):
            layer, param = rest.split(".", 1)
            rest = f"{layers[layer]}.{param}"
        elif part == "query":
            rest = f"net.{rest}"
        out[f"{by_key[site]}.{parts[part]}.{task}.{rest}"] = value
    return out


def stock_unet_config(release_config: dict) -> dict:
    """The release's ``unet/config.json`` as a stock ``UNet2DConditionModel`` config."""
    config = {k: v for k, v in release_config.items() if not k.startswith("_")}
    for field in ("down_block_types", "up_block_types"):
        config[field] = [BLOCKS_3D.get(b, b) for b in config.get(field, [])]
    if "mid_block_type" in config:
        config["mid_block_type"] = BLOCKS_3D.get(config["mid_block_type"], config["mid_block_type"])
    return config


def read_run(run_dir) -> dict:
    """What a release run folder says: kind, tasks, task-attention settings, iteration, files.
    A folder that is not one raises ``ReleaseFormatError`` naming what is missing."""
    import yaml

    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"release run folder {run} does not exist")
    missing = [p for p in ("config.yaml", WEIGHTS, UNET_CONFIG) if not (run / p).is_file()]
    if missing:
        raise ReleaseFormatError(
            f"{run} is not a StableMTL release run folder: {', '.join(str(p) for p in missing)} missing; expected "
            f"config.yaml and {WEIGHTS} with its config.json (the released single_stream / multi_stream tarball, "
            f"unpacked)")
    config = yaml.safe_load((run / "config.yaml").read_text()) or {}
    trainer = config.get("trainer") or {}
    tasks = list(trainer.get("output_types") or [])
    if not tasks:
        raise ReleaseFormatError(f"{run / 'config.yaml'}: no trainer.output_types (the task list)")
    multi = bool(trainer.get("unet_weight_path"))
    if multi:
        _check_setting(run, trainer, "apply_task_attn_to_layers", "all")
        _check_setting(run, trainer, "exclude_mainstream_output_type", True)
        _check_setting(run, trainer, "return_feature", "afterSelfAttn_residual")
    kwargs = (config.get("pipeline") or {}).get("kwargs") or {}
    _check_setting(run, kwargs, "encode_rgb_model", "duplicate", "pipeline.kwargs")
    _check_setting(run, kwargs, "input_noise", "deterministic", "pipeline.kwargs")
    markers = sorted((run / WEIGHTS.parent.parent).glob("iter_*"))
    return {"run": run, "kind": KINDS[1] if multi else KINDS[0], "tasks": tasks,
            "heads": int(trainer.get("n_attns", 4)), "mask_prob": float(trainer.get("attn_mask_ratio", 0.4)),
            "iteration": int(markers[-1].name[len("iter_"):]) if markers else None,
            "unet_config": stock_unet_config(json.loads((run / UNET_CONFIG).read_text())),
            "child_hint": trainer.get("unet_weight_path")}


def _check_setting(run: Path, section: dict, name: str, supported, where: str = "trainer") -> None:
    value = section.get(name, supported)
    if value != supported:
        raise ReleaseFormatError(f"{run / 'config.yaml'}: {where}.{name} is {value!r}; the kit converts the released "
                                 f"configuration ({supported!r}) only, so this model cannot be converted faithfully")


def load_weights(path) -> dict:
    """A release weights file (``.bin`` / ``.pth``): a flat state dict of tensors, read with
    ``weights_only=True``; anything else is refused, naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # a corrupt file, or one that needs arbitrary unpickling
        raise ReleaseFormatError(f"{path} is not a readable weights file (torch.load with weights_only=True: "
                                 f"{type(err).__name__}: {str(err)[:300]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ReleaseFormatError(f"{path} does not hold a flat state dict of tensors (got {type(state).__name__})")
    return state


def _strict(module, state: dict, what: str) -> None:
    """Load ``state`` into the meta-device ``module`` in place; every key used, every parameter filled."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})" for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise ReleaseFormatError(
            f"{what} does not map onto the kit's model: {len(missing)} kit parameter(s) not filled {missing[:5]}, "
            f"{len(unexpected)} key(s) unused {unexpected[:5]}, {len(shapes)} shape(s) differ {shapes[:3]}")
    module.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)


def convert(run_dir, out_dir, base=None, child=None) -> Path:
    """Convert a release run folder into a self-contained ``StableMTLPipeline`` folder.

    ``base``: Stable Diffusion 2 in the diffusers layout (default ``$BASE_CKPT_DIR/stable-diffusion-2``)
    for the VAE, text encoder and tokenizer; ``child``: the multi stream's ``single_stream_unet.pth``.
    Returns ``out_dir``, which also gets ``release.json`` (where the weights came from).
    """
    from diffusers import UNet2DConditionModel

    info = read_run(run_dir)
    run, out = info["run"], Path(out_dir)
    if info["kind"] == KINDS[1] and child is None:
        raise ReleaseFormatError(
            f"{run} is a multi-stream run: its frozen auxiliary stream is the single-stream UNet the release "
            f"downloads as single_stream_unet.pth (its config says {info['child_hint']!r}); pass it with --child")
    unet_state, ta_state = release_to_kit(load_weights(run / WEIGHTS))
    if info["kind"] == KINDS[0] and ta_state:
        raise ReleaseFormatError(f"{run / WEIGHTS} holds task-attention weights but {run / 'config.yaml'} has no "
                                 f"trainer.unet_weight_path: which model is it?")
    base = load_base(base if base is not None else paper_base_dir())

    def unet_from(state: dict, what: str):
        with torch.device("meta"):
            unet = UNet2DConditionModel(**info["unet_config"])
        _strict(unet, state, what)
        return unet.eval()

    unet = unet_from(unet_state, str(run / WEIGHTS))
    common = dict(tasks=info["tasks"], base_path=base.path, normals=options.DEFAULTS["normals"])
    if info["kind"] == KINDS[0]:
        model = SingleStream(unet, base.vae, base.text_encoder, base.tokenizer, **common)
    else:
        aux_state, extra = release_to_kit(load_weights(child))
        if extra:
            raise ReleaseFormatError(f"{child} holds task-attention weights; the auxiliary stream is the plain "
                                     f"single-stream UNet (single_stream_unet.pth)")
        aux = unet_from(aux_state, str(child))
        first = next((k for k in ta_state if ".query." in k and k.endswith(".0.weight")), None)
        if first is None:
            raise ReleaseFormatError(f"{run / WEIGHTS}: a multi-stream run without task-attention weights")
        query_hidden = ta_state[first].shape[0]
        with torch.device("meta"):
            sites = TaskAttentionSites(list(attention_sites(unet).items()), info["tasks"], query_hidden,
                                       info["heads"])
        _strict(sites, ta_state, f"{run / WEIGHTS} (task attention)")
        model = MultiStream(unet, aux, base.vae, base.text_encoder, base.tokenizer, query_hidden=query_hidden,
                            heads=info["heads"], mask_prob=info["mask_prob"], task_attention=sites.eval(), **common)
    save_model(model, out)
    record = {"source": str(run.resolve()), "kind": info["kind"], "iteration": info["iteration"],
              "tasks": info["tasks"], "child": str(Path(child).resolve()) if child else None,
              "weights_bytes": (run / WEIGHTS).stat().st_size}
    (out / "release.json").write_text(json.dumps(record, indent=1) + "\n")
    return out


def cmd_convert(args) -> int:
    try:
        out = convert(args.run_dir, args.out_dir, base=args.base, child=args.child)
    except (ValueError, FileNotFoundError) as err:  # ReleaseFormatError, a missing base (BaseModelError)
        print(f"stablemtl convert-release: {err}", file=sys.stderr)
        return 2
    record = json.loads((out / "release.json").read_text())
    print(f"{record['kind']} ({', '.join(record['tasks'])}; iteration {record['iteration']}) written to {out}")
    return 0
