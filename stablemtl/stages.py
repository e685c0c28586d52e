"""The six stages of a study: the graph (each stage's notebook, what it reads, what it writes), the run's
folders (``Study``, ``context``) and the stage work the notebooks call.

    01_prepare_data ──┐
    02_build_model ───┼─> 03_train_single_stream ─> 04_train_multi_stream
                      └──────────────┬───────────────────┘
                                     v
                                05_evaluate ─> 06_results

``GRAPH`` is the only place that says which stage reads which: ``check_inputs`` (called by every notebook
before its work and by the stage functions below), ``stablemtl run`` (which stages' ``done.json`` enter a
stage's hash, and which inputs must exist before a partial run starts) and the docs read it from here.
``outputs`` says what a finished stage leaves.

A run is a preset plus a run name (``context``). Its folders (docs/method.md, "The kit"):

- data: procedural presets write their miniatures to ``<project>/data/<preset>``; the ``paper`` preset
  reads ``$PREPROCESSED_DIR``;
- base model: procedural presets build it in ``<outputs>/<preset>/base`` (shared by every run of the
  preset: it depends only on the preset); ``paper`` loads ``$BASE_CKPT_DIR/stable-diffusion-2``;
- training: ``<outputs>/<run>/{single_stream,multi_stream}`` (checkpoints, ``train_log.csv``, the final
  ``model/``), ``<outputs>`` = ``$OUTPUT_DIR`` or ``<project>/outputs``;
- results: ``$RESULTS_DIR/<run>`` or ``<project>/results/<run>`` (metrics, tables, figures, the executed
  notebooks and ``manifest.json``).

Run and preset names are safe folder names (``stablemtl.guard.check_name``) and the preset is checked field
by field (``stablemtl.schema.check_preset``), so nothing is written outside these roots.

Training folders have generations: a finished training (or one of other settings) is moved to
``<folder>.previous`` before a new one starts, an earlier ``.previous`` to ``.previous.older``, and the
older generations are deleted only once the new training has written its first checkpoint
(``set_aside``), so that no kill at any moment loses the last finished model.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from stablemtl.benchmarks import BENCHMARKS, get_benchmark
from stablemtl.data import mini
from stablemtl.data.sources import META_FILE, SOURCES
from stablemtl.devices import pin_cpu_threads
from stablemtl.evaluate import evaluate
from stablemtl.guard import InputError, StageError, check_name, claim, is_own
from stablemtl.model.base import build_tiny_base, load_base, paper_base_dir
from stablemtl.model.pipeline import MODEL_FILE, saved_normals
from stablemtl.paths import (KINDS, METRICS_FILE, MODELS, PIPELINE_FILE, RANDOM_INIT, PAPER_DOC, REFERENCES,
                             REFERENCE, SINGLE_TASK, TRAIN_LOG, project_root)
from stablemtl.presets import DEFAULT_SEED, load_preset
from stablemtl.results import set_aside_stale_rows, seed_text
from stablemtl.schema import check_preset
from stablemtl.tasks import TASK_NAMES
from stablemtl.train import CheckpointMismatch, Trainer, accelerate_precision
from stablemtl.train_config import TrainConfig, check_cpu_memory, finished_training, preset_config


# --------------------------------------------------------------------------- the graph

@dataclass(frozen=True)
class Stage:
    """One numbered notebook, ``notebooks/<name>.ipynb``, and the stages whose outputs it reads."""

    name: str
    reads: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return self.name[:2]


GRAPH = {s.key: s for s in (
    Stage("01_prepare_data"),
    Stage("02_build_model"),
    Stage("03_train_single_stream", ("01", "02")),
    Stage("04_train_multi_stream", ("01", "02", "03")),
    Stage("05_evaluate", ("01", "02", "03", "04")),  # only those that make the models it evaluates: ``inputs``
    Stage("06_results", ("05",)),
)}
STAGES = tuple(s.name for s in GRAPH.values())
# the model rows each stage makes (stage 05 reads a stage when it evaluates one of its models)
MADE_BY = {"02": ("vae_ceiling",), "03": (KINDS[0], RANDOM_INIT, SINGLE_TASK), "04": (KINDS[1],)}
# a preset's ``study`` section: how many seeds, and whether stage 03 also trains the ablation and the baselines
STUDY_DEFAULTS = {"seeds": 1, "random_init": False, "single_task": False}


def stage_name(key: str) -> str:
    """``"3"``, ``"03"`` or ``"03_train_single_stream"`` -> ``"03_train_single_stream"``."""
    match = [s for s in STAGES if key in (s, s[:2]) or (key.isdigit() and s[:2] == key.zfill(2))]
    if not match:
        raise ValueError(f"unknown stage {key!r}; stages: " + ", ".join(f"{s[:2]} ({s})" for s in STAGES))
    return match[0]


def inputs(stage: str, models=None) -> tuple[str, ...]:
    """The stages whose outputs ``stage`` reads. Stage 05 reads only the stages that make the ``models``
    it evaluates (None: every model a run can train, and the VAE ceiling of its base), and the data."""
    key = stage_name(stage)[:2]
    if key != "05" or models is None:
        return GRAPH[key].reads
    return ("01",) + tuple(k for k, names in MADE_BY.items() if set(names) & set(models))


# --------------------------------------------------------------------------- a run's folders

@dataclass
class Study:
    """A preset plus the folders of one run (``context``)."""

    preset: dict
    run_name: str
    results_dir: Path
    output_dir: Path
    data_root: Path
    base_dir: Path

    @property
    def name(self) -> str:
        """The preset's name."""
        return str(self.preset.get("name", "custom"))

    @property
    def procedural(self) -> bool:
        """The kit's miniatures and tiny base (smoke, demo) rather than real data and SD2 (paper)."""
        return isinstance(self.preset.get("data"), dict)

    @property
    def seed(self) -> int:
        """The preset's seed: the first training seed."""
        return int(self.preset.get("seed", DEFAULT_SEED))

    @property
    def design(self) -> dict:
        """The study's design: the preset's ``study`` section over ``STUDY_DEFAULTS``."""
        return {**STUDY_DEFAULTS, **(self.preset.get("study") or {})}

    def seeds(self, count: int | None = None, first: int | None = None) -> list[int]:
        """The training seeds of a run of ``count`` seeds (None: the preset's ``study.seeds``): ``first``
        (None: the preset's seed) and the ones after it."""
        count = int(self.design["seeds"] if count is None else count)
        if count < 1:
            raise ValueError(f"seeds={count}: expected at least 1")
        first = self.seed if first is None else int(first)
        return list(range(first, first + count))

    def train_dir(self, name: str, seed: int | None = None) -> Path:
        """A training folder: ``<outputs>/<run>/<name>`` for the preset's seed (or None),
        ``<outputs>/<run>/seed<seed>/<name>`` for the others."""
        if seed is None or seed == self.seed:
            return self.output_dir / name
        return self.output_dir / f"seed{seed}" / name

    def model_dir(self, kind: str, seed: int | None = None) -> Path:
        return self.train_dir(kind, seed) / "model"

    def train_log(self, kind: str, seed: int | None = None) -> Path:
        return self.train_dir(kind, seed) / TRAIN_LOG

    def training_logs(self) -> dict[str, Path]:
        """Model kind -> ``train_log.csv`` of the kinds this run has trained (or begun to), first seed."""
        return {k: self.train_log(k) for k in (KINDS[0], RANDOM_INIT, KINDS[1]) if self.train_log(k).is_file()}

    def dataset_roots(self) -> dict[str, Path]:
        """Dataset name -> its folder: the preset's miniatures, or every dataset of the paper."""
        names = list(self.preset["data"]) if self.procedural else list(SOURCES)
        return {name: self.data_root / SOURCES[name].root_hint for name in names}

    def stage_dir(self, stage: str) -> Path:
        """The folder ``stage`` writes and keeps its ``done.json`` in: the datasets, the base, a training
        folder, or ``results/<run>/stages/<stage>`` for stages that only check or write results."""
        key = stage_name(stage)[:2]
        if self.procedural and key == "01":
            return self.data_root
        if self.procedural and key == "02":
            return self.base_dir
        if key in ("03", "04"):
            return self.output_dir / KINDS[int(key) - 3]
        return self.results_dir / "stages" / stage_name(stage)

    def __repr__(self) -> str:
        rows = [("preset", self.name), ("run", self.run_name), ("data", self.data_root),
                ("base model", self.base_dir), ("checkpoints", self.output_dir), ("results", self.results_dir)]
        return "\n".join(f"{k:<12} {v}" for k, v in rows)


