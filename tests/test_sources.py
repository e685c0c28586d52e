"""Mini datasets written in real formats read back through the real-layout loaders."""

import json

import numpy as np
import pytest
import torch

from stablemtl.data import mini, sources, splits, synthetic, transforms
from stablemtl.data.formats import DatasetLayoutError

SPLIT = {name: cls.default_split for name, cls in sources.SOURCES.items()}


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    return mini.write_mini_datasets(tmp_path_factory.mktemp("mini"), "smoke", workers=1, progress=False)


def rendered(root, sample_id):
    meta = json.loads((root / sources.META_FILE).read_text())
    return synthetic.render_sample(**meta["samples"][sample_id])


def numpy(sample, key):
    x = sample[key].numpy()
    return x[0] if x.shape[0] == 1 else np.moveaxis(x, 0, -1)


def each(roots, name, **kwargs):
    ds = sources.SOURCES[name](roots[name], SPLIT[name], **kwargs)
    assert len(ds) > 0
    for i in range(len(ds)):
        s = ds[i]
        yield s, rendered(roots[name], s["id"])


def test_every_dataset_is_written_with_its_own_layout(roots):
    assert set(roots) == set(sources.SOURCES)
    assert (roots["vkitti"] / "original/Scene02/15-deg-left/frames/rgb/Camera_0/rgb_00000.jpg").is_file()
    assert (roots["vkitti"] / "normal_estimated/Scene02/15-deg-left/frames/normal/Camera_0/normal_00000.npy").is_file()
    assert (roots["kitti_flow"] / "training/calib_cam_to_cam/000000.txt").is_file()
    assert (roots["flying_things_3d"] / "train/image_clean/0000001.png").is_file()
    assert sorted(p.name for p in (roots["cityscapes"] / "gtFine/val/frankfurt").iterdir())[0].endswith("_gtFine_labelIds.png")


def test_split_builders_reproduce_the_written_lists(roots):
    for name, root in roots.items():
        for file, lines in splits.BUILDERS[name](root).items():
            written = (root / "data_split" / file).read_text().splitlines()
            if name == "kitti_depth":  # the built list has no focal column and cannot know the None lines
                written = [" ".join(line.split()[:2]) for line in written if " None " not in line]
            assert sorted(lines) == sorted(written), (name, file)


def test_hypersim(roots):
    for s, r in each(roots, "hypersim"):
        np.testing.assert_allclose(numpy(s, "rgb"), np.round(r["rgb"] * 255) / 255, atol=1e-6)
        truncation = r["depth"] - numpy(s, "depth")  # uint16 millimetres, truncated
        assert (truncation > -1e-6).all() and (truncation < 1e-3 + 1e-6).all()
        assert numpy(s, "depth_valid").all()
        np.testing.assert_allclose(numpy(s, "normal"), -r["normal"], atol=1e-6)  # as stored: away from the camera
        np.testing.assert_allclose(numpy(s, "albedo"), np.round(r["albedo"] * 255) / 255, atol=1e-6)
        np.testing.assert_allclose(numpy(s, "shading"), np.round(r["shading"] * 255) / 255, atol=1e-6)
        np.testing.assert_array_equal(numpy(s, "shading_valid"), numpy(s, "albedo_valid"))
        np.testing.assert_allclose(s["K"].numpy(), r["K"], rtol=1e-6)


def test_virtual_kitti_2(roots):
    for s, r in each(roots, "vkitti"):
        h, w = r["depth"].shape
        assert np.abs(numpy(s, "rgb") - r["rgb"]).mean() < 0.03  # jpg
        assert np.abs(numpy(s, "rgb_next") - r["rgb_next"]).mean() < 0.03
        hit = r["depth"] > 0
        np.testing.assert_array_equal(numpy(s, "depth_valid"), hit & (r["depth"] < 80))
        valid = numpy(s, "depth_valid")
        np.testing.assert_allclose(numpy(s, "depth")[valid], r["depth"][valid], atol=0.0101)
        assert (numpy(s, "depth")[~hit] == np.float32(655.35)).all()  # the sky keeps its far code
        np.testing.assert_allclose(numpy(s, "normal")[valid], -r["normal"][valid], atol=1e-6)
        np.testing.assert_array_equal(numpy(s, "semantic"), r["semantic"])
        fv = numpy(s, "optical_flow_valid")
        assert fv.sum() > 0.3 * fv.size and not (fv & ~r["flow_defined"]).any()
        quantum = 2 * np.array([w - 1, h - 1]) / 65535 * 1.01 + 1e-5
        assert (np.abs(numpy(s, "optical_flow")[fv] - r["optical_flow"][fv]) <= quantum).all()
        assert np.abs(numpy(s, "scene_flow")[fv] - r["scene_flow"][fv]).max() <= 20 / 65535 + 1e-6


