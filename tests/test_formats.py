"""File formats: each writer's bytes checked against the encoding formula with an independent
decoder (pypng for PNG, raw bytes for PFM/.flo, numpy for npy), round trips, and bad input."""

import math
import struct

import numpy as np
import png  # pypng: a pure-Python PNG decoder, independent of OpenCV
import pytest

from stablemtl.data import annotations as A
from stablemtl.data import formats as F


def png_pixels(path):
    """(rows [H, W, C] as stored, bit depth) decoded by pypng, RGB order."""
    width, height, rows, info = png.Reader(filename=str(path)).asDirect()
    planes = info["planes"]
    arr = np.array([np.asarray(r) for r in rows]).reshape(height, width, planes)
    return arr, info["bitdepth"]


# ----------------------------------------------------------------------------- KITTI

def test_kitti_flow_png_encoding(tmp_path):
    flow = np.array([[[1.5, -2.25], [0.0, 0.0]], [[-511.0, 300.3], [7.0, 7.0]]])
    valid = np.array([[True, False], [True, True]])
    path = A.write_kitti_flow(tmp_path / "000000_10.png", flow, valid)
    raw, depth = png_pixels(path)
    assert depth == 16 and raw.shape == (2, 2, 3)
    assert raw[0, 0].tolist() == [math.floor(1.5 * 64 + 32768), math.floor(-2.25 * 64 + 32768), 1]
    assert raw[1, 0].tolist() == [math.floor(-511 * 64 + 32768), math.floor(300.3 * 64 + 32768), 1]
    assert raw[0, 1].tolist() == [32768, 32768, 0]  # invalid: zero flow, B = 0, as KITTI / FT3D store it
    back, back_valid = A.read_kitti_flow(path)
    assert back[0, 1].tolist() == [0.0, 0.0]
    assert back.dtype == np.float32 and np.array_equal(back_valid, valid)
    assert np.allclose(back[valid], flow[valid], atol=1 / 64)
    assert back[0, 0].tolist() == [1.5, -2.25]  # exactly representable


def test_kitti_depth_and_disparity_encoding(tmp_path):
    depth = np.array([[12.3456, 0.0], [np.nan, 80.0]])
    path = A.write_kitti_depth(tmp_path / "depth.png", depth)
    raw, bits = png_pixels(path)
    assert bits == 16 and raw[..., 0].tolist() == [[math.floor(12.3456 * 256), 0], [0, 80 * 256]]
    back = A.read_kitti_depth(path)
    assert back[0, 0] == np.float32(math.floor(12.3456 * 256) / 256) and back[1, 0] == 0 and back[1, 1] == 80
    disp, valid = A.read_kitti_disparity(A.write_kitti_disparity(tmp_path / "disp.png", np.array([[3.5, 9.0]]),
                                                                 valid=np.array([[True, False]])))
    assert disp.tolist() == [[3.5, 0.0]] and valid.tolist() == [[True, False]]


def test_kitti_calib_parses_the_devkit_text(tmp_path):
    text = ("calib_time: 09-Jan-2012 13:57:47\n"
            "corner_dist: 9.950000e-02\n"
            "P_rect_02: 7.215377e+02 0.000000e+00 6.095593e+02 4.485728e+01 0.000000e+00 7.215377e+02 "
            "1.728540e+02 2.163791e-01 0.000000e+00 0.000000e+00 1.000000e+00 2.745884e-03\n")
    path = tmp_path / "000000.txt"
    path.write_text(text)
    calib = A.read_kitti_calib(path)
    assert calib["calib_time"] == "09-Jan-2012 13:57:47"
    p = calib["P_rect_02"].reshape(3, 4)
    assert (p[0, 0], p[0, 2], p[1, 2]) == (721.5377, 609.5593, 172.854)
    again = A.read_kitti_calib(A.write_kitti_calib(tmp_path / "copy.txt", calib))
    assert again["calib_time"] == calib["calib_time"] and np.array_equal(again["P_rect_02"], calib["P_rect_02"])
    assert A.write_kitti_calib(tmp_path / "c2.txt", {"P_rect_02": p}).read_text().startswith(
        "P_rect_02: 7.215377e+02 0.000000e+00 6.095593e+02")


