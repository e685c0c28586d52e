"""``stablemtl rehearse``: the paper preset's code path end to end, and its refusals of bad input."""

import csv
import json
from pathlib import Path

import pytest

from stablemtl import cli
from stablemtl.data import formats
from stablemtl.benchmarks import BENCHMARKS
from stablemtl.rehearse import REPORT_JSON, REPORT_MD, Rehearsal, RehearsalError
from stablemtl.rehearse_report import format_report

STEPS = ["raw data", "prepare", "base", "01_prepare_data", "02_build_model", "03_train_single_stream",
         "04_train_multi_stream", "05_evaluate", "06_results", "predict single_stream", "predict multi_stream"]


@pytest.mark.parametrize("args, message", [
    (["--width", "0"], "--width 0.0"),
    (["--width", "-1"], "--width -1.0"),
    (["--steps", "0"], "--steps 0"),
    (["--images", "0"], "--images 0"),
    (["--device", "cuda:7"], "is not available on this machine"),
    (["--device", "tpu"], "unknown device"),
    (["-p", "iterations=5"], "use --steps"),
    (["-p", "no_such_knob=1"], "no_such_knob"),
])
def test_bad_arguments_exit_2_and_write_nothing(tmp_path, capsys, args, message):
    out = tmp_path / "rehearsal"
    assert cli.main(["rehearse", "--out", str(out), "--quiet", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("stablemtl rehearse: ")
    assert not out.exists()


def test_a_folder_of_other_files_is_refused_and_left_as_it_was(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert cli.main(["rehearse", "--out", str(out), "--quiet"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"


def test_the_stage_parameters_route_each_knob_to_the_stages_that_declare_it(tmp_path):
    r = Rehearsal(tmp_path / "r", steps=3, images=2, device="cpu", parameters={"mixed_precision": "bf16"})
    r.check()
    three = r.stage_parameters("03")
    assert three[three.index("-p") + 1:] and "iterations=3" in three and "batch_per_device=1" in three
    assert 'mixed_precision="bf16"' in three and not any(p.startswith("max_images") for p in three)
    five = r.stage_parameters("05", models=["trivial", "single_stream"])
    assert "max_images=2" in five and 'device="cpu"' in five and 'models=["trivial", "single_stream"]' in five
    assert not any(p.startswith("iterations") for p in five)
    env = r.environment()
    assert env["CUDA_VISIBLE_DEVICES"] == "" and env["PREPROCESSED_DIR"].endswith("preprocessed")
    assert Path(env["BASE_CKPT_DIR"], "stable-diffusion-2") == r.base
    with pytest.raises(RehearsalError, match="divisor"):
        Rehearsal(tmp_path / "r", batch_per_device=3).check()


@pytest.mark.slow
def test_a_narrow_rehearsal_runs_every_stage_of_the_paper_preset(tmp_path):
    out = tmp_path / "rehearsal"
    args = ["rehearse", "--width", "0.05", "--steps", "2", "--images", "1", "--out", str(out), "--quiet"]
    assert cli.main(args) == 0
    report = json.loads((out / REPORT_JSON).read_text())
    assert report["ok"] and list(report["stages"]) == STEPS
    for name, record in report["stages"].items():  # every figure of every stage
        assert record["status"] == "done", (name, record)
        assert record["wall_s"] > 0 and record["peak_rss_gib"] > 0 and record["disk_written_gib"] is not None
    assert report["settings"]["batch_per_device"] == 1 and report["settings"]["effective_batch"] == 32
    for kind in ("single_stream", "multi_stream"):
        t = report["training"][kind]
        assert t["steps"] == 2 and t["micro_batches_per_step"] == 32 and t["s_per_step"] > 0
        assert 0 <= t["data_wait_share"] <= 1 and t["peak_rss_gib"] > 0
        assert report["evaluation"][kind]["images"] > 0 and report["evaluation"][kind]["s_per_image"] > 0
        p = report["stages"][f"predict {kind}"]
        assert p["size"] == [576, 768] and len(p["tasks"]) == 7 and p["s_per_image"] > 0
        assert all((out / "predict" / kind / "frame_0" / f"{t}.npy").is_file() for t in p["tasks"])

    # all eight benchmarks scored, at the protocol's resolutions, on files at the real datasets' sizes
    results = out / "results" / "rehearsal"
    with open(results / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for model in ("trivial", "single_stream", "multi_stream"):
        assert {r["benchmark"] for r in rows if r["model"] == model} == set(BENCHMARKS)
    assert {b: v["resolution"] for b, v in report["benchmarks"].items()} == \
        {b: list(spec.resolution) for b, spec in BENCHMARKS.items()}
    pre = out / "preprocessed"
    city = next((pre / "cityscapes" / "leftImg8bit" / "val").rglob("*.png"))
    assert formats.read_rgb(city).shape == (1024, 2048, 3)
    hypersim = next((pre / "hypersim" / "train").rglob("rgb_*.png"))
    assert formats.read_rgb(hypersim).shape == (768, 1024, 3)
    assert (pre / "vkitti_v2" / "normal_estimated").is_dir()
    assert json.loads((out / "base" / "stable-diffusion-2" / "tokenizer" / "tokenizer_config.json").read_text())[
        "model_max_length"] == 77
    assert (results / "tables" / "main.md").read_text().count("| paper: ") == 4  # the published rows
    text = (out / REPORT_MD).read_text()
    assert text == format_report(report) and "every stage done" in text and "| kitti_scene_flow | 176x608 |" in text

    # a second call resumes: nothing is redone, the figures stay those of the call that made the outputs
    assert cli.main(args) == 0
    again = json.loads((out / REPORT_JSON).read_text())
    assert again["ok"] and all(again["stages"][s].get("kept") for s in STEPS if s != "prepare")
    assert all(again["stages"][s]["wall_s"] == report["stages"][s]["wall_s"] for s in STEPS if s != "prepare")
    assert again["training"] == report["training"] and again["benchmarks"] == report["benchmarks"]
