"""The seven task encodings: reference values, round trips and bad input."""

import numpy as np
import pytest
import torch

from stablemtl import metrics, tasks
from stablemtl.tasks import get_task


def _rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def test_task_names_order_and_prompts():
    assert tasks.TASK_NAMES == ("albedo", "shading", "depth", "normal", "semantic",
                                "optical_flow", "scene_flow")
    assert [get_task(n).prompt for n in tasks.TASK_NAMES] == [
        "albedo", "shading", "depth", "normal", "semantic", "optical flow", "scene flow"]
    assert all(get_task(n).name == n for n in tasks.TASK_NAMES)


def test_unknown_task_lists_valid_names():
    with pytest.raises(ValueError, match="unknown task 'segmentation'.*albedo, shading, depth"):
        get_task("segmentation")


@pytest.mark.parametrize("name", tasks.TASK_NAMES)
def test_targets_are_three_channels_in_range(name):
    task = get_task(name)
    c = {"depth": 1, "semantic": 1, "optical_flow": 2}.get(name, 3)
    ann = _rand(2, c, 8, 12)
    if name == "semantic":
        ann = (ann * 8).long().clamp(max=7)
    elif name in ("optical_flow", "scene_flow", "normal"):
        ann = ann * 2 - 1
    target, valid = task.encode(ann)
    assert target.shape == (2, 3, 8, 12) and target.dtype == torch.float32
    assert valid.shape == (2, 1, 8, 12) and valid.dtype == torch.bool
    assert target.min() >= -1 and target.max() <= 1


# ----------------------------------------------------------------------------- depth

def test_depth_encoding_reference_quantiles():
    # 0..99 m: the 2 % / 98 % quantiles (linear interpolation) are 1.98 and 97.02
    depth = torch.arange(100, dtype=torch.float32).reshape(1, 1, 10, 10)
    valid = depth > 0  # 0 m is invalid anyway; the quantiles are over 1..99
    target, mask = get_task("depth").encode(depth, valid)
    near, far = np.quantile(np.arange(1, 100), [0.02, 0.98])
    expected = np.clip((np.arange(100) - near) / (far - near) * 2 - 1, -1, 1)
    expected[0] = -1  # invalid pixel -> black
    assert torch.allclose(target[0, 0].flatten(), torch.tensor(expected, dtype=torch.float32), atol=1e-6)
    assert torch.equal(target[:, 0], target[:, 1]) and torch.equal(target[:, 0], target[:, 2])
    assert not mask[0, 0, 0, 0] and mask.sum() == 99


def test_depth_round_trip_is_affine_inside_the_quantile_range():
    depth = 2.0 + 30.0 * _rand(3, 1, 16, 20)
    task = get_task("depth")
    target, valid = task.encode(depth)
    out = task.decode(target)
    assert out.shape == (3, 1, 16, 20) and out.min() >= 0 and out.max() <= 1
    for i in range(3):
        inside = (target[i, 0].abs() < 1).numpy()
        aligned, scale, shift = metrics.align_depth_least_squares(
            out[i, 0].numpy(), depth[i, 0].numpy(), inside, return_params=True)
        assert np.abs(aligned - depth[i, 0].numpy())[inside].max() < 1e-4
        assert scale > 0


def test_depth_nan_and_nonpositive_become_invalid():
    depth = torch.full((1, 1, 4, 4), 5.0)
    depth[0, 0, 0, 0] = float("nan")
    depth[0, 0, 0, 1] = float("inf")
    depth[0, 0, 0, 2] = 0.0
    depth[0, 0, 0, 3] = -1.0
    depth[0, 0, 1] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    target, valid = get_task("depth").encode(depth)
    assert valid[0, 0, 0].tolist() == [False] * 4 and valid[0, 0, 1:].all()
    assert torch.isfinite(target).all()
    assert (target[0, :, 0] == -1).all()


def test_depth_without_valid_pixels_is_all_invalid_and_finite():
    target, valid = get_task("depth").encode(torch.zeros(1, 1, 4, 4))
    assert not valid.any() and (target == -1).all()


