"""``stablemtl.data.prepare``: raw-format miniatures of the procedural world (``stablemtl.data.raw``)
prepared into the layouts the loaders read, read back through ``sources`` and compared with the
world's ground truth; the release's numbers; resuming; bad layouts, corrupt files and the checks."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from stablemtl import cli
from stablemtl.data import formats as F
from stablemtl.data import imaging, mini, sources, splits, synthetic, transforms
from stablemtl.data import prepare as P
from stablemtl.data import raw as R
from stablemtl.data.convert import hypersim as convert_hypersim
from stablemtl.data.convert.common import JOURNAL, MANIFEST, PREPARE_VERSION, RAW_META
from stablemtl.data.convert.flying_things_3d import FT3D
from stablemtl.data.convert.hypersim import HYPERSIM
from stablemtl.data.convert.vkitti import VKITTI
from stablemtl.data.formats import DatasetLayoutError
from stablemtl.data.layout import CHECK_LISTS, CHECKED
from stablemtl.presets import load_preset


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Every converted dataset's raw miniature, prepared once (one worker): dataset -> (raw, out, manifest).
    (The checked datasets' miniatures: tests/test_raw_real_size.py.)"""
    base = tmp_path_factory.mktemp("prepare")
    out = {}
    for dataset in P.CONVERTED:
        raw = R.write_raw_miniature(dataset, base / "raw" / dataset)
        manifest = P.prepare(dataset, raw, base / "out" / dataset, workers=1, progress=False)
        out[dataset] = (raw, base / "out" / dataset, manifest)
    return out


def raw_meta(raw: Path) -> dict:
    return json.loads((raw / RAW_META).read_text())


def truth(raw: Path, sample_id: str) -> tuple[dict, dict]:
    """The world's ground truth of a prepared sample and what the raw writer did to it."""
    info = raw_meta(raw)["samples"][sample_id]
    return synthetic.render_sample(**info["render"]), info


def numpy(sample, key):
    x = sample[key].numpy()
    return x[0] if x.shape[0] == 1 else np.moveaxis(x, 0, -1)


