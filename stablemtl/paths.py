"""The names of a project's folders and files: where a run's files live is decided by
``stablemtl.stages.context`` from these names, the preset and the environment.

This module imports nothing of the package: every other module may name a file or a model row from here.
"""

from __future__ import annotations

import os
from pathlib import Path

KINDS = ("single_stream", "multi_stream")  # the trained model kinds, made by stages 03 and 04
RANDOM_INIT = "single_stream_random"  # the ablation: the single stream fine-tuned from a random UNet (stage 03)
SINGLE_TASK = "single_task"  # the Delta_m reference rows; their models train in single_task_<task> (stage 03)
# every model row of the results, in the tables' order; the references are seed-independent (the floor and
# the ceiling of every benchmark) and are evaluated first
MODELS = ("trivial", SINGLE_TASK, RANDOM_INIT, KINDS[0], KINDS[1], "vae_ceiling")
REFERENCES = ("trivial", "vae_ceiling")
TRAIN_LOG = "train_log.csv"  # a training folder's: step, task, dataset, loss, lr, seconds
DONE_FILE = "done.json"  # in a stage's folder once it finished: the hash of what it was made from
METRICS_FILE = "metrics.csv"  # results/<run>/: one row per (model, seed, benchmark, metric)
SAMPLES_FILE = "per_sample.csv"  # results/<run>/: one row per (model, seed, benchmark, image, metric)
PIPELINE_FILE = "model_index.json"  # a diffusers folder's index: a base model or a saved StableMTL pipeline
STATS_FILE = "train_stats.json"  # a training folder's: the device and peak memory of its last training call
REFERENCE = "reference"  # results/reference/<preset>/: the committed reference runs (no command writes there)
PAPER_DOC = "docs/paper.md"  # the paper preset: the weights, the real datasets, preparing them


def project_root() -> Path:
    """The checkout: ``$STABLEMTL_PROJECT``, else the current directory (its parent inside ``notebooks/``)."""
    if os.environ.get("STABLEMTL_PROJECT"):
        return Path(os.environ["STABLEMTL_PROJECT"]).resolve()
    cwd = Path.cwd().resolve()
    return cwd.parent if cwd.name == "notebooks" else cwd


def in_project(path) -> str:
    """``path`` relative to the project (``project_root``) when it lies inside it, else absolute: what the
    stage records, the manifest and the prediction cache keep, so a moved or copied project reads the same."""
    path = Path(path).resolve()
    try:
        return path.relative_to(project_root()).as_posix()
    except ValueError:
        return str(path)