def test_depth_decode_is_channel_mean():
    pred = torch.stack([torch.full((2, 2), -1.0), torch.full((2, 2), 0.0), torch.full((2, 2), 0.5)])[None]
    assert torch.allclose(get_task("depth").decode(pred), torch.full((1, 1, 2, 2), (-0.5 / 3 + 1) / 2))


# ----------------------------------------------------------------------------- normal

def test_normal_round_trip_exact_and_decode_normalises():
    n = torch.nn.functional.normalize(torch.randn(2, 3, 6, 7, generator=torch.Generator().manual_seed(1)), dim=1)
    task = get_task("normal")
    target, valid = task.encode(n)
    assert valid.all()
    assert torch.allclose(task.decode(target), n, atol=1e-6)
    shrunk = 0.5 * target
    shrunk[0, :, 0, 0] = 0  # a zero vector stays zero
    dec = task.decode(shrunk)
    assert torch.allclose(dec.norm(dim=1)[0, 1:], torch.ones(5, 7), atol=1e-6)
    assert torch.equal(dec[0, :, 0, 0], torch.zeros(3))


def test_normal_zero_or_nan_vectors_are_invalid():
    n = torch.zeros(1, 3, 2, 2)
    n[0, 2] = 1.0
    n[0, :, 0, 0] = 0.0
    n[0, 0, 0, 1] = float("nan")
    target, valid = get_task("normal").encode(n)
    assert valid[0, 0].tolist() == [[False, False], [True, True]]
    assert torch.equal(target[0, :, 0, 1], torch.zeros(3))


# ----------------------------------------------------------------------------- semantic

def test_semantic_palette_values_and_exact_round_trip():
    labels = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7], [250, 0, 250, 7]]).reshape(1, 1, 3, 4)
    task = get_task("semantic")
    target, valid = task.encode(labels)
    # road (128, 64, 128) -> 128/255*2-1 etc.; ignore -> black (-1)
    assert torch.allclose(target[0, :, 0, 0], torch.tensor([128, 64, 128]) / 255 * 2 - 1)
    assert torch.allclose(target[0, :, 1, 3], torch.tensor([0, 0, 142]) / 255 * 2 - 1)
    assert torch.equal(target[0, :, 2, 0], -torch.ones(3))
    assert valid[0, 0].tolist() == [[True] * 4, [True] * 4, [False, True, False, True]]
    decoded = task.decode(target)
    assert decoded.dtype == torch.int64
    assert torch.equal(decoded[valid], labels[valid])


def test_semantic_decode_nearest_colour_under_noise():
    labels = torch.arange(8).repeat(4).reshape(1, 1, 4, 8)
    task = get_task("semantic")
    target, _ = task.encode(labels)
    noisy = target + 0.05 * torch.randn(target.shape, generator=torch.Generator().manual_seed(2))
    assert torch.equal(task.decode(noisy), labels)


def test_semantic_rejects_unknown_ids():
    with pytest.raises(ValueError, match=r"class ids \[9, 33\].*250"):
        get_task("semantic").encode(torch.tensor([[0, 9], [33, 250]]).reshape(1, 1, 2, 2))


# ----------------------------------------------------------------------------- flows

def test_optical_flow_normalisation_reference():
    flow = torch.zeros(1, 2, 2, 2)
    flow[0, 0] = torch.tensor([[4.0, -8.0], [2.0, 100.0]])  # 100 px is on an invalid pixel
    flow[0, 1] = torch.tensor([[1.0, 0.5], [-2.0, 0.0]])
    valid = torch.tensor([[True, True], [True, False]])[None]
    # the release divides by the max over every pixel, the invalid one included, and keeps it
    target, mask = get_task("optical_flow").encode(flow, valid)
    assert torch.allclose(target[0, 0], torch.tensor([[0.04, -0.08], [0.02, 1.0]]))  # u / 100
    assert torch.allclose(target[0, 1], torch.tensor([[0.5, 0.25], [-1.0, 0.0]]))  # v / 2
    assert torch.equal(target[0, 2], target[0, 0])  # channels (u, v, u)
    assert torch.equal(mask[0, 0], valid[0])
    # invalid_targets="fill": the max over the valid pixels, invalid pixels zero
    target, mask = get_task("optical_flow").encode(flow, valid, invalid_targets="fill")
    assert torch.allclose(target[0, 0], torch.tensor([[0.5, -1.0], [0.25, 0.0]]))  # u / 8
    assert torch.equal(mask[0, 0], valid[0])
    with pytest.raises(ValueError, match=r"invalid_targets='zero'.*'keep', 'fill'"):
        get_task("optical_flow").encode(flow, valid, invalid_targets="zero")


