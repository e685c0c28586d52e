"""Nothing lost, every bad input named (issue #19): safe names, ownership markers and no overwriting,
``--force`` within the kit's own outputs, set-aside generations, the parameter and preset schema, YAML
errors, run locks, and worker processes that die with their parent. Fast: no notebook is executed."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from stablemtl import guard, kernel, run
from stablemtl.cli import main
from stablemtl.guard import MARKER, InputError, RunLock, check_name, claim
from stablemtl.schema import SPECS, check_parameters

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def project(tmp_path, monkeypatch):
    """An empty project folder; the CLI's roots are its defaults (and restored after the test)."""
    monkeypatch.setenv("STABLEMTL_PROJECT", str(tmp_path))
    for name in ("OUTPUT_DIR", "RESULTS_DIR", "DATA_DIR", "BASE_DIR", "PREPROCESSED_DIR", "BASE_CKPT_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def preset_file(folder: Path, text: str, name: str = "custom.yaml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


# --------------------------------------------------------------------------- names

@pytest.mark.parametrize("name", ["../../victim", "/etc", "a/b", "..", ".hidden", "x..y", "", "a b", "-x"])
def test_unsafe_names_are_refused(name):
    with pytest.raises(InputError, match="not a safe folder name"):
        check_name(name, "run name")
    assert check_name("demo_2.v-1", "run name") == "demo_2.v-1"


def test_a_preset_named_outside_the_project_writes_nothing(project, capsys):
    victim = project.parent / f"{project.name}-victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    path = preset_file(project, (ROOT / "stablemtl/presets/smoke.yaml").read_text().replace(
        "name: smoke", f"name: ../../{project.name}-victim"))
    code, err = cli(capsys, "run", "--preset", str(path), "--only", "01", "--quiet")
    assert code == 2 and "preset name '../../" in err and "not a safe folder name" in err
    assert (victim / "keep.txt").read_text() == "precious" and sorted(os.listdir(victim)) == ["keep.txt"]
    assert not (project / "data").exists() and not (project / "results").exists()


def test_a_run_name_with_a_separator_is_refused(project, capsys):
    code, err = cli(capsys, "run", "--preset", "smoke", "--run-name", "../escape", "--only", "01")
    assert code == 2 and "run name '../escape'" in err and "--run-name" in err
    assert not (project / "results").exists()


# --------------------------------------------------------------------------- markers and no overwriting

def test_base_into_a_folder_of_user_files_is_refused(project, capsys):
    (project / "my_models").mkdir()
    (project / "my_models" / "thesis.tex").write_text("years of work")
    code, err = cli(capsys, "base", "--preset", "smoke", "--out", "my_models")
    assert code == 2 and str(project / "my_models") in err and "thesis.tex" in err and "choose a new" in err
    assert (project / "my_models" / "thesis.tex").read_text() == "years of work"
    assert not (project / "my_models" / MARKER).exists()


def test_data_into_a_folder_of_user_files_is_refused(project, capsys):
    (project / "mine").mkdir()
    (project / "mine" / "notes.txt").write_text("x")
    code, err = cli(capsys, "data", "--preset", "smoke", "--root", "mine")
    assert code == 2 and str(project / "mine") in err and "no .stablemtl" in err
    assert os.listdir(project / "mine") == ["notes.txt"]


def test_run_force_does_not_overwrite_a_foreign_data_root(project, capsys, monkeypatch):
    (project / "elsewhere").mkdir()
    (project / "elsewhere" / "real.npy").write_bytes(b"data")
    monkeypatch.setenv("DATA_DIR", str(project / "elsewhere"))
    code, err = cli(capsys, "run", "--preset", "smoke", "--only", "01", "--force", "--quiet")
    assert code == 2 and str(project / "elsewhere") in err and "--force does not change this" in err
    assert os.listdir(project / "elsewhere") == ["real.npy"]
    assert not (project / "results" / "smoke").exists()  # refused before anything was written


def test_a_foreign_training_folder_is_refused_before_any_stage(project, capsys):
    folder = project / "outputs" / "smoke" / "single_stream"
    folder.mkdir(parents=True)
    (folder / "weights.bin").write_bytes(b"\0")
    code, err = cli(capsys, "run", "--preset", "smoke", "--only", "03", "--quiet")
    assert code == 2 and str(folder) in err and "training" in err
    assert os.listdir(folder) == ["weights.bin"]