def test_flying_things_3d(roots):
    for s, r in each(roots, "flying_things_3d"):
        ch, cw = 32, 64
        top = (r["depth"].shape[0] - ch) // 2
        crop = lambda a: a[top:top + ch, :cw]  # noqa: E731
        np.testing.assert_allclose(numpy(s, "rgb"), crop(np.round(r["rgb"] * 255) / 255), atol=1e-6)
        fv = numpy(s, "optical_flow_valid")
        np.testing.assert_array_equal(fv, crop(r["flow_defined"]))
        assert np.abs(numpy(s, "optical_flow")[fv] - crop(r["optical_flow"])[fv]).max() <= 1 / 64 + 1e-6
        sv = numpy(s, "scene_flow_valid")
        np.testing.assert_array_equal(sv, crop(r["flow_defined"] & (r["depth"] < 35)))  # splatted with the crop offset
        np.testing.assert_allclose(numpy(s, "scene_flow")[sv], crop(r["scene_flow"])[sv], atol=1e-6)
        assert s["K"][1, 2].item() == pytest.approx(r["K"][1, 2] - top)


def test_cityscapes(roots):
    for s, r in each(roots, "cityscapes"):
        np.testing.assert_array_equal(numpy(s, "semantic"), r["semantic"])
        np.testing.assert_array_equal(numpy(s, "semantic_valid"), r["semantic"] != 250)


def test_kitti_depth(roots):
    ds = sources.KittiDepth(roots["kitti_depth"], "test")
    assert ds.n_skipped == 1  # the smoke preset writes one "None" line
    for s, r in each(roots, "kitti_depth"):
        h, w = r["depth"].shape
        top, left = h - 32, (w - 104) // 2
        gt = r["depth"][top:, left:left + 104]
        valid = numpy(s, "depth_valid")
        assert 0.1 < valid.mean() < 0.45  # sparse LiDAR-like ground truth inside the Eigen crop
        assert not valid[~transforms.eigen_crop_mask(h, w, (32, 104))].any()
        np.testing.assert_allclose(numpy(s, "depth")[valid], gt[valid], atol=1 / 256)
        assert s["K"][0, 0].item() == pytest.approx(r["K"][0, 0], abs=1e-4)


def test_kitti_flow_scene_flow_from_disparities(roots):
    for s, r in each(roots, "kitti_flow"):
        h, w = r["depth"].shape
        top, left = h - 32, (w - 104) // 2
        crop = lambda a: a[top:, left:left + 104]  # noqa: E731
        fv = numpy(s, "optical_flow_valid")
        np.testing.assert_array_equal(fv, crop(r["flow_defined"]))  # its own mask, not the scene-flow one
        assert np.abs(numpy(s, "optical_flow")[fv] - crop(r["optical_flow"])[fv]).max() <= 1 / 64 + 1e-6
        sv = numpy(s, "scene_flow_valid")
        assert sv.sum() > 0.5 * fv.sum()
        # error bound from the formats' quantisation: disparity truncated to 1/256 px, flow to 1/64 px
        K = r["K"]
        fb = K[0, 0] * 0.54
        z0 = crop(r["depth"])[sv]
        z1 = z0 + crop(r["scene_flow"][..., 2])[sv]
        v, u = np.nonzero(sv)
        lever = 1 + (np.abs(u + left - K[0, 2]) + np.abs(v + top - K[1, 2]) + 2) / K[0, 0]
        bound = 1.5 * (lever * (z0**2 + z1**2) / fb / 256 + z1 / K[0, 0] / 64) + 1e-5
        error = np.abs(numpy(s, "scene_flow")[sv] - crop(r["scene_flow"])[sv]).max(-1)
        assert (error <= bound).all(), (error - bound).max()


def test_diode(roots):
    outdoor = 0
    for s, r in each(roots, "diode"):
        valid = numpy(s, "depth_valid")
        np.testing.assert_array_equal(valid, (r["depth"] > 0.6) & (r["depth"] < 350))
        np.testing.assert_allclose(numpy(s, "depth")[valid], r["depth"][valid], rtol=1e-6)
        nv = numpy(s, "normal_valid")
        np.testing.assert_array_equal(nv, r["depth"] > 0)
        np.testing.assert_allclose(numpy(s, "normal")[nv], -r["normal"][nv], atol=1e-6)  # as stored
        outdoor += "outdoor/" in s["id"]
    facing = sources.DIODE(roots["diode"], normals="facing")[0]
    stored = sources.DIODE(roots["diode"])[0]
    torch.testing.assert_close(facing["normal"], -stored["normal"])
    with pytest.raises(ValueError, match=r"normals='camera'.*'as_stored', 'facing'"):
        sources.DIODE(roots["diode"], normals="camera")
    assert outdoor == 2


