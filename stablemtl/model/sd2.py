"""Stable Diffusion 2's side, offline: its tokenizer, its component configs at a width, bases of
random weights in its layout, and parameter counts.

``sd2_tokenizer`` is SD2's real tokenizer (CLIP's BPE, from the merges file the PyPI package
``openai-clip`` ships), ``sd2_configs(width)`` SD2's component configs with the channels scaled,
``write_sd2_base`` a folder of SD2's layout with random weights at a width (a dry run of the paper
preset loads it as it loads SD2: ``base.load_base``), and ``count_parameters`` the components'
sizes at a width from the configs alone.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import numbers
import tempfile
import time
from pathlib import Path

import torch

from stablemtl.model import prior
from stablemtl.model.base import RANDOM_BASE_FILE, BaseModelError, byte_alphabet, write_model_index, writing_base
from stablemtl.model.streams import TASK_ATTENTION, TaskAttentionSites, attention_sites
from stablemtl.tasks import TASK_NAMES


# the published component configs of stabilityai/stable-diffusion-2 (unet/, vae/, text_encoder/ config.json)
SD2_CONFIGS = {
    "unet": dict(sample_size=96, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                 cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
                 upcast_attention=True),
    "vae": dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, latent_channels=4, sample_size=768, scaling_factor=0.18215),
    "text_encoder": dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                         num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", projection_dim=512),
}


CLIP_PACKAGE = "openai-clip"  # the PyPI package that ships CLIP's BPE merges (its top-level package is `clip`)
CLIP_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
CLIP_BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"  # openai-clip 1.0.1's file
SD2_VOCAB_SIZE = 49408  # 256 bytes, 256 bytes + "</w>", 48894 merges, "<|startoftext|>", "<|endoftext|>"
SD2_MERGES = SD2_VOCAB_SIZE - 2 * 256 - 2
BOS, EOS, SD2_PAD = "<|startoftext|>", "<|endoftext|>", "!"
_CLIP_FIX = (f"run ./setup.sh (it installs {CLIP_PACKAGE}, pinned in constraints.txt), or "
             f"`.venv/bin/python -m pip install -c constraints.txt {CLIP_PACKAGE}`")


def clip_bpe_path() -> Path:
    """CLIP's BPE merges file, ``clip/bpe_simple_vocab_16e6.txt.gz`` of the installed ``openai-clip``.

    The folder is found with ``importlib.util.find_spec`` without importing the package (its
    ``__init__`` imports torchvision, which the kit does not install); the file must belong to the
    ``openai-clip`` distribution and have the SHA-256 of openai-clip 1.0.1's (``CLIP_BPE_SHA256``)."""
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"Stable Diffusion 2's tokenizer is built from CLIP's BPE merges ({CLIP_BPE_FILE}), "
                                  f"which the PyPI package {CLIP_PACKAGE} ships (top-level package `clip`); it is not "
                                  f"installed. Fix: {_CLIP_FIX}", name="clip")
    path = Path(list(spec.submodule_search_locations)[0]) / CLIP_BPE_FILE
    try:
        dist = importlib.metadata.distribution(CLIP_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    files = (dist.files or []) if dist else []
    listed = [Path(dist.locate_file(f)).resolve() for f in files if f.name == CLIP_BPE_FILE]
    if dist is None or (dist.files is not None and path.resolve() not in listed):
        raise BaseModelError(f"{path.parent}: the package `clip` found there is not {CLIP_PACKAGE}'s (another package "
                             f"of that name?); Stable Diffusion 2's tokenizer needs {CLIP_PACKAGE}'s {CLIP_BPE_FILE}. "
                             f"Fix: uninstall the other `clip`, then {_CLIP_FIX}")
    if not path.is_file():
        raise BaseModelError(f"{path}: missing from the installed {CLIP_PACKAGE}; reinstall it: {_CLIP_FIX}")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != CLIP_BPE_SHA256:
        raise BaseModelError(f"{path}: SHA-256 {digest}, expected {CLIP_BPE_SHA256} (openai-clip 1.0.1's file); "
                             f"the file is damaged or from another release: reinstall with {_CLIP_FIX}")
    return path


def _clip_byte_symbols() -> list[str]:
    """The 256 byte symbols in the order of CLIP's vocabulary: the bytes that stand for themselves
    (``!`` .. ``~``, ``¡`` .. ``¬``, ``®`` .. ``ÿ``) first, then the others (``base.byte_alphabet``)."""
    alphabet = byte_alphabet()
    return sorted(alphabet, key=lambda s: (ord(s) >= 256, ord(s)))


def _sd2_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """SD2's ``vocab.json`` (token -> id) and ``merges.txt`` lines, from CLIP's BPE file: after the
    file's header line its first ``SD2_MERGES`` merges, each merge's joined pair one token."""
    path = clip_bpe_path()
    merges = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")[1:1 + SD2_MERGES]
    if len(merges) != SD2_MERGES or any(len(m.split()) != 2 for m in merges):
        raise BaseModelError(f"{path}: expected {SD2_MERGES} merges of two symbols after the header line")
    symbols = _clip_byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != SD2_VOCAB_SIZE:
        raise BaseModelError(f"{path}: {len(vocab)} distinct tokens, expected {SD2_VOCAB_SIZE}")
    return vocab, merges


def write_sd2_tokenizer(folder) -> Path:
    """Write Stable Diffusion 2's ``tokenizer/`` files into ``folder``: ``vocab.json``, ``merges.txt``
    (``#version: 0.2`` header), ``special_tokens_map.json`` and ``tokenizer_config.json`` (a
    ``CLIPTokenizer``: BOS ``<|startoftext|>`` 49406, EOS and unknown ``<|endoftext|>`` 49407, pad
    ``!`` 0 as OpenCLIP pads, ``model_max_length`` 77). Both JSON files name ``!`` as pad (where a
    ``tokenizer_config.json`` names another, transformers takes ``special_tokens_map.json``'s)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = _sd2_vocab_and_merges()
    special = lambda t: {"content": t, "lstrip": False, "normalized": True, "rstrip": False,  # noqa: E731
                         "single_word": False}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tokens = {"bos_token": special(BOS), "eos_token": special(EOS), "pad_token": SD2_PAD, "unk_token": special(EOS)}
    (folder / "special_tokens_map.json").write_text(json.dumps(tokens, indent=2) + "\n")
    config = {"add_prefix_space": False, "do_lower_case": True, "errors": "replace", "model_max_length": 77,
              "tokenizer_class": "CLIPTokenizer",
              **{k: v if isinstance(v, str) else {"__type": "AddedToken", **v} for k, v in tokens.items()}}
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(sorted(config.items())), indent=2) + "\n")
    return folder


def sd2_tokenizer():
    """Stable Diffusion 2's tokenizer, offline: the ``CLIPTokenizer`` that transformers loads from the
    files of ``write_sd2_tokenizer`` (the same object ``load_base`` gives for a real SD2 folder).

    49,408 tokens; every encoding is BOS + tokens + EOS (no padding unless asked); pad ``!`` = 0.
    Two behaviours of SD2's tokenizer under transformers (not of CLIP's own ``SimpleTokenizer``):
    ``!`` is the pad token, so a ``!`` in a text becomes id 0 (CLIP: ``!</w>`` 256, ``!!`` 748);
    and the text is only NFC-normalised, whitespace-collapsed and lower-cased, without CLIP's ftfy
    and HTML-entity cleaning (``&amp;`` stays three tokens). The task prompts meet neither."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="sd2-tokenizer-") as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(write_sd2_tokenizer(tmp), local_files_only=True)
    tokenizer.name_or_path = "stable-diffusion-2/tokenizer"
    return tokenizer


