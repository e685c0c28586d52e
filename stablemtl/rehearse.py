"""``stablemtl rehearse``: the paper preset's own code path, every stage, with nothing downloaded.

Before anyone downloads a terabyte of data and rents GPUs, one command runs what they will run:

1. **raw data**: miniatures of the eight datasets in their *raw* layouts and formats, at the real
   datasets' resolutions (``stablemtl.data.raw.REAL_SIZES``), ``--images`` frames each, rendered by
   the procedural world (``render_scale``: rendered smaller, upsampled to the real size);
2. **prepare**: ``stablemtl prepare <dataset> --raw ... --out $PREPROCESSED_DIR/...``, the command a
   user runs on the downloads;
3. **base**: a folder in the diffusers layout of ``stabilityai/stable-diffusion-2`` with SD2's configs
   at a width factor (``--width``; 1.0 is SD2's exact size), random weights and the real SD2 (CLIP)
   tokenizer (``stablemtl.model.sd2.write_sd2_base``);
4. **stages 01 to 06**: ``stablemtl run --preset paper`` against those folders (``PREPROCESSED_DIR``,
   ``BASE_CKPT_DIR``, ``OUTPUT_DIR``, ``RESULTS_DIR``), one stage per call, with the paper's
   resolutions, crops, mixing, effective batch and evaluation protocol, only ``--steps`` optimizer
   steps per stream, ``--images`` images per benchmark and, where memory needs it, a smaller
   ``batch_per_device`` (stated in the report);
5. **predict**: both trained streams on one 576 x 768 frame pair, all seven tasks in one call.

It writes ``rehearsal.json`` and ``rehearsal.md`` into ``--out``: per stage the wall time, peak memory
(the resident set of the stage's process tree on the CPU, read from the kernel's high-water mark;
``torch.cuda.max_memory_allocated`` of the training and evaluation on a GPU), disk written, and done or
the error; seconds per optimizer step and per micro-batch of each training (``train_log.csv``), seconds
per image of the evaluation (``evaluate_timing.json``) and of the prediction. A stage that would exhaust
the machine's memory is stopped by a watchdog and reported with the memory it reached, never left to
the OOM killer. Each stage is resumable (the runner's ``done.json``, ``prepare``'s journal), so an
interrupted rehearsal continues where it stopped.

``stablemtl.watch`` watches each child (peak memory, the watchdog), ``stablemtl.rehearse_report`` makes the
figures and ``rehearsal.md``. Importing this module imports no torch (the command line imports it to build
its parser, each step's child process to run its work): the modules that do are imported by the functions
that use them.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import stablemtl
from stablemtl.data import formats
from stablemtl.data.convert.common import RAW_META
from stablemtl.guard import InputError, claim, die_with_parent
from stablemtl.paths import KINDS, PIPELINE_FILE
from stablemtl.presets import DEFAULT_SEED, load_preset
from stablemtl.rehearse_report import collect_figures, format_report
from stablemtl.watch import GIB, Watch, folder_bytes, memory_reserve

RUN_NAME = "rehearsal"
REPORT_JSON, REPORT_MD = "rehearsal.json", "rehearsal.md"
DEFAULTS = {"width": 0.1, "steps": 2, "images": 2, "render_scale": 4}
PREDICT_SIZE = (576, 768)  # the frame pair of the prediction step
SKIPPED = "kept from an earlier call"  # what a step's log says when it had nothing to do
_SKIP_MARKS = (SKIPPED, "done, skipped (same parameters")  # the rehearsal's, and ``stablemtl run``'s


class RehearsalError(ValueError):
    """A bad argument or folder, found before anything is written (exit status 2)."""


# --------------------------------------------------------------------------- a step's log

def _last_line(path: Path) -> str:
    """The last line of a step's log (its end, no warning), for the progress bar."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            text = f.read().decode("utf-8", "replace").replace("\r", "\n")
    except OSError:
        return ""
    lines = [line.strip() for line in text.splitlines()
             if line.strip() and "WARNING" not in line and not line.startswith("$ ")]
    return lines[-1][-70:] if lines else ""