def context(preset="demo", run_name=None) -> Study:
    """The run's folders, from the preset, the run name and the environment (module docstring).

    ``DATA_DIR`` and ``BASE_DIR`` override the data and base folders of any preset; ``OUTPUT_DIR`` and
    ``RESULTS_DIR`` move the checkpoints and the results.
    """
    config = check_preset(load_preset(preset), preset)  # every field typed; the preset name is a safe name
    # a file's name is its stem (a 'name:' field that differs is refused: stablemtl.presets.load_preset)
    name = check_name(config.get("name", "custom"), "preset name", "the preset's file name, or a dict's 'name'")
    config = {**config, "name": name}  # Study.name: the same name as the folders
    run = check_name(run_name, "run name", "--run-name / run_name") if run_name else name
    if run == REFERENCE:
        raise InputError(f"run name {run!r} is reserved: results/{REFERENCE}/ holds the committed reference runs; "
                         f"choose another --run-name (or give the preset file another name)")
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
                             f"holding them; see {PAPER_DOC}")
    base_dir = os.environ.get("BASE_DIR")
    if not base_dir:
        if procedural:
            base_dir = outputs / name / "base"
        else:
            try:
                base_dir = paper_base_dir()
            except Exception as err:  # noqa: BLE001 - re-raised with the way out
                raise StageError(f"{err}; see {PAPER_DOC}") from err
    pin_cpu_threads(procedural)  # the same thread count on every machine: docs/reproducibility.md
    return Study(config, run, results / run, outputs / run, Path(data_root), Path(base_dir))