# ----------------------------------------------------------------------------- Virtual KITTI 2

def test_vkitti_depth_cm_and_sky_code(tmp_path):
    path = A.write_vkitti_depth(tmp_path / "depth_00000.png", np.array([[12.345, np.inf, np.nan]]))
    raw, bits = png_pixels(path)
    assert bits == 16 and raw[0, :, 0].tolist() == [math.floor(1234.5), 65535, 0]
    assert np.allclose(A.read_vkitti_depth(path), [[12.34, 655.35, 0.0]])


def test_vkitti_flow_encoding(tmp_path):
    h, w = 5, 6
    flow = np.zeros((h, w, 2))
    flow[0, 0] = [2.0, -1.0]
    flow[1, 1] = [-5.0, 4.0]  # the extremes: -(W-1), +(H-1)
    valid = np.ones((h, w), bool)
    valid[2, 2] = False
    path = A.write_vkitti_flow(tmp_path / "flow_00000.png", flow, valid)
    raw, bits = png_pixels(path)
    assert bits == 16
    code = lambda x, size: math.floor((x / size + 1) / 2 * 65535)  # noqa: E731
    assert raw[0, 0].tolist() == [code(2.0, w - 1), code(-1.0, h - 1), 65535]
    assert raw[1, 1].tolist() == [0, 65535, 65535]
    assert raw[2, 2].tolist() == [0, 0, 0]
    back, back_valid = A.read_vkitti_flow(path)
    assert np.array_equal(back_valid, valid) and np.all(back[~valid] == 0)
    assert np.abs(back - flow)[valid].max() <= 2 / 65535 * (w - 1) + 1e-6
    assert back[1, 1].tolist() == [-5.0, 4.0]


def test_vkitti_scene_flow_encoding(tmp_path):
    sf = np.array([[[1.0, -2.5, 0.0], [10.0, -10.0, np.nan]]])
    path = A.write_vkitti_scene_flow(tmp_path / "sceneFlow_00000.png", sf)
    raw, _ = png_pixels(path)
    code = lambda x: math.floor((x / 10 + 1) / 2 * 65535)  # noqa: E731
    assert raw[0, 0].tolist() == [code(1.0), code(-2.5), code(0.0)]
    assert raw[0, 1].tolist() == [65535, 0, code(0.0)]
    back, valid = A.read_vkitti_scene_flow(path)
    assert valid.all() and np.abs(back[0, 0] - sf[0, 0]).max() <= 20 / 65535
    assert back[0, 1, :2].tolist() == [10.0, -10.0]


def test_vkitti_semantic_colours_and_class_map(tmp_path):
    names = np.array([["Road", "Car", "Van", "Terrain"], ["Sky", "Tree", "Vegetation", "Undefined"]])
    path = A.write_vkitti_semantic(tmp_path / "classgt_00000.png", names)
    raw, bits = png_pixels(path)
    assert bits == 8 and raw[0, 0].tolist() == [100, 60, 100] and raw[0, 1].tolist() == [255, 127, 80]
    assert A.read_vkitti_semantic(path).tolist() == [[0, 7, 7, 250], [6, 5, 5, 250]]
    F.write_rgb(tmp_path / "odd.png", np.full((1, 1, 3), 17, np.uint8))
    with pytest.raises(F.FormatError, match=r"odd.png: colours \[\(17, 17, 17\)\] are not vKITTI 2 categories"):
        A.read_vkitti_semantic(tmp_path / "odd.png")


# ----------------------------------------------------------------------------- Hypersim, npy, DIODE, HDF5

def test_hypersim_depth_mm(tmp_path):
    path = A.write_hypersim_depth(tmp_path / "depth_plane_cam_00_fr0000.png", np.array([[3.2105, np.nan, 65.0]]))
    raw, bits = png_pixels(path)
    assert bits == 16 and raw[0, :, 0].tolist() == [3210, 0, 65000]
    assert np.allclose(A.read_hypersim_depth(path), [[3.21, 0.0, 65.0]])