def _error_of(log: Path) -> str:
    """The last error line of a step's log (``stablemtl run: ...``, an exception line), for the report."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").replace("\r", "\n").splitlines() if line.strip()]
    except OSError:
        return f"see {log}"
    for i in range(len(lines) - 1, -1, -1):
        line = lines[i]
        if line.startswith("stablemtl ") or "Error" in line.split(":")[0] or line.startswith("Killed"):
            return " ".join(lines[i:i + 3])[:600] + f" (log: {log})"
    return (lines[-1][:300] if lines else "no output") + f" (log: {log})"


def _project() -> Path:
    return Path(stablemtl.__file__).resolve().parents[1]


# --------------------------------------------------------------------------- the rehearsal

class Rehearsal:
    """The rehearsal's folders, settings and report; ``run()`` runs every step (module docstring)."""

    def __init__(self, out, width: float = DEFAULTS["width"], steps: int = DEFAULTS["steps"],
                 images: int = DEFAULTS["images"], device: str = "auto", batch_per_device: int | None = None,
                 parameters: dict | None = None, render_scale: int = DEFAULTS["render_scale"],
                 quiet: bool = False, seed: int = DEFAULT_SEED):
        self.out = Path(out).resolve()
        self.width, self.steps, self.images = width, steps, images
        self.device, self.batch_per_device = device, batch_per_device
        self.parameters, self.render_scale = dict(parameters or {}), render_scale
        self.quiet, self.seed = quiet, seed
        self.raw, self.preprocessed = self.out / "raw", self.out / "preprocessed"
        self.base_root = self.out / "base"
        self.base = self.base_root / "stable-diffusion-2"
        self.outputs, self.results = self.out / "outputs", self.out / "results"
        self.logs = self.out / "logs"
        self.report: dict = {}
        self.previous: dict = {}  # the report of an earlier call into the same folder (a resumed rehearsal)

    # ----------------------------------------------------------------- checks
    def check(self) -> None:
        """Every argument and the output folder, before anything is written (``RehearsalError``)."""
        from stablemtl import devices
        from stablemtl.run import RunError, check_run_parameters
        from stablemtl.stages import STAGES

        if isinstance(self.width, bool) or not isinstance(self.width, (int, float)) or not self.width > 0 \
                or self.width > 4:
            raise RehearsalError(f"--width {self.width!r}: expected a number in (0, 4]; 1.0 is Stable Diffusion 2's "
                                 f"exact size, {DEFAULTS['width']} (the default) a narrow copy for a quick check")
        for name, value in (("--steps", self.steps), ("--images", self.images), ("--render-scale", self.render_scale)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise RehearsalError(f"{name} {value!r}: expected a whole number >= 1")
        if self.batch_per_device is not None and (not isinstance(self.batch_per_device, int)
                                                  or 32 % max(1, self.batch_per_device) or self.batch_per_device < 1):
            raise RehearsalError(f"--batch-per-device {self.batch_per_device!r}: expected a divisor of the paper's "
                                 f"effective batch of 32 (1, 2, 4, 8, 16 or 32)")
        try:
            devices.resolve_device(None if self.device in (None, "auto") else self.device)
        except ValueError as err:
            raise RehearsalError(f"--device: {err}") from None
        for key in ("iterations", "max_images", "batch_per_device", "device", "preset", "run_name"):
            if key in self.parameters:
                raise RehearsalError(f"-p {key}=...: the rehearsal sets {key} itself (use --steps, --images, "
                                     f"--batch-per-device, --device)")
        try:
            check_run_parameters(list(STAGES), self.parameters)
        except RunError as err:
            raise RehearsalError(str(err)) from None
        try:
            claim(self.out, "rehearsal", lambda f: (f / REPORT_JSON).is_file(), create=False)
        except InputError as err:
            raise RehearsalError(str(err)) from None

    # ----------------------------------------------------------------- settings
    def _device(self) -> str:
        from stablemtl import devices

        return str(devices.resolve_device(None if self.device in (None, "auto") else self.device))

    def _batch(self) -> int:
        """``batch_per_device``: as given; else the paper's 16 on a GPU and 1 on the CPU (memory; the
        effective batch stays the paper's 32, in more micro-batches)."""
        if self.batch_per_device is not None:
            return self.batch_per_device
        return 16 if self._device().startswith("cuda") else 1

    def environment(self) -> dict:
        env = dict(os.environ, PREPROCESSED_DIR=str(self.preprocessed), BASE_CKPT_DIR=str(self.base_root),
                   OUTPUT_DIR=str(self.outputs), RESULTS_DIR=str(self.results), PYTHONUNBUFFERED="1")
        for variable in ("DATA_DIR", "BASE_DIR"):  # they would override the paper preset's folders
            env.pop(variable, None)
        device = self._device()
        if device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""  # training picks the GPU whenever it sees one
        elif device.startswith("cuda:"):
            env["CUDA_VISIBLE_DEVICES"] = device.split(":", 1)[1]
        return env

    def stage_parameters(self, key: str, models=None) -> list[str]:
        """``-p`` arguments of ``stablemtl run --only <key>``: the rehearsal's and the user's own that the
        stage's notebook declares."""
        from stablemtl.run import declared_parameters, notebook_dir
        from stablemtl.stages import stage_name

        declared = declared_parameters(notebook_dir() / f"{stage_name(key)}.ipynb")
        values = dict(self.parameters)
        values.update(iterations=self.steps, batch_per_device=self._batch(), max_images=self.images,
                      device="cuda" if self._device().startswith("cuda") else "cpu")
        if models is not None:
            values["models"] = models
        out = []
        for name, value in values.items():
            if name in declared:
                out += ["-p", f"{name}={json.dumps(value)}"]
        return out

    # ----------------------------------------------------------------- one step, in a child process
    def _child(self, name: str, cmd: list[str]) -> dict:
        """Run ``cmd`` with the rehearsal's environment, its output in ``logs/<name>.log``; returns the
        step's record (status, wall time, peak memory, disk written, error)."""
        from tqdm.auto import tqdm

        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"{name.replace(' ', '_')}.log"
        before = folder_bytes(self.out)
        bar = tqdm(total=1, desc=f"rehearse: {name}", disable=self.quiet, leave=True,
                   bar_format="{desc} [{elapsed}]{postfix}")
        parent = os.getpid()
        start = time.perf_counter()
        with open(log, "w") as handle:
            handle.write("$ " + " ".join(cmd) + "\n")
            handle.flush()
            proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=self.environment(),
                                    cwd=str(_project()), preexec_fn=lambda: die_with_parent(parent))
            watch = Watch(proc.pid, memory_reserve(), on_poll=lambda: bar.set_postfix_str(_last_line(log)))
            try:
                code = proc.wait()
            except KeyboardInterrupt:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                raise
            finally:
                watch.stop()
        wall = time.perf_counter() - start
        bar.update()
        bar.set_postfix_str("done" if code == 0 else f"FAILED (exit {code})")
        bar.close()
        record = {"status": "done" if code == 0 else "failed", "wall_s": round(wall, 1),
                  "peak_rss_gib": round(watch.peak_process / GIB, 3),
                  "peak_rss_tree_gib": round(watch.peak_tree / GIB, 3),
                  "disk_written_gib": round((folder_bytes(self.out) - before) / GIB, 4), "log": str(log)}
        if code != 0:
            record["exit"] = code
            record["error"] = watch.killed or _error_of(log)
        earlier = self.previous.get("stages", {}).get(name, {})
        if code == 0 and earlier.get("status") == "done" and any(m in log.read_text(errors="replace")
                                                                  for m in _SKIP_MARKS):
            record = {**earlier, "kept": f"{SKIPPED}: its outputs were complete; the figures are that call's"}
        return record

    def _python(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "stablemtl.cli", *args]

    # ----------------------------------------------------------------- the steps
    def step_raw(self) -> dict:
        cmd = [sys.executable, "-c", "import sys; from stablemtl.rehearse import write_raw; "
               "write_raw(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))",
               str(self.raw), str(self.images), str(self.render_scale), str(self.seed)]
        return self._child("raw data", cmd)

    def step_prepare(self) -> dict:
        from stablemtl.data.prepare import DATASETS

        records, status = {}, "done"
        for dataset in DATASETS:  # each resumes (prepare's journal): a rerun converts nothing twice
            cmd = self._python("prepare", dataset, "--raw", str(self.raw / dataset), "--quiet")
            if dataset == "kitti_depth":
                cmd += ["--eigen-list", str(self.raw / dataset / "eigen_test_files_with_gt.txt")]
            records[dataset] = rec = self._child(f"prepare {dataset}", cmd)
            if rec["status"] != "done":
                status = "failed"
                break
        total = {"status": status, "wall_s": round(sum(r["wall_s"] for r in records.values()), 1),
                 "peak_rss_gib": max(r["peak_rss_gib"] for r in records.values()),
                 "disk_written_gib": round(sum(r["disk_written_gib"] for r in records.values()), 4),
                 "datasets": records}
        failed = [f"{d}: {r['error']}" for d, r in records.items() if r["status"] != "done"]
        if failed:
            total["error"] = failed[0]
        return total

    def step_base(self) -> dict:
        cmd = [sys.executable, "-c", "import sys; from stablemtl.rehearse import write_base; "
               "write_base(sys.argv[1], float(sys.argv[2]), int(sys.argv[3]))",
               str(self.base), repr(float(self.width)), str(self.seed)]
        return self._child("base", cmd)

    def step_stage(self, stage: str, models=None) -> dict:
        """``stablemtl run --preset paper --only <stage>`` in the rehearsal's folders."""
        cmd = self._python("run", "--preset", "paper", "--run-name", RUN_NAME, "--only", stage[:2],
                           *(["--quiet"] if self.quiet else []), *self.stage_parameters(stage, models))
        return self._child(stage, cmd)

    def step_predict(self, kind: str, model_dir: Path, assemble: bool = False) -> dict:
        frames = self.out / "predict" / "frames"
        out = self.out / "predict" / kind
        cmd = [sys.executable, "-c", "import sys; from stablemtl.rehearse import measure_prediction; "
               "measure_prediction(*sys.argv[1:5], assemble=sys.argv[5] == 'assemble')", str(model_dir),
               str(frames), str(out), "cuda" if self._device().startswith("cuda") else self._device(),  # CUDA_VISIBLE_DEVICES
               "assemble" if assemble else "load"]
        record = self._child(f"predict {kind}", cmd)
        result = out / "timing.json"
        if record["status"] == "done" and result.is_file():
            record.update(json.loads(result.read_text()))
        return record

    # ----------------------------------------------------------------- the whole
    def run(self) -> dict:
        from stablemtl.stages import STAGES

        self.check()
        claim(self.out, "rehearsal", lambda f: (f / REPORT_JSON).is_file())
        self.report = self._header()
        stages = self.report["stages"]
        start = time.perf_counter()
        steps = [("raw data", self.step_raw), ("prepare", self.step_prepare), ("base", self.step_base)]
        for name, step in steps:
            stages[name] = step()
            self._write()
            if stages[name]["status"] != "done":
                return self._finish(start)
        for stage in STAGES:
            models = None
            if stage == STAGES[4] and stages.get(STAGES[3], {}).get("status") != "done":
                models = ["trivial", "single_stream"]  # the multi stream did not train: evaluate the rest
            record = stages[stage] = self.step_stage(stage, models)
            self._write()
            if record["status"] != "done" and stage != STAGES[3]:
                return self._finish(start)
        self._prediction(stages)
        return self._finish(start)

    def _prediction(self, stages: dict) -> None:
        """Both streams on one 576 x 768 frame pair, all seven tasks (the multi stream assembled from the
        trained single stream when its training did not run)."""
        from stablemtl.model.pipeline import MODEL_FILE

        frames = self.out / "predict" / "frames"
        write_frames(self.preprocessed, frames)
        trained = self.outputs / RUN_NAME
        for kind in KINDS:
            model, assemble = trained / kind / "model", False
            if kind == "multi_stream" and not (model / MODEL_FILE).is_file():
                model, assemble = trained / "single_stream" / "model", True
                stages.setdefault("notes", []).append(
                    "predict multi_stream: the multi stream did not train, so its prediction was timed with a "
                    "multi stream assembled in memory from the trained single stream (task attention at "
                    "initialisation; no files written)")
            stages[f"predict {kind}"] = self.step_predict(kind, model, assemble)
            self._write()

    def _header(self) -> dict:
        import psutil
        import torch

        previous = {}
        if (self.out / REPORT_JSON).is_file():
            try:
                previous = json.loads((self.out / REPORT_JSON).read_text())
            except (OSError, ValueError):
                previous = {}
        self.previous = previous if previous.get("settings", {}).get("width") == self.width else {}
        device = self._device()
        return {
            "command": " ".join(["stablemtl", "rehearse", *sys.argv[2:]]) if sys.argv[1:2] == ["rehearse"] else None,
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "settings": {"width": self.width, "steps": self.steps, "images": self.images,
                         "batch_per_device": self._batch(), "effective_batch": 32, "device": device,
                         "render_scale": self.render_scale, "seed": self.seed, "parameters": self.parameters},
            "machine": {"cpus": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / GIB, 1),
                        "platform": platform.platform(), "python": platform.python_version(),
                        "torch": torch.__version__, "stablemtl": stablemtl.__version__,
                        "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda") else
                        platform.processor() or platform.machine()},
            "folders": {"raw": str(self.raw), "preprocessed": str(self.preprocessed), "base": str(self.base),
                        "outputs": str(self.outputs), "results": str(self.results / RUN_NAME)},
            "stages": {},
        }

    def _finish(self, start: float) -> dict:
        self.report["wall_s"] = round(time.perf_counter() - start, 1)
        self.report["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.report.update(collect_figures(self.outputs / RUN_NAME, self.results / RUN_NAME))
        self.report["ok"] = all(r.get("status") == "done" for k, r in self.report["stages"].items() if k != "notes")
        self._write()
        return self.report

    def _write(self) -> None:
        formats.write_bytes(self.out / REPORT_JSON, (json.dumps(self.report, indent=1, default=str) + "\n").encode())
        formats.write_bytes(self.out / REPORT_MD, format_report(self.report).encode())


# --------------------------------------------------------------------------- the steps' own work (child processes)

def write_raw(root, images: int, render_scale: int, seed: int = DEFAULT_SEED) -> Path:
    """Raw miniatures of the eight datasets at the real resolutions under ``root/<dataset>``; a dataset
    already written (its ``stablemtl_raw.json`` present) is kept, a partial one written again."""
    from tqdm.auto import tqdm

    from stablemtl.data import raw
    from stablemtl.data.prepare import DATASETS

    root = Path(root)
    kept = 0
    for dataset in tqdm(DATASETS, desc="raw data", unit="dataset"):
        folder = root / dataset
        if (folder / RAW_META).is_file():
            kept += 1
            continue
        if folder.exists():
            shutil.rmtree(folder)  # a partial write of a killed rehearsal, inside the rehearsal's folder
        tmp = root / f".{dataset}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        raw.write_raw_miniature(dataset, tmp, count=images, size=raw.REAL_SIZES[dataset], seed=seed,
                                render_scale=render_scale)
        tmp.rename(folder)
    if kept == len(DATASETS):
        print(f"{root}: {SKIPPED} (every dataset written by an earlier call)")
    return root


