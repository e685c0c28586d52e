"""``stablemtl predict``: one's own images of any size -> every task's files at the image's size."""

from __future__ import annotations


import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from stablemtl import cli, devices
from stablemtl.data import formats
from stablemtl.model import streams as S
from stablemtl.model.pipeline import StableMTLPipeline, save_model
from stablemtl.predict import (CONTACT_SHEET, DEPTH_16BIT, PredictError, _folder_names,
                               list_images, model_size, predict)
from stablemtl.tasks import FLOW_TASKS, TASK_NAMES, get_task

OTHERS = [t for t in TASK_NAMES if t not in FLOW_TASKS]  # the tasks a frame without a next frame gets
CHANNELS = {"albedo": 3, "shading": 1, "depth": 1, "normal": 3, "semantic": 1, "optical_flow": 2, "scene_flow": 3}


@pytest.fixture(scope="module")
def models(tiny_base, tmp_path_factory):
    """Saved tiny pipelines: ``single`` and ``multi`` with every task, ``subset`` with three."""
    folder = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    single = S.SingleStream.from_base(tiny_base)
    multi = S.MultiStream.from_single_stream(single, query_hidden=32)
    torch.manual_seed(1)
    for module in multi.task_attention.values():  # off the zero init, so the task attention matters
        torch.nn.init.normal_(module.out.weight, std=0.2)
    subset = S.SingleStream.from_base(tiny_base, tasks=["depth", "normal", "optical_flow"])
    return {name: save_model(m, folder / name) for name, m in
            (("single", single), ("multi", multi.eval()), ("subset", subset))}