def outputs(study: Study, stage: str) -> list[Path]:
    """The files a finished ``stage`` leaves (what the stages after it read)."""
    key = stage_name(stage)[:2]
    if key == "01":
        return [root / META_FILE if study.procedural else root for root in study.dataset_roots().values()]
    if key == "02":
        return [study.base_dir / PIPELINE_FILE]
    if key in ("03", "04"):
        return [study.model_dir(KINDS[int(key) - 3]) / MODEL_FILE]
    if key == "05":
        return [study.results_dir / METRICS_FILE]
    return [study.results_dir / "tables" / "main.md", study.results_dir / "summary.md"]


def require(study: Study, *stages: str) -> None:
    """Fail with what is missing and how to make it when one of ``stages`` has not finished."""
    for stage in map(stage_name, stages):
        missing = [p for p in outputs(study, stage) if not p.exists()]
        if missing:
            raise StageError(f"stage {stage} of run {study.run_name!r} has not finished: {missing[0]} is missing; "
                             f"run notebooks/{stage}.ipynb (or `stablemtl run --only {stage[:2]}`) with the same "
                             f"preset ({study.name}) and run name first")


def check_inputs(study: Study, stage: str, models=None, ahead=()) -> None:
    """Every stage that ``stage`` reads (``inputs``), except those that run ``ahead`` of it in the same
    call, has finished, else a ``StageError`` naming it (for stage 05, with the ``models`` that would
    leave its unfinished trainings out)."""
    ahead = {k[:2] for k in ahead}
    needed = [k for k in inputs(stage, models) if k not in ahead]
    try:
        require(study, *needed)
    except StageError as err:
        unfinished = [k for k in needed if k in MADE_BY
                      and not all(p.exists() for p in outputs(study, stage_name(k)))]
        if stage_name(stage)[:2] != "05" or not unfinished:
            raise
        left_out = {m for k in unfinished for m in MADE_BY[k]}
        rest = [m for m in (models or MODELS) if m not in left_out]
        raise StageError(f"{err}; or evaluate without the models of stage {', '.join(unfinished)}: "
                         f"-p \"models=[{','.join(rest)}]\"") from None