def write_base(folder, width: float, seed: int = 0) -> Path:
    """The SD2-layout base at ``width`` (kept when it was written with the same width and seed)."""
    from stablemtl.model.sd2 import write_sd2_base

    folder = Path(folder)
    record = folder.parent / "rehearsal_base.json"
    wanted = {"width": width, "seed": seed}
    if (folder / PIPELINE_FILE).is_file() and record.is_file() and json.loads(record.read_text()) == wanted:
        print(f"{folder}: {SKIPPED} (written earlier with width {width} and seed {seed})")
        return folder
    write_sd2_base(folder, width=width, seed=seed)
    record.write_text(json.dumps(wanted) + "\n")
    return folder


def write_frames(preprocessed: Path, folder: Path) -> list[Path]:
    """A 576 x 768 frame pair (the prepared FlyingThings3D frames 0 and 1, resized) for the prediction."""
    import cv2

    from stablemtl.data.sources import SOURCES

    source = preprocessed / SOURCES["flying_things_3d"].root_hint / "train" / "image_clean"
    files = sorted(source.glob("*.png"))[:2]
    if len(files) < 2:
        raise FileNotFoundError(f"{source}: expected a prepared frame pair for the prediction step")
    out = []
    for i, file in enumerate(files):
        rgb = cv2.resize(formats.read_rgb(file), PREDICT_SIZE[::-1], interpolation=cv2.INTER_AREA)
        out.append(formats.write_rgb(folder / f"frame_{i}.png", rgb))
    return out


