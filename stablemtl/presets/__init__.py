"""Presets as data: ``smoke`` (CI), ``demo`` (the default main job), ``paper`` (the reproduction).

A preset is a YAML file next to this module; ``load_preset`` returns it as a
plain dict, or reads any YAML path a user gives. A YAML syntax error is an
``InputError`` naming the file and line (no traceback); ``preset_lines`` maps
each key path to its line, so ``stablemtl.schema`` names the line of a bad field.

A preset's name is its file's name (``my.yaml`` -> ``my``), and the name names its folders
(``data/<name>``, ``outputs/<name>/base``, ``results/<name>``): a copy of ``demo.yaml`` saved as
``my.yaml`` runs as preset ``my`` in folders of its own. A ``name:`` field that differs from the file's
name, or a user's file named like a built-in preset, is refused (``_file_name``), so that two presets
never share folders silently.
"""

from __future__ import annotations

import re
from pathlib import Path

from stablemtl.guard import InputError, check_name

PRESET_DIR = Path(__file__).resolve().parent
DEFAULT_SEED = 2024  # a preset's ``seed`` when it sets none, and every seed argument's default
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


def preset_path(preset) -> Path:
    """The YAML file of a preset name or path; an ``InputError`` listing the presets when there is none."""
    path = Path(str(preset))
    if path.suffix not in (".yaml", ".yml"):
        path = PRESET_DIR / f"{preset}.yaml"
    if not path.is_file():
        raise InputError(f"unknown preset {preset!r}; available: {', '.join(available_presets())} "
                         f"(or the path of a YAML file)")
    return path


def _read_yaml(path: Path, compose: bool = False):
    import yaml

    try:
        text = path.read_text()
        return yaml.compose(text) if compose else yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        at = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = " ".join(str(x) for x in (getattr(err, "context", None), getattr(err, "problem", None)) if x)
        raise InputError(f"{path}{at}: YAML syntax error: {what or err}; fix the file (YAML: 'key: value', "
                         f"two-space indentation, lists as [a, b])") from None
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: cannot read the preset ({err})") from None


def load_preset(preset) -> dict:
    """A preset by name (``smoke``, ``demo``, ``paper``), by YAML path, or a dict passed through. A file's
    ``name`` is its file's name (``_file_name``), whether or not the file has a ``name:`` field."""
    if isinstance(preset, dict):
        return preset
    path = preset_path(preset)
    data = yaml_numbers(_read_yaml(path))
    if not isinstance(data, dict):
        raise InputError(f"{path}: a preset must be a YAML mapping (key: value lines), got {type(data).__name__}")
    return {"name": _file_name(path, data), **{k: v for k, v in data.items() if k != "name"}}


def preset_name(preset) -> str:
    """The name of a preset: a built-in's name, a YAML file's stem, a dict's ``name`` (``custom``
    when it has none). It names the preset's folders: ``data/<name>``, ``outputs/<name>/base``,
    ``results/<name>`` (the run name's default)."""
    return str(load_preset(preset).get("name", "custom"))


def _file_name(path: Path, data: dict) -> str:
    """The name of the preset read from ``path`` (``data``: its contents): the file's stem. A ``name:``
    field other than the stem, and a user's file named like a built-in preset, would let two presets share
    folders: each is an ``InputError`` naming the file, the line and the fix."""
    stem = path.stem
    if stem in available_presets() and path.resolve() != (PRESET_DIR / f"{stem}.yaml").resolve():
        raise InputError(f"{path}: a preset's name is its file's name, and {path.name} is named like the "
                         f"built-in preset {stem!r}: it would share its folders (outputs/{stem}, results/{stem}, and "
                         f"data/{stem} for procedural data) and rewrite them; rename the file (for instance to my_{stem}"
                         f"{path.suffix}), which names the preset and its folders")
    if "name" in data and data["name"] != stem:
        line = preset_lines(path).get(("name",))
        where = f"{path}, line {line}" if line else str(path)
        check_name(data["name"], "preset name", where)  # an unsafe name is named as such first
        rename = "" if data["name"] in available_presets() else f", or rename the file to {data['name']}{path.suffix}"
        raise InputError(f"{where}: the field 'name: {data['name']}' differs from the file's name {stem!r}; a "
                         f"preset's name is its file's name and names its folders (outputs/{stem}, results/{stem}, "
                         f"and data/{stem} for procedural data), so a copy that kept another preset's name would rewrite that "
                         f"preset's folders: remove the 'name:' line (or change it to 'name: {stem}'){rename}")
    return stem


def preset_lines(preset) -> dict[tuple, int]:
    """Key path (``("train", "lr")``) -> its 1-based line in the preset's YAML file (``{}`` for a dict)."""
    if isinstance(preset, dict):
        return {}
    out: dict[tuple, int] = {}

    def walk(node, prefix: tuple) -> None:
        for key, value in getattr(node, "value", []) if node is not None and node.id == "mapping" else []:
            out[prefix + (key.value,)] = key.start_mark.line + 1
            walk(value, prefix + (key.value,))

    walk(_read_yaml(preset_path(preset), compose=True), ())
    return out
