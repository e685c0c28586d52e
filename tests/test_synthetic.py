"""The procedural world's physics, checked on rendered samples."""

import numpy as np
import pytest

from stablemtl.data import synthetic
from stablemtl.metrics import IGNORE_INDEX

H, W = 48, 64


@pytest.fixture(scope="module", params=[(k, d) for k in synthetic.KINDS for d in synthetic.DOMAINS],
                ids=lambda p: f"{p[0]}-{p[1]}")
def sample(request):
    kind, domain = request.param
    return synthetic.render_sample(kind, 11, H, W, domain)


def backproject(s):
    v, u = np.mgrid[0:H, 0:W].astype(np.float64)
    pix = np.stack([u, v, np.ones_like(u)], -1)
    return (pix @ np.linalg.inv(s["K"]).T) * s["depth"][..., None]


def test_depth_normals_and_classes_are_physical(sample):
    hit = sample["object_id"] >= 0
    assert hit.mean() > 0.5
    assert (sample["depth"][hit] > 0).all() and (sample["depth"][~hit] == 0).all()
    n = sample["normal"][hit].astype(np.float64)
    np.testing.assert_allclose(np.linalg.norm(n, axis=1), 1.0, atol=1e-5)
    rays = backproject(sample)[hit]
    assert ((n * rays).sum(1) < 0).all(), "normals must face the camera"
    classes = np.unique(sample["semantic"])
    assert set(classes.tolist()) <= set(range(8)) | {IGNORE_INDEX}
    if sample["kind"] == "street":
        assert {0, 1, 6, 7} <= set(classes.tolist())  # road, building, sky, vehicle are always there
        assert (sample["semantic"][~hit] == synthetic.SKY).all()


def test_normals_agree_with_depth_geometry_on_planes(sample):
    p = backproject(sample)
    cross = np.cross(p[1:-1, 2:] - p[1:-1, :-2], p[2:, 1:-1] - p[:-2, 1:-1])
    cross /= np.linalg.norm(cross, axis=-1, keepdims=True) + 1e-12
    n = sample["normal"][1:-1, 1:-1].astype(np.float64)
    cross *= np.sign((cross * n).sum(-1, keepdims=True))
    # planar pixels: the 3 x 3 neighbourhood is one object with one normal
    ids, normals = sample["object_id"], sample["normal"]
    planar = ids[1:-1, 1:-1] >= 0
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            planar &= ids[1 + dy:H - 1 + dy, 1 + dx:W - 1 + dx] == ids[1:-1, 1:-1]
            planar &= np.abs(normals[1 + dy:H - 1 + dy, 1 + dx:W - 1 + dx] - normals[1:-1, 1:-1]).max(-1) < 1e-6
    assert planar.sum() > 200
    angle = np.degrees(np.arccos(np.clip((cross * n).sum(-1), -1, 1)))[planar]
    assert np.percentile(angle, 99) < 0.5, angle.max()


def test_scene_flow_projects_onto_optical_flow(sample):
    defined = sample["flow_defined"]
    x1 = backproject(sample)[defined]
    x2 = x1 + sample["scene_flow"][defined]
    proj = x2 @ sample["K"].T
    uv2 = proj[:, :2] / proj[:, 2:]
    v, u = np.nonzero(defined)
    np.testing.assert_allclose(uv2, np.stack([u, v], 1) + sample["optical_flow"][defined], atol=2e-3)
    assert sample["valid_flow"][~defined].sum() == 0


def test_static_points_follow_the_camera_motion():
    s = synthetic.render_sample("indoor", 5, H, W)
    room = s["object_id"] == 0  # the room box never moves
    x1 = backproject(s)[room]
    x2 = x1 @ s["cam2_from_cam1"][:3, :3].T + s["cam2_from_cam1"][:3, 3]
    np.testing.assert_allclose(x1 + s["scene_flow"][room], x2, atol=1e-4)


def _bilinear(img, x, y):
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    x1, y1 = np.minimum(x0 + 1, img.shape[1] - 1), np.minimum(y0 + 1, img.shape[0] - 1)
    wx, wy = (x - x0)[:, None], (y - y0)[:, None]
    return (img[y0, x0] * (1 - wx) * (1 - wy) + img[y0, x1] * wx * (1 - wy)
            + img[y1, x0] * (1 - wx) * wy + img[y1, x1] * wx * wy)


@pytest.mark.parametrize("kind", synthetic.KINDS)
def test_warping_frame_two_by_the_flow_reproduces_frame_one(kind):
    s = synthetic.render_sample(kind, 3, 96, 128)
    valid = s["valid_flow"] & s["lambertian"]
    v, u = np.nonzero(valid)
    f = s["optical_flow"][valid]
    warped = _bilinear(s["rgb_next"].astype(np.float64), u + f[:, 0], v + f[:, 1])
    error = np.abs(warped - s["rgb"][valid]).mean(1)
    unwarped = np.abs(s["rgb_next"][valid] - s["rgb"][valid]).mean(1)
    assert valid.mean() > 0.3
    # textures alias a little and moving shadows change a few pixels: robust statistics
    assert np.median(error) < 0.01, np.median(error)
    assert (error < 0.02).mean() > 0.6
    assert error.mean() < 0.5 * unwarped.mean(), (error.mean(), unwarped.mean())


def test_rgb_is_albedo_times_shading_on_lambertian_pixels(sample):
    lam = sample["lambertian"]
    assert lam.mean() > 0.5
    product = sample["albedo"] * sample["shading"]
    np.testing.assert_allclose(sample["rgb_linear"][lam], product[lam], atol=1e-5)
    assert (sample["albedo"][lam] >= 0.02).all() and (sample["shading"] <= 1).all()
    if sample["domain"] == "train":
        np.testing.assert_array_equal(sample["rgb"], sample["rgb_linear"])
    else:  # the "real" sensor: blur, response and noise on top
        assert np.abs(sample["rgb"] - sample["rgb_linear"]).mean() > 0.01


def test_samples_are_pure_functions_of_their_seed():
    a = synthetic.render_sample("street", 7, 32, 48, "real")
    b = synthetic.render_sample("street", 7, 32, 48, "real")
    c = synthetic.render_sample("street", 8, 32, 48, "real")
    for key in ("rgb", "rgb_next", "depth", "optical_flow", "scene_flow", "semantic"):
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["depth"], c["depth"])
    # the scene does not depend on the resolution: the same centre pixel sees the same depth
    big = synthetic.render_sample("indoor", 7, 49, 65)
    small = synthetic.render_sample("indoor", 7, 25, 33)
    assert big["depth"][24, 32] == pytest.approx(small["depth"][12, 16], rel=1e-5)


def test_domains_differ_and_lights_vary_only_the_lighting():
    train = synthetic.render_sample("indoor", 4, H, W, "train")
    real = synthetic.render_sample("indoor", 4, H, W, "real")
    assert not np.allclose(train["K"], real["K"]) or not np.allclose(train["albedo"], real["albedo"])
    lit_a = synthetic.render_sample("indoor", 4, H, W, "real", light_seed=1)
    lit_b = synthetic.render_sample("indoor", 4, H, W, "real", light_seed=2)
    np.testing.assert_array_equal(lit_a["albedo"], lit_b["albedo"])
    np.testing.assert_array_equal(lit_a["depth"], lit_b["depth"])
    assert np.abs(lit_a["shading"] - lit_b["shading"]).mean() > 0.01


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="kind"):
        synthetic.render_sample("forest", 0, 8, 8)
    with pytest.raises(ValueError, match="domain"):
        synthetic.render_sample("indoor", 0, 8, 8, domain="sim")
