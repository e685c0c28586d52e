"""The StableMTL release's behaviour, pinned on small hand-checkable inputs (docs/method.md, "Release parity").

One test (or more) per item of the parity list, numbered as there. Files are written in
the real datasets' formats and sizes and read through the kit's loaders, so a change of a
loader, an encoding or the protocol that drifts from the release fails here.
"""

import cv2
import numpy as np
import pytest
import torch

from stablemtl import evaluate as E
from stablemtl.results import read_metrics
from stablemtl import metrics, options
from stablemtl import train as T
from stablemtl.data import annotations as A
from stablemtl.data import formats as F
from stablemtl.data import sources, transforms
from stablemtl.tasks import get_task

KITTI_P = np.array([[721.5377, 0, 609.5593, 44.85728], [0, 721.5377, 172.854, 0.2163791], [0, 0, 1, 0.002745884]])


def _lines(root, file, lines):
    path = root / "data_split" / file
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def _hypersim(root, depth, normal=None, lists=None):
    """One preprocessed Hypersim frame ``ai_001_001/..._cam_00_fr0000`` and the given split lists."""
    h, w = depth.shape
    name = lambda kind, ext: f"ai_001_001/{kind}_cam_00_fr0000.{ext}"  # noqa: E731
    F.write_rgb(root / name("rgb", "png"), np.full((h, w, 3), 128, np.uint8))
    A.write_hypersim_depth(root / name("depth_plane", "png"), depth)
    normal = np.zeros((h, w, 3), np.float32) + np.float32([0, 0, 1]) if normal is None else normal
    F.write_npy(root / name("normal_cam", "npy"), normal.astype(np.float32))
    F.write_rgb(root / name("normal_cam", "png"), np.zeros((h, w, 3), np.uint8))
    F.write_npy(root / name("normal_valid_mask", "npy"), np.ones((h, w), bool))
    F.write_rgb(root / name("albedo", "png"), np.full((h, w, 3), 100, np.uint8))
    F.write_rgb(root / name("shading", "png"), np.full((h, w, 3), 200, np.uint8))
    five = " ".join(name(k, e) for k, e in [("rgb", "png"), ("depth_plane", "png"), ("normal_cam", "npy"),
                                            ("normal_cam", "png"), ("normal_valid_mask", "npy")])
    for file, columns in (lists or {"filename_list_train_no_nandepth.txt": 5, "filename_list_train_normal.txt": 5}).items():
        _lines(root, file, [" ".join(five.split()[:columns])])
    return root


def _vkitti(root, h=375, w=1242, flow=None, flow_valid=None, scene_flow=None, depth=None):
    """One Virtual KITTI 2 frame (Scene02/clone/Camera_0, frames 0 and 1) with its per-task lists."""
    path = lambda kind, prefix, ext, n=0: f"original/Scene02/clone/frames/{kind}/Camera_0/{prefix}_{n:05d}.{ext}"  # noqa: E731
    g = np.random.default_rng(0)
    for n in (0, 1):
        F.write_rgb(root / path("rgb", "rgb", "jpg", n), g.integers(40, 220, (h, w, 3), dtype=np.uint8))
    lists = {}
    if flow is not None:
        A.write_vkitti_flow(root / path("forwardFlow", "flow", "png"), flow, flow_valid)
        lists["optical_flow"] = path("forwardFlow", "flow", "png")
    if scene_flow is not None:
        A.write_vkitti_scene_flow(root / path("forwardSceneFlow", "sceneFlow", "png"), scene_flow)
        lists["scene_flow"] = path("forwardSceneFlow", "sceneFlow", "png")
    if depth is not None:
        A.write_vkitti_depth(root / path("depth", "depth", "png"), depth)
        lists["depth"] = path("depth", "depth", "png")
    for task, line in lists.items():
        _lines(root, f"vkitti_{task}_train.txt", [line])
    return root