def test_a_read_only_output_folder_is_refused_before_any_stage(project, capsys, monkeypatch):
    """OUTPUT_DIR on a read-only disk (os.access says so: a read-only mount, or another user's folder)
    stops the run before stage 01, naming the folder, exit 2; before, stage 02 failed in a notebook."""
    read_only = project / "ro"
    read_only.mkdir()
    monkeypatch.setenv("OUTPUT_DIR", str(read_only / "outputs"))
    access = os.access
    monkeypatch.setattr(run.os, "access", lambda path, mode: Path(path) != read_only and access(path, mode))
    code, err = cli(capsys, "run", "--preset", "smoke", "--quiet")
    assert code == 2 and f"cannot write {read_only / 'outputs' / 'smoke' / 'base'}: {read_only} is " \
                          f"read-only or not writable" in err
    assert not (project / "results").exists() and not (project / "data").exists()  # nothing written


@pytest.mark.parametrize("error", [errno.EROFS, errno.EACCES])
def test_a_folder_that_cannot_be_created_is_named_where_a_notebook_creates_it(tmp_path, monkeypatch, error):
    """``guard.claim`` creates every folder the kit writes (in a notebook too, where the runner's check
    above cannot see a read-only pseudo-filesystem): its failure is an InputError naming the folder."""
    target = tmp_path / "outputs" / "smoke" / "base"

    def refused(self, *args, **kwargs):
        raise (PermissionError if error == errno.EACCES else OSError)(error, os.strerror(error), str(self))

    monkeypatch.setattr(Path, "mkdir", refused)
    with pytest.raises(InputError, match=rf"cannot write {target}: {os.strerror(error)} \(a read-only or protected "
                                         rf"folder\); give the command a writable place \(DATA_DIR, BASE_DIR"):
        claim(target, "base")

def test_data_replaces_only_its_own_outputs(project, capsys):
    code, _ = cli(capsys, "data", "--preset", "smoke", "--root", "mini")
    assert code == 0 and json.loads((project / "mini" / MARKER).read_text())["kind"] == "data"
    (project / "mini" / "my_notes.txt").write_text("mine")
    code, _ = cli(capsys, "data", "--preset", "smoke", "--root", "mini")  # rewrites its datasets
    assert code == 0 and (project / "mini" / "my_notes.txt").read_text() == "mine"


@pytest.mark.parametrize("kind, files, recognise", [
    ("data", ["hypersim/train/stablemtl_dataset.json"], "stablemtl.data.mini:is_mini_root"),
    ("base", ["model_index.json", "stablemtl_base.json", "unet/config.json"], "stablemtl.model.base:is_built_base"),
    ("training", ["checkpoint/latest/state.json", "train_log.csv"], "stablemtl.stages:is_training_folder"),
    ("results", ["manifest.json", "metrics.csv"], "stablemtl.run:is_results_folder"),
])
def test_earlier_kit_outputs_without_a_marker_are_adopted(tmp_path, kind, files, recognise):
    import importlib

    module, name = recognise.split(":")
    folder = tmp_path / kind
    for file in files:
        (folder / file).parent.mkdir(parents=True, exist_ok=True)
        (folder / file).write_text("{}")
    notes: list[str] = []
    claim(folder, kind, getattr(importlib.import_module(module), name), log=notes.append)
    assert json.loads((folder / MARKER).read_text())["kind"] == kind and "adopted" in notes[0]
    assert all((folder / f).is_file() for f in files)


def test_the_committed_demo_results_are_recognised():
    assert run.is_results_folder(ROOT / "results" / "reference" / "demo")
    claim(ROOT / "results" / "reference" / "demo", "results", run.is_results_folder, create=False)  # checks, writes nothing


def test_a_folder_marked_for_another_kind_is_refused(tmp_path):
    claim(tmp_path / "x", "data")
    with pytest.raises(InputError, match=r"holds the kit's data .*not base"):
        claim(tmp_path / "x", "base")


# --------------------------------------------------------------------------- set-aside generations

def _training(folder: Path, tag: str, finished: bool = True) -> Path:
    (folder / "checkpoint" / "latest").mkdir(parents=True)
    (folder / "checkpoint" / "latest" / "state.json").write_text(json.dumps({"tag": tag}))
    (folder / "train_log.csv").write_text(tag)
    if finished:
        (folder / "model").mkdir()
    return folder