# --------------------------------------------------------------------------- stages 01 and 02

def prepare_data(study: Study, progress: bool = True) -> dict:
    """Stage 01: write the procedural miniatures of a ``smoke``/``demo`` run, or check the layout of the
    real datasets of a ``paper`` run; returns dataset name -> folder."""
    if study.procedural:
        return mini.write_mini_datasets(study.data_root, study.preset, progress=progress)
    roots, problems = study.dataset_roots(), []
    for name, root in roots.items():
        try:
            SOURCES[name](root)
        except Exception as err:  # noqa: BLE001 - collected so that one message lists every dataset
            problems.append(f"  {name}: {err}")
    if problems:
        raise StageError(f"the real datasets under {study.data_root} are incomplete:\n" + "\n".join(problems)
                         + f"\nsee {PAPER_DOC} for how to download and preprocess each dataset")
    return roots


def prepare_base(study: Study, progress: bool = True, rebuild: bool = False) -> Path:
    """Stage 02: make the tiny base of a ``smoke``/``demo`` run (the committed one, or built:
    ``build_tiny_base``), or load and check the SD2 weights of a ``paper`` run; returns the base folder."""
    if study.procedural:
        return build_tiny_base(study.base_dir, study.preset, progress=progress, rebuild=rebuild)
    load_base(study.base_dir)  # configs checked, weights loaded: fails here rather than in training
    return study.base_dir


# --------------------------------------------------------------------------- stages 03 and 04

def train_config(study: Study, kind: str, name: str | None = None, **overrides) -> TrainConfig:
    """The preset's ``TrainConfig`` for ``kind`` in this run's folder ``name`` (default: the kind) of its
    seed (``Study.train_dir``); ``None`` overrides are ignored. A multi stream starts from the single
    stream of its seed and learns the normals in that model's convention."""
    values = {k: v for k, v in overrides.items() if v is not None}
    seed = values.get("seed")
    values.setdefault("base", str(study.base_dir))
    values.setdefault("data_root", str(study.data_root))
    values.setdefault("output_dir", str(study.train_dir(name or kind, seed)))
    if kind == KINDS[1]:
        values.setdefault("init", str(study.model_dir(KINDS[0], seed)))
        record = Path(values["init"]) / MODEL_FILE
        if "normals" not in values and record.is_file():
            values["normals"] = saved_normals(json.loads(record.read_text()), record)
    return preset_config(study.preset, kind, **values)


def is_training_folder(folder: Path) -> bool:
    """An earlier kit training folder without a ``.stablemtl`` marker: a checkpoint and a log, or a model."""
    return ((folder / "checkpoint").is_dir() and (folder / TRAIN_LOG).is_file()) or \
        (folder / "model" / MODEL_FILE).is_file()


def older_generations(folder: Path) -> list[Path]:
    """The generations set aside before ``<folder>.previous`` and kept until a new first checkpoint."""
    return sorted(folder.parent.glob(f"{folder.name}.previous.older*"))


def drop_older_when_checkpointed(folder) -> list[Path]:
    """Delete the older generations (``<folder>.previous.older*``, the kit's only) once ``folder`` holds a
    checkpoint of its own; returns what was deleted."""
    folder = Path(folder)
    if not (folder / "checkpoint" / "latest" / "state.json").is_file():
        return []
    gone = [p for p in older_generations(folder) if is_own(p) or is_training_folder(p)]
    for path in gone:
        shutil.rmtree(path)
    return gone


