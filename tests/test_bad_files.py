"""Bad files are named, never silently wrong (issue #19): truncated or corrupt checkpoints, state and
cache files are set aside and recomputed (or a checkpoint falls back to a good backup), edited results
are flagged in the tables, and inputs that would give a wrong number (NaN images, truncated images,
binary files of the wrong size, repeated split lines, missing files, labels of another size) fail with
a message that names the file or value."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from stablemtl import evaluate as E
from stablemtl import results
from stablemtl import report
from stablemtl.data import annotations as A
from stablemtl.data import formats as F
from stablemtl.data import mini
from stablemtl.data.sources import DIODE, Cityscapes, VirtualKITTI2

DEMO = Path(__file__).resolve().parents[1] / "results" / "reference" / "demo"
EVAL_RES = {"mid_albedo": (32, 48), "mid_shading": (32, 48)}


def _truncate(path: Path, keep: float = 0.6) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def _image(h: int = 24, w: int = 32) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 7 % 256, y * 11 % 256, (x + y) * 5 % 256], -1).astype(np.uint8)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Procedural miniatures of the datasets these tests read (a fresh copy per test: ``tree``)."""
    root = tmp_path_factory.mktemp("bad_files") / "data"
    mini.write_mini_datasets(root, "smoke", datasets=["cityscapes", "mid", "diode", "hypersim", "vkitti"],
                             workers=1, progress=False)
    return root


@pytest.fixture
def tree(data, tmp_path) -> Path:
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    return copy


# --------------------------------------------------------------------------- truncated images

@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_truncated_jpeg_and_png_are_refused_naming_the_file(tmp_path, suffix):
    path = F.write_rgb(tmp_path / f"img{suffix}", _image())
    assert F.read_rgb(path).shape == (24, 32, 3)  # the complete file reads
    _truncate(path)
    kind = "JPEG" if suffix == ".jpg" else "PNG"
    with pytest.raises(F.FormatError, match=rf"{path}: cannot decode the image \(truncated {kind}"):
        F.read_rgb(path)


def test_truncated_16bit_kitti_flow_png_is_refused(tmp_path):
    flow = np.zeros((8, 12, 2), np.float32)
    path = A.write_kitti_flow(tmp_path / "flow.png", flow, np.ones((8, 12), bool))
    _truncate(path, 0.9)
    with pytest.raises(F.FormatError, match=rf"{path}: cannot decode the image \(truncated PNG.*KITTI 16-bit"):
        A.read_kitti_flow(path)


def test_a_jpeg_padded_after_its_end_marker_still_reads(tmp_path):
    path = F.write_rgb(tmp_path / "img.jpg", _image())
    path.write_bytes(path.read_bytes() + b"\x00" * 16)  # padding some cameras write: still complete
    assert F.read_rgb(path).shape == (24, 32, 3)


def test_predict_refuses_a_truncated_jpeg_even_with_pillows_truncated_flag_on(tmp_path, monkeypatch):
    from PIL import ImageFile

    from stablemtl.predict import ImageError, load_image

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # the kit never turns it on
    path = _truncate(F.write_rgb(tmp_path / "photo.jpg", _image(64, 64)), 0.5)
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # another library may have
    with pytest.raises(ImageError, match=rf"{path}: cannot decode the image \(corrupt or truncated\?\): "
                                         rf"truncated JPEG"):
        load_image(path)


def test_predict_refuses_a_float_image_with_nan_naming_file_and_pixel(tmp_path):
    from PIL import Image

    from stablemtl.predict import ImageError, load_image

    values = np.full((6, 8), 0.5, np.float32)
    values[2, 5] = np.nan
    path = tmp_path / "float.tif"
    Image.fromarray(values, mode="F").save(path)
    with pytest.raises(ImageError, match=rf"{path}: 1 non-finite pixel.*nan at row 2, column 5"):
        load_image(path)


# --------------------------------------------------------------------------- fixed-size binary formats

def test_flo_with_a_float64_body_is_refused_not_decoded_as_noise(tmp_path):
    flow = np.random.default_rng(0).normal(size=(5, 7, 2))
    path = tmp_path / "flow.flo"
    path.write_bytes(b"PIEH" + np.array([7, 5], "<i4").tobytes() + flow.astype("<f8").tobytes())
    with pytest.raises(F.FormatError, match=rf"{path}: .flo longer than its header says: a 7x5 flow needs 292 "
                                            rf"bytes, found 572 \(12 \+ 4\*2\*7\*5 expected\) \(a float64 body"):
        F.read_flo(path)