def _kitti_flow(root, h=375, w=1242):
    """One KITTI 2015 scene-flow frame: flow (u, v) = (col % 64 / 8, row % 32 / 4) px, disparities 10 and 8 px."""
    rows, cols = np.mgrid[0:h, 0:w]
    flow = np.stack([(cols % 64) / 8.0, (rows % 32) / 4.0], -1)
    valid = (rows + cols) % 7 != 0
    t = root / "training"
    g = np.random.default_rng(1)
    for frame in ("10", "11"):
        F.write_rgb(t / f"image_2/000000_{frame}.png", g.integers(0, 255, (h, w, 3), dtype=np.uint8))
    A.write_kitti_flow(t / "flow_occ/000000_10.png", flow, valid)
    A.write_kitti_disparity(t / "disp_occ_0/000000_10.png", np.full((h, w), 10.0))
    A.write_kitti_disparity(t / "disp_occ_1/000000_10.png", np.full((h, w), 8.0))
    A.write_kitti_calib(t / "calib_cam_to_cam/000000.txt", {"P_rect_02": KITTI_P})
    _lines(root, "training.txt", ["training/flow_occ/000000_10.png"])
    return flow, valid


def _diode(root, stored_normal, h=8, w=8):
    stem = "indoors/scene_00019/scan_00183/00019_00183_indoors_000_010"
    F.write_rgb(root / f"{stem}.png", np.full((h, w, 3), 90, np.uint8))
    A.write_diode_depth(root / f"{stem}_depth.npy", np.full((h, w), 3.0))
    A.write_diode_mask(root / f"{stem}_depth_mask.npy", np.ones((h, w), bool))
    F.write_npy(root / f"{stem}_normal.npy", np.broadcast_to(np.float32(stored_normal), (h, w, 3)).copy())
    _lines(root, "diode_val_all_filename_list.txt", [f"{stem}.png {stem}_depth.npy {stem}_depth_mask.npy"])
    return root


# ----------------------------------------------------------------------------- 1. decoding

@pytest.mark.parametrize("task", ["depth", "shading"])
def test_1_depth_and_shading_decode_average_then_clip(task):
    x = torch.tensor([[1.2, 0.9, 0.9], [-1.3, -0.5, -0.5]]).T.reshape(1, 3, 1, 2)
    out = get_task(task).decode(x)
    assert out.shape == (1, 1, 1, 2)
    assert out[0, 0, 0].tolist() == pytest.approx([1.0, (1 - 2.3 / 3) / 2], abs=1e-6)  # 1.0 and 0.11667
    assert out[0, 0, 0, 1].item() == pytest.approx(0.116667, abs=1e-6)


# ----------------------------------------------------------------------------- 2. the Eigen window

def test_2_eigen_window_is_built_on_the_full_image_then_cropped():
    mask = transforms.eigen_crop_mask(375, 1242)
    assert mask.shape == (352, 1216) and mask.dtype == bool
    rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    assert (rows[0], rows[-1], cols[0], cols[-1]) == (101, 318, 31, 1183)
    assert mask.sum() == 218 * 1153  # a full rectangle
    assert mask.sum() / (204 * 1129) == pytest.approx(1.0914, abs=1e-4)  # 9 % more than the window on the crop


def test_2_kitti_depth_loader_uses_the_release_window(tmp_path):
    rgb = "2011_09_26/2011_09_26_drive_0002_sync/image_02/data/0000000069.png"
    gt = "2011_09_26_drive_0002_sync/proj_depth/groundtruth/image_02/0000000069.png"
    F.write_rgb(tmp_path / rgb, np.full((375, 1242, 3), 100, np.uint8))
    A.write_kitti_depth(tmp_path / gt, np.full((375, 1242), 20.0))
    _lines(tmp_path, "eigen_test_files_with_gt.txt", [f"{rgb} {gt} 721.5377"])
    sample = sources.KittiDepth(tmp_path, "test")[0]
    assert sample["depth"].shape == (1, 352, 1216)
    np.testing.assert_array_equal(sample["depth_valid"][0].numpy(), transforms.eigen_crop_mask(375, 1242))


# ----------------------------------------------------------------------------- 3. learning-rate warm-up