def measure_prediction(model_dir, frames, out, device, assemble: bool = False) -> dict:
    """Time one call of the pipeline on the first frame pair, every task of the model (``timing.json``
    in ``out``, and its outputs as ``<frame>/<task>.npy``, channels last). ``assemble``: ``model_dir``
    is a single stream, timed as the multi stream made from it (``MultiStream.from_single_stream`` with
    the paper preset's task attention, in memory; no files)."""
    import torch

    from stablemtl.devices import resolve_device
    from stablemtl.model.pipeline import MODEL_FILE, StableMTLPipeline, load_model
    from stablemtl.model.streams import MultiStream
    from stablemtl.predict import load_image

    dev = resolve_device(device)
    record = Path(model_dir) / MODEL_FILE
    made = {"model": str(Path(model_dir).resolve()), "model_written": record.stat().st_mtime_ns, "device": str(dev),
            "assembled": bool(assemble)}
    earlier = Path(out) / "timing.json"
    if earlier.is_file() and {k: json.loads(earlier.read_text()).get(k) for k in made} == made:
        print(f"{out}: {SKIPPED} (the same model and device)")
        return json.loads(earlier.read_text())
    start = time.perf_counter()
    if assemble:
        single = load_model(model_dir, expect="single_stream")
        multi = MultiStream.from_single_stream(single, **load_preset("paper")["model"]["task_attention"])
        del single
        pipe = StableMTLPipeline.from_model(multi.eval()).to(dev)
    else:
        pipe = StableMTLPipeline.from_pretrained(model_dir).to(dev)
    load_s = time.perf_counter() - start
    files = sorted(Path(frames).glob("*.png"))
    rgb, nxt = (torch.from_numpy(load_image(f)[0]).permute(2, 0, 1)[None].to(dev)
                for f in files[:2])
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        torch.cuda.synchronize(dev)
    start = time.perf_counter()
    with torch.no_grad():
        result = pipe(rgb, tasks=list(pipe.config.tasks), next_images=nxt)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    timing = {**made, "size": list(rgb.shape[-2:]), "tasks": sorted(result.predictions), "load_s": round(load_s, 2),
              "s_per_image": round(time.perf_counter() - start, 2),
              "cuda_peak_gib": round(torch.cuda.max_memory_allocated(dev) / GIB, 3) if dev.type == "cuda" else None}
    del pipe
    for task, output in result.predictions.items():  # the timed call's outputs, channels last, float32
        formats.write_npy(Path(out) / files[0].stem / f"{task}.npy",
                          output[0].float().permute(1, 2, 0).cpu().numpy().astype("float32"))
    (Path(out) / "timing.json").write_text(json.dumps(timing, indent=1) + "\n")
    print(json.dumps(timing))
    return timing


