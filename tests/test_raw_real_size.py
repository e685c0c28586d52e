"""``stablemtl.data.raw`` for the eight datasets: the four evaluation datasets written in their download
layouts, prepared (checked) and read back against the world's ground truth; ``render_scale``
(rays every s pixels, upsampled with consistent intrinsics and flow); the real datasets' sizes
(``REAL_SIZES``) against the loaders' crops and the release's cameras, and a real-size round trip."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from stablemtl.data import prepare as P
from stablemtl.data import raw as R
from stablemtl.data import annotations, sources, synthetic, transforms
from stablemtl.data.convert.common import MANIFEST, RAW_META
from stablemtl.data.convert.flying_things_3d import FT3D
from stablemtl.data.convert.hypersim import HYPERSIM
from stablemtl.data.convert.vkitti import VKITTI
from stablemtl.data.formats import DatasetLayoutError
from stablemtl.data.layout import CHECK_LISTS, CHECKED


def numpy(sample, key):
    x = sample[key].numpy()
    return x[0] if x.shape[0] == 1 else np.moveaxis(x, 0, -1)


def truth(raw, sample_id: str) -> dict:
    """The world's ground truth of a sample, rendered again from the raw tree's record."""
    return synthetic.render_sample(**json.loads((raw / RAW_META).read_text())["samples"][sample_id]["render"])


def angle(a, b):
    return np.degrees(np.arccos(np.clip((a * b).sum(-1), -1, 1)))


# ----------------------------------------------------------------------------- render_scale

def test_render_scale_one_and_the_scene_camera_are_the_plain_render():
    plain = synthetic.render_sample("street", 3, 20, 36, "real")
    scene = synthetic.make_scene("street", 3, "real")
    for same in (synthetic.render_sample("street", 3, 20, 36, "real", render_scale=1),
                 synthetic.render_sample("street", 3, 20, 36, "real", K=synthetic.intrinsics(scene, 20, 36))):
        for key, value in plain.items():
            assert np.array_equal(same[key], value), key


@pytest.mark.parametrize("kind, domain", [("street", "train"), ("indoor", "real"), ("flying", "train")])
def test_render_scale_upsamples_with_the_full_renders_camera_and_flow(kind, domain):
    h, w, s = 62, 202, 4  # not multiples of 4: 16 x 51 rays, the last block row and column cut
    full = synthetic.render_sample(kind, 7, h, w, domain)
    up = synthetic.render_sample(kind, 7, h, w, domain, render_scale=s)
    assert up["K"].tolist() == full["K"].tolist() and up["rgb"].shape == full["rgb"].shape
    assert up["semantic"].dtype == full["semantic"].dtype and up["valid_flow"].dtype == bool
    # the block centre's values are those of the low-resolution render, flow in full-resolution pixels
    low = synthetic.render_sample(kind, 7, 16, 51, domain, K=synthetic.scale_intrinsics(full["K"], 1 / s))
    i, j = np.mgrid[0:16, 0:51]
    inside = (i * s + 1 < h) & (j * s + 1 < w)
    centre = lambda a: a[(i * s + 1)[inside], (j * s + 1)[inside]]  # noqa: E731  pixel 1.5 of each block
    assert np.array_equal(centre(up["object_id"]), low["object_id"][inside])
    # pixels inside one object agree with the full render: the ray through the pixel, its flow
    ids = full["object_id"]
    same = (ids >= 0) & (up["object_id"] == ids) & full["flow_defined"] & up["flow_defined"]
    same[[0, -1], :] = same[:, [0, -1]] = False
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            same[1:-1, 1:-1] &= ids[1 + dy:h - 1 + dy, 1 + dx:w - 1 + dx] == ids[1:-1, 1:-1]
    assert same.mean() > 0.5
    depth = np.abs(up["depth"] - full["depth"])[same] / full["depth"][same]
    assert np.median(depth) < 1e-6 and np.percentile(depth, 99) < 0.02
    flow = np.abs(up["optical_flow"] - full["optical_flow"]).max(-1)[same]
    assert np.median(flow) < 0.1 and np.percentile(flow, 99) < 1.0, (np.median(flow), np.percentile(flow, 99))
    # within the upsampled sample, a point moved by its scene flow projects to pixel + flow
    v, u = np.mgrid[0:h, 0:w].astype(np.float64)
    K = up["K"]
    moved = np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones_like(u)], -1) * up["depth"][..., None]
    moved = moved + up["scene_flow"]
    with np.errstate(divide="ignore", invalid="ignore"):  # the sky: no point
        pixel = (moved @ K.T)[..., :2] / moved[..., 2:]
    error = np.abs(pixel - np.stack([u, v], -1) - up["optical_flow"]).max(-1)
    assert np.percentile(error[up["flow_defined"] & (moved[..., 2] > 0.05)], 99) < 1e-3


def test_render_scale_must_be_a_whole_number_of_pixels(tmp_path):
    for bad in (0, 1.5, True, -2):
        with pytest.raises(ValueError, match="render_scale must be an integer >= 1"):
            synthetic.render_sample("indoor", 1, 16, 16, render_scale=bad)
    with pytest.raises(ValueError, match="render_scale 9 leaves fewer than 2 x 2 rays for 9 x 16"):
        synthetic.render_sample("indoor", 1, 9, 16, render_scale=9)
    with pytest.raises(ValueError, match=r"K must be 3 x 3 intrinsics"):
        synthetic.render_sample("indoor", 1, 16, 16, K=np.eye(2))
    with pytest.raises(ValueError, match="render_scale must be an integer >= 1"):
        R.write_raw_miniature("diode", tmp_path / "d", render_scale=2.5)


def test_the_raw_metadata_records_the_render_scale(tmp_path):
    raw = R.write_raw_miniature("kitti_flow", tmp_path / "raw", count=1, render_scale=2)
    meta = json.loads((raw / RAW_META).read_text())
    assert meta["render_scale"] == 2 and meta["camera"] == "world"
    [(sample_id, info)] = meta["samples"].items()
    assert info["render"]["render_scale"] == 2  # the sample rendered again is the one written
    flow, valid = annotations.read_kitti_flow(raw / sample_id)
    assert valid.mean() > 0.5 and np.abs(flow - truth(raw, sample_id)["optical_flow"])[valid].max() <= 1 / 64 + 1e-6


# ----------------------------------------------------------------------------- the evaluation datasets

@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    """The four evaluation datasets' raw miniatures, checked by ``prepare`` into linked outputs."""
    base = tmp_path_factory.mktemp("checked")
    out = {}
    for dataset in CHECKED:
        raw = R.write_raw_miniature(dataset, base / "raw" / dataset)
        eigen = raw / "eigen_test_files_with_gt.txt" if dataset == "kitti_depth" else None
        manifest = P.prepare(dataset, raw, base / "out" / dataset, progress=False, eigen_list=eigen)
        out[dataset] = (raw, base / "out" / dataset, manifest)
    return out