def test_npy_normals_masks_and_diode(tmp_path):
    n = np.random.default_rng(0).normal(size=(4, 5, 3)).astype(np.float32)
    assert np.array_equal(A.read_normal_npy(F.write_npy(tmp_path / "normal.npy", n)), n)
    mask = np.eye(4, 5, dtype=bool)
    assert np.array_equal(A.read_mask_npy(F.write_npy(tmp_path / "mask.npy", mask)), mask)

    depth = np.arange(20, dtype=np.float32).reshape(4, 5)
    p = A.write_diode_depth(tmp_path / "00019_00183_indoors_000_010_depth.npy", depth)
    assert np.load(p).shape == (4, 5, 1)  # DIODE stores [H, W, 1]
    assert np.array_equal(A.read_diode_depth(p), depth)
    m = A.write_diode_mask(tmp_path / "x_depth_mask.npy", mask)
    assert np.load(m).dtype == np.float32 and np.array_equal(A.read_diode_mask(m), mask)

    normal = np.zeros((1, 3, 3), np.float32)
    normal[0, 0] = [0.6, 0.0, 0.8]
    normal[0, 1] = [0.1, 0.1, 0.1]  # length 0.17: invalid
    p = A.write_diode_normal(tmp_path / "x_normal.npy", normal)
    assert np.load(p)[0, 0].tolist() == pytest.approx([-0.6, 0.0, 0.8])  # stored in DIODE's convention
    back, valid = A.read_diode_normal(p)
    assert np.array_equal(back, normal) and valid.tolist() == [[True, False, False]]


def test_hdf5_round_trip(tmp_path):
    a = np.random.default_rng(1).random((3, 4, 3))
    assert np.array_equal(F.read_hdf5(F.write_hdf5(tmp_path / "frame.0000.color.hdf5", a)), a)
    with pytest.raises(F.FormatError, match="has no dataset 'depth'"):
        F.read_hdf5(tmp_path / "frame.0000.color.hdf5", key="depth")


# ----------------------------------------------------------------------------- PFM, .flo

def test_pfm_bytes_and_round_trip(tmp_path):
    img = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, -6.5]], np.float32)
    path = F.write_pfm(tmp_path / "0006.pfm", img)
    data = path.read_bytes()
    header = b"Pf\n3 2\n-1.000000\n"
    assert data[:len(header)] == header
    assert np.frombuffer(data[len(header):], "<f4").tolist() == [4.0, 5.0, -6.5, 1.0, 2.0, 3.0]  # bottom row first
    assert np.array_equal(F.read_pfm(path), img)
    colour = np.random.default_rng(2).random((4, 5, 3)).astype(np.float32)
    assert np.array_equal(F.read_pfm(F.write_pfm(tmp_path / "c.pfm", colour)), colour)
    # big-endian files (positive scale) are read too
    (tmp_path / "be.pfm").write_bytes(b"Pf\n2 1\n1.0\n" + struct.pack(">2f", 7.0, 8.0))
    assert F.read_pfm(tmp_path / "be.pfm").tolist() == [[7.0, 8.0]]


def test_flo_bytes_and_round_trip(tmp_path):
    flow = np.array([[[1.0, -1.0], [2.5, 0.0], [0.0, 3.0]]], np.float32)
    path = F.write_flo(tmp_path / "0006.flo", flow)
    data = path.read_bytes()
    assert data[:4] == b"PIEH" and struct.unpack("<ii", data[4:12]) == (3, 1)
    assert struct.unpack("<6f", data[12:]) == (1.0, -1.0, 2.5, 0.0, 0.0, 3.0)
    assert np.array_equal(F.read_flo(path), flow)


# ----------------------------------------------------------------------------- Cityscapes, RGB, masks, EXR

def test_cityscapes_label_ids_to_classes(tmp_path):
    ids = np.array([[7, 11, 17, 19, 20], [21, 23, 26, 28, 24]], np.uint8)
    path = A.write_cityscapes_label_ids(tmp_path / "x_gtFine_labelIds.png", ids)
    raw, bits = png_pixels(path)
    assert bits == 8 and np.array_equal(raw[..., 0], ids)
    assert A.read_cityscapes_labels(path).tolist() == [[0, 1, 2, 3, 4], [5, 6, 7, 7, 250]]