def _check_width(width) -> float:
    if isinstance(width, bool) or not isinstance(width, numbers.Real) or not math.isfinite(width) or width <= 0:
        raise ValueError(f"width {width!r}: expected a finite number > 0 (1.0 = Stable Diffusion 2's channel widths, "
                         f"0.1 = a tenth of them)")
    return float(width)


def _scale(channels: int, width: float, quantum: int) -> int:
    """``channels * width`` to the nearest multiple of ``quantum`` (halves up), at least one quantum."""
    return quantum * max(1, math.floor(channels * width / quantum + 0.5))


def sd2_configs(width: float = 1.0) -> dict:
    """SD2's component configs (``SD2_CONFIGS``) with every channel count scaled by ``width``.

    Width 1.0 gives ``SD2_CONFIGS`` exactly. Otherwise the depth (blocks, layers, block types)
    stays SD2's and: UNet block channels are multiples of 64 (32 when ``width`` makes them
    smaller than 64) with 64-wide attention heads (diffusers' ``attention_head_dim`` is SD2's
    number of heads: channels / 64); VAE channels are multiples of the 32 group-norm groups;
    the text encoder's hidden size is a multiple of 64 with 64-wide heads (intermediate 4x,
    projection 1/2), equal to the UNet's ``cross_attention_dim``; ``vocab_size`` stays 49408
    (``sd2_tokenizer``). A width that is not a finite number > 0 is a ``ValueError``."""
    width = _check_width(width)
    sd2 = copy.deepcopy(SD2_CONFIGS)
    unet, vae, text = sd2["unet"], sd2["vae"], sd2["text_encoder"]
    channels = tuple(_scale(c, width, 64 if c * width >= 64 else 32) for c in unet["block_out_channels"])
    hidden = _scale(text["hidden_size"], width, 64)
    unet.update(block_out_channels=channels, attention_head_dim=tuple(max(1, c // 64) for c in channels),
                cross_attention_dim=hidden)
    vae.update(block_out_channels=tuple(_scale(c, width, 32) for c in vae["block_out_channels"]))
    text.update(hidden_size=hidden, intermediate_size=4 * hidden, num_attention_heads=hidden // 64,
                projection_dim=hidden // 2)
    return sd2


def count_parameters(width: float = 1.0, tasks=TASK_NAMES, query_hidden: int = TASK_ATTENTION["query_hidden"],
                     heads: int = TASK_ATTENTION["heads"], configs: dict | None = None) -> dict[str, int]:
    """Parameter counts of the SD2 components at ``width`` (``sd2_configs``), or of ``configs`` (e.g.
    ``base.base_configs(folder)``), from the configs alone: the modules are built on the meta device (no
    weight is allocated). Keys: ``unet`` (as configured), ``unet_widened`` (the single stream's,
    ``conv_in`` taking 3 latents: what both training stages train, and the multi stream's frozen
    auxiliary copy), ``vae``, ``text_encoder``, ``task_attention`` (the multi stream's, over ``tasks``,
    at every self-attention site: ``streams.TaskAttentionSites``)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    configs = sd2_configs(width) if configs is None else configs
    latent = configs["vae"].get("latent_channels", 4)
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(configs["unet"])
        out = {"unet": count(unet),
               "unet_widened": count(UNet2DConditionModel.from_config(dict(configs["unet"], in_channels=3 * latent))),
               "vae": count(AutoencoderKL.from_config(configs["vae"])),
               "text_encoder": count(CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))),
               "task_attention": count(TaskAttentionSites(list(attention_sites(unet).items()), list(tasks),
                                                          query_hidden, heads))}
    return out


def write_sd2_base(out_dir, width: float = 1.0, seed: int = 0, progress: bool = True) -> Path:
    """Write a base of random weights with Stable Diffusion 2's architecture scaled by ``width``
    (``sd2_configs``) in the diffusers layout of ``stabilityai/stable-diffusion-2``; returns ``out_dir``.

    ``model_index.json``; ``unet/``, ``vae/`` (``config.json`` + ``diffusion_pytorch_model.safetensors``),
    ``text_encoder/`` (``config.json`` + ``model.safetensors``; its bos/eos/pad ids are the tokenizer's:
    49406, 49407, 0), ``tokenizer/`` (``write_sd2_tokenizer``), ``scheduler/`` (SD2's
    ``scheduler_config.json``: DDIM, v-prediction, scaled-linear betas 0.00085 .. 0.012 over 1,000
    steps: ``prior.make_scheduler``), all in float32 (about 5 GB at width 1.0), plus
    ``stablemtl_random_base.json`` saying the weights are random: for dry runs, timing and memory,
    never for results. The weights are the components' default initialisation drawn from ``seed``
    (the same for the same seed and torch version). Written as ``base.save_base`` writes: into a marked
    partial folder renamed into place; ``out_dir`` is replaced only when it is the kit's, a
    non-empty folder of other files is refused (``stablemtl.guard.InputError``)."""
    width, out_dir = _check_width(width), Path(out_dir)  # a bad width is refused before any import or write
    configs = sd2_configs(width)
    with writing_base(out_dir) as tmp:
        record = _write_sd2_components(tmp, configs, width, seed, progress)
    if progress:
        print(f"[sd2 base] {out_dir}: width {width:g}, seed {seed}, written in {record['seconds']} s", flush=True)
    return out_dir


def _write_sd2_components(tmp: Path, configs: dict, width: float, seed: int, progress: bool) -> dict:
    """``write_sd2_base``'s files, into the partial folder ``tmp``; returns the random-base record."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    from transformers.utils import logging as transformers_logging

    start = time.perf_counter()
    tokenizer = CLIPTokenizer.from_pretrained(write_sd2_tokenizer(tmp / "tokenizer"), local_files_only=True)
    configs["text_encoder"].update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                   pad_token_id=tokenizer.pad_token_id)
    makers = {"unet": lambda: UNet2DConditionModel(**configs["unet"]),
              "vae": lambda: AutoencoderKL(**configs["vae"]),
              "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))}
    parameters = {}
    bars = transformers_logging.is_progress_bar_enabled()
    if not progress:
        transformers_logging.disable_progress_bar()  # transformers' "Writing model shards" bar
    try:
        with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
            torch.manual_seed(seed)
            for name, make in makers.items():  # one at a time: at most one component in memory
                t0 = time.perf_counter()
                module = make()
                parameters[name] = sum(p.numel() for p in module.parameters())
                module.save_pretrained(tmp / name, safe_serialization=True)
                del module
                if progress:
                    print(f"[sd2 base] {name}: {parameters[name]:,} random parameters written in "
                          f"{time.perf_counter() - t0:.1f} s", flush=True)
    finally:
        if bars:
            transformers_logging.enable_progress_bar()
    prior.make_scheduler().save_pretrained(tmp / "scheduler")
    write_model_index(tmp)
    record = {"random_weights": True, "width": width, "seed": seed, "parameters": parameters,
              "seconds": round(time.perf_counter() - start, 1), "torch": torch.__version__,
              "note": "Stable Diffusion 2's architecture with random weights (write_sd2_base): for dry runs, "
                      "timing and memory, never for results"}
    (tmp / RANDOM_BASE_FILE).write_text(json.dumps(record, indent=1) + "\n")
    return record