def test_truncated_flo_is_refused(tmp_path):
    path = F.write_flo(tmp_path / "flow.flo", np.ones((5, 7, 2), np.float32))
    assert F.read_flo(path).shape == (5, 7, 2)
    _truncate(path, 0.8)
    with pytest.raises(F.FormatError, match=rf"{path}: truncated .flo: a 7x5 flow needs 292 bytes, found 233 "):
        F.read_flo(path)


@pytest.mark.parametrize("extra", [-4, 4])
def test_pfm_whose_size_differs_from_its_header_is_refused(tmp_path, extra):
    path = F.write_pfm(tmp_path / "disp.pfm", np.ones((4, 6), np.float32))
    data = path.read_bytes()
    path.write_bytes(data[:extra] if extra < 0 else data + b"\0" * extra)
    what = "truncated PFM" if extra < 0 else "PFM longer than its header says"
    with pytest.raises(F.FormatError, match=rf"{path}: {what}: 6x4x1 floats need 96 bytes .*found {96 + extra}$"):
        F.read_pfm(path)


# --------------------------------------------------------------------------- split lists and dataset files

def test_a_repeated_split_line_names_the_list_and_both_line_numbers(tree):
    split = tree / "cityscapes" / "data_split" / "cityscapes_val_full.txt"
    lines = split.read_text().splitlines()
    split.write_text("\n".join(lines + ["", lines[0]]) + "\n")  # line 1 again, after a blank line
    n = len(lines) + 2
    with pytest.raises(F.FormatError, match=rf"{split}: lines 1 and {n} both list '{lines[0]}'"):
        Cityscapes(tree / "cityscapes")


def test_a_split_entry_whose_file_is_missing_names_the_line(tree):
    source = Cityscapes(tree / "cityscapes")
    label = tree / "cityscapes" / Cityscapes.label_path(source.entries[1][0])
    label.unlink()
    with pytest.raises(FileNotFoundError, match=rf"line 2 of {source.split_file}: .*{label}: no such file"):
        source[1]


def test_a_label_half_the_size_of_its_image_names_both_files_and_sizes(tree):
    source = Cityscapes(tree / "cityscapes")
    image = tree / "cityscapes" / source.entries[0][0]
    label = tree / "cityscapes" / Cityscapes.label_path(source.entries[0][0])
    ids = A.read_cityscapes_label_ids(label)
    h, w = ids.shape
    A.write_cityscapes_label_ids(label, ids[::2, ::2])
    with pytest.raises(F.FormatError, match=rf"{label} is {h // 2}x{w // 2} but its image {image} is {h}x{w}"):
        source[0]
    assert Cityscapes(tree / "cityscapes", resolution=(32, 64))[1]["semantic"].shape == (1, 32, 64)  # others load