def test_rgb_png_jpg_and_mask(tmp_path):
    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb[0, 0] = [255, 0, 0]
    rgb[1, 2] = [0, 10, 200]
    raw, bits = png_pixels(F.write_rgb(tmp_path / "rgb.png", rgb))
    assert bits == 8 and np.array_equal(raw, rgb)  # RGB order on disk, no BGR swap
    assert np.array_equal(F.read_rgb(tmp_path / "rgb.png"), rgb)
    assert F.read_rgb(F.write_rgb(tmp_path / "half.png", np.full((1, 1, 3), 0.5)))[0, 0].tolist() == [127] * 3
    big = np.full((16, 16, 3), [200, 30, 30], np.uint8)
    assert np.abs(F.read_rgb(F.write_rgb(tmp_path / "rgb.jpg", big)).astype(int) - big).max() <= 3
    mask = np.array([[True, False]])
    assert png_pixels(F.write_mask_png(tmp_path / "occ.png", mask))[0][..., 0].tolist() == [[255, 0]]
    assert np.array_equal(F.read_mask_png(tmp_path / "occ.png"), mask)


def test_exr_round_trip_and_channel_order(tmp_path):
    import OpenEXR

    img = np.random.default_rng(3).random((4, 6, 3)).astype(np.float32) * 5
    path = F.write_exr(tmp_path / "dir_0_mip2.exr", img)
    with OpenEXR.File(str(path), separate_channels=True) as f:
        channels = f.channels()
        assert sorted(channels) == ["B", "G", "R"] and np.array_equal(channels["G"].pixels, img[..., 1])
    assert np.array_equal(F.read_exr(path), img)
    grey = F.read_exr(F.write_exr(tmp_path / "y.exr", img[..., 0], half=True))
    assert grey.shape == (4, 6, 1) and np.allclose(grey[..., 0], img[..., 0], rtol=1e-3)


# ----------------------------------------------------------------------------- bad input

def test_corrupt_and_truncated_files_name_the_file(tmp_path):
    path = A.write_kitti_depth(tmp_path / "good.png", np.ones((64, 64)))
    data = path.read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(F.FormatError, match=r"trunc.png: cannot decode the image.*KITTI 16-bit depth"):
        A.read_kitti_depth(tmp_path / "trunc.png")
    with pytest.raises(FileNotFoundError, match="missing.png: no such file"):
        A.read_kitti_depth(tmp_path / "missing.png")

    F.write_pfm(tmp_path / "a.pfm", np.ones((4, 4), np.float32))
    (tmp_path / "t.pfm").write_bytes((tmp_path / "a.pfm").read_bytes()[:-5])
    with pytest.raises(F.FormatError, match=r"t.pfm: truncated PFM: 4x4x1 floats need 64 bytes"):
        F.read_pfm(tmp_path / "t.pfm")
    (tmp_path / "n.pfm").write_bytes(b"P6\n1 1\n255\n\x00\x00\x00")
    with pytest.raises(F.FormatError, match="n.pfm: not a PFM file"):
        F.read_pfm(tmp_path / "n.pfm")

    F.write_flo(tmp_path / "a.flo", np.ones((3, 3, 2), np.float32))
    (tmp_path / "t.flo").write_bytes((tmp_path / "a.flo").read_bytes()[:-1])
    with pytest.raises(F.FormatError, match=r"t.flo: truncated .flo: a 3x3 flow needs 84 bytes, found 83"):
        F.read_flo(tmp_path / "t.flo")
    (tmp_path / "m.flo").write_bytes(b"XXXX" + bytes(8))
    with pytest.raises(F.FormatError, match="m.flo: not a .flo file"):
        F.read_flo(tmp_path / "m.flo")

    F.write_npy(tmp_path / "a.npy", np.ones((8, 8, 3), np.float32))
    (tmp_path / "t.npy").write_bytes((tmp_path / "a.npy").read_bytes()[:-10])
    with pytest.raises(F.FormatError, match="t.npy: cannot read as .npy"):
        A.read_normal_npy(tmp_path / "t.npy")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(F.FormatError, match="obj.npy: cannot read as .npy"):
        F.read_npy(tmp_path / "obj.npy")  # never unpickles

    F.write_exr(tmp_path / "a.exr", np.ones((8, 8, 3)))
    (tmp_path / "t.exr").write_bytes((tmp_path / "a.exr").read_bytes()[:-40])
    with pytest.raises(F.FormatError, match="t.exr: cannot read as OpenEXR"):
        F.read_exr(tmp_path / "t.exr")
    (tmp_path / "bad.h5").write_bytes(b"not hdf5")
    with pytest.raises(F.FormatError, match="bad.h5: cannot read as HDF5"):
        F.read_hdf5(tmp_path / "bad.h5")