def test_set_aside_keeps_the_older_generation_until_a_new_first_checkpoint(tmp_path):
    from stablemtl.stages import drop_older_when_checkpointed, set_aside

    out = tmp_path / "single_stream"
    set_aside(_training(out, "A"))
    set_aside(_training(out, "B"))
    older, previous = tmp_path / "single_stream.previous.older", tmp_path / "single_stream.previous"
    assert (older / "train_log.csv").read_text() == "A" and (previous / "train_log.csv").read_text() == "B"
    out.mkdir()
    assert drop_older_when_checkpointed(out) == [] and older.is_dir()  # no new checkpoint yet: A kept
    set_aside(_training(out, "C"))  # C had a checkpoint, so A was due; B -> older, C -> previous
    assert not older.with_name("single_stream.previous.older-1").exists()
    assert (older / "train_log.csv").read_text() == "B" and (previous / "train_log.csv").read_text() == "C"
    _training(out, "D", finished=False)
    assert drop_older_when_checkpointed(out) == [older] and not older.exists() and previous.is_dir()


def test_set_aside_refuses_a_foreign_previous_folder(tmp_path):
    from stablemtl.stages import set_aside

    (tmp_path / "single_stream.previous").mkdir()
    (tmp_path / "single_stream.previous" / "mine.txt").write_text("x")
    with pytest.raises(InputError, match=r"single_stream.previous is not empty"):
        set_aside(_training(tmp_path / "single_stream", "A"))
    assert (tmp_path / "single_stream.previous" / "mine.txt").is_file()
    assert (tmp_path / "single_stream" / "model").is_dir()


# --------------------------------------------------------------------------- parameters and presets

def test_iterations_abc_is_named_before_any_stage(project, capsys):
    code, err = cli(capsys, "run", "--preset", "smoke", "-p", "iterations=abc", "--only", "03")
    assert code == 2 and "iterations='abc'" in err and "from -p" in err and "integer >= 1" in err
    assert not (project / "results").exists()


def test_a_single_task_name_is_a_one_item_list():
    declared = {"03_train_single_stream": run.declared_parameters(ROOT / "notebooks" / "03_train_single_stream.ipynb")}
    assert check_parameters({"tasks": "depth"}, declared) == {"tasks": ["depth"]}
    _, given = run.check_run_parameters(["05_evaluate"], {"models": "trivial", "benchmarks": "kitti_depth"})
    assert given == {"models": ["trivial"], "benchmarks": ["kitti_depth"]}


@pytest.mark.parametrize("pair, only, named", [
    ("batch_per_device=0", "03", "batch_per_device=0"),
    ("max_images=0", "05", "max_images=0"),
    ("tasks=[depth, telepathy]", "03", "'telepathy' is not allowed"),
    ("lr=-1", "03", "lr=-1"),
    ("models=[trivial, trivial]", "05", "models="),
    ("device=gpu0", "05", "device='gpu0'"),
    ("gradient_checkpointing=maybe", "03", "gradient_checkpointing='maybe'"),
    ("normals=bogus", "03", "normals='bogus' is not a valid choice"),
    ("iterations=[1", "03", "not valid YAML"),
])
def test_bad_parameters_exit_2_naming_the_parameter(project, capsys, pair, only, named):
    code, err = cli(capsys, "run", "--preset", "smoke", "-p", pair, "--only", only)
    assert code == 2 and named in err and "-p" in err


def test_a_batch_split_that_does_not_divide_is_named_before_training(project, capsys):
    code, err = cli(capsys, "run", "--preset", "smoke", "-p", "batch_per_device=3", "--only", "03")
    assert code == 2 and "03_train_single_stream" in err and "effective batch 2 is not a multiple of 3" in err


def test_every_notebook_knob_has_a_type_in_the_schema():
    knobs = {k for stage in run.STAGES for k in run.declared_parameters(ROOT / "notebooks" / f"{stage}.ipynb")}
    assert knobs - set(run.RUNNER_PARAMETERS) <= set(SPECS), knobs - set(SPECS)


def test_a_yaml_syntax_error_names_the_file_and_line(project, capsys):
    path = preset_file(project, "name: custom\nseed: 1\ntrain:\n  lr: [0.1\n  warmup: 2\n")
    code, err = cli(capsys, "run", "--preset", str(path), "--only", "01")
    assert code == 2 and str(path) in err and "line 5" in err and "YAML syntax error" in err