def test_all_eight_datasets_have_a_raw_miniature(tmp_path):
    assert set(R.RAW_DATASETS) == set(P.DATASETS) == set(R.DEFAULTS) == set(R.REAL_SIZES)
    with pytest.raises(ValueError, match="no raw miniature for 'kitti'; valid: hypersim, .*, diode"):
        R.write_raw_miniature("kitti", tmp_path / "k")


def test_the_evaluation_layouts_are_the_downloads(checked):
    for dataset, (raw, out, manifest) in checked.items():
        assert out.is_symlink() and out.resolve() == raw.resolve()  # nothing converted: linked
        assert manifest["action"] == "check" and manifest["details"]["samples"] == R.DEFAULTS[dataset][0]
        listed = manifest["lists"][CHECK_LISTS[dataset]]  # no list in the download: built by prepare
        assert listed == R.DEFAULTS[dataset][0] + (dataset == "kitti_depth")  # + the Eigen list's None line
    assert (checked["kitti_flow"][0] / "training/calib_cam_to_cam/000000.txt").is_file()
    assert {p.name for p in checked["diode"][0].iterdir()} >= {"indoors", "outdoor"}
    # KITTI's benchmark crop, to scale, reaches the loader through prepare's stablemtl_dataset.json
    for dataset in ("kitti_depth", "kitti_flow"):
        geometry = json.loads((checked[dataset][1] / sources.META_FILE).read_text())["geometry"]
        assert geometry == {"kb_crop": [34, 110]} == checked[dataset][2]["geometry"]
    assert not (checked["cityscapes"][1] / sources.META_FILE).exists()


