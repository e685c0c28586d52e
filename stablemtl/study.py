"""The stages of the study as functions the numbered notebooks call.

A notebook cell is a call into this module: ``context`` resolves a preset and a
run name to directories; ``prepare_data`` (01), ``build_base`` (02),
``train_stage`` (03, 04), ``evaluate_stage`` (05) and ``results_stage`` (06)
do the work; the ``*_table`` and ``plot_*`` helpers are what the notebooks show.
``require`` is how a stage checks the previous stage's artifacts before any
long work starts.

Directories (docs/method.md, "The kit"):

- data: procedural presets write their miniatures to ``<project>/data/<preset>``;
  the ``paper`` preset reads ``$PREPROCESSED_DIR``;
- base model: procedural presets build it in ``<outputs>/<preset>/base`` (shared
  by every run of the preset: it depends only on the preset); ``paper`` loads
  ``$BASE_CKPT_DIR/stable-diffusion-2``;
- training: ``<outputs>/<run>/{single_stream,multi_stream}`` (checkpoints,
  ``train_log.csv``, the final ``model/``), ``<outputs>`` = ``$OUTPUT_DIR`` or
  ``<project>/outputs``;
- results: ``<project>/results/<run>`` (metrics, tables, figures, the executed
  notebooks and ``manifest.json``).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from stablemtl.presets import load_preset

STAGES = ("01_prepare_data", "02_build_model", "03_train_single_stream", "04_train_multi_stream",
          "05_evaluate", "06_results")
MODELS = ("trivial", "single_stream", "multi_stream")
README_PAPER = "README.md, section 'The paper preset'"


class StageError(RuntimeError):
    """A stage's input is missing or unusable; the message says what and how to make it."""


def project_root() -> Path:
    """The checkout: ``$STABLEMTL_PROJECT``, else the current directory (its parent inside ``notebooks/``)."""
    if os.environ.get("STABLEMTL_PROJECT"):
        return Path(os.environ["STABLEMTL_PROJECT"]).resolve()
    cwd = Path.cwd().resolve()
    return cwd.parent if cwd.name == "notebooks" else cwd


@dataclass
class Study:
    """A preset plus the directories of one run."""

    preset: dict
    run: str
    results_dir: Path
    output_dir: Path
    data_root: Path
    base_dir: Path
    overrides: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.preset.get("name", "custom"))

    @property
    def procedural(self) -> bool:
        """The kit's miniatures and tiny base (smoke, demo) rather than real data and SD2 (paper)."""
        return isinstance(self.preset.get("data"), dict)

    def model_dir(self, kind: str) -> Path:
        return self.output_dir / kind / "model"

    def train_log(self, kind: str) -> Path:
        return self.output_dir / kind / "train_log.csv"

    def __repr__(self) -> str:
        rows = [("preset", self.name), ("run", self.run), ("data", self.data_root), ("base model", self.base_dir),
                ("checkpoints", self.output_dir), ("results", self.results_dir)]
        return "\n".join(f"{k:<12} {v}" for k, v in rows)


def context(preset="demo", run_name=None, data_root=None, output_root=None, results_root=None,
            base_dir=None) -> Study:
    """The run's directories; ``None`` takes the defaults of the module docstring."""
    config = load_preset(preset)
    name = str(config.get("name", Path(str(preset)).stem))
    run = run_name or name
    if not all(c.isalnum() or c in "-_." for c in run) or run.startswith("."):
        raise ValueError(f"run name {run!r}: use letters, digits, '-', '_' and '.' (it names a folder)")
    root = project_root()
    outputs = Path(output_root or os.environ.get("OUTPUT_DIR") or root / "outputs")
    procedural = isinstance(config.get("data"), dict)
    if data_root is None:
        if procedural:
            data_root = root / "data" / name
        elif os.environ.get("PREPROCESSED_DIR"):
            data_root = os.environ["PREPROCESSED_DIR"]
        else:
            raise StageError(f"preset {name!r} reads the real datasets: set PREPROCESSED_DIR (or pass data_root) "
                             f"to the folder holding them; see {README_PAPER}")
    if base_dir is None:
        if procedural:
            base_dir = outputs / name / "base"
        else:
            from stablemtl.model.base import paper_base_dir

            try:
                base_dir = paper_base_dir()
            except Exception as err:  # noqa: BLE001 - re-raised with the way out
                raise StageError(f"{err}; see {README_PAPER}") from err
    return Study(config, run, Path(results_root or root / "results") / run, outputs / run, Path(data_root),
                 Path(base_dir))