def test_a_declared_annotation_scale_is_accepted_and_then_required(tree):
    root = tree / "cityscapes"
    meta = json.loads((root / "stablemtl_dataset.json").read_text())
    meta.setdefault("geometry", {})["annotation_scale"] = {"semantic": 0.5}
    (root / "stablemtl_dataset.json").write_text(json.dumps(meta))
    source = Cityscapes(root)
    label = root / Cityscapes.label_path(source.entries[0][0])
    with pytest.raises(F.FormatError, match=r"declared scale 0.5"):  # same size now contradicts the declaration
        source[0]
    A.write_cityscapes_label_ids(label, A.read_cityscapes_label_ids(label)[::2, ::2])
    assert source[0]["semantic"].shape[-2:] == tuple(s // 2 for s in source[0]["rgb"].shape[-2:])


def test_a_depth_mask_of_another_size_names_both_files(tree):
    source = DIODE(tree / "diode" / "diode_val", tasks=["depth"])
    mask = tree / "diode" / "diode_val" / source.entries[0][2]
    A.write_diode_mask(mask, A.read_diode_mask(mask)[:-2])
    depth = tree / "diode" / "diode_val" / source.entries[0][1]
    with pytest.raises(F.FormatError, match=rf"{mask} is \d+x\d+ but {depth} is \d+x\d+"):
        source[0]



def test_an_image_too_small_for_the_protocol_names_the_file_and_the_minimum(tree):
    """An image smaller than the protocol can take (Cityscapes halves it first; a crop of the dataset) is
    refused naming the sample's split line, the image's size and the minimum (issue #30); before, a
    1 x 1 Cityscapes image stopped in torch's resize. Any image at least that large is resized to the
    protocol's resolution."""
    source = Cityscapes(tree / "cityscapes", resolution=(32, 64))
    image = tree / "cityscapes" / source.entries[0][0]
    label = tree / "cityscapes" / Cityscapes.label_path(source.entries[0][0])
    ids, rgb = A.read_cityscapes_label_ids(label), F.read_rgb(image)
    A.write_cityscapes_label_ids(label, ids[:1, :1])
    F.write_rgb(image, rgb[:1, :1])
    with pytest.raises(F.FormatError, match=rf"Cityscapes sample 0 \(line 1 of .*{source.entries[0][0]}.*\): image 1x1 "
                                            rf"is smaller than 2x2: the Cityscapes protocol halves the image first"):
        source[0]
    A.write_cityscapes_label_ids(label, ids[:2, :2])
    F.write_rgb(image, rgb[:2, :2])
    assert source[0]["semantic"].shape == (1, 32, 64)
    root = tree / "vkitti_v2"
    meta = json.loads((root / "stablemtl_dataset.json").read_text())
    h, w = VirtualKITTI2(root, tasks=["optical_flow"])[0]["rgb"].shape[-2:]
    meta.setdefault("geometry", {})["train_crop"] = [h + 1, w]
    (root / "stablemtl_dataset.json").write_text(json.dumps(meta))
    source = VirtualKITTI2(root, tasks=["optical_flow"], augment=True)  # the task it crops
    with pytest.raises(F.FormatError, match=rf"VirtualKITTI2 sample 0 \(.*{source.entries[0][0]}.*\): image {h}x{w} "
                                            rf"is smaller than the training crop {h + 1}x{w}"):
        source[0]


# --------------------------------------------------------------------------- the pipeline's inputs

@pytest.fixture(scope="module")
def pipe(tiny_base):
    from stablemtl.model.pipeline import StableMTLPipeline
    from stablemtl.model.streams import SingleStream

    return StableMTLPipeline.from_model(SingleStream.from_base(tiny_base, ["depth", "optical_flow"]))


def test_pipeline_refuses_nan_images_naming_count_value_and_position(pipe):
    images = torch.full((2, 3, 32, 32), 0.5)
    images[1, 2, 3, 4] = float("nan")
    images[1, 0, 9, 9] = float("nan")
    with pytest.raises(ValueError, match=r"images: 2 non-finite value\(s\).*nan at \[batch 1, channel 0, y 9, x 9\]"):
        pipe(images, tasks=["depth"])


def test_pipeline_refuses_inf_in_the_next_frame(pipe):
    images = torch.full((1, 3, 32, 32), 0.5)
    nxt = images.clone()
    nxt[0, 1, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"next_images: 1 non-finite.*inf at \[batch 0, channel 1, y 0, x 0\]"):
        pipe(images, tasks=["optical_flow"], next_images=nxt)


@pytest.mark.parametrize("shape, message", [
    ((1, 32, 32, 3), r"got shape \(1, 32, 32, 3\) \(channels last\? use images.permute\(0, 3, 1, 2\)\)"),
    ((1, 1, 32, 32), r"3 channels\), got shape \(1, 1, 32, 32\)"),
    ((0, 3, 32, 32), r"empty tensor of shape \(0, 3, 32, 32\)"),
])
def test_pipeline_refuses_wrongly_shaped_images_naming_the_shape(pipe, shape, message):
    with pytest.raises(ValueError, match=message):
        pipe(torch.full(shape, 0.5), tasks=["depth"])


def test_a_model_folder_with_a_corrupt_json_record_is_named(pipe, tmp_path):
    from stablemtl.model.pipeline import ModelFileError, load_model

    pipe.save_pretrained(tmp_path / "model")
    record = _truncate(tmp_path / "model" / "model_index.json", 0.5)
    with pytest.raises(ModelFileError, match=rf"{record}: not valid JSON"):
        load_model(tmp_path / "model")


# --------------------------------------------------------------------------- evaluation caches and results

def _trivial(sample, task):
    return E.trivial_prediction(sample, task)


def _evaluate(data_root, out, benchmarks=("mid_albedo",)):
    return E.evaluate(_trivial, list(benchmarks), out, data_root, run="t", model_name="fn", fingerprint="v1",
                      resolution=EVAL_RES, progress=False, prefetch=0)


def test_a_corrupt_prediction_cache_entry_is_set_aside_and_recomputed(data, tmp_path, capsys):
    out = _evaluate(data, tmp_path / "out")
    before = (out / "metrics.csv").read_text()
    entry = out / "predictions" / "fn" / "mid_albedo" / "00001.npz"
    _truncate(entry, 0.5)
    capsys.readouterr()
    _evaluate(data, out)  # used to fail on every rerun with a zip error that named no file
    assert f"{entry}: cannot be read" in capsys.readouterr().out
    assert (entry.parent / "00001.npz.corrupt").is_file() and entry.is_file()
    with np.load(entry) as npz:
        assert {"pred", "gt", "valid", "id", "rgb"} <= set(npz.files)
    assert (out / "metrics.csv").read_text() == before


def test_a_corrupt_cache_record_is_set_aside_with_a_message(data, tmp_path, capsys):
    out = _evaluate(data, tmp_path / "out")
    record = out / "predictions" / "fn" / "mid_albedo" / E.CACHE_FILE
    record.write_text('{"weights": "v1", "da')
    capsys.readouterr()
    _evaluate(data, out)
    assert f"{record}: cannot be read (not valid JSON" in capsys.readouterr().out
    assert json.loads(record.read_text())["weights"] == "v1"
    assert (record.parent / (E.CACHE_FILE + ".corrupt")).is_file()


def test_evaluate_records_the_sha256_of_its_csvs(data, tmp_path):
    import hashlib

    out = _evaluate(data, tmp_path / "out")
    recorded = json.loads((out / results.HASH_FILE).read_text())
    for name in ("metrics.csv", "per_sample.csv"):
        assert recorded[name] == hashlib.sha256((out / name).read_bytes()).hexdigest()
    assert results.edited_results(out) == []


def test_a_corrupt_metrics_csv_is_named_by_report_and_set_aside_by_evaluate(data, tmp_path, capsys):
    out = _evaluate(data, tmp_path / "out")
    metrics = out / "metrics.csv"
    lines = metrics.read_text().splitlines()
    lines[3] = lines[3].replace(lines[3].split(",")[results.METRIC_FIELDS.index("value")], "0.1x")
    metrics.write_text("\n".join(lines) + "\n")
    with pytest.raises(results.ResultsFileError, match=rf"{metrics}: line 4: value '0.1x' is not a number"):
        report.write_tables(out)
    capsys.readouterr()
    _evaluate(data, out, ("mid_albedo", "mid_shading"))
    assert f"{metrics}: cannot be read" in capsys.readouterr().out
    assert (out / "metrics.csv.corrupt").is_file()
    assert {r["benchmark"] for r in results.read_metrics(out)} == {"mid_albedo", "mid_shading"}


METRIC_VALUE = results.METRIC_FIELDS.index("value")


def test_tables_from_an_edited_metrics_csv_carry_a_warning(tmp_path, capsys):
    for name in ("metrics.csv", results.HASH_FILE):
        shutil.copy(DEMO / name, tmp_path / name)
    written = report.write_tables(tmp_path, run="demo")  # unedited: byte-identical to the committed tables
    assert capsys.readouterr().out == ""
    for name, path in written.items():
        assert path.read_text() == (DEMO / "tables" / name).read_text(), name
    metrics = tmp_path / "metrics.csv"
    lines = metrics.read_text().splitlines(keepends=True)  # a hand edit: the trivial row's KITTI flow EPE
    i = next(i for i, line in enumerate(lines) if line.startswith("demo,trivial,,kitti_flow,") and ",epe," in line)
    fields = lines[i].split(",")
    fields[METRIC_VALUE] = "7.5"
    lines[i] = ",".join(fields)
    metrics.write_text("".join(lines))
    written = report.write_report(tmp_path, run="demo")
    printed = capsys.readouterr().out
    assert f"WARNING: {metrics} was changed after evaluate wrote it" in printed
    assert "> WARNING: " in written["main.md"].read_text() and "% WARNING: " in written["main.tex"].read_text()
    assert "| trivial | 3.889 | 64.16 | 68.58 | 7.5 |" in written["main.md"].read_text()  # used all the same
    assert f"WARNING: {metrics} was changed" in (tmp_path / "summary.md").read_text()


# --------------------------------------------------------------------------- training checkpoints

@pytest.fixture(scope="module")
def trained(data, tiny_base_dir, tmp_path_factory):
    """A 2-step depth training with ``latest`` (step 2) and backups ``iter_000001``, ``iter_000002``."""
    from stablemtl import train as T

    root = tmp_path_factory.mktemp("ckpt")
    values = dict(tasks=["depth"], base=str(tiny_base_dir), data_root=str(data),
                  resolution={"hypersim": [32, 48], "vkitti": [32, 104]}, effective_batch=2, batch_per_device=2,
                  iterations=2, warmup=1, decay_steps=50, checkpoint_every=1, backup_every=1,
                  output_dir=str(root / "run"))
    T.Trainer(T.TrainConfig.from_dict(values), progress=False).train()
    return root / "run", values


def _resume(trained, tmp_path):
    from stablemtl import train as T

    run, values = trained
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run" / "checkpoint", lambda: T.Trainer(T.TrainConfig.from_dict(
        dict(values, output_dir=str(tmp_path / "run"))), progress=False)