@pytest.mark.parametrize("text, named, line", [
    ("name: custom\nseed: 1\ntrain:\n  single_stream: {iterations: abc}\n", "train.single_stream.iterations='abc'", 4),
    ("name: custom\ntrian:\n  lr: 1\n", "unknown preset field 'trian'", 2),
    ("name: custom\nseed: -3\n", "seed=-3", 2),
    ("name: custom\ndata:\n  hypersim: {count: 0, size: [8, 8]}\n", "data.hypersim.count=0", 3),
])
def test_bad_preset_fields_name_the_file_and_line(project, capsys, text, named, line):
    path = preset_file(project, text)
    code, err = cli(capsys, "base", "--preset", str(path))
    assert code == 2 and named in err and f"{path}, line {line}" in err


# --------------------------------------------------------------------------- locks and interrupts

def test_a_run_folder_in_use_by_a_live_pid_is_refused(project, capsys):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        folder = project / "results" / "smoke"
        claim(folder, "results")
        (folder / guard.LOCK).write_text(json.dumps({"pid": holder.pid, "started": "now", "command": "stablemtl run"}))
        code, err = cli(capsys, "run", "--preset", "smoke", "--only", "01", "--quiet")
        assert code == 2 and f"pid {holder.pid}" in err and "in use" in err
        assert json.loads((folder / guard.LOCK).read_text())["pid"] == holder.pid  # left alone
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_is_taken_over_with_a_note(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (tmp_path / guard.LOCK).write_text(json.dumps({"pid": pid}))
    notes: list[str] = []
    with RunLock(tmp_path, log=notes.append):
        assert json.loads((tmp_path / guard.LOCK).read_text())["pid"] == os.getpid()
        with pytest.raises(InputError, match=f"pid {os.getpid()}"):
            RunLock(tmp_path).acquire()  # held by this live process
    assert "stale lock" in notes[0] and str(pid) in notes[0]
    assert not (tmp_path / guard.LOCK).exists()  # released


def test_ctrl_c_records_the_stage_and_releases_the_lock(project, monkeypatch):
    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(run, "_execute", interrupted)
    with pytest.raises(run.RunError, match="interrupted during stage 01_prepare_data") as err:
        run.run_study("smoke", only="01", progress=False, log=lambda *_: None)
    assert err.value.code == 130
    folder = project / "results" / "smoke"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["stages"]["01_prepare_data"]["status"] == "interrupted" and not (folder / guard.LOCK).exists()



@pytest.mark.slow
@pytest.mark.skipif(os.name != "posix", reason="SIGINT to this process is a POSIX test")
def test_ctrl_c_in_a_running_cell_kills_the_kernel_without_a_traceback(tmp_path, capfd):
    """A real kernel in a long cell, then SIGINT to the runner's process (what Ctrl-C sends): the kernel
    and its process group die at once, KeyboardInterrupt comes out of the session (the runner turns it
    into exit 130), and neither the kernel nor papermill prints a traceback (issue #30)."""
    import threading

    import nbformat
    import papermill

    started = tmp_path / "started"
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        f"import os, time\nopen({str(started)!r}, 'w').write(str(os.getpid()))\ntime.sleep(120)")])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    source = tmp_path / "sleep.ipynb"
    nbformat.write(nb, source)

    def press_ctrl_c():
        for _ in range(600):
            if started.exists() and started.read_text():
                break
            time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGINT)

    # as in a terminal: a test run in the background of a shell (as CI may be) inherits SIGINT ignored
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    threading.Thread(target=press_ctrl_c, daemon=True).start()
    begun = time.perf_counter()
    try:
        with pytest.raises(KeyboardInterrupt):
            with kernel.session(progress=False) as manager:
                papermill.execute_notebook(str(source), str(tmp_path / "out.ipynb"), kernel_name="python3",
                                           progress_bar=False, kernel_manager_class=manager)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    finally:
        signal.signal(signal.SIGINT, before)
    assert time.perf_counter() - begun < 60  # not the cell's 120 s
    pid = int(started.read_text())
    for _ in range(50):
        if not guard.pid_alive(pid):
            break
        time.sleep(0.1)
    assert not guard.pid_alive(pid)
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err and "ZMQError" not in err and "Kernel died" not in err, err[-2000:]


# --------------------------------------------------------------------------- worker processes

_POOL = """
import sys, time
from stablemtl.data import jobs
pool = jobs.worker_pool(2)
futures = [pool.submit(time.sleep, 60) for _ in range(2)]
time.sleep(1.0)
print(" ".join(str(p) for p in pool._processes), flush=True)
time.sleep(60)
"""