# --------------------------------------------------------------------------- stage artifacts

def stage_outputs(study: Study, stage: str) -> list[Path]:
    """The files whose presence means ``stage`` finished (the runner skips complete stages)."""
    from stablemtl.data.sources import SOURCES

    if stage.startswith("01"):
        if study.procedural:
            return [study.data_root / SOURCES[d].root_hint / "stablemtl_dataset.json" for d in study.preset["data"]]
        return [study.data_root / SOURCES[d].root_hint for d in SOURCES]
    if stage.startswith("02"):
        return [study.base_dir / ("stablemtl_base.json" if study.procedural else "model_index.json")]
    if stage.startswith("03"):
        return [study.model_dir("single_stream") / "stablemtl_model.json"]
    if stage.startswith("04"):
        return [study.model_dir("multi_stream") / "stablemtl_model.json"]
    if stage.startswith("05"):
        return [study.results_dir / "metrics.csv", study.results_dir / "evaluated.json"]
    if stage.startswith("06"):
        return [study.results_dir / "tables" / "main.md", study.results_dir / "summary.md"]
    raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")


_HOW = {"01": "run notebooks/01_prepare_data.ipynb (or `stablemtl run --only 01`)",
        "02": "run notebooks/02_build_model.ipynb (or `stablemtl run --only 02`)",
        "03": "run notebooks/03_train_single_stream.ipynb (or `stablemtl run --only 03`)",
        "04": "run notebooks/04_train_multi_stream.ipynb (or `stablemtl run --only 04`)",
        "05": "run notebooks/05_evaluate.ipynb (or `stablemtl run --only 05`)"}


def require(study: Study, *stages: str) -> None:
    """Fail with what is missing and how to make it when a previous stage has not run."""
    for stage in stages:
        missing = [p for p in stage_outputs(study, stage) if not p.exists()]
        if missing:
            raise StageError(f"stage {stage} of run {study.run!r} has not finished: {missing[0]} is missing; "
                             f"{_HOW[stage[:2]]} with the same preset ({study.name}) and run name first")


# --------------------------------------------------------------------------- 01 data

def prepare_data(study: Study, progress: bool = True) -> dict[str, Path]:
    """Write (or reuse) the procedural miniatures, or check the real datasets' layout; name -> root."""
    from stablemtl.data import mini
    from stablemtl.data.sources import SOURCES

    if study.procedural:
        return mini.write_mini_datasets(study.data_root, study.preset, progress=progress)
    roots, problems = {}, []
    for name, cls in SOURCES.items():
        root = study.data_root / cls.root_hint
        try:
            cls(root)
            roots[name] = root
        except Exception as err:  # noqa: BLE001 - collected so that one message lists every dataset
            problems.append(f"  {name}: {err}")
    if problems:
        raise StageError(f"the real datasets under {study.data_root} are incomplete:\n" + "\n".join(problems)
                         + f"\nsee {README_PAPER} for how to download and preprocess each dataset")
    return roots


def dataset_table(roots: dict):
    """One row per dataset: loader class, images of the study's split, annotated tasks, folder."""
    import pandas as pd

    from stablemtl.data.sources import SOURCES

    rows = []
    for name, root in roots.items():
        cls = SOURCES[name]
        rows.append({"dataset": name, "class": cls.__name__, "images": len(cls(root)),
                     "tasks": ", ".join(cls.tasks_provided), "folder": str(root)})
    return pd.DataFrame(rows).set_index("dataset")


