"""Presets as data: ``smoke`` (CI), ``demo`` (the default main job), ``paper`` (the reproduction).

A preset is a YAML file next to this module; ``load_preset`` returns it as a
plain dict, or reads any YAML path a user gives.
"""

from __future__ import annotations

import re
from pathlib import Path

PRESET_DIR = Path(__file__).resolve().parent
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def yaml_numbers(value):
    """YAML 1.1 reads ``1e-4`` (no dot) as a string; a researcher writing ``lr: 1e-4`` means a number."""
    if isinstance(value, str):
        return float(value) if _FLOAT.fullmatch(value.strip()) else value
    if isinstance(value, list):
        return [yaml_numbers(v) for v in value]
    if isinstance(value, dict):
        return {k: yaml_numbers(v) for k, v in value.items()}
    return value


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset(preset) -> dict:
    """A preset by name (``smoke``, ``demo``, ``paper``), by YAML path, or a dict passed through."""
    import yaml

    if isinstance(preset, dict):
        return preset
    path = Path(preset)
    if path.suffix not in (".yaml", ".yml"):
        path = PRESET_DIR / f"{preset}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown preset {preset!r}; available: {', '.join(available_presets())} "
                         f"(or the path of a YAML file)")
    with open(path) as f:
        data = yaml_numbers(yaml.safe_load(f))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a preset must be a YAML mapping, got {type(data).__name__}")
    return data