def test_kitti_depth_takes_the_official_style_eigen_list(checked, tmp_path):
    raw, out, manifest = checked["kitti_depth"]
    eigen = (raw / "eigen_test_files_with_gt.txt").read_text().splitlines()
    assert len(eigen) == 4 and sum(" None " in line for line in eigen) == 1
    assert all(len(line.split()) == 3 for line in eigen)  # rgb, ground truth or None, focal
    built = (out / "data_split/eigen_test_files_with_gt.txt").read_text().splitlines()
    assert built == eigen  # the list followed, the focal column kept
    ds = sources.KittiDepth(out)
    assert len(ds) == 3 and ds.n_skipped == 1
    (h, w), (ch, cw) = R.DEFAULTS["kitti_depth"][1], (34, 110)
    top, left = transforms.kb_crop(h, w, (ch, cw))
    for sample in ds:
        r = truth(raw, sample["id"])
        valid = numpy(sample, "depth_valid")
        assert numpy(sample, "depth").shape == (ch, cw) and 0.1 < valid.mean() < 0.5
        assert not valid[~transforms.eigen_crop_mask(h, w, (ch, cw))].any()
        gt = r["depth"][top:top + ch, left:left + cw]
        np.testing.assert_allclose(numpy(sample, "depth")[valid], gt[valid], atol=1 / 256)
        assert sample["K"][0, 0].item() == pytest.approx(r["K"][0, 0], abs=1e-4)  # the list's focal
    copy = tmp_path / "copy"
    shutil.copytree(raw, copy, ignore=shutil.ignore_patterns("data_split"))
    with pytest.raises(DatasetLayoutError, match="--eigen-list"):
        P.prepare("kitti_depth", copy, copy, progress=False)


def test_kitti_flow_cityscapes_and_diode_read_back_as_the_world(checked):
    raw, out, _ = checked["kitti_flow"]
    (h, w), (ch, cw) = R.DEFAULTS["kitti_flow"][1], (34, 110)
    top, left = transforms.kb_crop(h, w, (ch, cw))
    for sample in sources.KittiFlow(out):
        r = truth(raw, sample["id"])
        crop = lambda a: a[top:top + ch, left:left + cw]  # noqa: E731
        fv, sv = numpy(sample, "optical_flow_valid"), numpy(sample, "scene_flow_valid")
        assert (fv == crop(r["flow_defined"])).all() and sv.sum() > 0.5 * fv.sum()
        assert np.abs(numpy(sample, "optical_flow") - crop(r["optical_flow"]))[fv].max() <= 1 / 64 + 1e-6
        # disparities in 1/256 px at a focal of ~60 px: centimetres at a few metres
        assert np.median(np.abs(numpy(sample, "scene_flow") - crop(r["scene_flow"]))[sv]) < 0.02
        assert sample["K"][0, 0].item() == pytest.approx(r["K"][0, 0], rel=1e-6)  # P_rect_02
    raw, out, _ = checked["cityscapes"]
    for sample in sources.Cityscapes(out):
        r = truth(raw, sample["id"])
        assert (numpy(sample, "semantic") == r["semantic"]).all()
    raw, out, _ = checked["diode"]
    outdoor = 0
    for sample in sources.DIODE(out):
        r = truth(raw, sample["id"])
        valid = numpy(sample, "depth_valid")
        assert (valid == ((r["depth"] > 0.6) & (r["depth"] < 350))).all()
        np.testing.assert_allclose(numpy(sample, "depth")[valid], r["depth"][valid], rtol=1e-6)
        normal_valid = numpy(sample, "normal_valid")
        np.testing.assert_allclose(numpy(sample, "normal")[normal_valid], -r["normal"][normal_valid], atol=1e-6)
        outdoor += "outdoor/" in sample["id"]
    assert outdoor == 2


# ----------------------------------------------------------------------------- the real sizes