def test_mid(roots):
    for s, r in each(roots, "mid"):
        assert np.abs(numpy(s, "albedo") - r["albedo"]).mean() < 0.04  # jpg (chroma subsampled)
        assert np.abs(numpy(s, "shading") - r["shading"]).mean() < 0.04
        assert numpy(s, "albedo_valid").mean() > 0.9


def test_resizing_scales_flow_vectors(roots):
    native = sources.VirtualKITTI2(roots["vkitti"], "train", tasks="optical_flow")[0]
    half = sources.VirtualKITTI2(roots["vkitti"], "train", tasks="optical_flow", resolution=(16, 52))[0]
    assert half["rgb"].shape == (3, 16, 52)
    expected = torch.nn.functional.interpolate(native["optical_flow"][None], size=(16, 52), mode="nearest-exact")[0]
    torch.testing.assert_close(half["optical_flow"], expected * 0.5)
    assert half["K"][0, 0].item() == pytest.approx(native["K"][0, 0].item() / 2)


def test_horizontal_flip_negates_x_components(roots):
    # vKITTI normals and scene flow: flips only (the release neither jitters nor crops them)
    ds = sources.VirtualKITTI2(roots["vkitti"], "train", tasks=["normal", "scene_flow"], augment=True)
    plain = sources.VirtualKITTI2(roots["vkitti"], "train", tasks=["normal", "scene_flow"])
    flipped = 0
    for i in range(len(ds)):
        for epoch in range(4):
            a, b = ds[(i, epoch)], plain[i]
            assert a["crop"] is None
            if a["flip"][0]:
                flipped += 1
                torch.testing.assert_close(a["rgb"], b["rgb"].flip(-1))
                torch.testing.assert_close(a["normal"][0], -b["normal"][0].flip(-1))
                torch.testing.assert_close(a["normal"][1:], b["normal"][1:].flip(-1))
                torch.testing.assert_close(a["scene_flow"][0], -b["scene_flow"][0].flip(-1))
                torch.testing.assert_close(a["scene_flow"][1:], b["scene_flow"][1:].flip(-1))
                width = b["rgb"].shape[-1]
                assert a["K"][0, 2].item() == pytest.approx(width - 1 - b["K"][0, 2].item())
            else:
                torch.testing.assert_close(a["rgb"], b["rgb"])
    assert flipped > 0
    torch.testing.assert_close(ds[(0, 1)]["rgb"], ds[(0, 1)]["rgb"])  # a function of (seed, epoch, index)
    ds.set_epoch(1)
    torch.testing.assert_close(ds[0]["rgb"], ds[(0, 1)]["rgb"])


def test_vkitti_optical_flow_is_cropped_and_jittered_as_the_release_trains(roots):
    ds = sources.VirtualKITTI2(roots["vkitti"], "train", tasks="optical_flow", augment=True)
    plain = sources.VirtualKITTI2(roots["vkitti"], "train", tasks="optical_flow")
    ch, cw = ds.geometry["train_crop"]  # the release's 256 x 1024 of 375 x 1242, to the miniature's scale
    assert (ch, cw) == (round(32 * 256 / 375), round(104 * 1024 / 1242))
    crops = set()
    for epoch in range(6):
        a, b = ds[(0, epoch)], plain[0]
        top, left = a["crop"]
        crops.add((top, left))
        assert a["rgb"].shape == (3, ch, cw) and a["optical_flow"].shape == (2, ch, cw)
        flow, image, cx = b["optical_flow"], b["rgb"], b["K"][0, 2].item()
        if a["flip"][0]:  # the release flips, then crops
            flow, image, cx = torch.cat([-flow[:1], flow[1:]]).flip(-1), image.flip(-1), b["rgb"].shape[-1] - 1 - cx
        torch.testing.assert_close(a["optical_flow"], flow[..., top:top + ch, left:left + cw])
        assert a["K"][0, 2].item() == pytest.approx(cx - left)
        assert not torch.equal(a["rgb"], image[..., top:top + ch, left:left + cw])  # colour jitter
    assert len(crops) > 1  # a new window every epoch