def angle(a, b):
    return np.degrees(np.arccos(np.clip((a * b).sum(-1), -1, 1)))


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` but the resume journal."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != JOURNAL}


# ----------------------------------------------------------------------------- the release's operations

def test_tone_mapping_reference_values():
    rgb = np.repeat(np.linspace(0.01, 4.0, 100).reshape(10, 10, 1), 3, axis=-1)  # grey HDR: brightness = value
    assert np.allclose(imaging.brightness(np.array([[1.0, 0, 0], [0, 1, 0], [0, 0, 1]])), [0.3, 0.59, 0.11])
    p90 = np.percentile(rgb[..., 0], 90)
    scale = imaging.tonemap_scale(rgb)
    assert scale == pytest.approx(0.8 ** 2.2 / p90)
    # after the gamma, the 90th-percentile brightness is 0.8
    mapped = imaging.tonemap(rgb, scale)
    assert np.percentile(imaging.brightness(mapped ** 2.2), 90) == pytest.approx(0.8 ** 2.2, rel=1e-9)
    assert mapped.max() <= 1 and mapped.min() >= 0
    valid = np.zeros((10, 10), bool)
    valid[:, :5] = True  # only valid pixels count
    assert imaging.tonemap_scale(rgb, valid) == pytest.approx(0.8 ** 2.2 / np.percentile(rgb[:, :5, 0], 90))
    assert imaging.tonemap_scale(rgb * 1e-6) == 0.0 and imaging.tonemap_scale(rgb, np.zeros((10, 10), bool)) == 1.0
    assert imaging.to_uint8(np.array([0.0, 0.5, 0.999, 1.0, np.nan])).tolist() == [0, 127, 254, 255, 0]  # truncation


def test_hypersim_distance_to_planar_depth_on_the_image_plane_grid():
    distance = np.full((3, 3), 6.0)
    planar = imaging.distance_to_planar(distance, 1.0)
    assert planar[1, 1] == pytest.approx(6.0) and planar[0, 0] == pytest.approx(6.0 / np.sqrt(3), rel=1e-6)
    # at the release's 1024 x 768, focal 886.81: the corner pixel is (-511.5, -383.5) from the centre
    planar = imaging.distance_to_planar(np.ones((768, 1024)), 886.81)
    assert planar[0, 0] == pytest.approx(886.81 / np.sqrt(511.5 ** 2 + 383.5 ** 2 + 886.81 ** 2), rel=1e-6)


def test_d2nt_recovers_a_plane_pointing_away_with_the_release_pixel_grid():
    h, w, f = 40, 60, 50.0
    cx, cy = (w - 1) / 2, (h - 1) / 2
    n = np.array([0.3, -0.4, 0.866])
    n /= np.linalg.norm(n)
    v, u = np.mgrid[0:h, 0:w].astype(float)
    ray = np.stack([(u - cx) / f, (v - cy) / f, np.ones_like(u)], -1)
    depth = 5.0 / (ray @ n)  # the plane n . X = 5 m, in front of the camera
    err = angle(imaging.d2nt_normals(depth, f, f, cx, cy), n)
    assert err.max() < 0.3 and err[2:-2, 2:-2].max() < 0.1  # pointing away from the camera, as stored
    # the release's grid is u = 1..W minus cx: a principal point one pixel further is exact inside
    shifted = angle(imaging.d2nt_normals(depth, f, f, cx + 1, cy + 1), n)
    assert shifted[2:-2, 2:-2].max() < 0.02 < err[2:-2, 2:-2].max()
    # a fronto-parallel wall: +z everywhere
    assert np.allclose(imaging.d2nt_normals(np.full((8, 9), 3.0), f, f, 4, 3.5), [0, 0, 1], atol=1e-7)


# ----------------------------------------------------------------------------- round trips

def test_hypersim_round_trip(prepared):
    raw, out, manifest = prepared["hypersim"]
    ds = sources.Hypersim(out, tasks=["depth", "normal", "albedo", "shading"])
    assert len(ds) == 3  # frame 1 has a NaN distance: not in the no-NaN-depth list
    import h5py

    for sample in ds:
        r, info = truth(raw, sample["id"])
        scene, name = sample["id"].split("/")
        frame = int(name[-8:-4])
        with h5py.File(raw / scene / "images/scene_cam_00_final_hdf5" / f"frame.{frame:04d}.color.hdf5") as f:
            color = f["dataset"][()].astype(np.float64)
        valid = r["depth"] > 0
        if info["window"]:
            top, bottom, left, right = info["window"]
            valid[top:bottom, left:right] = False
        depth, depth_valid = numpy(sample, "depth"), numpy(sample, "depth_valid")
        assert (depth_valid == valid).all()
        # planar depth from float16 distances, truncated to millimetres
        assert (np.abs(depth - r["depth"])[valid] <= 1e-3 * r["depth"][valid] + 1e-3).all()
        assert (depth[~valid] == 0).all()
        normal, normal_valid = numpy(sample, "normal"), numpy(sample, "normal_valid")
        assert (normal_valid == valid).all()
        # back-facing normals flipped, x negated: the stored normals point away from the camera
        assert np.abs(normal + r["normal"])[valid].max() < 2e-3
        assert np.allclose(normal[~valid], -1 / np.sqrt(3))  # the release's invalid code, normalised
        scale = 0.8 ** 2.2 / np.percentile(imaging.brightness(color)[valid], 90)
        expected = np.floor(np.clip(np.maximum(scale * color, 0) ** (1 / 2.2), 0, 1) * 255) / 255
        assert np.abs(numpy(sample, "rgb") - expected).max() < 1e-6
        assert np.abs(numpy(sample, "albedo") - np.clip(scale * r["albedo"], 0, 1))[valid].max() < 2 / 255
        shading = np.clip(info["exposure"] * r["shading"], 0, 1)  # rgb / reflectance, not tone-mapped
        lambertian = r["lambertian"] & valid
        assert np.abs(numpy(sample, "shading") - shading)[lambertian].max() < 2 / 255
        assert sample["K"][0, 0].item() == pytest.approx(r["K"][0, 0])
    lists = {f: (out / "data_split" / f).read_text().splitlines() for f in manifest["lists"]}
    all_list, normal_list, no_nan_list = (lists[f] for f in (splits.HYPERSIM_LIST_ALL, splits.HYPERSIM_LIST_NORMAL,
                                                             splits.HYPERSIM_LIST_NO_NAN))
    assert [len(all_list), len(normal_list), len(no_nan_list)] == [4, 4, 3]
    assert {len(line.split()) for line in all_list} == {2}
    assert {len(line.split()) for line in normal_list + no_nan_list} == {5}
    unlisted = ("ai_002_001", "ai_003_001")  # the csv's val frame and its frame left out of the release
    assert not any(scene in line for scene in unlisted for line in all_list)
    nan_frame = "ai_001_001/rgb_cam_00_fr0001.png"
    assert nan_frame not in " ".join(no_nan_list)
    assert nan_frame in " ".join(normal_list)
    assert manifest["details"]["frames_with_nan_depth"] == 1 and manifest["counts"]["depth_nan_pixels"] == 1
    assert manifest["counts"]["normal_flipped_pixels"] > 100  # the raw writer's back-facing objects
    assert manifest["written"] == {k: 4 for k in ("albedo", "depth", "normal_mask", "normal_npy", "normal_png",
                                                  "rgb", "shading")}


def test_vkitti_normals_estimated_from_depth(prepared):
    raw, out, manifest = prepared["vkitti"]
    assert (out / "original").is_symlink()  # the loader reads original/ beside normal_estimated/
    ds = sources.VirtualKITTI2(out, tasks=["normal"])
    assert len(ds) == 2
    for sample in ds:
        r, _ = truth(raw, sample["id"])
        valid = numpy(sample, "normal_valid")
        assert valid.mean() > 0.8
        err = angle(numpy(sample, "normal"), -r["normal"])[valid]  # stored pointing away from the camera
        assert np.median(err) < 3 and (err < 10).mean() > 0.8
        png = sample["id"].replace("original/", "normal_estimated/").replace("/rgb/", "/normal/")
        assert F.read_rgb(out / png.replace("rgb_", "normal_").replace(".jpg", ".png")).shape == r["rgb"].shape
    assert manifest["numbers"]["fx"] == raw_meta(raw)["geometry"]["focal"]
    assert manifest["numbers"]["version"] == "d2nt_v3"
    assert manifest["lists"] == {f"vkitti_{t}_train.txt": 2 for t in ("depth", "normal", "optical_flow",
                                                                      "scene_flow", "semantic")}


def test_flying_things_3d_flow_and_scene_flow(prepared):
    raw, out, manifest = prepared["flying_things_3d"]
    geometry = raw_meta(raw)["geometry"]
    seen = 0
    for split in ("train", "val"):
        for sample in sources.FlyingThings3D(out, split):
            seen += 1
            r, info = truth(raw, sample["id"])
            h, w = r["depth"].shape
            ch, cw = geometry["crop"]
            top, left = transforms.center_crop(h, w, (ch, cw))
            crop = lambda a: a[top:top + ch, left:left + cw]  # noqa: E731
            fast = np.zeros((h, w), bool)
            if info["fast_pixel"]:
                fast[tuple(info["fast_pixel"])] = True
            flow, flow_valid = numpy(sample, "optical_flow"), numpy(sample, "optical_flow_valid")
            assert (flow_valid == ~crop(fast)).all() and (flow[crop(fast)] == 0).all()  # |flow| >= 500 px
            assert np.abs(flow - crop(r["optical_flow"]))[flow_valid].max() <= 1 / 64
            sf, sf_valid = numpy(sample, "scene_flow"), numpy(sample, "scene_flow_valid")
            assert (sf_valid == crop(r["depth"] < 35)).all()  # the points nearer than 35 m
            error = np.abs(sf - crop(r["scene_flow"]))
            assert error[sf_valid & ~crop(fast)].max() < 1e-4
            if info["fast_pixel"]:  # the scene flow follows the raw flow there, as the release's (before masking)
                i, j = info["fast_pixel"]
                z2 = r["depth"][i, j] + r["scene_flow"][i, j, 2]
                shift = 600 - r["optical_flow"][i, j, 0]  # the raw flow replaced by 600 px
                assert error[i - top, j - left, 0] == pytest.approx(abs(shift) * z2 / geometry["focal"], rel=1e-4)
            points = F.read_npz(out / sample["id"].replace("flow_2d", "pc").replace(".png", ".npz"), "pc1")
            assert len(points) == (r["depth"] < 35).sum()
            assert np.abs(np.sort(points[:, 2]) - np.sort(r["depth"][r["depth"] < 35])).max() < 1e-3
    assert seen == 3 and manifest["lists"] == {"train.txt": 2, "val.txt": 1}
    assert manifest["counts"]["flow_pixels_too_fast"] == 1 and manifest["numbers"]["max_depth"] == 35.0


def test_mid_intrinsics_from_exr(prepared):
    raw, out, manifest = prepared["mid"]
    ds = sources.MIDIntrinsics(out)
    assert len(ds) == 4 and manifest["lists"] == {"test.txt": 4}
    for sample in ds:
        r, info = truth(raw, sample["id"])
        hdr = info["exposure"] * r["rgb_linear"]
        scale = 0.8 ** 2.2 / np.percentile(imaging.brightness(hdr), 90)
        lambertian = r["lambertian"]
        # JPEG (quality 75) on 24 x 32 images: compare means
        assert np.abs(numpy(sample, "albedo") - r["albedo"]).mean() < 0.06
        shading = np.clip(scale * info["exposure"] * r["shading"], 0, 1)  # clip(scale x rgb / albedo)
        assert np.abs(numpy(sample, "shading") - shading)[lambertian].mean() < 0.03
        rgb = numpy(sample, "rgb")
        assert np.abs(rgb - np.clip(np.maximum(scale * hdr, 0) ** (1 / 2.2), 0, 1)).mean() < 0.06
        assert (out / sample["id"].replace(".jpg", "_scaled_only.jpg")).is_file()


def test_the_manifest_records_what_was_written_and_the_numbers_used(prepared):
    for dataset, (raw, out, manifest) in prepared.items():
        assert json.loads((out / MANIFEST).read_text()) == manifest
        assert manifest["dataset"] == dataset and manifest["prepare_version"] == PREPARE_VERSION
        assert manifest["release"]["repository"] == "astra-vision/StableMTL" and manifest["release"]["files"]
        assert manifest["frames"]["skipped"] == {} and manifest["deviations_from_release"]
        if dataset == "mid":  # no camera: no loader override, no stablemtl_dataset.json
            assert manifest["geometry"] is None and not (out / sources.META_FILE).exists()
        else:  # the world's camera at the miniature's size, for the loader
            assert json.loads((out / sources.META_FILE).read_text())["geometry"] == manifest["geometry"]
    hypersim = prepared["hypersim"][2]["numbers"]
    assert (hypersim["percentile"], hypersim["brightness"], hypersim["depth_scale"]) == (90, 0.8, 1000.0)
    assert HYPERSIM["focal"] == 886.81 and (HYPERSIM["width"], HYPERSIM["height"]) == (1024, 768)
    assert (VKITTI["fx"], VKITTI["cx"], VKITTI["cy"]) == (725.0087, 620.5, 187.0)
    assert (FT3D["focal"], FT3D["cx"], FT3D["cy"], FT3D["baseline"]) == (1050.0, 479.5, 269.5, 1.0)


def test_a_hypersim_frame_without_geometry_is_skipped_and_counted(prepared, tmp_path):
    raw = shutil.copytree(prepared["hypersim"][0], tmp_path / "raw")
    entity = raw / "ai_001_002/images/scene_cam_00_geometry_hdf5/frame.0001.render_entity_id.hdf5"
    F.write_hdf5(entity, np.full_like(F.read_hdf5(entity), -1))
    manifest = P.prepare("hypersim", raw, tmp_path / "out", workers=1, progress=False)
    assert manifest["frames"] == {"total": 4, "skipped": {"no valid pixel": 1}}
    assert manifest["lists"][splits.HYPERSIM_LIST_ALL] == 3 and manifest["written"]["rgb"] == 3
    assert not list((tmp_path / "out/ai_001_002").glob("*_fr0001.*"))


# ----------------------------------------------------------------------------- resuming

def test_a_killed_preparation_resumes_to_identical_outputs(tmp_path, monkeypatch):
    raw = R.write_raw_miniature("hypersim", tmp_path / "raw")
    out = tmp_path / "out"
    P.prepare("hypersim", raw, out, workers=1, progress=False)
    clean = snapshot(out)
    shutil.rmtree(out)
    real, calls = convert_hypersim.convert_frame, []

    def dies_after_two(job):
        if len(calls) == 2:
            raise RuntimeError("killed")
        calls.append(job["frame"])
        return real(job)

    monkeypatch.setattr(convert_hypersim, "convert_frame", dies_after_two)
    with pytest.raises(RuntimeError, match="killed"):
        P.prepare("hypersim", raw, out, workers=1, progress=False)
    assert not (out / MANIFEST).exists()  # written last
    assert len(list(out.glob("*/rgb_*.png"))) == 2
    calls.clear()
    monkeypatch.setattr(convert_hypersim, "convert_frame", lambda job: calls.append(job["frame"]) or real(job))
    P.prepare("hypersim", raw, out, workers=1, progress=False)
    assert len(calls) == 2  # only the two frames the killed run did not finish
    assert snapshot(out) == clean
    calls.clear()
    (out / "ai_001_002" / "albedo_cam_00_fr0001.png").unlink()  # a lost output: that frame again
    P.prepare("hypersim", raw, out, workers=1, progress=False)
    assert calls == [1] and snapshot(out) == clean
    calls.clear()
    color = raw / "ai_001_001/images/scene_cam_00_final_hdf5/frame.0000.color.hdf5"
    F.write_hdf5(color, F.read_hdf5(color))  # a raw file written again (same values): its frame runs again
    P.prepare("hypersim", raw, out, workers=1, progress=False)
    assert calls == [0] and snapshot(out) == clean
    F.write_hdf5(color, F.read_hdf5(color))  # a later run killed: the earlier manifest does not survive it
    calls[:] = [0, 0]
    monkeypatch.setattr(convert_hypersim, "convert_frame", dies_after_two)
    with pytest.raises(RuntimeError, match="killed"):
        P.prepare("hypersim", raw, out, workers=1, progress=False)
    assert not (out / MANIFEST).exists()


def test_parallel_workers_write_the_same_files(prepared, tmp_path):
    raw, serial, manifest = prepared["flying_things_3d"]
    out = tmp_path / "parallel"
    parallel = P.prepare("flying_things_3d", raw, out, workers=2, progress=False)
    a, b = snapshot(serial), snapshot(out)
    assert a.keys() == b.keys()
    assert {k: v for k, v in a.items() if k != MANIFEST} == {k: v for k, v in b.items() if k != MANIFEST}
    assert {**parallel, "out": None} == {**manifest, "out": None}


# ----------------------------------------------------------------------------- bad input

def test_a_wrong_raw_layout_names_the_first_missing_file_and_the_expected_tree(prepared, tmp_path):
    copies = {d: shutil.copytree(prepared[d][0], tmp_path / d) for d in P.CONVERTED}
    (copies["hypersim"] / "ai_001_002/images/scene_cam_00_geometry_hdf5/frame.0000.normal_world.hdf5").unlink()
    with pytest.raises(DatasetLayoutError, match=r"(?s)missing .*ai_001_002/images/scene_cam_00_geometry_hdf5/"
                                                 r"frame\.0000\.normal_world\.hdf5\. Expected:.*_detail/cam_ZZ"):
        P.prepare("hypersim", copies["hypersim"], tmp_path / "o1", progress=False)
    (copies["hypersim"] / splits.HYPERSIM_SPLIT_CSV).unlink()
    with pytest.raises(DatasetLayoutError, match=r"no metadata_images_split_scene_v1\.csv .*--split-csv"):
        P.prepare("hypersim", copies["hypersim"], tmp_path / "o1", progress=False)
    (copies["flying_things_3d"] / "train/disparity_change/left/into_future/0000002.pfm").unlink()
    (copies["flying_things_3d"] / "val/image_clean/left/0000005.png").unlink()
    with pytest.raises(DatasetLayoutError, match=r"(?s)missing .*train/disparity_change/left/into_future/0000002\.pfm "
                                                 r"\(and 1 more missing\).*flow/left/into_future/NNNNNNN\.flo"):
        P.prepare("flying_things_3d", copies["flying_things_3d"], tmp_path / "o2", progress=False)
    (copies["mid"] / "test/everett_room01/albedo.exr").unlink()
    with pytest.raises(DatasetLayoutError, match=r"(?s)missing .*everett_room01/albedo\.exr.*the release's albedo"):
        P.prepare("mid", copies["mid"], tmp_path / "o3", progress=False)
    shutil.rmtree(copies["vkitti"] / "original")
    with pytest.raises(DatasetLayoutError, match=r"(?s)missing .*original\. Expected:.*depth_NNNNN\.png"):
        P.prepare("vkitti", copies["vkitti"], tmp_path / "o4", progress=False)
    with pytest.raises(DatasetLayoutError, match=r"(?s)raw folder .*nowhere does not exist.*image_clean/left"):
        P.prepare("flying_things_3d", tmp_path / "nowhere", tmp_path / "o5", progress=False)
    with pytest.raises(ValueError, match="unknown dataset 'hypersims'; valid: hypersim, vkitti"):
        P.prepare("hypersims", tmp_path, tmp_path / "o6")
    assert not any((tmp_path / f"o{i}" / MANIFEST).exists() for i in range(1, 6))


def _corrupt(path: Path, keep: int = 40) -> str:
    path.write_bytes(path.read_bytes()[:keep])
    return str(path)


def test_corrupt_raw_files_are_named(prepared, tmp_path):
    copies = {d: shutil.copytree(prepared[d][0], tmp_path / d) for d in ("hypersim", "flying_things_3d", "mid")}
    bad = _corrupt(copies["hypersim"] / "ai_001_001/images/scene_cam_00_final_hdf5/frame.0001.color.hdf5")
    with pytest.raises(F.FormatError, match=rf"{bad}: cannot read as HDF5"):
        P.prepare("hypersim", copies["hypersim"], tmp_path / "o1", workers=1, progress=False)
    bad = _corrupt(copies["flying_things_3d"] / "train/disparity/left/0000002.pfm", 30)
    with pytest.raises(F.FormatError, match=rf"{bad}: truncated PFM"):
        P.prepare("flying_things_3d", copies["flying_things_3d"], tmp_path / "o2", workers=1, progress=False)
    F.write_pfm(copies["flying_things_3d"] / "train/disparity/left/0000002.pfm", np.full((36, 64), 3.0))
    with pytest.raises(F.FormatError, match=r"0000002\.pfm: the disparities are positive .* full FlyingThings3D"):
        P.prepare("flying_things_3d", copies["flying_things_3d"], tmp_path / "o2", workers=1, progress=False)
    shutil.copy(prepared["flying_things_3d"][0] / "train/disparity/left/0000002.pfm",
                copies["flying_things_3d"] / "train/disparity/left/0000002.pfm")
    bad = _corrupt(copies["flying_things_3d"] / "train/flow/left/into_future/0000000.flo", 20)
    with pytest.raises(F.FormatError, match=rf"{bad}: truncated \.flo"):  # also through the process pool
        P.prepare("flying_things_3d", copies["flying_things_3d"], tmp_path / "o2", workers=2, progress=False)
    bad = _corrupt(copies["mid"] / "test/everett_room00/dir_1_mip2.exr", 100)
    with pytest.raises(F.FormatError, match=rf"{bad}: cannot read as OpenEXR"):
        P.prepare("mid", copies["mid"], tmp_path / "o3", workers=1, progress=False)
    F.write_exr(copies["mid"] / "test/everett_room00/dir_1_mip2.exr", np.ones((24, 32)))  # one channel, "Y"
    with pytest.raises(F.FormatError, match=r"dir_1_mip2\.exr: expected the channels \['R', 'G', 'B'\], "
                                            r"missing \['R', 'G', 'B'\] \(the file has \['Y'\]\)"):
        P.prepare("mid", copies["mid"], tmp_path / "o3", workers=1, progress=False)


# ----------------------------------------------------------------------------- the checked datasets

@pytest.fixture(scope="module")
def mini_checked(tmp_path_factory):
    root = tmp_path_factory.mktemp("checked")
    specs = load_preset("smoke")["data"]
    return {d: mini.write_mini_dataset(root, d, specs[d], workers=1, progress=False) for d in CHECKED}


def test_the_checks_pass_on_valid_trees_and_list_every_problem_at_once(mini_checked, tmp_path):
    for dataset, root in mini_checked.items():
        tree = shutil.copytree(root, tmp_path / dataset)
        manifest = P.prepare(dataset, tree, tree, progress=False)
        assert manifest["action"] == "check" and manifest["details"]["samples"] >= 3
        assert (tree / MANIFEST).is_file()

    def listed(dataset: str) -> list[list[str]]:
        text = (tmp_path / dataset / "data_split" / CHECK_LISTS[dataset]).read_text()
        return [line.split() for line in text.splitlines() if " None" not in line]

    city, kitti, flow, diode = listed("cityscapes"), listed("kitti_depth"), listed("kitti_flow"), listed("diode")
    removed = {  # files of different lines and kinds
        "cityscapes": [sources.Cityscapes.label_path(city[0][0]), city[1][0]],
        "kitti_depth": [kitti[0][0], kitti[1][1]],
        "kitti_flow": [flow[1][0].replace("flow_occ/", "image_2/").replace("_10.", "_11."),
                       flow[2][0].replace("flow_occ/", "disp_occ_1/"),
                       flow[0][0].replace("flow_occ/", "calib_cam_to_cam/").replace("_10.png", ".txt")],
        "diode": [diode[0][1].replace("_depth.npy", "_normal.npy"), diode[1][2]],
    }
    for dataset, files in removed.items():
        tree = tmp_path / dataset
        for file in files:
            (tree / file).unlink()
        with pytest.raises(DatasetLayoutError) as err:
            P.prepare(dataset, tree, tree, progress=False)
        message = str(err.value)
        assert f"{len(files)} problem(s)" in message and "Expected:" in message
        for file in files:  # every problem, not only the first
            assert f"missing {tree / file}" in message


def test_the_checks_build_missing_lists_and_need_the_eigen_list(mini_checked, tmp_path):
    tree = shutil.copytree(mini_checked["cityscapes"], tmp_path / "cityscapes")
    written = (tree / "data_split/cityscapes_val_full.txt").read_text()
    (tree / "data_split/cityscapes_val_full.txt").unlink()
    P.prepare("cityscapes", tree, tree, progress=False)
    built = (tree / "data_split/cityscapes_val_full.txt").read_text()
    assert sorted(built.splitlines()) == sorted(written.splitlines())
    kitti = shutil.copytree(mini_checked["kitti_depth"], tmp_path / "kitti")
    eigen = tmp_path / "eigen.txt"
    shutil.move(kitti / "data_split/eigen_test_files_with_gt.txt", eigen)
    with pytest.raises(DatasetLayoutError, match="--eigen-list"):
        P.prepare("kitti_depth", kitti, kitti, progress=False)
    manifest = P.prepare("kitti_depth", kitti, tmp_path / "linked", progress=False, eigen_list=eigen)
    assert (tmp_path / "linked").is_symlink() and manifest["details"]["samples"] == 3
    assert len(sources.KittiDepth(tmp_path / "linked")) == 3  # the built list, read by the loader


# ----------------------------------------------------------------------------- the command line

def test_the_prepare_command(prepared, tmp_path, monkeypatch, capsys):
    parser = cli.build_parser()
    raw = prepared["mid"][0]
    monkeypatch.delenv("PREPROCESSED_DIR", raising=False)
    args = parser.parse_args(["prepare", "mid", "--raw", str(raw), "--quiet"])
    assert args.func(args) == 2
    assert "give the output folder (out= / --out), or set PREPROCESSED_DIR" in capsys.readouterr().err
    monkeypatch.setenv("PREPROCESSED_DIR", str(tmp_path / "pre"))
    args = parser.parse_args(["prepare", "mid", "--raw", str(raw), "--workers", "1", "--quiet"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "mid: 4 frame(s) prepared" in printed and "data_split/test.txt: 4 line(s)" in printed
    assert (tmp_path / "pre/mid_intrinsics" / MANIFEST).is_file()
    args = parser.parse_args(["prepare", "hypersim", "--raw", str(tmp_path / "none"), "--out", str(tmp_path / "o")])
    assert args.func(args) == 2 and "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["prepare", "fly", "--raw", "x"])
