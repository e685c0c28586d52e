"""Fingerprints of weights: short hashes that tell one training's weights from another's.

Two kinds, each for where the weights are at hand: ``weights_fingerprint`` hashes the weight
files of a folder (a base model, a saved model: what a training checkpoint records of its base
and its initial model), ``module_fingerprint`` the tensors of modules in memory and
``model_fingerprint`` those of a whole model (the key of evaluation's prediction caches).

Both are recorded in files (checkpoints, caches): their values must never change for the same
weights. Neither reads every byte of SD2's gigabytes: files by their first and last MiB, large
tensors by an evenly strided subset.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from stablemtl.paths import KINDS


def weights_fingerprint(directory, sample: int = 1 << 20) -> str | None:
    """A cheap hash of the weight files under ``directory`` (names, sizes, first and last MiB of each).

    Two trainings of one architecture differ in their first and last tensors, so this tells a
    rebuilt base or a retrained model from the one a checkpoint or a prediction cache came from,
    without reading gigabytes of SD2 weights. ``None`` when there are no weight files.
    """
    directory = Path(directory)
    files = sorted(f for ext in ("*.safetensors", "*.bin") for f in directory.rglob(ext)) if directory.is_dir() else []
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.relative_to(directory).as_posix()}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(sample))
            if size > 2 * sample:
                fh.seek(-sample, os.SEEK_END)
                h.update(fh.read(sample))
            else:
                h.update(fh.read())
    return h.hexdigest()[:16]


def module_fingerprint(modules: dict, sample: int = 1 << 16) -> str:
    """A hash of the weights of ``{name: nn.Module}``: every tensor's name, shape and dtype, and
    its values (all of them up to ``sample`` elements, an evenly strided subset beyond, enough to
    tell two trainings apart without hashing gigabytes of SD2 weights)."""
    import torch  # lazily: the file fingerprint above needs no torch

    h = hashlib.sha256()
    for prefix, module in sorted(modules.items()):
        for key, tensor in sorted(module.state_dict().items()):
            t = tensor.detach().flatten()
            h.update(f"{prefix}.{key}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            if t.numel() > sample:
                t = t[:: t.numel() // sample + 1]
            h.update(t.to("cpu", torch.float64 if t.is_floating_point() else torch.int64).numpy().tobytes())
    return h.hexdigest()[:16]


def model_fingerprint(model) -> str:
    """The fingerprint of everything a model's predictions depend on: its UNet(s) and task attention,
    the frozen VAE and text encoder, its tasks and its normal convention (a ``streams.SingleStream``
    or ``streams.MultiStream``)."""
    modules = {"unet": model.unet, "vae": model.frozen.vae, "text_encoder": model.frozen.text_encoder}
    if model.kind == KINDS[1]:  # the multi stream
        modules.update(aux_unet=model.aux_unet, task_attention=model.task_attention)
    return f"{model.kind}:{','.join(model.tasks)}:{model.normals}:{module_fingerprint(modules)}"