@pytest.mark.parametrize("name,c", [("optical_flow", 2), ("scene_flow", 3)])
def test_flow_round_trip_up_to_per_axis_scale(name, c):
    flow = 10 * torch.randn(2, c, 9, 11, generator=torch.Generator().manual_seed(3))
    task = get_task(name)
    target, valid = task.encode(flow)
    out = task.decode(target)
    assert out.shape == (2, c, 9, 11)
    for i in range(2):
        peak = flow[i].abs().amax(dim=(1, 2))
        assert torch.allclose(out[i] * peak[:, None, None], flow[i], atol=1e-5)
        o, f = out[i].permute(1, 2, 0).numpy(), flow[i].permute(1, 2, 0).numpy()
        aligned, scale = metrics.align_flow_nnls(o, f, valid[i, 0].numpy(), return_scale=True)
        assert np.allclose(scale, peak.numpy(), rtol=1e-5)


def test_flow_zero_axis_is_not_divided_by_zero():
    flow = torch.zeros(1, 2, 3, 3)
    flow[0, 0] = 5.0
    target, _ = get_task("optical_flow").encode(flow)
    assert torch.isfinite(target).all() and (target[0, 1] == 0).all() and (target[0, 0] == 1).all()


# ----------------------------------------------------------------------------- albedo / shading

def test_albedo_mask_threshold_and_round_trip():
    albedo = torch.full((1, 3, 2, 2), 0.5)
    albedo[0, 1, 0, 0] = 0.0039  # one channel below 0.004 -> invalid
    albedo[0, :, 0, 1] = 0.004  # exactly at the threshold -> valid
    task = get_task("albedo")
    target, valid = task.encode(albedo)
    assert valid[0, 0].tolist() == [[False, True], [True, True]]
    assert torch.allclose(target[0, :, 0, 0], torch.tensor([0.0, 0.0039 * 2 - 1, 0.0]))  # the raw albedo kept
    assert torch.equal(task.encode(albedo, invalid_targets="fill")[0][0, :, 0, 0], -torch.ones(3))
    assert torch.allclose(task.decode(target)[valid.expand(-1, 3, -1, -1)],
                          albedo[valid.expand(-1, 3, -1, -1)], atol=1e-6)
    assert torch.equal(tasks.albedo_valid_mask(albedo), valid)


def test_albedo_uint8_is_divided_by_255_and_floats_above_one_rejected():
    u8 = torch.tensor([0, 1, 128, 255], dtype=torch.uint8).reshape(1, 1, 2, 2).repeat(1, 3, 1, 1)
    target, valid = get_task("albedo").encode(u8)
    assert torch.allclose(target[0, 0, 1], torch.tensor([128 / 255 * 2 - 1, 1.0]), atol=1e-6)
    assert valid[0, 0].tolist() == [[False, False], [True, True]]  # 0 and 1/255 = 0.0039 < 0.004
    with pytest.raises(ValueError, match=r"values reach 255.*divide 8-bit images by 255"):
        get_task("albedo").encode(u8.float())


