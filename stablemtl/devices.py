"""Where the model runs and in which precision: one place for the kit's device and dtype choices.

``default_device()`` is the GPU when there is one (``torch.cuda.is_available()``), else the CPU;
``resolve_device(device)`` turns ``None`` into that default and checks a given device
(a ``torch.device`` or a string such as ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``),
naming it and the available ones when it does not exist. ``check_dtype(dtype, device)`` refuses
float16 on the CPU (no fp16 kernels there): use bfloat16 or float32.
"""

from __future__ import annotations

import torch


def default_device() -> torch.device:
    """The GPU (``cuda``) when there is one, else the CPU. Tests monkeypatch this function."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def available_devices() -> list[str]:
    """The devices this machine can run on: ``cpu``, ``cuda:0`` ... and ``mps`` when present."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    return found


def resolve_device(device=None) -> torch.device:
    """``None`` -> ``default_device()``; a given device is checked to exist (a clear ``ValueError`` else)."""
    if device is None:
        return torch.device(default_device())
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"unknown device {device!r}; available: {', '.join(available_devices())}") from None
    available = available_devices()
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        index = 0 if dev.index is None else dev.index
        if f"cuda:{index}" in available:
            return dev
    elif dev.type == "mps" and "mps" in available:
        return dev
    raise ValueError(f"device {str(dev)!r} is not available on this machine; available: {', '.join(available)}"
                     + ("" if torch.cuda.is_available() or dev.type != "cuda"
                        else " (this torch build or machine has no CUDA GPU)"))


def check_dtype(dtype, device) -> None:
    """Refuse float16 on the CPU: its kernels are missing or very slow there."""
    if dtype == torch.float16 and torch.device(device).type == "cpu":
        raise ValueError("torch_dtype=torch.float16 is not supported on the CPU (no fp16 kernels); "
                         "use torch.bfloat16 (half the memory, supported on CPU) or torch.float32, "
                         "or run on a GPU")


# The procedural presets' results are bit-identical only for the same number of CPU threads: a
# thread count changes how sums are split, so the float32 results differ in the last bits from the
# first training step on and training amplifies that (docs/reproducibility.md). They run with this
# many threads on every machine (the reference machine's 2 cores) unless STABLEMTL_THREADS says otherwise.
REFERENCE_THREADS = 2


def pin_cpu_threads(procedural: bool) -> int:
    """Set torch's CPU thread count: ``$STABLEMTL_THREADS`` (a number, or ``auto`` for torch's default),
    else ``REFERENCE_THREADS`` for a procedural preset on a machine without a GPU; returns the count."""
    import os

    value = os.environ.get("STABLEMTL_THREADS", "").strip()
    if value and value != "auto":
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"STABLEMTL_THREADS={value!r}: expected a number of threads >= 1, or 'auto'")
        torch.set_num_threads(int(value))
    elif not value and procedural and not torch.cuda.is_available():
        torch.set_num_threads(REFERENCE_THREADS)
    return torch.get_num_threads()


def peak_memory(device=None) -> dict:
    """This process's peak memory so far, in GiB: ``peak_rss_gib`` (the resident set's high-water mark)
    and ``cuda_peak_gib`` (``torch.cuda.max_memory_allocated`` of ``device``, None off CUDA)."""
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    dev = torch.device(device) if device is not None else None
    cuda = torch.cuda.max_memory_allocated(dev) / 1024 ** 3 if dev is not None and dev.type == "cuda" else None
    return {"peak_rss_gib": round(rss / 1024 ** 3, 3), "cuda_peak_gib": None if cuda is None else round(cuda, 3)}