@pytest.mark.parametrize("name", ["weights.safetensors", "optimizer.pt", "states.pt", "sampler.json", "state.json"])
def test_a_corrupt_latest_checkpoint_falls_back_to_the_newest_good_backup(trained, tmp_path, capsys, name):
    ckpt, trainer = _resume(trained, tmp_path)
    shutil.rmtree(ckpt / "iter_000002")  # so the fallback is visible: the backup of step 1
    _truncate(ckpt / "latest" / name, 0.5)
    resumed = trainer()
    printed = capsys.readouterr().out
    assert resumed.resumed_from == ckpt / "iter_000001" and resumed.step == 1
    assert f"{ckpt / 'latest'}: cannot be read ({name}: cannot be read" in printed
    assert f"resuming from {ckpt / 'iter_000001'} instead" in printed
    assert (ckpt / "latest.corrupt" / name).is_file() and not (ckpt / "latest").exists()


def test_a_corrupt_latest_prefers_the_previous_latest(trained, tmp_path, capsys):
    ckpt, trainer = _resume(trained, tmp_path)
    shutil.copytree(ckpt / "latest", ckpt / ".latest.previous")  # a kill between the two renames of a save
    _truncate(ckpt / "latest" / "weights.safetensors", 0.5)
    resumed = trainer()
    assert resumed.resumed_from == ckpt / ".latest.previous" and resumed.step == 2