# --------------------------------------------------------------------------- the command line

def cmd_rehearse(args) -> int:
    from stablemtl.run import RunError, parse_parameters

    try:
        parameters = parse_parameters(args.parameter)
        rehearsal = Rehearsal(args.out, width=args.width, steps=args.steps, images=args.images, device=args.device,
                              batch_per_device=args.batch_per_device, parameters=parameters,
                              render_scale=args.render_scale, quiet=args.quiet)
        report = rehearsal.run()  # checks every argument and the folder first (``check``)
    except (RehearsalError, RunError) as err:
        print(f"stablemtl rehearse: {err}", file=sys.stderr)
        return 2
    print(format_report(report))
    print(f"report: {rehearsal.out / REPORT_MD} and {rehearsal.out / REPORT_JSON}")
    return 0 if report["ok"] else 1


def add_rehearse_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "rehearse", help="run the paper preset's code path end to end on real-size miniatures, nothing downloaded",
        description="Write raw miniatures of the eight datasets at their real resolutions, prepare them with "
                    "`stablemtl prepare`, write a Stable Diffusion 2 layout base (random weights, the real SD2 "
                    "tokenizer) at a width factor, run `stablemtl run --preset paper` stage by stage with few steps "
                    "and images, time a 576 x 768 prediction of both streams, and report time, memory and disk per "
                    "stage (rehearsal.md, rehearsal.json). Resumable.")
    p.add_argument("--width", type=float, default=DEFAULTS["width"],
                   help=f"channel width of the SD2 base as a fraction of SD2's (1.0: SD2's exact size; default "
                        f"{DEFAULTS['width']})")
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="optimizer steps per stream (default 2)")
    p.add_argument("--images", type=int, default=DEFAULTS["images"],
                   help="frames per dataset and images per benchmark (default 2)")
    p.add_argument("--batch-per-device", type=int, default=None,
                   help="micro-batch size (default: 16 on a GPU, 1 on the CPU; the effective batch stays 32)")
    p.add_argument("--render-scale", type=int, default=DEFAULTS["render_scale"],
                   help="render the raw frames at 1/N of the real size, then upsample (default 4)")
    p.add_argument("--device", default="auto",
                   help="auto|cpu|cuda[:N] (default auto: the GPU when there is one, else the CPU)")
    p.add_argument("--out", default="outputs/rehearsal", metavar="DIR",
                   help="the output folder: the rehearsal's data, models, logs and report (default: outputs/rehearsal)")
    p.add_argument("-p", "--parameter", action="append", default=[], metavar="KEY=VALUE",
                   help="a notebook parameter passed to the stages that declare it, as `stablemtl run -p` "
                        "(e.g. -p mixed_precision=bf16 -p gradient_checkpointing=true)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_rehearse)
