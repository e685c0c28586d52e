"""One typed schema for the notebooks' parameters (``-p key=value``) and the preset fields.

Every value is checked before any stage starts, and a bad one is one ``InputError`` naming the
parameter, the value, what is allowed and where it came from (``-p``, or the preset file and line).

- The notebook knobs are those the notebooks' ``parameters`` cells declare (``run.declared_parameters``,
  which also give the defaults); ``SPECS`` holds only their types, ranges and allowed values.
- The preset's ``train`` section takes the fields of ``stablemtl.train_config.TrainConfig``: the type of a
  field without an entry in ``SPECS`` is that of its dataclass default (no second copy of defaults).
- A single name is accepted for a list of names (``-p tasks=depth`` -> ``["depth"]``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import MISSING, dataclass, fields

from stablemtl import options
from stablemtl.benchmarks import BENCHMARKS
from stablemtl.guard import InputError, check_name
from stablemtl.paths import KINDS, MODELS
from stablemtl.presets import preset_lines, preset_path

# Importing this module imports no torch (``stablemtl run`` checks every input before any stage starts):
# the three names below come from modules that do, imported when a value is checked against them.


def _tasks() -> tuple:
    from stablemtl.tasks import TASK_NAMES

    return tuple(TASK_NAMES)


def _optimizers() -> tuple:
    from stablemtl.train_config import OPTIMIZERS

    return tuple(OPTIMIZERS)


def _datasets() -> tuple:
    from stablemtl.data.mini import MINI_SCENES

    return tuple(MINI_SCENES)


def _option(name: str) -> Callable[[], tuple]:
    return lambda: tuple(options.OPTIONS[name])


@dataclass(frozen=True)
class Spec:
    """A value's type (``int``, ``float``, ``bool``, ``str``, ``names``: a list of names, ``size``:
    ``[height, width]``, ``dict``), its bounds and its allowed values (a tuple, or a function giving one)."""

    type: str
    low: float | None = None
    high: float | None = None
    above: float | None = None  # strictly greater than
    choices: tuple | Callable[[], tuple] | None = None
    pattern: str | None = None
    nullable: bool = True

    def allowed(self) -> tuple | None:
        return self.choices() if callable(self.choices) else self.choices

    def describe(self) -> str:
        kind = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
                "names": "a name or a list of names", "size": "[height, width] of integers >= 1",
                "dict": "a mapping"}[self.type]
        bounds = [f">= {self.low:g}" if self.low is not None else "", f"> {self.above:g}" if self.above is not None
                  else "", f"<= {self.high:g}" if self.high is not None else ""]
        text = " ".join([kind] + [b for b in bounds if b])
        if self.allowed():
            text += " from " + ", ".join(map(repr, self.allowed()))
        if self.pattern:
            text += f" matching {self.pattern}"
        return text + (", or null (the default)" if self.nullable else "")

    def check(self, name: str, value, where: str):
        """``value``, normalised (a name -> a one-item list, an integer for a number); an ``InputError``
        otherwise."""
        if value is None and self.nullable:
            return None
        ok, out = True, value
        if self.type == "int":
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif self.type == "float":
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            out = float(value) if ok else value
        elif self.type == "bool":
            ok = isinstance(value, bool)
        elif self.type == "str":
            ok = isinstance(value, str) and (self.pattern is None or re.fullmatch(self.pattern, value) is not None)
        elif self.type == "names":
            out = [value] if isinstance(value, str) else value
            ok = isinstance(out, list) and len(out) > 0 and all(isinstance(v, str) for v in out) \
                and len(set(out)) == len(out)
        elif self.type == "size":
            ok = isinstance(value, list) and len(value) == 2 and all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)
        elif self.type == "dict":
            ok = isinstance(value, dict)
        if ok and self.type in ("int", "float"):
            ok = (self.low is None or out >= self.low) and (self.high is None or out <= self.high) and \
                (self.above is None or out > self.above)
        allowed = self.allowed()
        if ok and allowed:
            bad = [v for v in (out if self.type == "names" else [out]) if v not in allowed]
            if bad:
                raise InputError(f"{name}={value!r} ({where}): {bad[0]!r} is not allowed; expected "
                                 f"{self.describe()}")
        if not ok:
            raise InputError(f"{name}={value!r} ({where}): expected {self.describe()}")
        return out


# the notebook knobs (their defaults: the notebooks' parameters cells) and the training fields
SPECS: dict[str, Spec] = {
    "iterations": Spec("int", low=1),
    "lr": Spec("float", above=0),
    "tasks": Spec("names", choices=_tasks),
    "seed": Spec("int", low=0),
    "seeds": Spec("int", low=1),
    "random_init": Spec("bool"),
    "single_task": Spec("bool"),
    "unet_init": Spec("str", choices=("base", "random")),
    "normals": Spec("str", choices=_option("normals")),
    "invalid_targets": Spec("str", choices=_option("invalid_targets")),
    "target_order": Spec("str", choices=_option("target_order")),
    "silog": Spec("str", choices=_option("silog")),
    "flow_scoring": Spec("str", choices=_option("flow_scoring")),
    "mixed_precision": Spec("str", choices=("no", "fp16", "bf16")),
    "gradient_checkpointing": Spec("bool"),
    "batch_per_device": Spec("int", low=1),
    "optimizer": Spec("str", choices=_optimizers),
    "models": Spec("names", choices=MODELS),
    "benchmarks": Spec("names", choices=tuple(BENCHMARKS)),
    "max_images": Spec("int", low=1),
    "device": Spec("str", pattern=r"cpu|mps|cuda(:\d+)?"),
    "raw_dirs": Spec("dict"),
    # training fields of presets only (TrainConfig)
    "kind": Spec("str", choices=KINDS, nullable=False),
    "effective_batch": Spec("int", low=1),
    "warmup": Spec("int", low=0),
    "decay_steps": Spec("int", low=1),
    "decay_to": Spec("float", low=0, high=1),
    "grad_clip": Spec("float", low=0),
    "checkpoint_every": Spec("int", low=0),
    "backup_every": Spec("int", low=0),
    "keep_backups": Spec("int", low=0),
    "loss": Spec("str", choices=("latent", "pixel")),
    "num_workers": Spec("int", low=0),
    "prefetch_factor": Spec("int", low=1),
}
_DEFAULT_TYPES = {bool: "bool", int: "int", float: "float", str: "str", dict: "dict", list: "names"}


def check_parameters(values: dict, declared: dict[str, dict], runner: tuple = ()) -> dict:
    """Check ``-p`` values against the knobs the selected notebooks declare (``declared``: stage ->
    name -> default) and ``SPECS``; returns them normalised. ``runner``: names set by options instead."""
    known = {k for d in declared.values() for k in d} - set(runner)
    out = {}
    for key, value in values.items():
        if key in runner:
            raise InputError(f"set {key!r} with --{key.replace('_', '-')}, not -p")
        if key not in known:
            raise InputError(f"unknown parameter {key!r} (from -p) for stage(s) {', '.join(declared)}; the notebooks "
                             f"declare: {', '.join(sorted(known))}")
        spec = SPECS.get(key)
        if spec is None:
            raise InputError(f"parameter {key!r} has no entry in stablemtl.schema.SPECS; add its type there")
        out[key] = spec.check(f"parameter {key}", value, "from -p")
    return out


def check_notebook_parameters(namespace: dict) -> dict:
    """In a notebook, right after its ``parameters`` cell (``namespace``: its ``globals()``): every
    parameter it holds checked against ``SPECS`` with ``stablemtl run``'s messages, and normalised in
    place (``tasks="depth"`` -> ``["depth"]``), so that papermill run directly (``-p``, which passes any
    value) or an edited cell fails here, naming the parameter, not cells later. Returns the values."""
    out = {}
    for key, spec in SPECS.items():
        if key in namespace and not key.startswith("_"):
            out[key] = spec.check(f"parameter {key}", namespace[key], "in the notebook's parameters")
    namespace.update(out)
    return out


def train_specs() -> dict[str, Spec]:
    """The preset ``train`` fields: ``TrainConfig``'s, typed by ``SPECS`` or by their defaults."""
    from stablemtl.train_config import TrainConfig

    out = {}
    for f in fields(TrainConfig):
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        out[f.name] = SPECS.get(f.name) or Spec(_DEFAULT_TYPES.get(type(default), "str"))
    out["resolution"] = Spec("dict")
    return out