def annotation_matrix():
    """Task x dataset: the training sampling probability (the release's) or 'eval' for the zero-shot benchmarks."""
    import pandas as pd

    from stablemtl.data.mixing import TASK_DATASET_PROBS
    from stablemtl.data.sources import SOURCES
    from stablemtl.evaluate import BENCHMARKS
    from stablemtl.tasks import TASK_NAMES

    table = pd.DataFrame("", index=list(TASK_NAMES), columns=list(SOURCES))
    for task, probs in TASK_DATASET_PROBS.items():
        for dataset, p in probs.items():
            table.loc[task, dataset] = f"train {p:g}"
    for b in BENCHMARKS.values():
        table.loc[b.task, b.dataset] = "eval"
    for dataset, cls in SOURCES.items():
        for task in cls.tasks_provided:
            if not table.loc[task, dataset]:
                table.loc[task, dataset] = "annotated"
    return table


def _sample_panels(sample: dict, tasks) -> list[tuple[str, object]]:
    import torch

    from stablemtl.tasks import SHADING_WEIGHTS, get_task

    panels = [("rgb", sample["rgb"].permute(1, 2, 0).numpy())]
    for task in tasks:
        if task in sample:
            x, v = sample[task][None], sample[f"{task}_valid"][None]
            if task == "shading" and x.shape[1] == 3:  # RGB shading shown as the grey the model predicts
                x = (x * torch.tensor(SHADING_WEIGHTS)[None, :, None, None]).sum(1, keepdim=True)
            if task == "depth":
                vals = x[v.expand_as(x)]
                lo, hi = (float(vals.min()), float(vals.max())) if vals.numel() else (0.0, 1.0)
                img = get_task(task).colorize(x, v, value_range=(lo, max(hi, lo + 1e-6)))[0]
            else:
                img = get_task(task).colorize(x, v)[0]
            panels.append((task, img))
    return panels