def test_bad_input_is_named(roots, tmp_path):
    with pytest.raises(DatasetLayoutError, match="does not exist.*docs/paper.md"):
        sources.Hypersim(tmp_path / "nowhere", "train")
    with pytest.raises(DatasetLayoutError, match="no split list 'val'.*data_split"):
        sources.Hypersim(roots["hypersim"], "val")
    with pytest.raises(ValueError, match="does not provide 'semantic'.*depth, normal, albedo, shading"):
        sources.Hypersim(roots["hypersim"], "train", tasks=["semantic"])
    with pytest.raises(ValueError, match="unknown task"):
        sources.Cityscapes(roots["cityscapes"], "val", tasks=["segmentation"])
    ds = sources.Cityscapes(roots["cityscapes"], "val")
    label = roots["cityscapes"] / sources.Cityscapes.label_path(ds.entries[0][0])
    label.unlink()
    with pytest.raises(FileNotFoundError, match="gtFine_labelIds.png"):
        ds[0]
    with pytest.raises(FileExistsError, match="not a procedural mini dataset"):
        (tmp_path / "cityscapes").mkdir()
        mini.write_mini_dataset(tmp_path, "cityscapes", {"count": 1, "size": [16, 32]})


def test_an_empty_split_list_and_a_mistyped_geometry_are_named_with_their_file(roots, tmp_path):
    import shutil

    from stablemtl.data.formats import FormatError

    root = tmp_path / "kitti_flow"
    shutil.copytree(roots["kitti_flow"], root)
    ds = sources.KittiFlow(root)
    assert root in ds.split_file.parents  # the copy's own list, never the repository's
    ds.split_file.write_text("")
    with pytest.raises(DatasetLayoutError, match=rf"the split list {ds.split_file} is empty \(no sample of split"):
        sources.KittiFlow(root)
    meta = root / "stablemtl_dataset.json"
    record = json.loads(meta.read_text())
    for geometry, expected in (("kb_crop", "a list of 2 numbers"), ([1, 2], "an object of fields"),
                               ({"baseline": "0.54"}, "a number")):
        record["geometry"] = {"kb_crop": "352x1216"} if geometry == "kb_crop" else geometry
        meta.write_text(json.dumps(record))
        with pytest.raises(FormatError, match=rf"{meta}: .*expected {expected}"):
            sources.KittiFlow(root)


def test_generation_replaces_an_earlier_miniature_and_a_killed_partial_one(tmp_path):
    spec = {"count": 2, "size": [16, 32]}
    root = mini.write_mini_dataset(tmp_path, "cityscapes", spec, workers=1, progress=False)
    assert len(sources.Cityscapes(root, "val")) == 2
    (tmp_path / ".cityscapes.partial-999").mkdir()  # as a run killed while writing leaves it
    mini.write_mini_dataset(tmp_path, "cityscapes", {"count": 3, "size": [16, 32]}, workers=1, progress=False)
    assert len(sources.Cityscapes(root, "val")) == 3
    assert not list(tmp_path.glob(".*partial*"))


def test_official_lists_filter_frames_and_mark_missing_ground_truth(roots, tmp_path):
    csv = tmp_path / "metadata_images_split_scene_v1.csv"
    csv.write_text("scene_name,camera_name,frame_id,included_in_public_release,exclude_reason,split_partition_name\n"
                   "ai_001_001,cam_00,0,True,,train\nai_001_001,cam_00,1,True,,val\nai_001_001,cam_00,2,False,,train\n")
    built = splits.hypersim_lines(roots["hypersim"], split_csv=csv)
    assert sorted(built) == ["filename_list_train_no_nandepth.txt", "filename_list_train_normal.txt"]
    for lines in built.values():
        assert [line.split()[0] for line in lines] == ["ai_001_001/rgb_cam_00_fr0000.png"]
    written = (roots["kitti_depth"] / "data_split/eigen_test_files_with_gt.txt").read_text().splitlines()
    eigen = tmp_path / "eigen_test_files.txt"
    eigen.write_text("\n".join(line.split()[0] for line in written))
    built = splits.kitti_depth_lines(roots["kitti_depth"], eigen_list=eigen)["eigen_test_files_with_gt.txt"]
    assert [line.split()[:2] for line in built] == [line.split()[:2] for line in written]
    out = splits.build_split("kitti_flow", roots["kitti_flow"], out_dir=tmp_path / "lists")
    assert (tmp_path / "lists/training.txt").read_text().splitlines() == out["training.txt"]
