"""The numbered notebooks and ``stablemtl run``: every notebook executed with the smoke preset through
papermill, the runner's skipping, forcing, parameter checks and failure reports, and the bad-input
messages of the stages."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import torch

from stablemtl.model.pipeline import MODEL_FILE
from stablemtl import paths, stages
from stablemtl.benchmarks import BENCHMARKS
from stablemtl.guard import StageError
from stablemtl.paths import MODELS
from stablemtl.run import RunError, declared_parameters, notebook_dir, parse_parameters, run_study, select_stages

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def in_project(monkeypatch, smoke_study):
    _, project, _ = smoke_study
    monkeypatch.setenv("STABLEMTL_PROJECT", str(project))
    for name in ("OUTPUT_DIR", "PREPROCESSED_DIR", "BASE_CKPT_DIR"):
        monkeypatch.delenv(name, raising=False)
    return project


@pytest.mark.parametrize("stage", stages.STAGES)
def test_notebooks_are_committed_stripped_with_one_parameters_cell(stage):
    path = ROOT / "notebooks" / f"{stage}.ipynb"
    nb = nbformat.read(str(path), as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path}: outputs not stripped"
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    params = declared_parameters(path)
    assert params["preset"] == "demo" and params["run_name"] is None  # the defaults are the demo preset
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith(f"# {stage[:2]} ")


@pytest.mark.slow
def test_smoke_study_runs_every_notebook(smoke_study):
    study, project, lines = smoke_study
    manifest = json.loads((study.results_dir / "manifest.json").read_text())
    assert [manifest["stages"][s]["status"] for s in stages.STAGES] == ["done"] * len(stages.STAGES)
    assert manifest["seed"] == 2024 and manifest["preset_name"] == "smoke"
    assert set(manifest["data_split_hashes"]) >= {"hypersim", "vkitti", "mid"}
    assert manifest["directories"] == {"data": "data/smoke", "base": "outputs/smoke/base", "outputs": "outputs/smoke",
                                       "results": "results/smoke"}  # inside the project: relative to it
    for stage in stages.STAGES:
        executed = nbformat.read(str(study.results_dir / "notebooks" / f"{stage}.ipynb"), as_version=4)
        code = [c for c in executed.cells if c.cell_type == "code"]
        assert all(c.execution_count is not None for c in code)  # every cell ran
        assert not any(o.get("output_type") == "error" for c in code for o in c.outputs)
        injected = [c for c in executed.cells if "injected-parameters" in c.metadata.get("tags", [])]
        assert len(injected) == 1 and 'preset = "smoke"' in injected[0].source
    # the notebooks wrote into the project: data, base model, checkpoints, results
    assert (project / "data" / "smoke" / "hypersim" / "train" / "stablemtl_dataset.json").is_file()
    assert (project / "outputs" / "smoke" / "base" / "model_index.json").is_file()
    assert (project / "outputs" / "smoke" / "multi_stream" / "model" / MODEL_FILE).is_file()
    with open(study.results_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    got = {(r["model"], r["benchmark"]) for r in rows}
    assert got == {(m, b) for m in MODELS for b in BENCHMARKS}
    main = (study.results_dir / "tables" / "main.md").read_text()
    assert "multi_stream" in main and "single_stream" in main and "trivial" in main
    assert (study.results_dir / "figures" / "training_curves.png").stat().st_size > 1000
    assert "Targets" in (study.results_dir / "summary.md").read_text()
    # the training curves live in the training notebooks (an embedded PNG)
    nb03 = nbformat.read(str(study.results_dir / "notebooks" / "03_train_single_stream.ipynb"), as_version=4)
    assert any("image/png" in o.get("data", {}) for c in nb03.cells if c.cell_type == "code" for o in c.outputs)


def _ran(lines: list[str]) -> list[str]:
    """The stages a runner log says it executed."""
    return [line.split("] ")[1] for line in lines if line.startswith("[") and "skipped" not in line]


@pytest.mark.slow
def test_a_second_run_skips_every_stage_and_a_changed_parameter_reruns_its_stage_and_the_later_ones(
        smoke_study, in_project):
    study, _, _ = smoke_study
    done = {s: (study.stage_dir(s) / paths.DONE_FILE).read_text() for s in stages.STAGES}
    lines: list[str] = []
    run_study("smoke", progress=False, log=lines.append)
    assert sum("done, skipped" in line for line in lines) == len(stages.STAGES) and _ran(lines) == []
    assert {s: (study.stage_dir(s) / paths.DONE_FILE).read_text() for s in stages.STAGES} == done
    # a knob of stage 05 only: 05 and 06 (which reads 05) run, nothing before them
    lines.clear()
    run_study("smoke", parameters={"max_images": 2}, progress=False, log=lines.append)
    assert _ran(lines) == ["05_evaluate", "06_results"]
    with open(study.results_dir / "metrics.csv", newline="") as f:
        assert {int(r["n_images"]) for r in csv.DictReader(f)} == {2}
    for stage in stages.STAGES[:4]:  # untouched: same done.json, same trained model
        assert (study.stage_dir(stage) / paths.DONE_FILE).read_text() == done[stage]
    # --force of one stage alone: the stages that read it run on the next call, and only them
    run_study("smoke", only="05", force=True, parameters={"max_images": 2}, progress=False, log=lambda *_: None)
    lines.clear()
    run_study("smoke", parameters={"max_images": 2}, progress=False, log=lines.append)
    assert _ran(lines) == ["06_results"]
    # back to the defaults: 05 and 06 again
    lines.clear()
    run_study("smoke", progress=False, log=lines.append)
    assert _ran(lines) == ["05_evaluate", "06_results"]
    manifest = json.loads((study.results_dir / "manifest.json").read_text())["stages"]
    assert manifest["06_results"]["status"] == "done" and manifest["01_prepare_data"]["status"] == "done"


@pytest.mark.slow
def test_the_stage_hash_covers_knobs_preset_sections_and_what_a_stage_reads(smoke_study, in_project):
    from stablemtl.run import reads, stage_hash

    study, _, _ = smoke_study
    knobs = {"preset": "smoke", "run_name": None, "models": list(MODELS)}
    base = {s: stage_hash(study, s, knobs) for s in stages.STAGES}
    assert len(set(base.values())) == len(stages.STAGES)
    # the run name is not a knob of a stage: stage 01 and 02 of another run of the preset are the same
    assert stage_hash(study, "01", dict(knobs, run_name="other")) == base["01_prepare_data"]
    assert stage_hash(study, "05", dict(knobs, max_images=2)) != base["05_evaluate"]
    changed = stages.Study(dict(study.preset, evaluate={"resolution": {}}), study.run_name, study.results_dir,
                          study.output_dir, study.data_root, study.base_dir)
    assert stage_hash(changed, "05", knobs) != base["05_evaluate"]
    assert stage_hash(changed, "03", knobs) == base["03_train_single_stream"]
    longer = dict(study.preset, train=dict(study.preset["train"], single_stream={"iterations": 99}))
    longer = stages.Study(longer, study.run_name, study.results_dir, study.output_dir, study.data_root, study.base_dir)
    assert stage_hash(longer, "03", knobs) != base["03_train_single_stream"]
    assert stage_hash(longer, "02", knobs) == base["02_build_model"]
    # how the data is read never changes a trained model: no retraining for more workers
    workers = dict(study.preset, train=dict(study.preset["train"], num_workers=2))
    workers = stages.Study(workers, study.run_name, study.results_dir, study.output_dir, study.data_root, study.base_dir)
    assert stage_hash(workers, "03", knobs) == base["03_train_single_stream"]
    # evaluating the trivial row alone does not read the trainings
    assert reads("05", {"models": ["trivial"]}) == ("01",)
    assert reads("05", {"models": ["multi_stream"]}) == ("01", "04") and reads("05", {}) == ("01", "02", "03", "04")


@pytest.mark.slow
def test_another_run_of_the_preset_shares_its_data_and_reruns_on_changed_parameters(in_project):
    lines: list[str] = []
    few = dict(only="05", run_name="few", progress=False, log=lines.append)
    run_study("smoke", parameters={"models": ["trivial"], "max_images": 1}, **few)
    lines.clear()
    run_study("smoke", parameters={"models": ["trivial"], "max_images": 1}, **few)
    assert any("done, skipped" in line for line in lines)
    lines.clear()
    run_study("smoke", parameters={"models": ["trivial"], "max_images": 2}, **few)
    assert not any("skipped" in line for line in lines)
    with open(in_project / "results" / "few" / "metrics.csv", newline="") as f:
        counts = {int(r["n_images"]) for r in csv.DictReader(f)}
    assert max(counts) == 2


@pytest.mark.slow
def test_unknown_or_runner_parameters_are_rejected_before_any_work(in_project):
    with pytest.raises(RunError, match=r"unknown parameter 'iteration'.*iterations"):
        run_study("smoke", only="03", parameters={"iteration": 5}, run_name="typo", progress=False)
    with pytest.raises(RunError, match="--run-name"):
        run_study("smoke", parameters={"run_name": "x"}, progress=False)
    with pytest.raises(RunError, match=r"normals='bogus' is not a valid choice; valid: 'as_stored', 'facing'"):
        run_study("smoke", parameters={"normals": "bogus"}, run_name="typo", progress=False)
    with pytest.raises(RunError, match="unknown preset 'nope'"):
        run_study("nope", progress=False)
    with pytest.raises(RunError, match="unknown stage '09'"):
        select_stages("03,09")
    with pytest.raises(RunError, match="key=value"):
        parse_parameters(["iterations"])
    assert parse_parameters(["tasks=[depth, normal]", "lr=1e-3", "max_images=null"]) == \
        {"tasks": ["depth", "normal"], "lr": 1e-3, "max_images": None}
    assert not (in_project / "results" / "typo").exists()


def test_a_missing_stage_output_names_the_stage_and_how_to_make_it(tmp_path, monkeypatch):
    monkeypatch.setenv("STABLEMTL_PROJECT", str(tmp_path))
    monkeypatch.delenv("OUTPUT_DIR", raising=False)
    with pytest.raises(RunError, match=r"stage 01_prepare_data .*stablemtl run --only 01"):
        run_study("smoke", only="03", progress=False)
    study = stages.context("smoke")
    with pytest.raises(StageError, match=r"stage 05_evaluate of run 'smoke' has not finished: .*metrics.csv"):
        stages.check_inputs(study, "06")
    assert not (tmp_path / "results" / "smoke").exists()  # nothing started


@pytest.mark.slow
def test_a_failing_cell_is_reported_with_notebook_and_cell(in_project):
    with pytest.raises(RunError) as err:
        # valid to the schema, refused inside the notebook (the optimizer needs CUDA or bitsandbytes)
        run_study("smoke", only="03", parameters={"optimizer": "adam8bit" if torch.cuda.is_available() else
                                                  "adam_fused"}, run_name="broken", progress=False)
    message = str(err.value)
    assert "03_train_single_stream" in message and "cell [" in message and "optimizer" in message
    executed = in_project / "results" / "broken" / "notebooks" / "03_train_single_stream.ipynb"
    assert executed.is_file() and "optimizer" in executed.read_text()  # kept, with the error
    manifest = json.loads((in_project / "results" / "broken" / "manifest.json").read_text())
    assert manifest["stages"]["03_train_single_stream"]["status"] == "failed"


@pytest.mark.slow
def test_a_single_task_baseline_runs_through_the_notebooks(in_project):
    run_study("smoke", only="03,05", parameters={"tasks": ["depth"], "iterations": 2,
                                                 "models": ["single_stream"]}, run_name="depth_only",
              progress=False, log=lambda *_: None)
    with open(in_project / "results" / "depth_only" / "metrics.csv", newline="") as f:
        benchmarks = {r["benchmark"] for r in csv.DictReader(f)}
    assert benchmarks == {"kitti_depth", "diode_depth"}
    # a killed training (no done.json, no final model yet) resumes from its checkpoint
    trained = in_project / "outputs" / "depth_only" / "single_stream"
    (trained / paths.DONE_FILE).unlink()
    shutil.rmtree(trained / "model")
    same = dict(only="03", parameters={"tasks": ["depth"], "iterations": 2}, run_name="depth_only", progress=False,
                log=lambda *_: None)
    run_study("smoke", **same)
    executed = in_project / "results" / "depth_only" / "notebooks" / "03_train_single_stream.ipynb"
    assert "resuming from" in executed.read_text() and "moved to" not in executed.read_text()
    assert not trained.with_name("single_stream.previous").exists()
    # a finished training of the same settings is kept (a forced rerun, or more seeds, does not redo it)
    weights = (trained / "model" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    run_study("smoke", force=True, **same)
    assert "finished; kept" in executed.read_text() and "moved to" not in executed.read_text()
    assert (trained / "model" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == weights
    # one of other settings is never continued: it is moved aside and the training starts anew
    run_study("smoke", force=True, **dict(same, parameters={"tasks": ["depth"], "iterations": 2, "lr": 1e-5}))
    assert "moved to" in executed.read_text()
    assert (trained.with_name("single_stream.previous") / "model" / MODEL_FILE).is_file()
    assert (trained / "model" / MODEL_FILE).is_file()


def test_the_paper_preset_names_missing_data_and_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("STABLEMTL_PROJECT", str(tmp_path))
    monkeypatch.delenv("PREPROCESSED_DIR", raising=False)
    with pytest.raises(RunError, match="PREPROCESSED_DIR"):
        run_study("paper", progress=False)
    monkeypatch.setenv("PREPROCESSED_DIR", str(tmp_path / "data"))
    (tmp_path / "data").mkdir()
    monkeypatch.setenv("BASE_CKPT_DIR", str(tmp_path / "ckpt"))
    with pytest.raises(RunError, match=r"stable-diffusion-2"):
        run_study("paper", progress=False)
    (tmp_path / "ckpt" / "stable-diffusion-2").mkdir(parents=True)
    (tmp_path / "ckpt" / "stable-diffusion-2" / "model_index.json").write_text("{}")

    with pytest.raises(StageError, match=r"(?s)real datasets under .*hypersim.*docs/paper.md"):
        stages.prepare_data(stages.context("paper"))


def test_paper_preset_carries_the_reference_numbers():
    from stablemtl.presets import load_preset
    from stablemtl.train_config import TrainConfig, preset_config

    ref = TrainConfig()
    single, multi = preset_config("paper", "single_stream"), preset_config("paper", "multi_stream")
    for name in ("resolution", "effective_batch", "lr", "warmup", "decay_steps", "decay_to", "grad_clip", "seed",
                 "checkpoint_every", "backup_every"):
        assert getattr(single, name) == getattr(ref, name), name
    assert (single.iterations, multi.iterations) == (20000, 11000)
    assert multi.task_attention == ref.task_attention
    assert "evaluate" not in load_preset("paper")  # every benchmark at its reference resolution


@pytest.mark.slow
def test_a_moved_project_skips_every_finished_stage(smoke_study, tmp_path, monkeypatch):
    """The stage records, the manifest and the prediction cache keep folders relative to the project: a
    finished project moved (or copied, or cloned with its outputs) elsewhere runs nothing again."""
    _, project, _ = smoke_study
    moved = tmp_path / "elsewhere" / "project"
    shutil.copytree(project, moved, symlinks=True)
    monkeypatch.setenv("STABLEMTL_PROJECT", str(moved))
    lines: list[str] = []
    study = run_study("smoke", progress=False, log=lines.append)
    assert [line.split(": ", 1)[1] for line in lines if line.startswith("[")] == \
        ["done, skipped (same parameters and inputs; --force reruns it)"] * len(stages.STAGES), lines
    assert study.results_dir == moved / "results" / "smoke"
    done = json.loads((study.stage_dir("03") / "done.json").read_text())
    assert str(project) not in json.dumps(done)


@pytest.mark.slow
def test_papermill_run_directly_checks_the_parameters_as_stablemtl_run_does(tmp_path, monkeypatch):
    import papermill
    from papermill.exceptions import PapermillExecutionError

    monkeypatch.setenv("STABLEMTL_PROJECT", str(tmp_path))  # it stops before reading anything there

    with pytest.raises(PapermillExecutionError) as caught:
        papermill.execute_notebook(str(notebook_dir() / "03_train_single_stream.ipynb"), str(tmp_path / "out.ipynb"),
                                   parameters={"preset": "smoke", "iterations": "many"}, progress_bar=False,
                                   cwd=str(tmp_path), kernel_name="python3")
    assert caught.value.ename == "InputError"
    assert caught.value.evalue == ("parameter iterations='many' (in the notebook's parameters): expected an integer "
                                   ">= 1, or null (the default)")
    assert caught.value.exec_count == 3  # after the parameters and the injected ones: before any work
    # the cell shows the message alone, not the traceback of the kit's code (guard._Named)
    assert caught.value.traceback == [f"InputError: {caught.value.evalue}"]


@pytest.mark.slow
def test_cli_run_rejects_bad_input_with_exit_status(in_project):
    script = Path(sys.executable).with_name("stablemtl")
    bad = subprocess.run([str(script), "run", "--preset", "smoke", "-p", "iteratons=3"], capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "unknown parameter 'iteratons'" in bad.stderr  # 2: a bad input
    bad = subprocess.run([str(script), "run", "--preset", "nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown preset 'nope'" in bad.stderr


def test_notebooks_live_next_to_the_package():
    assert notebook_dir() == ROOT / "notebooks"
    assert sorted(p.stem for p in notebook_dir().glob("0*.ipynb")) == list(stages.STAGES)


@pytest.mark.slow
def test_seeds_ablation_and_baselines_run_through_the_notebooks(in_project):
    same = dict(run_name="two_seeds", progress=False, log=lambda *_: None)
    run_study("smoke", **same)  # one seed (the preset's): single, random-init ablation, baselines, multi
    outputs = in_project / "outputs" / "two_seeds"
    first = (outputs / "single_stream" / "model" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    run_study("smoke", parameters={"seeds": 2}, **same)  # the first seed's trainings are kept, not redone
    assert (outputs / "single_stream" / "model" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == first
    executed = (in_project / "results" / "two_seeds" / "notebooks" / "03_train_single_stream.ipynb").read_text()
    assert executed.count("finished; kept") >= 2 + 7  # single, random init and the seven baselines of seed 2024
    for name in ("single_stream", "single_stream_random", "multi_stream"):
        assert (outputs / "seed2025" / name / "model" / MODEL_FILE).is_file()
    assert not (outputs / "seed2025" / "single_task_depth").exists()  # baselines: first seed only
    with open(in_project / "results" / "two_seeds" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    seeds = lambda model: sorted({r["seed"] for r in rows if r["model"] == model})  # noqa: E731
    for model in ("single_stream", "single_stream_random", "multi_stream"):
        assert seeds(model) == ["2024", "2025"], model
    assert seeds("single_task") == ["2024"] and seeds("trivial") == [""] and seeds("vae_ceiling") == [""]
    assert {r["benchmark"] for r in rows if r["model"] == "single_task"} == set(BENCHMARKS)
    summary = (in_project / "results" / "two_seeds" / "summary.md").read_text()
    assert "single (n=2)" in summary and "multi (n=2)" in summary and "prior vs random" in summary
    assert (in_project / "results" / "two_seeds" / "tables" / "gap_closed.md").is_file()


def test_seeds_flag_and_parameter_must_agree(capsys):
    from argparse import Namespace

    from stablemtl.run import main

    args = Namespace(parameter=["seeds=2"], seeds=3, preset="smoke", only=None, run_name="x", force=False, quiet=True)
    assert main(args) == 2 and "--seeds 3 and -p seeds=2 disagree" in capsys.readouterr().err
