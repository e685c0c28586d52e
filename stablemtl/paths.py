"""Where a run's files live: the stages, their folders and the check that a stage's inputs exist.

A run is a preset plus a run name (``context``). Directories (docs/method.md, "The kit"):

- data: procedural presets write their miniatures to ``<project>/data/<preset>``;
  the ``paper`` preset reads ``$PREPROCESSED_DIR``;
- base model: procedural presets build it in ``<outputs>/<preset>/base`` (shared
  by every run of the preset: it depends only on the preset); ``paper`` loads
  ``$BASE_CKPT_DIR/stable-diffusion-2``;
- training: ``<outputs>/<run>/{single_stream,multi_stream}`` (checkpoints,
  ``train_log.csv``, the final ``model/``), ``<outputs>`` = ``$OUTPUT_DIR`` or
  ``<project>/outputs``;
- results: ``$RESULTS_DIR/<run>`` or ``<project>/results/<run>`` (metrics,
  tables, figures, the executed notebooks and ``manifest.json``).

Run and preset names are safe folder names (``stablemtl.guard.check_name``) and the preset is
checked field by field (``stablemtl.schema.check_preset``), so nothing is written outside these roots.

Each stage writes a ``done.json`` into its folder (``stage_dir``) when it
finishes; ``stablemtl.run`` compares it with the stage's current parameters.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from stablemtl.guard import check_name
from stablemtl.presets import load_preset

STAGES = ("01_prepare_data", "02_build_model", "03_train_single_stream", "04_train_multi_stream",
          "05_evaluate", "06_results")
KINDS = ("single_stream", "multi_stream")  # the trained model kinds, made by stages 03 and 04
RANDOM_INIT = "single_stream_random"  # the ablation: the single stream fine-tuned from a random UNet (stage 03)
SINGLE_TASK = "single_task"  # the Delta_m reference rows; their models train in single_task_<task> (stage 03)
# a preset's ``study`` section: how many seeds, and whether stage 03 also trains the ablation and the baselines
STUDY_DEFAULTS = {"seeds": 1, "random_init": False, "single_task": False}
# every model row of the results, in the tables' order; the references are seed-independent (the floor and
# the ceiling of every benchmark) and are evaluated first
MODELS = ("trivial", SINGLE_TASK, RANDOM_INIT, KINDS[0], KINDS[1], "vae_ceiling")
REFERENCES = ("trivial", "vae_ceiling")
DONE_FILE = "done.json"
METRICS_FILE = "metrics.csv"  # results/<run>/: one row per (model, seed, benchmark, metric)
SAMPLES_FILE = "per_sample.csv"  # results/<run>/: one row per (model, seed, benchmark, image, metric)
PIPELINE_FILE = "model_index.json"  # a diffusers folder's index: a base model or a saved StableMTL pipeline
README_PAPER = "README.md, section 'The paper preset'"


class StageError(RuntimeError):
    """A stage's input is missing or unusable; the message says what and how to make it."""


def project_root() -> Path:
    """The checkout: ``$STABLEMTL_PROJECT``, else the current directory (its parent inside ``notebooks/``)."""
    if os.environ.get("STABLEMTL_PROJECT"):
        return Path(os.environ["STABLEMTL_PROJECT"]).resolve()
    cwd = Path.cwd().resolve()
    return cwd.parent if cwd.name == "notebooks" else cwd


def stage_name(key: str) -> str:
    """``"3"``, ``"03"`` or ``"03_train_single_stream"`` -> ``"03_train_single_stream"``."""
    match = [s for s in STAGES if key in (s, s[:2]) or (key.isdigit() and s[:2] == key.zfill(2))]
    if not match:
        raise ValueError(f"unknown stage {key!r}; stages: " + ", ".join(f"{s[:2]} ({s})" for s in STAGES))
    return match[0]