def test_readers_refuse_what_breaks_their_contract_naming_the_file(tmp_path):
    """What a library would return silently (an empty image, byte strings, integer normals) or raise
    about without naming the file (a group, a damaged archive, a non-text calibration file)."""
    (tmp_path / "empty.pfm").write_bytes(b"Pf\n0 0\n-1.0\n")
    with pytest.raises(F.FormatError, match=r"empty.pfm: the PFM header says 0 x 0 pixels"):
        F.read_pfm(tmp_path / "empty.pfm")

    import h5py

    with h5py.File(tmp_path / "strings.h5", "w") as f:
        f.create_dataset("dataset", data=np.array([b"a", b"bc"]))
        f.create_group("group").create_dataset("inner", data=np.ones(2))
    with pytest.raises(F.FormatError, match=r"strings.h5: HDF5 dataset 'dataset' holds \|S2 values.*expected "):
        F.read_hdf5(tmp_path / "strings.h5")
    with pytest.raises(F.FormatError, match=r"strings.h5: 'group' is an HDF5 group \(holding \['inner'\]\)"):
        F.read_hdf5(tmp_path / "strings.h5", key="group")

    np.save(tmp_path / "int_normals.npy", np.ones((4, 4, 3), np.int64))
    with pytest.raises(F.FormatError, match=r"int_normals.npy: the array holds int64 .*expected floating-point"):
        A.read_normal_npy(tmp_path / "int_normals.npy")
    assert A.read_normal_npy(F.write_npy(tmp_path / "f64.npy", np.ones((4, 4, 3)))).dtype == np.float32  # a float
    np.save(tmp_path / "text.npy", np.array([["a", "b"], ["c", "d"]]))
    with pytest.raises(F.FormatError, match=r"text.npy: the array holds <U1 values"):
        A.read_mask_npy(tmp_path / "text.npy")
    np.save(tmp_path / "none.npy", np.zeros((0, 3), np.float32))
    with pytest.raises(F.FormatError, match=r"none.npy: the array is empty \(shape \(0, 3\)\)"):
        F.read_npy(tmp_path / "none.npy")

    F.write_npz(tmp_path / "pc.npz", pc1=np.ones((5, 3), np.float32))
    (tmp_path / "cut.npz").write_bytes((tmp_path / "pc.npz").read_bytes()[:40])
    with pytest.raises(F.FormatError, match=r"cut.npz: cannot read as .npz \(BadZipFile"):
        F.read_npz(tmp_path / "cut.npz", "pc1")
    with pytest.raises(F.FormatError) as missing:  # a readable archive is not called damaged
        F.read_npz(tmp_path / "pc.npz", "pc2")
    assert str(missing.value) == f"{tmp_path / 'pc.npz'}: no array 'pc2' in the archive (it holds ['pc1'])"

    (tmp_path / "calib.txt").write_bytes(b"P0: 1 2 3\n\xff\xfe binary\n")
    with pytest.raises(F.FormatError, match=r"calib.txt: not a KITTI calibration text file \(byte 10 is not UTF-8"):
        A.read_kitti_calib(tmp_path / "calib.txt")