def test_shading_grey_weights_and_round_trip():
    shading = torch.zeros(1, 3, 1, 2)
    shading[0, :, 0, 0] = torch.tensor([1.0, 0.0, 0.0])
    shading[0, :, 0, 1] = torch.tensor([0.2, 0.4, 0.6])
    task = get_task("shading")
    target, valid = task.encode(shading)
    grey = torch.tensor([0.3, 0.3 * 0.2 + 0.59 * 0.4 + 0.11 * 0.6])
    assert torch.allclose(target[0, 0, 0], grey * 2 - 1, atol=1e-6)
    assert torch.allclose(task.decode(target)[0, 0, 0], grey, atol=1e-6)
    # a grey single-channel shading is used as is; the albedo mask is passed as valid
    target1, valid1 = task.encode(grey.reshape(1, 1, 1, 2), valid=torch.tensor([[[True, False]]]))
    assert torch.allclose(target1, target)  # the masked pixel keeps its shading (the release)
    assert valid1[0, 0].tolist() == [[True, False]]
    target1, _ = task.encode(grey.reshape(1, 1, 1, 2), valid=torch.tensor([[[True, False]]]), invalid_targets="fill")
    assert torch.allclose(target1, target * torch.tensor([1.0, 0.0]) + torch.tensor([0.0, -1.0]))


# ----------------------------------------------------------------------------- shapes, colours

def test_bad_shapes_name_the_task_and_expectation():
    with pytest.raises(ValueError, match=r"depth annotation: expected a batch-first tensor \[B, 1, H, W\]"):
        get_task("depth").encode(torch.ones(4, 4))
    with pytest.raises(ValueError, match=r"optical_flow annotation.*\[B, 2, H, W\], got shape \(1, 3, 4, 4\)"):
        get_task("optical_flow").encode(torch.ones(1, 3, 4, 4))
    with pytest.raises(ValueError, match="valid mask of shape"):
        get_task("normal").encode(torch.ones(1, 3, 4, 4), torch.ones(1, 4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"normal prediction.*\[B, 3, H, W\]"):
        get_task("normal").decode(torch.ones(1, 4, 4, 4))


def test_colorize_semantic_palette_and_normals():
    ids = torch.tensor([[0, 7], [250, 5]]).reshape(1, 1, 2, 2)
    rgb = get_task("semantic").colorize(ids)
    assert rgb.dtype == np.uint8 and rgb.shape == (1, 2, 2, 3)
    assert rgb[0, 0, 0].tolist() == [128, 64, 128] and rgb[0, 0, 1].tolist() == [0, 0, 142]
    assert rgb[0, 1, 0].tolist() == [0, 0, 0] and rgb[0, 1, 1].tolist() == [107, 142, 35]
    n = torch.tensor([0.0, 0.0, 1.0]).reshape(1, 3, 1, 1)
    assert get_task("normal").colorize(n)[0, 0, 0].tolist() == [128, 128, 255]


def test_colorize_flow_wheel_directions():
    # Middlebury wheel: zero -> white, right -> red, left -> cyan, up -> blue/violet, down -> yellow
    flow = torch.tensor([[0.0, 1.0, -1.0, 0.0, 0.0], [0.0, 0.0, 0.0, -1.0, 1.0]]).reshape(1, 2, 1, 5)
    rgb = get_task("optical_flow").colorize(flow)[0, 0]
    assert rgb[0].tolist() == [255, 255, 255]
    assert rgb[1].tolist() == [255, 0, 0]  # angle atan2(-0.0, -1) = -pi: the wheel's first entry
    assert rgb[2].tolist() == [0, 209, 255]
    assert rgb[3].tolist() == [88, 0, 255]
    assert rgb[4].tolist() == [255, 229, 0]


def test_colorize_depth_uses_colormap_and_masks_invalid():
    d = torch.tensor([0.0, 0.5, 1.0]).reshape(1, 1, 1, 3)
    valid = torch.tensor([[[True, True, False]]])
    rgb = get_task("depth").colorize(d, valid)
    import matplotlib
    lut = matplotlib.colormaps["Spectral"]
    assert rgb[0, 0, 0].tolist() == [round(255 * c) for c in lut(0.0)[:3]]
    assert rgb[0, 0, 2].tolist() == [0, 0, 0]
    metric = get_task("depth").colorize(torch.tensor([[[[2.0, 6.0]]]]), value_range=(2.0, 6.0))
    assert metric[0, 0, 0].tolist() == rgb[0, 0, 0].tolist()