@dataclass
class Study:
    """A preset plus the directories of one run."""

    preset: dict
    run: str
    results_dir: Path
    output_dir: Path
    data_root: Path
    base_dir: Path

    @property
    def name(self) -> str:
        return str(self.preset.get("name", "custom"))

    @property
    def procedural(self) -> bool:
        """The kit's miniatures and tiny base (smoke, demo) rather than real data and SD2 (paper)."""
        return isinstance(self.preset.get("data"), dict)

    @property
    def options(self) -> dict:
        """The preset's ``study`` section over ``STUDY_DEFAULTS``."""
        return {**STUDY_DEFAULTS, **(self.preset.get("study") or {})}

    def seeds(self, count: int | None = None, first: int | None = None) -> list[int]:
        """The training seeds of a run of ``count`` seeds (None: the preset's ``study.seeds``): ``first``
        (None: the preset's seed) and the ones after it."""
        count = int(self.options["seeds"] if count is None else count)
        if count < 1:
            raise ValueError(f"seeds={count}: expected at least 1")
        first = int(self.preset.get("seed", 2024) if first is None else first)
        return list(range(first, first + count))

    def train_dir(self, name: str, seed: int | None = None) -> Path:
        """A training folder: ``<outputs>/<run>/<name>`` for the preset's seed (or None),
        ``<outputs>/<run>/seed<seed>/<name>`` for the others."""
        if seed is None or seed == int(self.preset.get("seed", 2024)):
            return self.output_dir / name
        return self.output_dir / f"seed{seed}" / name

    def model_dir(self, kind: str, seed: int | None = None) -> Path:
        return self.train_dir(kind, seed) / "model"

    def train_log(self, kind: str, seed: int | None = None) -> Path:
        return self.train_dir(kind, seed) / "train_log.csv"

    def training_logs(self) -> dict[str, Path]:
        """Model kind -> ``train_log.csv`` of the kinds this run has trained (or begun to), first seed."""
        return {k: self.train_log(k) for k in (KINDS[0], RANDOM_INIT, KINDS[1]) if self.train_log(k).is_file()}

    def dataset_roots(self) -> dict[str, Path]:
        """Dataset name -> its folder: the preset's miniatures, or every dataset of the paper."""
        from stablemtl.data.sources import SOURCES

        names = list(self.preset["data"]) if self.procedural else list(SOURCES)
        return {name: self.data_root / SOURCES[name].root_hint for name in names}

    def stage_dir(self, stage: str) -> Path:
        """The folder ``stage`` writes and keeps its ``done.json`` in: the datasets, the base, a training
        folder, or ``results/<run>/stages/<stage>`` for stages that only check or write results."""
        stage = stage_name(stage)
        if self.procedural and stage == STAGES[0]:
            return self.data_root
        if self.procedural and stage == STAGES[1]:
            return self.base_dir
        if stage in (STAGES[2], STAGES[3]):
            return self.output_dir / KINDS[STAGES.index(stage) - 2]
        return self.results_dir / "stages" / stage

    def __repr__(self) -> str:
        rows = [("preset", self.name), ("run", self.run), ("data", self.data_root), ("base model", self.base_dir),
                ("checkpoints", self.output_dir), ("results", self.results_dir)]
        return "\n".join(f"{k:<12} {v}" for k, v in rows)


def context(preset="demo", run_name=None) -> Study:
    """The run's directories, from the preset, the run name and the environment (module docstring).

    ``DATA_DIR`` and ``BASE_DIR`` override the data and base folders of any preset; ``OUTPUT_DIR`` and
    ``RESULTS_DIR`` move the checkpoints and the results.
    """
    from stablemtl.schema import check_preset

    config = check_preset(load_preset(preset), preset)  # every field typed; the preset name is a safe name
    name = check_name(config.get("name", Path(str(preset)).stem), "preset name",
                      "the preset's 'name', or its file name")
    run = check_name(run_name, "run name", "--run-name / run_name") if run_name else name
    root = project_root()
    outputs = Path(os.environ.get("OUTPUT_DIR") or root / "outputs")
    results = Path(os.environ.get("RESULTS_DIR") or root / "results")
    procedural = isinstance(config.get("data"), dict)
    data_root = os.environ.get("DATA_DIR")
    if not data_root:
        if procedural:
            data_root = root / "data" / name
        elif os.environ.get("PREPROCESSED_DIR"):
            data_root = os.environ["PREPROCESSED_DIR"]
        else:
            raise StageError(f"preset {name!r} reads the real datasets: set PREPROCESSED_DIR to the folder "
                             f"holding them; see {README_PAPER}")
    base_dir = os.environ.get("BASE_DIR")
    if not base_dir:
        if procedural:
            base_dir = outputs / name / "base"
        else:
            from stablemtl.model.base import paper_base_dir

            try:
                base_dir = paper_base_dir()
            except Exception as err:  # noqa: BLE001 - re-raised with the way out
                raise StageError(f"{err}; see {README_PAPER}") from err
    from stablemtl.devices import pin_cpu_threads

    pin_cpu_threads(procedural)  # the same thread count on every machine: README, "Reproducibility"
    return Study(config, run, results / run, outputs / run, Path(data_root), Path(base_dir))


def stage_outputs(study: Study, stage: str) -> list[Path]:
    """The files a finished ``stage`` leaves (what the stages after it read)."""
    stage = stage_name(stage)
    if stage == STAGES[0]:
        return [root / "stablemtl_dataset.json" if study.procedural else root for root in study.dataset_roots().values()]
    if stage == STAGES[1]:
        return [study.base_dir / "model_index.json"]
    if stage in (STAGES[2], STAGES[3]):
        return [study.model_dir(KINDS[STAGES.index(stage) - 2]) / "stablemtl_model.json"]  # either layout
    if stage == STAGES[4]:
        return [study.results_dir / "metrics.csv"]
    return [study.results_dir / "tables" / "main.md", study.results_dir / "summary.md"]


def require(study: Study, *stages: str) -> None:
    """Fail with what is missing and how to make it when a previous stage has not run."""
    for stage in map(stage_name, stages):
        missing = [p for p in stage_outputs(study, stage) if not p.exists()]
        if missing:
            raise StageError(f"stage {stage} of run {study.run!r} has not finished: {missing[0]} is missing; "
                             f"run notebooks/{stage}.ipynb (or `stablemtl run --only {stage[:2]}`) with the same "
                             f"preset ({study.name}) and run name first")