def set_aside(folder) -> Path | None:
    """Move a training folder to ``<folder>.previous`` so that a new training starts from scratch; returns
    the new place, or ``None`` when there was nothing. Nothing is deleted here: an earlier ``.previous``
    becomes ``.previous.older`` and stays until the new training has written its first checkpoint
    (``drop_older_when_checkpointed``). Folders the kit did not write are refused (``InputError``)."""
    folder = Path(folder)
    if not folder.exists():
        return None
    claim(folder, "training", is_training_folder)
    drop_older_when_checkpointed(folder)  # a training killed after its first checkpoint
    previous = folder.with_name(folder.name + ".previous")
    if previous.exists():
        claim(previous, "training", is_training_folder)
        older, n = folder.with_name(folder.name + ".previous.older"), 1
        while older.exists():
            older, n = folder.with_name(f"{folder.name}.previous.older-{n}"), n + 1
        previous.rename(older)
    folder.rename(previous)
    return previous


def launch(config: TrainConfig, out: Path, gpus: int) -> Path:
    """Train ``config`` on ``gpus`` GPUs through ``accelerate launch`` (``python -m stablemtl.train`` in
    each process); returns the model folder."""
    config.validate(gpus)
    (out / "config.json").write_text(json.dumps(asdict(config), indent=1))
    # every launch setting given: a user's accelerate config file (~/.cache/huggingface/accelerate) must not
    # change the precision or add a compiler, and accelerate then does not stop to warn about defaults
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(gpus),
           "--num_machines", "1", "--mixed_precision", accelerate_precision(config.mixed_precision),
           "--dynamo_backend", "no",
           "-m", "stablemtl.train", "--config", str(out / "config.json")]
    print("launching:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    drop_older_when_checkpointed(out)
    return out / "model"


def train_model(study: Study, kind: str, progress: bool = True, name: str | None = None, **overrides) -> Path:
    """One training of stage 03 or 04: ``kind`` in the folder ``name`` (default: the kind), saved as its
    ``model/``; returns that folder.

    A training folder is continued only when it holds an unfinished training of the same settings
    (it resumes from its last checkpoint); one that finished (it has ``model/``) or whose checkpoint
    has other settings is set aside (``set_aside``) and training starts from scratch. The folder
    carries the kit's marker; a foreign non-empty one is refused. Ctrl-C stops with the last checkpoint
    kept (rerun to resume). With several GPUs the run goes through ``accelerate launch``.
    """
    import torch  # the device count only: the training itself runs in stablemtl.train

    check_inputs(study, "03" if kind == KINDS[0] else "04")
    config = train_config(study, kind, name, **overrides)
    if kind == KINDS[1] and not (Path(config.init) / MODEL_FILE).is_file():
        raise StageError(f"the multi stream starts from {config.init}, which is not a trained single stream; "
                         f"run notebooks/03_train_single_stream.ipynb (or `stablemtl run --only 03`) with the "
                         f"same preset, run name and seeds first")
    out = claim(config.output_dir, "training", is_training_folder)
    drop_older_when_checkpointed(out)
    if finished_training(out, config):
        print(f"{out} holds this training, finished; kept", flush=True)
        return out / "model"
    if (out / "model").exists():
        print(f"{out} holds a finished training; moved to {set_aside(out)}", flush=True)
        claim(out, "training")
    gpus = torch.cuda.device_count()
    if gpus > 1:
        return launch(config, out, gpus)
    if not gpus:
        check_cpu_memory(config)  # a clear refusal with the counted numbers, not the OOM killer
    try:
        trainer = Trainer(config, progress=progress)
    except CheckpointMismatch as err:
        print(f"{err.args[0].split(' and ')[0]}; moved to {set_aside(out)}", flush=True)
        claim(out, "training")
        trainer = Trainer(config, progress=progress)
    if trainer.resumed_from:
        print(f"resuming from {trainer.resumed_from} at step {trainer.step}", flush=True)
    try:
        if older_generations(out) and trainer.resumed_from is None:  # to the first checkpoint, then drop them
            every = config.checkpoint_every
            trainer.train(until=min(config.iterations, (trainer.step // every + 1) * every if every else
                                    config.iterations))
            drop_older_when_checkpointed(out)
        trainer.train()
    except KeyboardInterrupt:
        last = trainer.checkpoint_dir()
        print(f"interrupted at step {trainer.step}; the last checkpoint is kept ({last or 'none written yet'}); "
              f"run the stage again to resume from it", flush=True)
        raise
    return trainer.save_model()


def training_jobs(study: Study, kind: str, seeds: int | None = None, random_init: bool | None = None,
                  single_task: bool | None = None, **knobs) -> list[tuple[str, dict]]:
    """The trainings of stage 03 (``kind="single_stream"``) or 04 (``"multi_stream"``): (folder name,
    overrides) for every seed of ``study.seeds(seeds, knobs["seed"])``. Stage 03 also trains, as
    ``random_init`` and ``single_task`` say (None: the preset's ``study`` section), the ablation
    ``single_stream_random`` (the same training from a random UNet: the generative prior's effect)
    per seed, and with the first seed one single-task baseline per task (``single_task_<task>``: the
    same recipe for the steps the task gets in the joint run, which gives each optimizer step to one
    task in turn)."""
    design, all_seeds = study.design, study.seeds(seeds, knobs.get("seed"))
    design.update({k: v for k, v in (("random_init", random_init), ("single_task", single_task)) if v is not None})
    knobs = {k: v for k, v in knobs.items() if v is not None and k != "seed"}
    jobs = []
    for seed in all_seeds:
        jobs.append((kind, {**knobs, "seed": seed}))
        if kind == KINDS[0] and design["random_init"]:
            jobs.append((RANDOM_INIT, {**knobs, "seed": seed, "unet_init": "random"}))
    if kind == KINDS[0] and design["single_task"]:
        joint = train_config(study, kind, **knobs)
        steps = math.ceil(joint.iterations / len(joint.tasks))
        for task in joint.tasks:
            jobs.append((f"{SINGLE_TASK}_{task}", {**knobs, "seed": all_seeds[0], "tasks": [task],
                                                    "iterations": steps}))
    return jobs


def train_models(study: Study, kind: str, seeds: int | None = None, progress: bool = True,
                 random_init: bool | None = None, single_task: bool | None = None,
                 **knobs) -> dict[tuple[str, int], Path]:
    """Stage 03 or 04: every training of ``training_jobs``, in order; returns (name, seed) -> model folder.
    Each one resumes or skips as ``train_model`` does, so a killed stage goes on where it stopped."""
    out = {}
    jobs = training_jobs(study, kind, seeds, random_init, single_task, **knobs)
    for i, (name, overrides) in enumerate(jobs, 1):
        print(f"[{i}/{len(jobs)}] {name}, seed {overrides['seed']}", flush=True)
        out[(name, overrides["seed"])] = train_model(study, kind, progress, name, **overrides)
    return out


# --------------------------------------------------------------------------- stage 05

def trained_models(study: Study, seeds: list[int]) -> dict[tuple[str, int], Path]:
    """(folder name, seed) -> model folder, for every trained model row of ``MODELS`` the run has trained
    for ``seeds`` (a single-task baseline ``single_task_<task>`` is a ``single_task`` row)."""
    found = {}
    names = [m for m in MODELS if m not in REFERENCES and m != SINGLE_TASK]
    names += [f"{SINGLE_TASK}_{task}" for task in TASK_NAMES]
    for seed in seeds:
        for name in names:
            if (study.model_dir(name, seed) / MODEL_FILE).is_file():
                found[(name, seed)] = study.model_dir(name, seed)
    return found


def evaluate_models(study: Study, models=None, benchmarks=None, max_images=None, progress: bool = True,
                    silog: str | None = None, flow_scoring: str | None = None, device=None, dtype=None,
                    seeds: int | None = None, seed: int | None = None) -> Path:
    """Stage 05: evaluate ``models`` (names of ``MODELS``; None: the reference rows and every model the
    run trained) for every seed of ``study.seeds(seeds, seed)`` on its benchmarks into ``results/<run>``.

    ``trivial`` and ``vae_ceiling`` (the ground truth through the frozen VAE: the best a latent
    prediction can be) do not depend on a seed; ``single_task`` gathers the single-task baselines.
    A model trained on fewer tasks meets only their benchmarks; ``max_images`` limits each benchmark;
    ``silog`` and ``flow_scoring`` (None: the release's) choose the protocol options of
    ``stablemtl.options``. Cached predictions are reused only when they come from the same weights,
    data and protocol (``stablemtl.evaluate.evaluate``). ``device`` (None: the GPU when there is one) and
    ``dtype`` (e.g. ``torch.bfloat16``; None: float32) as in ``evaluate``.
    """
    unknown = set(models or ()) - set(MODELS)
    if unknown:
        raise ValueError(f"unknown model(s) {sorted(unknown)}; choose from {MODELS}")
    check_inputs(study, "05", models or ())  # the data; the models are looked for below
    seed_list = study.seeds(seeds, seed)
    trained = trained_models(study, seed_list)
    row = lambda folder: SINGLE_TASK if folder.startswith(SINGLE_TASK + "_") else folder  # noqa: E731
    order = list(REFERENCES) + [m for m in MODELS if m not in REFERENCES]  # the references first
    if models is None:
        models = [m for m in REFERENCES if study.procedural or m == "trivial"]
        models += [m for m in order[len(REFERENCES):] if any(row(name) == m for name, _ in trained)]
    for name in models:
        missing = [s for s in seed_list if name in (RANDOM_INIT, *KINDS) and (name, s) not in trained]
        if missing:
            raise StageError(f"{study.model_dir(name, missing[0])} is not a trained model: run notebooks 03 and 04 "
                             f"(or `stablemtl run --only 03,04`) with the same preset, run name and seeds first")
    benchmarks = [get_benchmark(b).name for b in (benchmarks or BENCHMARKS)]
    resolution = (study.preset.get("evaluate") or {}).get("resolution")
    common = dict(resolution=resolution, max_images=max_images, progress=progress, device=device, dtype=dtype,
                  **{k: v for k, v in (("silog", silog), ("flow_scoring", flow_scoring)) if v is not None})
    study.results_dir.mkdir(parents=True, exist_ok=True)
    expected = {name: {""} if name in REFERENCES else
                {seed_text(s) for folder, s in trained if row(folder) == name} for name in models}
    set_aside_stale_rows(study.results_dir, study.run_name, expected)
    for name in models:
        if name in REFERENCES:
            source = "trivial" if name == "trivial" else ("vae_ceiling", load_base(study.base_dir))
            evaluate(source, benchmarks, study.results_dir, study.data_root, run=study.run_name, model_name=name,
                     **common)
            continue
        for (folder_name, seed_value), folder in trained.items():
            if row(folder_name) != name:
                continue
            tasks = json.loads((folder / MODEL_FILE).read_text()).get("tasks") or []
            chosen = [b for b in benchmarks if BENCHMARKS[b].task in tasks]
            if not chosen:
                print(f"{folder_name}: trained on {tasks}, none of the benchmarks {benchmarks}; skipped")
                continue
            evaluate(folder, chosen, study.results_dir, study.data_root, run=study.run_name, model_name=name,
                     seed=seed_value, expect_kind=KINDS[1] if name == KINDS[1] else KINDS[0], **common)
    return study.results_dir