def test_the_real_sizes_are_the_kits_cameras_and_crops():
    sizes = R.REAL_SIZES
    assert sources.Hypersim.geometry["size"] == list(sizes["hypersim"]) == [HYPERSIM["height"], HYPERSIM["width"]]
    for dataset, numbers in (("vkitti", (VKITTI["cx"], VKITTI["cy"])),
                             ("flying_things_3d", (FT3D["cx"], FT3D["cy"]))):
        h, w = sizes[dataset]
        assert numbers == ((w - 1) / 2, (h - 1) / 2), dataset  # principal point at the image centre
        K = R.real_camera(dataset)
        assert (K[0, 2], K[1, 2]) == numbers and K[0, 0] == sources.SOURCES[dataset].geometry["focal"]
    h, w = sizes["kitti_depth"]
    assert sizes["kitti_flow"] == (h, w)
    for cls in (sources.KittiDepth, sources.KittiFlow):
        crop = tuple(cls.geometry["kb_crop"])
        assert crop == transforms.KB_CROP == (352, 1216) and transforms.kb_crop(h, w, crop) == (23, 13)
    assert transforms.eigen_crop_mask(h, w).shape == (352, 1216)
    assert transforms.center_crop(*sizes["flying_things_3d"], sources.FlyingThings3D.geometry["crop"]) == (2, 0)
    ch, cw = sources.VirtualKITTI2.geometry["train_crop"]
    assert ch <= sizes["vkitti"][0] and cw <= sizes["vkitti"][1]
    # the evaluation resolutions keep each dataset's aspect (KITTI: of its crop; Cityscapes: a quarter)
    assert sizes["cityscapes"] == (4 * 256, 4 * 512) and sizes["diode"] == (2 * 384, 2 * 512)
    assert sizes["mid"][1] / sizes["mid"][0] == 384 / 256 and (352, 1216) == (2 * 176, 2 * 608)


def test_a_real_size_raw_tree_needs_no_geometry_override(tmp_path):
    """vKITTI, FlyingThings3D and KITTI at their real sizes (rays every 8 pixels): no override is
    written; the loaders crop the real sizes to the real crops; D2NT normals from the upsampled
    depth agree with the world's."""
    sizes = R.REAL_SIZES
    for dataset in ("vkitti", "flying_things_3d", "kitti_depth", "kitti_flow"):
        raw = R.write_raw_miniature(dataset, tmp_path / "raw" / dataset, count=1, size=sizes[dataset], render_scale=8)
        meta = json.loads((raw / RAW_META).read_text())
        assert meta["geometry"] == {} and meta["camera"] == ("world" if dataset.startswith("kitti") else "real")
        eigen = raw / "eigen_test_files_with_gt.txt" if dataset == "kitti_depth" else None
        manifest = P.prepare(dataset, raw, tmp_path / "out" / dataset, progress=False, workers=1, eigen_list=eigen)
        assert manifest["geometry"] is None and not (tmp_path / "out" / dataset / sources.META_FILE).exists()
    out = tmp_path / "out"
    assert json.loads((out / "vkitti" / MANIFEST).read_text())["numbers"]["fx"] == VKITTI["fx"]  # the release's
    assert sources.KittiDepth(out / "kitti_depth")[0]["rgb"].shape == (3, 352, 1216)
    assert sources.KittiFlow(out / "kitti_flow")[0]["scene_flow"].shape == (3, 352, 1216)
    sample = sources.FlyingThings3D(out / "flying_things_3d")[0]
    assert sample["rgb"].shape == (3, 536, 960) and sample["K"][1, 2].item() == FT3D["cy"] - 2
    crop = sources.VirtualKITTI2(out / "vkitti", tasks=["optical_flow"], augment=True)[0]
    assert crop["rgb"].shape == (3, 256, 1024) and crop["crop"] is not None
    sample = sources.VirtualKITTI2(out / "vkitti", tasks=["normal"])[0]
    r = truth(tmp_path / "raw" / "vkitti", sample["id"])
    assert r["K"].tolist() == R.real_camera("vkitti").tolist() == sample["K"].tolist()
    error = angle(numpy(sample, "normal"), -r["normal"])[numpy(sample, "normal_valid")]
    assert np.median(error) < 3 and (error < 10).mean() > 0.8
