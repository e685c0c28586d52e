"""The evaluation sources (``stablemtl.data.sources``): Cityscapes, the KITTI Eigen depth split,
KITTI 2015 flow and scene flow, DIODE and MID, read and cropped as the StableMTL release scores them."""

from __future__ import annotations

import numpy as np

from stablemtl.data import annotations, formats, transforms
from stablemtl.data.source_base import Source, albedo_valid
from stablemtl.data.splits import CITYSCAPES_LIST, DIODE_LIST, KITTI_DEPTH_LIST, KITTI_FLOW_LIST, LAYOUTS
from stablemtl.data.transforms import KB_CROP, eigen_crop_mask
from stablemtl.metrics import IGNORE_INDEX


class Cityscapes(Source):
    """Cityscapes: ``leftImg8bit/<split>/<city>/*_leftImg8bit.png`` and ``gtFine/<split>/<city>/*_gtFine_labelIds.png``,
    label ids mapped to the 8 classes (car and bus -> vehicle, everything else ignore).

    Resized as the release reads it: the image and the labels are first halved with
    nearest sampling (pixel 2i + 1), then resized nearest-exact, so at 256 x 512 pixel
    (i, j) is full-resolution pixel (4i + 3, 4j + 3).
    """

    name = "cityscapes"
    root_hint = "cityscapes"
    default_split = "val"
    tasks_provided = ("semantic",)
    split_files = {"val": CITYSCAPES_LIST}
    layout = LAYOUTS[name]

    @staticmethod
    def label_path(rgb_path: str) -> str:
        return rgb_path.replace("leftImg8bit/", "gtFine/", 1).replace("_leftImg8bit.png", "_gtFine_labelIds.png")

    def _load(self, entry):
        label = self.label_path(entry[0])
        labels = annotations.read_cityscapes_labels(self.path(label))
        return {"rgb": self._rgb(entry[0]), "semantic": labels, "semantic_valid": labels != IGNORE_INDEX,
                "files": {"rgb": entry[0], "semantic": label, "semantic_valid": label}}

    def _resize(self, sample: dict, size: tuple[int, int]) -> dict:
        h, w = sample["rgb"].shape[-2:]
        if h < 2 or w < 2:
            raise formats.FormatError(f"image {h}x{w} is smaller than 2x2: the Cityscapes protocol halves the image "
                                      f"first (1024 x 2048 -> 512 x 1024)")
        halved = super()._resize(sample, (h // 2, w // 2))  # PIL's nearest halving = nearest-exact
        return super()._resize(halved, size)


class KittiDepth(Source):
    """KITTI Eigen test split (Marigold's ``kitti_eigen_split_test`` layout): lines
    ``<date>/<drive>/image_02/data/N.png <drive>/proj_depth/groundtruth/image_02/N.png <focal>``;
    lines whose depth is ``None`` are skipped (and counted in ``n_skipped``). Depth png / 256 m,
    KITTI benchmark crop 352 x 1216, valid 1e-5..80 m and (``eigen_crop=True``) the release's
    Eigen window (``eigen_crop_mask``: built on the original image, then cropped)."""

    name = "kitti_depth"
    root_hint = "kitti/kitti_eigen_split_test"
    default_split = "test"
    tasks_provided = ("depth",)
    split_files = {"test": KITTI_DEPTH_LIST}
    layout = LAYOUTS[name]
    depth_range = (1e-5, 80.0)
    geometry = {"kb_crop": list(KB_CROP)}

    def __init__(self, *args, eigen_crop: bool = True, **kwargs):
        self.eigen_crop = eigen_crop
        super().__init__(*args, **kwargs)

    def _read_split(self, split):
        lines = self._split_lines(split)
        kept = [tuple(line) for line in lines if len(line) >= 2 and line[1] != "None"]
        self.n_skipped = len(lines) - len(kept)
        return kept

    def _load(self, entry):
        rgb = self._rgb(entry[0])
        depth = annotations.read_kitti_depth(self.path(entry[1]))
        self._same_size(entry[1], depth, entry[0], rgb)
        crop_size = tuple(self.geometry["kb_crop"])
        top, left = transforms.kb_crop(*depth.shape, crop_size)
        ch, cw = crop_size
        valid = self._depth_valid(depth[top:top + ch, left:left + cw])
        if self.eigen_crop:
            valid &= eigen_crop_mask(*depth.shape, crop_size)
        rgb, depth = rgb[top:top + ch, left:left + cw], depth[top:top + ch, left:left + cw]
        out = {"rgb": rgb, "depth": depth, "depth_valid": valid,
               "files": {"rgb": entry[0], "depth": entry[1], "depth_valid": entry[1]}}
        if len(entry) >= 3:
            f = float(entry[2])
            out["K"] = np.array([[f, 0, np.nan], [0, f, np.nan], [0, 0, 1]])
        return out


class KittiFlow(Source):
    """KITTI 2015 scene flow, ``training/``: ``image_2/N_10.png`` and ``_11``, ``flow_occ`` (16-bit),
    ``disp_occ_0`` / ``disp_occ_1`` (/256, the latter in the reference frame's pixels),
    ``calib_cam_to_cam/N.txt`` (P_rect_02). Scene flow = backprojection of (pixel + flow, disp1)
    minus backprojection of (pixel, disp0), baseline 0.54 m, depth = f b / (disparity + 1e-5),
    in float32 as the release. Everything KB-cropped.

    Optical flow keeps its own valid mask (the release overwrote it with the
    scene-flow mask: a documented fix); scene flow needs flow and both disparities.
    """

    name = "kitti_flow"
    root_hint = "kitti/flow_2015"
    default_split = "train"
    tasks_provided = ("optical_flow", "scene_flow")
    split_files = {"train": KITTI_FLOW_LIST}
    layout = LAYOUTS[name]
    geometry = {"kb_crop": list(KB_CROP), "baseline": 0.54}

    def _load(self, entry):
        flow_path = entry[0]
        rgb_path = flow_path.replace("flow_occ/", "image_2/", 1)
        rgb, rgb_next = self._rgb(rgb_path), self._rgb(rgb_path.replace("_10.", "_11."))
        flow, flow_valid = annotations.read_kitti_flow(self.path(flow_path))
        self._same_size(flow_path, flow, rgb_path, rgb)
        self._same_size(rgb_path.replace("_10.", "_11."), rgb_next, rgb_path, rgb)
        h, w = flow.shape[:2]
        top, left = transforms.kb_crop(h, w, self.geometry["kb_crop"])
        ch, cw = self.geometry["kb_crop"]
        crop = lambda a: a[top:top + ch, left:left + cw]  # noqa: E731
        calib_path = flow_path.replace("flow_occ/", "calib_cam_to_cam/", 1).replace("_10.png", ".txt")
        calib = annotations.read_kitti_calib(self.path(calib_path))
        if "P_rect_02" not in calib:
            raise formats.FormatError(f"{self.path(calib_path)}: no P_rect_02 line")
        P = np.asarray(calib["P_rect_02"], dtype=np.float32).reshape(3, 4)
        f, cx, cy = P[0, 0], P[0, 2], P[1, 2]
        out = {"rgb": crop(rgb), "rgb_next": crop(rgb_next),
               "files": {"rgb": rgb_path, "rgb_next": rgb_path.replace("_10.", "_11."), "optical_flow": flow_path,
                         "optical_flow_valid": flow_path, "scene_flow": flow_path, "scene_flow_valid": flow_path}}
        if "optical_flow" in self.tasks:
            out["optical_flow"], out["optical_flow_valid"] = crop(flow), crop(flow_valid)
        if "scene_flow" in self.tasks:
            disp0, disp1 = (flow_path.replace("flow_occ/", f"disp_occ_{k}/", 1) for k in (0, 1))
            d0, v0 = annotations.read_kitti_disparity(self.path(disp0))
            d1, v1 = annotations.read_kitti_disparity(self.path(disp1))
            self._same_size(disp0, d0, flow_path, flow)
            self._same_size(disp1, d1, flow_path, flow)
            valid = v0 & v1 & flow_valid
            fb = np.float32(self.geometry["baseline"]) * f
            vv, uu = np.mgrid[0:h, 0:w].astype(np.float32)
            z0, z1 = fb / (d0 + np.float32(1e-5)), fb / (d1 + np.float32(1e-5))
            p1 = np.stack([(uu - cx) * z0 / f, (vv - cy) * z0 / f, z0], -1)
            p2 = np.stack([(uu + flow[..., 0] - cx) * z1 / f, (vv + flow[..., 1] - cy) * z1 / f, z1], -1)
            sf = np.where(valid[..., None], p2 - p1, np.float32(0.0))
            out["scene_flow"], out["scene_flow_valid"] = crop(sf), crop(valid)
        f, cx, cy = float(f), float(cx), float(cy)
        out["K"] = np.array([[f, 0, cx - left], [0, f, cy - top], [0, 0, 1]])
        return out


class DIODE(Source):
    """DIODE val (indoors + outdoor): lines ``<rgb>.png <rgb>_depth.npy <rgb>_depth_mask.npy``;
    normals in ``<rgb>_normal.npy``. Depth valid = the depth mask (the only depth mask, as the
    release); normals converted to (-nx, ny, nz) as the release (``normals="facing"`` negates
    them), valid where |n| in (0.5, 1.5)."""

    name = "diode"
    root_hint = "diode/diode_val"
    default_split = "val"
    tasks_provided = ("depth", "normal")
    split_files = {"val": DIODE_LIST}
    layout = LAYOUTS[name]
    depth_range = (0.6, 350.0)

    def _load(self, entry):
        if len(entry) != 3:
            raise formats.FormatError(f"expected 3 columns (rgb depth.npy depth_mask.npy), got {len(entry)}")
        out = {"rgb": self._rgb(entry[0])}
        normal_file = entry[1].replace("_depth.npy", "_normal.npy")
        out["files"] = {"rgb": entry[0], "depth": entry[1], "depth_valid": entry[2], "normal": normal_file,
                        "normal_valid": normal_file}
        if "depth" in self.tasks:
            out["depth"] = annotations.read_diode_depth(self.path(entry[1]))
            mask = annotations.read_diode_mask(self.path(entry[2]))
            self._same_size(entry[2], mask, entry[1], out["depth"])
            out["depth_valid"] = mask & np.isfinite(out["depth"])
        if "normal" in self.tasks:
            n, valid = annotations.read_diode_normal(self.path(normal_file))
            out["normal"], out["normal_valid"] = self._oriented(n, valid)
        return out


class MIDIntrinsics(Source):
    """MIT multi-illumination (MID) test set as StableMTL preprocesses it: ``test/<scene>_dir_K_mip2.jpg``
    (tone-mapped), ``..._albedo.jpg`` and ``..._shading.jpg``; both masked where albedo < 0.004."""

    name = "mid"
    root_hint = "mid_intrinsics"
    default_split = "test"
    tasks_provided = ("albedo", "shading")
    layout = LAYOUTS[name]

    def _load(self, entry):
        stem = entry[0][: -len(".jpg")]
        albedo = self._rgb(f"{stem}_albedo.jpg")
        valid = albedo_valid(albedo)
        out = {"rgb": self._rgb(entry[0])}
        out["files"] = {"rgb": entry[0], "albedo": f"{stem}_albedo.jpg", "albedo_valid": f"{stem}_albedo.jpg",
                        "shading": f"{stem}_shading.jpg", "shading_valid": f"{stem}_albedo.jpg"}
        if "albedo" in self.tasks:
            out["albedo"], out["albedo_valid"] = albedo, valid
        if "shading" in self.tasks:
            out["shading"], out["shading_valid"] = self._rgb(f"{stem}_shading.jpg"), valid
        return out