def test_no_readable_checkpoint_is_an_error_naming_the_files_never_a_silent_restart(trained, tmp_path):
    from stablemtl import train as T

    ckpt, trainer = _resume(trained, tmp_path)
    for folder in ("latest", "iter_000001", "iter_000002"):
        (ckpt / folder / "state.json").write_text('{"step": ')
    with pytest.raises(T.CheckpointError, match=r"no checkpoint can be read") as err:
        trainer()
    for folder in ("latest", "iter_000001", "iter_000002"):
        assert f"{ckpt / folder / 'state.json'}: cannot be read (JSONDecodeError" in str(err.value)
    assert f"move or delete {ckpt}" in str(err.value)
    with pytest.raises(T.CheckpointError):  # and on every rerun, until the user decides
        trainer()


def test_the_run_summary_warns_of_an_edited_metrics_csv_when_every_stage_is_skipped(tmp_path, monkeypatch):
    """`stablemtl run` prints the target check from metrics.csv at its end even when it ran nothing; the
    check against the recorded hashes happens there too, not only in stage 06."""
    from stablemtl import run, stages

    monkeypatch.setenv("STABLEMTL_PROJECT", str(tmp_path))
    study = stages.context("demo", "demo")
    study.results_dir.mkdir(parents=True)
    for name in ("metrics.csv", results.HASH_FILE):
        shutil.copy(DEMO / name, study.results_dir / name)
    assert "warning" not in run.summary(study)
    metrics = study.results_dir / "metrics.csv"
    edited = metrics.read_text().replace("optical_flow,epe,6.081260985616232,", "optical_flow,epe,7.5,", 1)
    assert edited != metrics.read_text()
    metrics.write_text(edited)
    text = run.summary(study)
    assert f"warning: {metrics} was changed after evaluate wrote it" in text
    assert text.index("warning") < text.index("(a) ")  # before the numbers it warns about