def test_3_warm_up_starts_at_zero_and_the_decay_agrees():
    assert [T.lr_factor(k, 100, 25000, 0.01) for k in (0, 1, 50, 100)] == [0.0, 0.01, 0.5, 1.0]
    assert T.lr_factor(100 + (25000 - 100) // 2, 100, 25000, 0.01) == pytest.approx(0.1)  # halfway: 0.01 ** 0.5
    assert T.lr_factor(25000, 100, 25000, 0.01) == pytest.approx(0.01)
    assert T.lr_factor(30000, 100, 25000, 0.01) == pytest.approx(0.01)


# ----------------------------------------------------------------------------- 4. normals as stored

def test_4_a_diode_normal_file_gives_the_release_target(tmp_path):
    root = _diode(tmp_path, [0.6, 0.0, 0.8])
    sample = sources.DIODE(root, tasks="normal", encode_targets=True)[0]
    target = sample["normal_target"][:, 0, 0]
    assert target.tolist() == pytest.approx([-0.6, 0.0, 0.8], abs=1e-6)  # DIODE's (-nx, ny, nz), not negated
    facing = sources.DIODE(root, tasks="normal", encode_targets=True, normals="facing")[0]
    assert facing["normal_target"][:, 0, 0].tolist() == pytest.approx([0.6, 0.0, -0.8], abs=1e-6)


def test_4_a_hypersim_normal_file_is_learned_as_stored(tmp_path):
    stored = np.zeros((4, 4, 3), np.float32) + np.float32([0.0, 0.28, 0.96])
    root = _hypersim(tmp_path, np.full((4, 4), 2.0), stored)
    target = sources.Hypersim(root, tasks="normal", encode_targets=True)[0]["normal_target"]
    np.testing.assert_allclose(target[:, 0, 0].numpy(), [0.0, 0.28, 0.96], atol=1e-6)


# ----------------------------------------------------------------------------- 5. invalid pixels keep their annotation

def test_5_vkitti_sky_depth_normalises_to_plus_one(tmp_path):
    depth = np.array([[5.0, 6.0, 7.0], [8.0, 9.0, np.inf]])  # +inf: the sky's far code 655.35 m
    root = _vkitti(tmp_path, 2, 3, depth=depth)
    sample = sources.VirtualKITTI2(root, tasks="depth", encode_targets=True)[0]
    assert sample["depth_valid"][0].tolist() == [[True, True, True], [True, True, False]]
    near, far = 5.0 + 0.02 * 4, 5.0 + 0.98 * 4  # quantiles of the valid 5..9 m
    expected = np.clip((depth.clip(max=655.35) - near) / (far - near) * 2 - 1, -1, 1)
    np.testing.assert_allclose(sample["depth_target"][0].numpy(), expected, atol=1e-6)
    assert sample["depth_target"][0, 1, 2] == 1.0
    filled = sources.VirtualKITTI2(root, tasks="depth", encode_targets=True, invalid_targets="fill")[0]
    assert filled["depth_target"][0, 1, 2] == -1.0


def test_5_scene_flow_is_normalised_over_every_pixel_invalid_ones_included(tmp_path):
    flow = np.zeros((2, 2, 2))
    valid = np.array([[True, True], [True, False]])
    scene = np.zeros((2, 2, 3))
    scene[..., 0] = [[1.0, -2.0], [0.5, 8.0]]  # 8 m on the invalid pixel
    scene[..., 1] = [[0.5, 1.0], [0.25, 0.0]]
    scene[..., 2] = [[2.0, 4.0], [-1.0, 0.0]]
    root = _vkitti(tmp_path, 2, 2, flow=flow, flow_valid=valid, scene_flow=scene)
    sample = sources.VirtualKITTI2(root, tasks="scene_flow", encode_targets=True)[0]
    assert sample["scene_flow_valid"][0].tolist() == valid.tolist()
    q = 20 / 65535  # the PNG's quantisation
    np.testing.assert_allclose(sample["scene_flow_target"][0].numpy(), [[0.125, -0.25], [0.0625, 1.0]], atol=q)
    np.testing.assert_allclose(sample["scene_flow_target"][1].numpy(), [[0.5, 1.0], [0.25, 0.0]], atol=q)
    np.testing.assert_allclose(sample["scene_flow_target"][2].numpy(), [[0.5, 1.0], [-0.25, 0.0]], atol=q)
    filled = sources.VirtualKITTI2(root, tasks="scene_flow", encode_targets=True, invalid_targets="fill")[0]
    np.testing.assert_allclose(filled["scene_flow_target"][0].numpy(), [[0.5, -1.0], [0.25, 0.0]], atol=q)


def test_5_albedo_and_shading_keep_their_values_where_the_mask_is_off():
    albedo = torch.tensor([0.5, 0.002, 0.3]).reshape(1, 3, 1, 1)  # one channel under 0.004: invalid
    target, valid = get_task("albedo").encode(albedo)
    assert not valid.any() and target[0, :, 0, 0].tolist() == pytest.approx([0.0, -0.996, -0.4], abs=1e-6)
    target, _ = get_task("shading").encode(torch.full((1, 1, 1, 1), 0.75), torch.zeros(1, 1, 1, dtype=torch.bool))
    assert target[0, :, 0, 0].tolist() == pytest.approx([0.5] * 3)


# ----------------------------------------------------------------------------- 6. normalise, then resize

def test_6_depth_is_normalised_at_the_file_resolution_then_resized(tmp_path):
    depth = np.arange(1, 17, dtype=np.float64).reshape(4, 4)  # metres; quantiles 1.3 and 15.7
    root = _hypersim(tmp_path, depth)
    sample = sources.Hypersim(root, tasks="depth", resolution=(2, 2), encode_targets=True)[0]
    # nearest-exact 4 -> 2 keeps pixels (1, 1), (1, 3), (3, 1), (3, 3): 6, 8, 14, 16 m
    expected = np.clip((np.array([[6.0, 8.0], [14.0, 16.0]]) - 1.3) / 14.4 * 2 - 1, -1, 1)
    np.testing.assert_allclose(sample["depth_target"][0].numpy(), expected, atol=1e-6)
    other = sources.Hypersim(root, tasks="depth", resolution=(2, 2), encode_targets=True,
                             target_order="resize_then_normalise")[0]
    near, far = 6.0 + 0.06 * 2, 14.0 + 0.94 * 2  # quantiles of the four resized pixels
    np.testing.assert_allclose(other["depth_target"][0].numpy(),
                               np.clip((np.array([[6.0, 8.0], [14.0, 16.0]]) - near) / (far - near) * 2 - 1, -1, 1),
                               atol=1e-6)
    with pytest.raises(ValueError, match="target_order='resize_first'.*'normalise_then_resize'"):
        sources.Hypersim(root, tasks="depth", target_order="resize_first")


# ----------------------------------------------------------------------------- 7. Cityscapes sampling

def test_7_cityscapes_at_256x512_samples_full_resolution_pixel_4i_plus_3(tmp_path):
    rows, cols = np.mgrid[0:1024, 0:2048]
    rgb = np.stack([rows % 256, cols % 256, (rows // 256) * 16 + cols // 256], -1).astype(np.uint8)
    labels = np.where((rows % 4 == 3) & (cols % 4 == 3), 7, 11)  # road exactly at (4i + 3, 4j + 3)
    image = "leftImg8bit/val/frankfurt/frankfurt_000000_000294_leftImg8bit.png"
    F.write_rgb(tmp_path / image, rgb)
    A.write_cityscapes_label_ids(tmp_path / sources.Cityscapes.label_path(image), labels)
    _lines(tmp_path, "cityscapes_val_full.txt", [image])
    sample = sources.Cityscapes(tmp_path, resolution=(256, 512))[0]
    assert (sample["semantic"] == 0).all()  # every sampled label is a road pixel
    got = np.rint(sample["rgb"].numpy() * 255).astype(int)
    r, c = 4 * np.arange(256)[:, None] + 3, 4 * np.arange(512)[None, :] + 3
    np.testing.assert_array_equal(got[0], r % 256 + 0 * c)
    np.testing.assert_array_equal(got[1], c % 256 + 0 * r)
    np.testing.assert_array_equal(got[2], (r // 256) * 16 + c // 256)


# ----------------------------------------------------------------------------- 8, 9. KITTI flow scoring and scene flow

@pytest.fixture(scope="module")
def kitti_flow(tmp_path_factory):
    data = tmp_path_factory.mktemp("kitti")
    flow, valid = _kitti_flow(data / "kitti" / "flow_2015")
    return data, flow, valid


def _oracle(sample, task):
    return sample[task][None].float()


def test_8_kitti_flow_is_scored_at_176x608_against_ground_truth_at_native_pixels(kitti_flow, tmp_path):
    data, flow, valid = kitti_flow
    E.evaluate(_oracle, ["kitti_flow", "kitti_scene_flow"], tmp_path, data, model_name="oracle", progress=False)
    crop = lambda a: a[375 - 352:, 13:13 + 1216]  # noqa: E731  the KB crop
    with np.load(tmp_path / "predictions/oracle/kitti_flow/00000.npz") as stored:
        assert stored["gt"].shape == (176, 608, 2) and stored["pred"].shape == (176, 608, 2)
        # pixel (i, j) is native pixel (2i + 1, 2j + 1), values in full-resolution pixels (not halved)
        stored_flow = np.where(valid[..., None], flow, 0.0).astype(np.float32)  # invalid pixels read as 0
        np.testing.assert_array_equal(stored["gt"], crop(stored_flow)[1::2, 1::2])
        np.testing.assert_array_equal(stored["valid"], crop(valid)[1::2, 1::2])
    rows = read_metrics(tmp_path)
    (epe,) = [float(r["value"]) for r in rows if r["benchmark"] == "kitti_flow" and r["metric"] == "epe"]
    assert epe == pytest.approx(0.0, abs=1e-6)
    E.evaluate(_oracle, ["kitti_flow"], tmp_path / "native", data, model_name="oracle", progress=False,
               flow_scoring="native")
    with np.load(tmp_path / "native/predictions/oracle/kitti_flow/00000.npz") as stored:
        assert stored["gt"].shape == (352, 1216, 2)
        np.testing.assert_array_equal(stored["gt"], crop(stored_flow))
    with pytest.raises(ValueError, match="flow_scoring='full'.*'eval_resolution', 'native'"):
        E.evaluate(_oracle, ["kitti_flow"], tmp_path, data, model_name="oracle", flow_scoring="full")


def test_9_kitti_scene_flow_ground_truth_uses_the_release_depth_in_float32(kitti_flow):
    data, flow, valid = kitti_flow
    sample = sources.KittiFlow(data / "kitti" / "flow_2015", tasks="scene_flow")[0]
    top, left = 375 - 352, 13
    i, j = 100, 500  # a valid pixel of the crop: native (123, 513)
    assert sample["scene_flow_valid"][0, i, j]
    f32 = np.float32
    f, cx, cy = f32(721.5377), f32(609.5593), f32(172.854)
    fb = f32(0.54) * f
    z0, z1 = fb / (f32(10.0) + f32(1e-5)), fb / (f32(8.0) + f32(1e-5))
    u, v = f32(j + left), f32(i + top)
    du, dv = f32(flow[i + top, j + left, 0]), f32(flow[i + top, j + left, 1])
    expected = [(u + du - cx) * z1 / f - (u - cx) * z0 / f, (v + dv - cy) * z1 / f - (v - cy) * z0 / f, z1 - z0]
    np.testing.assert_allclose(sample["scene_flow"][:, i, j].numpy(), expected, rtol=0, atol=2e-6)
    # the 1e-5 px is visible: without it the depth change differs by about 1.5e-5 m here
    assert abs((0.54 * 721.5377 / 8 - 0.54 * 721.5377 / 10) - sample["scene_flow"][2, i, j].item()) > 5e-6


# ----------------------------------------------------------------------------- 10. FlyingThings3D splatting (a documented fix)

def test_10_flyingthings3d_scene_flow_is_splatted_with_the_crop_offset(tmp_path):
    import json

    h, w, ch = 12, 8, 8  # a miniature FT3D frame: the centre crop drops 2 rows at the top
    meta = {"geometry": {"focal": 10.0, "cx": 3.5, "cy": 5.5, "crop": [ch, w]}}
    (tmp_path / sources.META_FILE).write_text(json.dumps(meta))
    for n in (0, 1):
        F.write_rgb(tmp_path / f"train/image_clean/{n:07d}.png", np.zeros((h, w, 3), np.uint8))
    A.write_kitti_flow(tmp_path / "train/flow_2d/0000000.png", np.zeros((h, w, 2)), np.ones((h, w), bool))
    pc1 = np.array([[0.0, 0.0, 2.0]], np.float32)  # projects onto native pixel (row 5.5 -> 6, col 3.5 -> 4)
    F.write_npz(tmp_path / "train/pc/0000000.npz", pc1=pc1)
    F.write_npy(tmp_path / "train/flow_3d/0000000.npy", np.array([[0.1, 0.2, 0.3]], np.float32))
    _lines(tmp_path, "train.txt", ["train/flow_2d/0000000.png"])
    sample = sources.FlyingThings3D(tmp_path, tasks="scene_flow")[0]
    rows, cols = np.nonzero(sample["scene_flow_valid"][0].numpy())
    assert (rows.tolist(), cols.tolist()) == ([4], [4])  # native row 6 - 2 (the release: row 6, 2 rows off)
    assert sample["scene_flow"][:, 4, 4].tolist() == pytest.approx([0.1, 0.2, 0.3])


# ----------------------------------------------------------------------------- 11. SILog

def test_11_silog_is_reported_x100():
    gt, pred, valid = np.array([[1.0, 2.0], [4.0, 8.0]]), np.array([[1.0, 2.0], [3.0, 5.0]]), np.ones((2, 2), bool)
    aligned = metrics.align_depth_least_squares(pred, gt, valid, depth_range=(1e-5, 80.0))
    d = np.log(np.array([0.6, 2.4, 4.2, 7.8]) / np.array([1.0, 2.0, 4.0, 8.0]))
    assert metrics.depth_metrics(aligned, gt, valid)["silog"] == pytest.approx(100 * np.sqrt(np.mean(d**2) - np.mean(d) ** 2))
    assert metrics.depth_metrics(aligned, gt, valid)["silog"] == pytest.approx(26.17, abs=5e-3)
    assert metrics.depth_metrics(aligned, gt, valid, silog="fraction")["silog"] == pytest.approx(0.2617, abs=5e-5)
    acc = metrics.DepthAccumulator(depth_range=(1e-5, 80.0))
    acc.update(pred, gt, valid)
    assert acc.compute()["silog"] == pytest.approx(26.17, abs=5e-3)
    with pytest.raises(ValueError, match="silog='percent'.*'x100', 'fraction'"):
        metrics.depth_metrics(aligned, gt, valid, silog="percent")


# ----------------------------------------------------------------------------- 12. the vKITTI optical-flow crop

def test_12_vkitti_optical_flow_trains_on_a_random_1024x256_window(tmp_path):
    rows, cols = np.mgrid[0:375, 0:1242]
    flow = np.stack([np.full((375, 1242), 3.0), np.full((375, 1242), -1.5)], -1)
    scene = np.zeros((375, 1242, 3)) + [0.1, 0.0, -0.2]
    root = _vkitti(tmp_path, flow=flow, flow_valid=np.ones((375, 1242), bool), scene_flow=scene)
    ds = sources.VirtualKITTI2(root, tasks="optical_flow", augment=True)
    for epoch in range(4):
        s = ds[(0, epoch)]
        top, left = s["crop"]
        assert s["rgb"].shape == (3, 256, 1024) and 0 <= top <= 375 - 256 and 0 <= left <= 1242 - 1024
    resized = sources.VirtualKITTI2(root, tasks="optical_flow", augment=True, resolution=(187, 621),
                                    encode_targets=True)[(0, 0)]
    assert resized["optical_flow_target"].shape == (3, 187, 621)
    # scene flow: neither cropped nor colour-jittered, only flipped
    plain = sources.VirtualKITTI2(root, tasks="scene_flow")[0]
    for epoch in range(4):
        s = sources.VirtualKITTI2(root, tasks="scene_flow", augment=True)[(0, epoch)]
        assert s["crop"] is None and s["rgb"].shape == (3, 375, 1242)
        torch.testing.assert_close(s["rgb"], plain["rgb"].flip(-1) if s["flip"][0] else plain["rgb"])


# ----------------------------------------------------------------------------- 13. Hypersim lists under their own names

def test_13_the_release_hypersim_lists_drop_in(tmp_path):
    root = _hypersim(tmp_path, np.full((4, 4), 2.0), lists={"filename_list_train_no_nandepth.txt": 5,
                                                           "filename_list_train_normal.txt": 5})
    for task in ("depth", "normal", "albedo", "shading"):
        ds = sources.Hypersim(root, tasks=task)
        expected = "filename_list_train_normal.txt" if task == "normal" else "filename_list_train_no_nandepth.txt"
        assert ds.split_file.name == expected and len(ds) == 1
        assert ds[0][task].shape[-2:] == (4, 4)


def test_13_a_depth_only_list_serves_depth_and_a_wrong_column_count_is_named(tmp_path):
    root = _hypersim(tmp_path, np.full((4, 4), 2.0), lists={"filename_list_train_no_nandepth.txt": 2,
                                                           "filename_list_train_normal.txt": 2})
    assert sources.Hypersim(root, tasks="depth")[0]["depth"].shape == (1, 4, 4)
    with pytest.raises(F.FormatError, match=r"filename_list_train_normal.txt: line 1 has 2 column\(s\); "
                                            r"a Hypersim normal list needs 5"):
        sources.Hypersim(root, tasks="normal")
    _lines(root, "filename_list_train_no_nandepth.txt", ["ai_001_001/rgb_cam_00_fr0000.png a b"])
    with pytest.raises(F.FormatError, match=r"line 1 has 3 column\(s\); a Hypersim depth list needs 2 or 5"):
        sources.Hypersim(root, tasks="depth")


# ----------------------------------------------------------------------------- 14. KITTI flow PNGs

def test_14_kitti_flow_png_stores_invalid_pixels_as_zero_flow(tmp_path):
    path = A.write_kitti_flow(tmp_path / "f.png", np.array([[[1.0, -2.0], [300.0, 5.0]]]), np.array([[True, False]]))
    bgr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)  # as the release reads it
    assert bgr[0, 0].tolist() == [1, 32768 - 128, 32768 + 64]  # B = valid, G = v, R = u
    assert bgr[0, 1].tolist() == [0, 32768, 32768]
    flow, valid = A.read_kitti_flow(path)
    assert flow[0, 1].tolist() == [0.0, 0.0] and valid.tolist() == [[True, False]]


# ----------------------------------------------------------------------------- the options themselves

def test_every_option_defaults_to_the_release_and_rejects_unknown_values():
    assert options.DEFAULTS == {"invalid_targets": "keep", "normals": "as_stored", "target_order": "normalise_then_resize",
                                "silog": "x100", "flow_scoring": "eval_resolution"}
    for name, values in options.OPTIONS.items():
        for value in values:
            assert options.check(name, value) == value
        with pytest.raises(ValueError, match=f"{name}='nope' is not a valid choice; valid: " + ", ".join(
                repr(v) for v in values).replace("(", r"\(")):
            options.check(name, "nope")
    assert T.TrainConfig().normals == "as_stored" and T.TrainConfig().invalid_targets == "keep"
    assert T.TrainConfig().target_order == "normalise_then_resize"
    with pytest.raises(ValueError, match="normals='inward'"):
        T.TrainConfig(normals="inward", base=".", data_root=".").validate()