def _frame(h: int, w: int, seed: int, channels: int = 3) -> np.ndarray:
    """A smooth random uint8 image (a blurred noise field, so the model sees structure)."""
    g = np.random.default_rng(seed)
    small = g.random((max(2, h // 6), max(2, w // 6), channels)).astype(np.float32)
    big = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC).reshape(h, w, channels)
    return (np.clip(big, 0, 1) * 255).round().astype(np.uint8)


def _write(path, array: np.ndarray, mode: str | None = None):
    Image.fromarray(array if array.shape[-1] != 1 else array[..., 0], mode=mode).save(path)
    return path


def _sheet_size(h: int, w: int, panels: int) -> tuple[int, int]:
    """Expected contact-sheet size, worked out here: panels in a 256 px box 8 px apart, 4 per row, titles
    24 px, header 28 px."""
    pw, ph = (256, round(h * 256 / w)) if w >= h else (round(w * 256 / h), 256)
    cols = min(4, panels)
    return cols * (pw + 8), 28 + -(-panels // cols) * (24 + ph)


def _check_outputs(record, tasks):
    """Every task's files at the image's size, with the right shapes, dtypes and ranges."""
    h, w = record["size"]
    folder = record["folder"]
    assert record["ok"] and record["tasks"] == tasks
    for task in TASK_NAMES:
        npy, png = folder / f"{task}.npy", folder / f"{task}.png"
        if task not in tasks:
            assert not npy.exists() and not png.exists(), task
            continue
        array = np.load(npy)
        assert array.dtype == np.float32, task
        assert array.shape == ((h, w) if CHANNELS[task] == 1 else (h, w, CHANNELS[task])), task
        assert np.isfinite(array).all(), task
        colour = formats.read_rgb(png)
        assert colour.shape == (h, w, 3), task
        chw = torch.from_numpy(array[None, None] if array.ndim == 2 else array.transpose(2, 0, 1)[None])
        np.testing.assert_array_equal(colour, get_task(task).colorize(chw)[0], err_msg=task)  # the kit's colours
    if "depth" in tasks:
        depth = np.load(folder / "depth.npy")
        assert 0 <= depth.min() and depth.max() <= 1
        raw = cv2.imread(str(folder / DEPTH_16BIT), cv2.IMREAD_UNCHANGED)
        assert raw.dtype == np.uint16 and raw.shape == (h, w)
        assert np.abs(raw / 65535.0 - depth).max() <= 0.5 / 65535 + 1e-7  # the round trip, within quantisation
    if "normal" in tasks:
        np.testing.assert_allclose(np.linalg.norm(np.load(folder / "normal.npy"), axis=-1), 1.0, atol=1e-5)
    if "semantic" in tasks:  # nearest resizing: class ids stay integers in 0..7
        ids = np.load(folder / "semantic.npy")
        assert np.array_equal(ids, ids.round()) and ids.min() >= 0 and ids.max() <= 7
    for task in set(tasks) & set(FLOW_TASKS):  # scale-free: each axis within [-1, 1]
        assert np.abs(np.load(folder / f"{task}.npy")).max() <= 1 + 1e-6
    sheet = Image.open(folder / CONTACT_SHEET)
    assert sheet.size == _sheet_size(h, w, 1 + len(tasks))
    assert np.asarray(sheet.convert("L")).std() > 10  # not blank


def test_frame_pairs_of_odd_sizes_get_every_output_at_the_image_size(models, tmp_path, capsys):
    src = tmp_path / "frames"
    src.mkdir()
    for name, (h, w), seed in (("a_1", (19, 29), 0), ("a_2", (19, 29), 1), ("b_1", (26, 41), 2), ("b_2", (26, 41), 3)):
        _write(src / f"{name}.png", _frame(h, w, seed))
    records = predict(src, models["single"], out=tmp_path / "out", progress=False)
    assert [r["image"].name for r in records] == ["a_1.png", "a_2.png", "b_1.png", "b_2.png"]
    assert [r["size"] for r in records] == [(19, 29), (19, 29), (26, 41), (26, 41)]
    assert [r["model_size"] for r in records] == [(20, 30), (20, 30), (26, 42), (26, 42)]  # multiples of the VAE's 2
    assert [r["next_frame"] and r["next_frame"].name for r in records] == ["a_2.png", None, "b_2.png", None]
    for record, tasks in zip(records, (list(TASK_NAMES), OTHERS, list(TASK_NAMES), OTHERS)):
        assert record["folder"] == tmp_path / "out" / record["image"].stem
        _check_outputs(record, tasks)
    assert "has another size" in records[1]["skipped"]["optical_flow"]
    assert "last image" in records[3]["skipped"]["scene_flow"]
    out = capsys.readouterr().out
    assert out.count("note: optical_flow and scene_flow read image i with image i + 1") == 1, out  # said once
    assert "4 of 4 image(s) predicted" in out and str((tmp_path / "out").resolve()) in out


def test_outputs_equal_the_pipeline_on_the_frame_and_its_next_frame(models, tmp_path, monkeypatch):
    """At a size the model takes as is nothing is resized: the files hold the pipeline's own outputs
    (channels last), frame 0 read with frame 1, and frame 1 (the last) alone.

    Bit for bit: the pipeline is run here as predict runs it, on the same device (the CPU), with the same
    batch (the frame with its next frame, or alone; the same tasks) and on inputs of the same values in the
    same memory layout. The layout matters: predict's input (an image array [H, W, 3] permuted to [1, 3, H, W])
    is channels-last, and a channels-last convolution sums in another order than a contiguous one, so the two
    differ in the last bits, by an amount that depends on the CPU's kernels (1e-5 on a normal on one machine)."""
    frames = [_frame(16, 24, seed) for seed in (5, 6)]
    paths = [_write(tmp_path / f"f{i}.png", f) for i, f in enumerate(frames)]
    fed = []  # what predict hands the pipeline: (images, next_images) per call
    call = StableMTLPipeline.__call__
    with monkeypatch.context() as m:
        m.setattr(StableMTLPipeline, "__call__", lambda self, images, tasks=None, next_images=None, **kw:
                  fed.append((images, next_images)) or call(self, images, tasks=tasks, next_images=next_images, **kw))
        records = predict(paths, models["single"], out=tmp_path / "out", progress=False, device="cpu")
    pipe = StableMTLPipeline.from_pretrained(models["single"])
    x = [torch.from_numpy(f).permute(2, 0, 1)[None].float() / 255 for f in frames]
    assert len(fed) == 2 and fed[1][1] is None
    for got, want in zip((*fed[0], fed[1][0]), (x[0], x[1], x[1])):
        assert torch.equal(got, want)  # the image's values, as read here
    like = lambda value, fed_tensor: torch.empty_like(fed_tensor).copy_(value)  # noqa: E731 - its layout too
    for record, expected in ((records[0], pipe(like(x[0], fed[0][0]), next_images=like(x[1], fed[0][1])).predictions),
                             (records[1], pipe(like(x[1], fed[1][0]), tasks=OTHERS).predictions)):
        assert sorted(expected) == sorted(record["tasks"])
        for task, want in expected.items():
            want = want[0].numpy()
            np.testing.assert_array_equal(np.load(record["folder"] / f"{task}.npy"),
                                          want[0] if want.shape[0] == 1 else want.transpose(1, 2, 0), err_msg=task)


def test_a_single_image_gets_the_other_five_tasks_with_a_note(models, tmp_path, capsys):
    image = tmp_path / "photo.jpg"
    Image.fromarray(_frame(23, 35, 9)).save(image, quality=90)
    (record,) = predict(image, models["single"], out=tmp_path / "out", progress=False)
    _check_outputs(record, OTHERS)
    assert record["next_frame"] is None and set(record["skipped"]) == set(FLOW_TASKS)
    out = capsys.readouterr().out
    assert "photo.jpg gets the other tasks because it is a single image (no next frame)" in out


def test_bad_inputs_are_named_and_the_other_images_still_predicted(models, tmp_path, capsys):
    src = tmp_path / "mixed"
    src.mkdir()
    for i in range(2):
        _write(src / f"good_{i}.png", _frame(20, 28, 10 + i))
    rgb = _frame(17, 23, 20)
    rgba = np.concatenate([rgb, _frame(17, 23, 21, channels=1)], axis=2)  # a random alpha
    _write(src / "rgba.png", rgba, "RGBA")
    grey = _frame(17, 23, 22, channels=1)
    _write(src / "grey.png", grey, "L")
    (src / "notes.txt").write_text("not an image\n")
    whole = (src / "good_0.png").read_bytes()
    (src / "corrupt.png").write_bytes(whole[: len(whole) // 2])  # a truncated PNG
    (src / "fake.png").write_bytes(b"this is no PNG at all" * 10)
    records = predict(src, models["subset"], tasks="depth,albedo,optical_flow", out=tmp_path / "out", progress=False)
    by_name = {r["image"].name: r for r in records}
    assert list(by_name) == ["corrupt.png", "fake.png", "good_0.png", "good_1.png", "grey.png", "notes.txt", "rgba.png"]
    captured = capsys.readouterr()
    err = captured.err
    # the model lacks albedo: said once, naming the model's tasks; the other tasks are predicted
    assert err.count("albedo: the model has no such task") == 1 and "its tasks: depth, normal, optical_flow" in err
    for name in ("corrupt.png", "fake.png", "notes.txt"):
        assert not by_name[name]["ok"] and str(src / name) in err and not (tmp_path / "out" / name[:-4]).exists()
    assert "corrupt or truncated" in by_name["corrupt.png"]["error"]
    assert "fake.png" in by_name["fake.png"]["error"] and "decode" in by_name["fake.png"]["error"]
    assert "not an image file (suffix '.txt')" in by_name["notes.txt"]["error"]
    _check_outputs(by_name["good_0.png"], ["depth", "optical_flow"])  # good_1 is its next frame
    for name in ("good_1.png", "grey.png", "rgba.png"):
        _check_outputs(by_name[name], ["depth"])
        assert "albedo" in by_name[name]["skipped"] and "optical_flow" in by_name[name]["skipped"]
    assert "another size" in by_name["good_1.png"]["skipped"]["optical_flow"]
    assert "notes.txt, could not be read" in by_name["grey.png"]["skipped"]["optical_flow"]
    assert by_name["rgba.png"]["notes"] == [
        "RGBA image: alpha channel dropped (transparent pixels keep their stored colour)"]
    assert by_name["grey.png"]["notes"] == ["grey image: its channel repeated to RGB"]
    assert "note: " + str(src / "rgba.png") in captured.out
    summary = captured.out[captured.out.index("stablemtl predict: 4 of 7"):]
    assert "failed (3):" in summary and "notes.txt: not an image file" in summary
    assert "not predicted (the model lacks them): albedo" in summary
    # the conversions: RGBA = its RGB (alpha dropped, not composited), grey = its channel repeated
    _write(tmp_path / "rgb.png", rgb)
    _write(tmp_path / "grey_rgb.png", np.repeat(grey, 3, axis=2))
    for converted, reference in (("rgba", "rgb"), ("grey", "grey_rgb")):
        (ref,) = predict(tmp_path / f"{reference}.png", models["subset"], tasks=["depth"], out=tmp_path / "ref",
                         progress=False)
        np.testing.assert_array_equal(np.load(tmp_path / "out" / converted / "depth.npy"),
                                      np.load(ref["folder"] / "depth.npy"))


def _cli(argv) -> int:
    args = cli.build_parser().parse_args(["predict", *map(str, argv)])
    return args.func(args)


def test_the_command_line_end_to_end(models, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(devices, "default_device", lambda: torch.device("cpu"))
    frames = [_write(tmp_path / f"{i}.png", _frame(18, 25, 30 + i)) for i in (2, 10)]  # name order: 2 before 10
    out = tmp_path / "out"
    assert _cli([frames[1], frames[0], "--model", models["multi"], "--tasks", "depth,optical_flow", "--out", out,
                 "--quiet"]) == 0
    assert sorted(p.name for p in (out / "2").iterdir()) == sorted(
        ["depth.npy", "depth.png", DEPTH_16BIT, "optical_flow.npy", "optical_flow.png", CONTACT_SHEET])
    assert not (out / "10" / "optical_flow.npy").exists() and (out / "10" / "depth.npy").is_file()
    # bfloat16 (float32 files all the same) on an explicit device
    assert _cli([frames[0], "--model", models["single"], "--tasks", "depth", "--out", tmp_path / "bf16",
                 "--device", "cpu", "--bf16", "--quiet"]) == 0
    assert np.load(tmp_path / "bf16" / "2" / "depth.npy").dtype == np.float32
    capsys.readouterr()
    # a failed image: 1, the others still written
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    assert _cli([frames[0], tmp_path / "broken.png", "--model", models["single"], "--tasks", "depth",
                 "--out", tmp_path / "o2", "--quiet"]) == 1
    assert "broken.png" in capsys.readouterr().err and (tmp_path / "o2" / "2" / "depth.npy").is_file()
    # nothing can run: 2, with the reason
    for argv, words in (([frames[0], "--model", tmp_path / "frames_not_a_model"], ["frames_not_a_model", "model"]),
                        ([frames[0], "--model", tmp_path], ["not a stablemtl model", "save_pretrained"]),
                        ([frames[0], "--model", models["single"], "--tasks", "depth,bogus"],
                         ["'bogus'", "valid tasks"]),
                        ([frames[0], "--model", models["single"], "--device", "cuda:7"], ["cuda:7", "available"]),
                        ([frames[0], "--model", models["single"], "--device", "tpu"], ["'tpu'", "available"])):
        assert _cli([*argv, "--out", tmp_path / "o3", "--quiet"]) == 2, argv
        message = capsys.readouterr().err
        assert message.startswith("stablemtl predict: ") and all(w in message for w in words), message
    (tmp_path / "empty").mkdir()
    with pytest.raises(PredictError, match="empty: the folder holds no file"):
        predict(tmp_path / "empty", models["single"])


def test_max_side_runs_the_model_smaller_and_writes_at_the_image_size(models, tmp_path):
    image = _write(tmp_path / "big.png", _frame(60, 90, 40))
    (record,) = predict(image, models["single"], tasks="depth,semantic", out=tmp_path / "out", progress=False,
                        max_side=40)
    assert record["model_size"] == (26, 40)  # 60 x 90 scaled by 40 / 90, rounded to multiples of 2
    _check_outputs(record, ["depth", "semantic"])
    with pytest.raises(PredictError, match="max_side=0"):
        predict(image, models["single"], max_side=0)


def test_order_sizes_and_folder_names(tmp_path):
    """Name order with numbers as numbers; the model's size for SD2's factor 8; one folder per file."""
    for name in ("frame_10.png", "frame_2.png", "frame_1.png", ".hidden.png"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in list_images([tmp_path, tmp_path / "frame_2.png"])] == \
        ["frame_1.png", "frame_2.png", "frame_10.png"]  # hidden files left out, a file given twice once
    assert model_size(37, 61, 8) == (40, 64) and model_size(35, 59, 8) == (32, 56) and model_size(3, 5, 8) == (8, 8)
    assert model_size(3000, 4000, 8, max_side=768) == (576, 768) and model_size(300, 400, 8, max_side=768) == (304, 400)
    files = [tmp_path / "x" / "a.png", tmp_path / "y" / "a.png", tmp_path / "a.jpg", tmp_path / "b.png"]
    assert list(_folder_names(files).values()) == ["a_png", "a_png_2", "a_jpg", "b"]