def test_wrong_bit_depth_or_channels_are_explained(tmp_path):
    F.write_rgb(tmp_path / "rgb.png", np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(F.FormatError, match=r"rgb.png: expected a KITTI 16-bit depth PNG .*16-bit, 1 channel.*"
                                            r"got 8-bit with 3 channel"):
        A.read_kitti_depth(tmp_path / "rgb.png")
    A.write_kitti_depth(tmp_path / "grey16.png", np.ones((2, 2)))
    with pytest.raises(F.FormatError, match=r"grey16.png: expected a KITTI 16-bit RGB flow PNG.*got 16-bit with 1"):
        A.read_kitti_flow(tmp_path / "grey16.png")
    with pytest.raises(F.FormatError, match="expected 3 channel"):
        A.read_normal_npy(F.write_npy(tmp_path / "n2.npy", np.ones((2, 2, 2))))


def test_writers_reject_what_the_format_cannot_hold(tmp_path):
    with pytest.raises(ValueError, match=r"depth \(m\) 70 is outside .*65.535.*mark farther pixels invalid"):
        A.write_hypersim_depth(tmp_path / "d.png", np.array([[70.0]]))
    with pytest.raises(ValueError, match="must not be negative"):
        A.write_kitti_depth(tmp_path / "d.png", np.array([[-1.0]]))
    with pytest.raises(ValueError, match=r"flow component 600 is outside"):
        A.write_kitti_flow(tmp_path / "f.png", np.full((1, 1, 2), 600.0), np.ones((1, 1), bool))
    with pytest.raises(ValueError, match=r"scene-flow component \(m\) -12 is outside \+-10"):
        A.write_vkitti_scene_flow(tmp_path / "s.png", np.full((1, 1, 3), -12.0))
    with pytest.raises(ValueError, match=r"optical flow must be \[H, W, 2\], got shape \(2, 2, 3\)"):
        F.write_flo(tmp_path / "f.flo", np.ones((2, 2, 3)))
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_nan_flow_is_written_invalid(tmp_path):
    flow = np.array([[[np.nan, 1.0], [2.0, 2.0]]])
    _, valid = A.read_kitti_flow(A.write_kitti_flow(tmp_path / "f.png", flow, np.ones((1, 2), bool)))
    assert valid.tolist() == [[False, True]]


def test_atomic_write_keeps_the_old_file_when_interrupted(tmp_path):
    path = A.write_kitti_depth(tmp_path / "d.png", np.ones((2, 2)))
    before = path.read_bytes()

    def dies_halfway(tmp):
        with open(tmp, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        F.atomic_write(path, dies_halfway)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["d.png"]


def test_a_full_disk_is_named_and_leaves_no_partial_file(tmp_path, monkeypatch):
    import errno
    import shutil
    from collections import namedtuple

    from stablemtl.guard import DiskFullError

    def fill_up(tmp):
        with open(tmp, "wb") as f:
            f.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFullError, match=rf"the disk is full: writing the file {tmp_path / 'a.npy'} stopped "
                                            r"after 0.0 MiB .*the partial file was removed"):
        F.atomic_write(tmp_path / "a.npy", fill_up)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither the file nor its temporary

    def torch_like(tmp):  # a library that wraps the OSError in its own error
        try:
            fill_up(tmp)
        except OSError as err:
            raise RuntimeError("file write failed") from err

    with pytest.raises(DiskFullError):
        F.atomic_write(tmp_path / "b.pt", torch_like)

    folder = tmp_path / "checkpoint" / ".latest.partial"
    with pytest.raises(DiskFullError, match=r"writing the checkpoint of step 7 .*\.latest\.partial stopped after"):
        with F.partial_folder(folder, 10, "the checkpoint of step 7"):
            fill_up(folder / "optimizer.pt")
    assert not folder.exists()
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(2 ** 30, 2 ** 30 - 2 ** 20, 2 ** 20))
    with pytest.raises(DiskFullError, match=r"not enough disk space for the checkpoint of step 8 in .*checkpoint: "
                                            r"it needs about 3.0 MiB, 1.0 MiB are free there"):
        with F.partial_folder(folder, 3 * 2 ** 20, "the checkpoint of step 8"):
            raise AssertionError("nothing is written when the space is known to be missing")
    assert not folder.exists()