def plot_dataset_samples(roots: dict, index: int = 0):
    """One row per dataset: the input and every annotation it has, colourised (black = invalid)."""
    import matplotlib.pyplot as plt

    from stablemtl.data.sources import SOURCES

    rows = []
    for name, root in roots.items():
        cls = SOURCES[name]
        ds = cls(root)
        rows.append((name, _sample_panels(ds[min(index, len(ds) - 1)], cls.tasks_provided)))
    cols = max(len(p) for _, p in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(2.0 * cols, 1.3 * len(rows)), squeeze=False)
    for r, (name, panels) in enumerate(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(panels):
                ax.imshow(panels[c][1])
                ax.set_title(panels[c][0], fontsize=7)
        axes[r][0].text(-0.08, 0.5, name, transform=axes[r][0].transAxes, rotation=90, va="center", ha="right",
                        fontsize=7)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- 02 base model

def build_base(study: Study, progress: bool = True) -> Path:
    """Build (or reuse) the tiny base, or check the SD2 directory; returns the base directory."""
    from stablemtl.model import base

    if study.procedural:
        return base.build_tiny_base(study.base_dir, study.preset, progress=progress)
    base.load_base(study.base_dir)  # configs checked, weights loaded: fails here rather than in training
    return study.base_dir


def base_report(study: Study) -> str:
    """The tiny base's build report (VAE PSNR per encoding and the VAE ceiling per task)."""
    from stablemtl.model import base

    if not study.procedural:
        return f"{study.base_dir}: Stable Diffusion 2 (no build report; the weights are the published ones)"
    return base.format_build_report(base.build_report(study.base_dir))


def plot_vae_roundtrips(study: Study, roots: dict, index: int = 0):
    """Each task's target encoding of one training sample and its reconstruction through the frozen VAE."""
    import matplotlib.pyplot as plt
    import torch

    from stablemtl.data.sources import SOURCES
    from stablemtl.model.base import load_base
    from stablemtl.tasks import TASK_NAMES, get_task

    vae = load_base(study.base_dir).vae
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    samples = {}
    for name in ("hypersim", "vkitti", "flying_things_3d"):
        if name in roots:
            ds = SOURCES[name](roots[name])
            samples[name] = ds[min(index, len(ds) - 1)]
    rows = []
    for task in TASK_NAMES:
        name = next((n for n, s in samples.items() if task in s), None)
        if name is None:
            continue
        s = samples[name]
        t = get_task(task)
        target, valid = t.encode(s[task][None], s[f"{task}_valid"][None])
        h, w = target.shape[-2:]
        padded = torch.nn.functional.pad(target, (0, (-w) % factor, 0, (-h) % factor), mode="replicate")
        with torch.no_grad():
            recon = vae.decode(vae.encode(padded).latent_dist.mean).sample[..., :h, :w]
        show = (lambda x: ((x[0].permute(1, 2, 0).clamp(-1, 1) + 1) / 2).numpy())  # noqa: E731
        rows.append((f"{task} ({name})", show(target), show(recon)))
    fig, axes = plt.subplots(len(rows), 2, figsize=(5.0, 1.3 * len(rows)), squeeze=False)
    for r, (label, a, b) in enumerate(rows):
        for c, (img, title) in enumerate(((a, "target encoding"), (b, "through the VAE"))):
            axes[r][c].imshow(img)
            axes[r][c].axis("off")
            if r == 0:
                axes[r][c].set_title(title, fontsize=8)
        axes[r][0].text(-0.05, 0.5, label, transform=axes[r][0].transAxes, rotation=90, va="center", ha="right",
                        fontsize=6)
    fig.tight_layout()
    return fig


def parameter_table(study: Study):
    """Parameters of the base's components and of what each model kind trains."""
    import pandas as pd

    from stablemtl.model.base import load_base
    from stablemtl.model.streams import MultiStream, SingleStream
    from stablemtl.tasks import TASK_NAMES

    count = lambda ps: sum(p.numel() for p in ps)  # noqa: E731
    base = load_base(study.base_dir)
    rows = [{"component": c, "parameters": count(getattr(base, c).parameters()), "trained": False}
            for c in ("unet", "vae", "text_encoder")]
    single = SingleStream.from_base(base, list(TASK_NAMES))
    rows.append({"component": "single stream (widened UNet)", "parameters": count(single.trainable_parameters()),
                 "trained": True})
    ta = dict((study.preset.get("model") or {}).get("task_attention") or {})
    multi = MultiStream.from_single_stream(single, **ta)
    rows.append({"component": "multi stream: main UNet + task attention",
                 "parameters": count(multi.trainable_parameters()), "trained": True})
    rows.append({"component": "  of which task attention", "parameters": count(multi.task_attention.parameters()),
                 "trained": True})
    return pd.DataFrame(rows).set_index("component")


# --------------------------------------------------------------------------- 03 / 04 training

def train_config(study: Study, kind: str, **overrides):
    """The preset's ``TrainConfig`` for ``kind`` in this run's folders; ``None`` overrides are ignored.
    A multi stream learns the normals in the convention of the single stream it starts from."""
    import json

    from stablemtl.model.streams import MODEL_FILE, saved_normals
    from stablemtl.train import preset_config

    values = {k: v for k, v in overrides.items() if v is not None}
    values.setdefault("base", str(study.base_dir))
    values.setdefault("data_root", str(study.data_root))
    values.setdefault("output_dir", str(study.output_dir / kind))
    if kind == "multi_stream":
        values.setdefault("init", str(study.model_dir("single_stream")))
        record = Path(values["init"]) / MODEL_FILE
        if "normals" not in values and record.is_file():
            values["normals"] = saved_normals(json.loads(record.read_text()))
    return preset_config(study.preset, kind, **values)


def set_aside_training(study: Study, kind: str) -> Path | None:
    """Move ``<output>/<kind>`` to ``<output>/<kind>.previous`` (replacing an older one) so that a new
    training starts from scratch instead of resuming a checkpoint of other settings; returns the new
    place, or ``None`` when there was nothing."""
    import shutil

    current = study.output_dir / kind
    if not current.exists():
        return None
    previous = current.with_name(kind + ".previous")
    shutil.rmtree(previous, ignore_errors=True)
    current.rename(previous)
    return previous


def train_stage(study: Study, kind: str, progress: bool = True, **overrides) -> Path:
    """Train (or resume, or reuse) ``kind`` and save ``<output>/<kind>/model``; returns that folder.

    With several GPUs the run goes through ``accelerate launch`` (one process per GPU); otherwise it
    runs in this process. An interrupted run resumes from its last checkpoint.
    """
    import json
    import subprocess
    import sys

    import torch

    from stablemtl.train import train

    require(study, "01", "02", *(["03"] if kind == "multi_stream" else []))
    config = train_config(study, kind, **overrides)
    gpus = torch.cuda.device_count()
    if gpus > 1:
        config.validate(gpus)
        out = Path(config.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(asdict(config), indent=1))
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(gpus),
               "-m", "stablemtl.train", "--config", str(out / "config.json")]
        print("launching:", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        return out / "model"
    trainer = train(config, progress=progress)
    return trainer.save_model()


def plot_training_curves(study: Study, kinds=("single_stream", "multi_stream"), smooth: int = 10):
    """The loss per task against the step of each trained kind (a PNG next to the last kind's log)."""
    from stablemtl.report import plot_training_curves as plot

    logs = {k: study.train_log(k) for k in kinds if study.train_log(k).is_file()}
    if not logs:
        raise StageError(f"no training log under {study.output_dir} for {list(kinds)}; train first")
    return plot(logs, study.output_dir / list(logs)[-1] / "training_curves.png", smooth=smooth)


# --------------------------------------------------------------------------- 05 evaluation

def evaluate_stage(study: Study, models=MODELS, benchmarks=None, max_images=None, progress: bool = True,
                   silog: str | None = None, flow_scoring: str | None = None) -> Path:
    """Evaluate ``models`` (names of MODELS) on every benchmark into ``results/<run>``.

    ``stablemtl.evaluate.evaluate`` reuses cached predictions only when they come from the same
    weights, data and protocol; ``evaluated.json`` records the checkpoints evaluated (the stage's
    marker); ``max_images`` limits each benchmark; ``silog`` and ``flow_scoring`` (None: the
    release's) choose the protocol options of ``stablemtl.options``.
    """
    import json

    from stablemtl.evaluate import BENCHMARKS, evaluate
    from stablemtl.model.base import weights_fingerprint

    require(study, "01", *(["03"] if "single_stream" in models else []), *(["04"] if "multi_stream" in models else []))
    unknown = set(models) - set(MODELS)
    if unknown:
        raise ValueError(f"unknown model(s) {sorted(unknown)}; choose from {MODELS}")
    benchmarks = list(benchmarks or BENCHMARKS)
    if set(benchmarks) - set(BENCHMARKS):
        raise ValueError(f"unknown benchmark(s) {sorted(set(benchmarks) - set(BENCHMARKS))}; "
                         f"choose from {', '.join(BENCHMARKS)}")
    resolution = (study.preset.get("evaluate") or {}).get("resolution")
    protocol = {k: v for k, v in (("silog", silog), ("flow_scoring", flow_scoring)) if v is not None}
    study.results_dir.mkdir(parents=True, exist_ok=True)
    record_file = study.results_dir / "evaluated.json"
    record = json.loads(record_file.read_text()) if record_file.is_file() else {}
    for name in models:
        source = "trivial" if name == "trivial" else study.model_dir(name)
        chosen = benchmarks
        if name != "trivial":  # a model trained on fewer tasks (a single-task baseline) meets only their benchmarks
            trained = json.loads((source / "stablemtl_model.json").read_text()).get("tasks") or []
            chosen = [b for b in benchmarks if BENCHMARKS[b].task in trained]
            if not chosen:
                print(f"{name}: trained on {trained}, none of the benchmarks {benchmarks}; skipped")
                continue
        key = {"weights": "trivial" if name == "trivial" else weights_fingerprint(source),
               "max_images": max_images, "resolution": resolution, "data_root": str(study.data_root)}
        evaluate(source if name == "trivial" else str(source), chosen, study.results_dir, study.data_root,
                 run=study.run, model_name=name, resolution=resolution, max_images=max_images, progress=progress,
                 expect_kind=None if name == "trivial" else name, **protocol)
        record[name] = key
        record_file.write_text(json.dumps(record, indent=1))
    return study.results_dir


def metrics_table(study: Study):
    """The main table (headline metric per task, Delta_m when single-task rows exist) as a DataFrame."""
    import pandas as pd

    from stablemtl.evaluate import read_metrics
    from stablemtl.report import main_table

    rows = [r for r in read_metrics(study.results_dir) if r["run"] == study.run]
    header, body = main_table(rows, paper=False)
    return pd.DataFrame(body, columns=header).set_index("model")


# --------------------------------------------------------------------------- 06 results

def target_check(rows: list[dict]):
    """The demo's targets per benchmark headline metric: each trained model beats the trivial row, and
    multi-stream is not worse than single-stream on average (mean signed relative change >= 0).

    Returns (DataFrame, passed: bool).
    """
    import pandas as pd

    from stablemtl import metrics
    from stablemtl.report import DELTA_M_METRICS

    values = {(r["model"], r["benchmark"], r["metric"]): float(r["value"]) for r in rows}
    table, ok, changes = [], True, []
    for benchmark, metric in DELTA_M_METRICS:
        hib = metrics.HIGHER_IS_BETTER[metric]
        get = lambda m: values.get((m, benchmark, metric))  # noqa: E731
        t, s, m = get("trivial"), get("single_stream"), get("multi_stream")
        better = lambda a, b: a is not None and b is not None and (a > b if hib else a < b)  # noqa: E731
        row = {"benchmark": benchmark, "metric": metric + (" (higher better)" if hib else " (lower better)"),
               "trivial": t, "single_stream": s, "multi_stream": m,
               "single beats trivial": better(s, t), "multi beats trivial": better(m, t)}
        if s is not None and m is not None and s != 0:
            change = (m - s) / abs(s) * (1 if hib else -1) * 100
            row["multi vs single %"] = change
            changes.append(change)
        ok = ok and row["single beats trivial"] and row["multi beats trivial"]
        table.append(row)
    mean_change = sum(changes) / len(changes) if len(changes) == len(DELTA_M_METRICS) else None
    ok = ok and mean_change is not None and mean_change >= 0
    table.append({"benchmark": "mean", "metric": "multi vs single (signed relative change)",
                  "multi vs single %": mean_change})
    return pd.DataFrame(table).set_index("benchmark"), bool(ok)


def format_target_check(table, passed: bool) -> str:
    lines = [f"{'benchmark':<20}{'metric':<24}{'trivial':>10}{'single':>10}{'multi':>10}{'multi vs single':>17}"]
    for benchmark, r in table.iterrows():
        f = lambda v: "-" if v is None or v != v else f"{v:.4g}"  # noqa: E731
        if benchmark == "mean":
            lines.append(f"{'mean':<20}{'':<24}{'':>30}{f(r['multi vs single %']) + ' %':>17}")
            continue
        mark = lambda b: "*" if b else " "  # noqa: E731
        lines.append(f"{benchmark:<20}{r['metric'].split(' ')[0]:<24}{f(r['trivial']):>10}"
                     f"{f(r['single_stream']) + mark(r['single beats trivial']):>10}"
                     f"{f(r['multi_stream']) + mark(r['multi beats trivial']):>10}{f(r['multi vs single %']) + ' %':>17}")
    lines.append("* = beats the trivial baseline.  Targets " + ("MET" if passed else "NOT MET") +
                 ": both models beat trivial on every benchmark and multi-stream is not worse than single-stream "
                 "on average.")
    return "\n".join(lines)


def results_stage(study: Study) -> dict[str, Path]:
    """Tables, figures and ``summary.md`` (the target check) from the results files."""
    from stablemtl.evaluate import read_metrics
    from stablemtl.report import write_report

    require(study, "05")
    logs = {k: study.train_log(k) for k in ("single_stream", "multi_stream") if study.train_log(k).is_file()}
    written = write_report(study.results_dir, training_logs=logs or None, run=study.run)
    rows = [r for r in read_metrics(study.results_dir) if r["run"] == study.run]
    table, passed = target_check(rows)
    summary = study.results_dir / "summary.md"
    summary.write_text(f"# Run {study.run} (preset {study.name})\n\n```\n{format_target_check(table, passed)}\n```\n")
    written["summary.md"] = summary
    return written