_LOADER = """
import os, time
import psutil
from stablemtl.data.mixing import TaskMixingSampler, micro_batch_loader

class Slow:
    def __len__(self):
        return 4
    def __getitem__(self, key):
        time.sleep(60)

sampler = TaskMixingSampler({("depth", "hypersim"): 4}, ["depth"], 1, 1, {"depth": {"hypersim": 1.0}}, 0)
it = iter(micro_batch_loader(sampler, {("depth", "hypersim"): Slow()}, lambda s, t: s, num_workers=2))
time.sleep(1.0)
print(" ".join(str(c.pid) for c in psutil.Process().children()), flush=True)
next(it)
"""


@pytest.mark.parametrize("script", [_POOL, _LOADER], ids=["data_pool", "dataloader"])
def test_worker_processes_die_with_their_parent(script):
    import psutil

    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        workers = [int(p) for p in parent.stdout.readline().split()]
        assert len(workers) >= 2 and all(psutil.pid_exists(p) for p in workers)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.time() + 15
        alive = workers
        while alive and time.time() < deadline:
            alive = [p for p in alive if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
            time.sleep(0.2)
        assert not alive, f"orphaned workers {alive} of the SIGKILLed parent {parent.pid}"
    finally:
        if parent.poll() is None:
            parent.kill()


# --------------------------------------------------------------------------- python -m stablemtl.train

def _default_config(**changes) -> str:
    import dataclasses

    from stablemtl.train_config import TrainConfig

    return json.dumps(dict(dataclasses.asdict(TrainConfig()), **changes))


@pytest.mark.parametrize("text, named", [
    ('{"kind": "single_stream",', "not valid JSON at line 1, column 26"),
    ("[1, 2]", "expected a JSON object of TrainConfig fields, found a list"),
    (b'{"kind": "\xe9"}', "not UTF-8 text (byte 10)"),
    (_default_config(colour=1), "unknown training option(s) ['colour']"),
    (_default_config(kind="triple"), "unknown model kind 'triple'"),
    (_default_config(iterations="many"), "training option iterations='many': expected an integer"),
    (_default_config(tasks=5), "training option tasks=5: expected a list"),
    (_default_config(tasks=[1]), "training option tasks=[1]: expected a list of task names"),
    (_default_config(keep_backups=True), "training option keep_backups=True: expected an integer or null"),
    (_default_config(base="/nowhere"), "base model directory '/nowhere' does not exist"),
], ids=["syntax", "list", "not_utf8", "unknown", "kind", "type", "tasks_type", "task_type", "bool_for_int", "base"])
def test_train_module_names_a_bad_configuration_without_a_traceback(tmp_path, capsys, text, named):
    """``python -m stablemtl.train --config F`` (what ``accelerate launch`` runs): a bad configuration is one
    line naming the file and the fault, exit 2 (issue #30)."""
    from stablemtl import train

    path = tmp_path / "run.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    assert train.main(["--config", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"python -m stablemtl.train: {path}: ") and named in err and "Traceback" not in err


def test_train_module_names_a_missing_file_ctrl_c_and_an_unwritable_folder(tmp_path, capsys, monkeypatch):
    import errno

    from stablemtl import train

    assert train.main(["--config", str(tmp_path / "none.json")]) == 2
    assert f"no training configuration at {tmp_path / 'none.json'}" in capsys.readouterr().err
    path = tmp_path / "run.json"
    path.write_text(_default_config())
    monkeypatch.setattr(train, "read_config", lambda _path: object())
    for fault, code, named in [(KeyboardInterrupt(), 130, "interrupted; what was written stays"),
                               (PermissionError(errno.EROFS, "Read-only file system", "/ro/run"), 2,
                                "cannot write /ro/run: Read-only file system (a read-only or protected folder); give "
                                "the command a writable place (the configuration's output_dir)")]:
        def failing(*_args, **_kwargs):
            raise fault

        monkeypatch.setattr(train, "train", failing)
        assert train.main(["--config", str(path)]) == code
        err = capsys.readouterr().err
        assert named in err and "Traceback" not in err
    monkeypatch.setattr(train, "train", lambda *_a, **_k: 1 / 0)  # a bug keeps its traceback
    with pytest.raises(ZeroDivisionError):
        train.main(["--config", str(path)])