_DATA_FIELDS = {"count": Spec("int", low=1, nullable=False), "scenes": Spec("int", low=1, nullable=False),
                "lights": Spec("int", low=1, nullable=False), "size": Spec("size", nullable=False),
                "crop": Spec("size"), "kb_crop": Spec("size"), "none_lines": Spec("int", low=0)}
_TASK_ATTENTION = {"query_hidden": Spec("int", low=1, nullable=False), "heads": Spec("int", low=1, nullable=False),
                   "mask_prob": Spec("float", low=0, high=1, nullable=False)}
_STUDY = {"seeds": Spec("int", low=1, nullable=False), "random_init": Spec("bool", nullable=False),
          "single_task": Spec("bool", nullable=False)}
_TOP = ("name", "seed", "study", "data", "model", "train", "evaluate")


def check_preset(config: dict, preset=None) -> dict:
    """Check a preset's fields; returns it normalised (a single task name -> a list). ``preset``: the
    name or path it was read from (for the file and line of a bad field)."""
    if isinstance(preset, dict) or preset is None:
        file, lines = "the preset", {}
    else:
        file, lines = str(preset_path(preset)), preset_lines(preset)

    def where(*keys: str) -> str:
        line = lines.get(tuple(keys)) or lines.get(tuple(keys[:-1]))
        return f"{file}, line {line}" if line else file

    def unknown(keys: tuple, key: str, valid) -> InputError:
        return InputError(f"unknown preset field {'.'.join(keys + (key,))!r} ({where(*keys, key)}); valid: "
                          f"{', '.join(sorted(valid))}")

    def mapping(value, *keys: str) -> dict:
        if not isinstance(value, dict):
            raise InputError(f"preset field {'.'.join(keys)}={value!r} ({where(*keys)}): expected a mapping")
        return value

    config = dict(config)
    for key in config:
        if key not in _TOP:
            raise unknown((), key, _TOP)
    if "name" in config:  # a file's name is its stem (stablemtl.presets.load_preset), its 'name:' field at most
        check_name(config["name"], "preset name", where("name") if ("name",) in lines or not lines
                   else f"{file}: the file's name names the preset")
    if "seed" in config:
        config["seed"] = Spec("int", low=0, nullable=False).check("preset field seed", config["seed"], where("seed"))
    for field, value in mapping(config.get("study", {}), "study").items():
        if field not in _STUDY:
            raise unknown(("study",), field, _STUDY)
        _STUDY[field].check(f"preset field study.{field}", value, where("study", field))
    data = config.get("data")
    if isinstance(data, dict):
        datasets = _datasets()
        for name, spec in data.items():
            if name not in datasets:
                raise unknown(("data",), name, datasets)
            for field, value in mapping(spec, "data", name).items():
                if field not in _DATA_FIELDS:
                    raise unknown(("data", name), field, _DATA_FIELDS)
                _DATA_FIELDS[field].check(f"preset field data.{name}.{field}", value, where("data", name, field))
    elif data is not None and data != "real":
        raise InputError(f"preset field data={data!r} ({where('data')}): expected 'real' (the datasets under "
                         f"$PREPROCESSED_DIR) or a mapping of procedural dataset sizes")
    model = mapping(config.get("model", {}), "model")
    for key, value in model.items():
        if key == "task_attention":
            for field, v in mapping(value, "model", key).items():
                if field not in _TASK_ATTENTION:
                    raise unknown(("model", key), field, _TASK_ATTENTION)
                _TASK_ATTENTION[field].check(f"preset field model.{key}.{field}", v, where("model", key, field))
        elif key == "base":
            for field, v in mapping(value, "model", key).items():
                flat = v if isinstance(v, list) else [v]
                if not all(isinstance(x, (int, float)) and (isinstance(x, bool) or x >= 0) for x in flat):
                    raise InputError(f"preset field model.base.{field}={v!r} ({where('model', key, field)}): "
                                     f"expected a number >= 0, true/false, or a list of them")
        else:
            raise unknown(("model",), key, ("base", "task_attention"))
    train = dict(mapping(config.get("train", {}), "train"))
    kinds = [k for k in KINDS if k in train]
    for k in kinds:
        train[k] = dict(mapping(train[k], "train", k))
    specs = train_specs()
    for section, keys in [(train, ("train",))] + [(train[k], ("train", k)) for k in kinds]:
        for field in list(section):
            if keys == ("train",) and field in kinds:
                continue
            if field not in specs:
                raise unknown(keys, field, set(specs) | set(KINDS))
            section[field] = specs[field].check(f"preset field {'.'.join(keys + (field,))}", section[field],
                                                where(*keys, field))
    if train:
        config["train"] = train
    evaluate = mapping(config.get("evaluate", {}), "evaluate")
    for key in evaluate:
        if key != "resolution":
            raise unknown(("evaluate",), key, ("resolution",))
    resolution = mapping(evaluate.get("resolution", {}), "evaluate", "resolution")
    if resolution:
        names = tuple(BENCHMARKS)
        for bench, size in resolution.items():
            if bench not in names:
                raise unknown(("evaluate", "resolution"), bench, names)
            Spec("size").check(f"preset field evaluate.resolution.{bench}", size,
                               where("evaluate", "resolution", bench))
    return config
