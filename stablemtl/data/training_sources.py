"""The training sources (``stablemtl.data.sources``): Hypersim, Virtual KITTI 2 and FlyingThings3D,
as the StableMTL release preprocesses and augments them."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from stablemtl.data import annotations, formats, transforms
from stablemtl.data.source_base import Source, albedo_valid
from stablemtl.data.splits import HYPERSIM_LISTS, LAYOUTS, VKITTI_ANNOTATIONS
from stablemtl.metrics import IGNORE_INDEX


class Hypersim(Source):
    """Hypersim, StableMTL-preprocessed: ``<scene>/rgb_cam_XX_frNNNN.png`` with ``depth_plane_``
    (uint16 mm), ``normal_cam_`` (.npy) + ``normal_valid_mask_`` (.npy), ``albedo_`` and ``shading_`` PNGs.

    The release's split lists drop in under their own names, one per task
    (``HYPERSIM_LISTS``): for training ``filename_list_train_no_nandepth.txt``
    (depth, albedo, shading) and ``filename_list_train_normal.txt`` (normal).
    A line has 2 columns (rgb, depth: the depth-only lists) or 5 (rgb, depth,
    normal npy, normal png, normal mask npy); normals need the 5. With several
    tasks, the frames listed for all of them are used. Albedo is read from
    ``albedo_*.png``, the name the preprocessing writes (the release's loader
    looked for ``reflectance_*``: a documented fix).
    """

    name = "hypersim"
    root_hint = "hypersim/train"
    default_split = "train"
    tasks_provided = ("depth", "normal", "albedo", "shading")
    layout = LAYOUTS[name]
    depth_range = (1e-5, 65.0)
    geometry = {"focal": 886.81, "size": [768, 1024]}

    def _read_split(self, split):
        frames: dict[str, tuple[str, ...]] | None = None
        for task in self.tasks:
            lists = HYPERSIM_LISTS.get(split)
            file = lists.get(task) if isinstance(lists, dict) else lists
            lines = self._split_lines(split, file)
            expected = HYPERSIM_COLUMNS[task]
            for number, line in enumerate(lines, 1):
                if len(line) not in expected:
                    raise formats.FormatError(
                        f"{self.split_file}: line {number} has {len(line)} column(s); a Hypersim {task} list "
                        f"needs {' or '.join(str(c) for c in expected)} ({HYPERSIM_COLUMN_NAMES[max(expected)]})")
            listed = {line[0]: tuple(line) for line in lines}
            if frames is None:
                frames = listed
            else:  # keep the frames of every task's list, with the longest line of each
                frames = {k: max(v, listed[k], key=len) for k, v in frames.items() if k in listed}
        return list(frames.values())

    def _load(self, entry):
        rgb_path = entry[0]
        out = {"rgb": self._rgb(rgb_path)}
        h, w = out["rgb"].shape[:2]
        folder, file = rgb_path.rsplit("/", 1) if "/" in rgb_path else ("", rgb_path)
        sibling = lambda prefix: f"{folder}/{file.replace('rgb_', prefix + '_', 1)}".lstrip("/")  # noqa: E731
        files = out["files"] = {"rgb": rgb_path}
        if "depth" in self.tasks:
            d = annotations.read_hypersim_depth(self.path(entry[1]))
            out["depth"], out["depth_valid"] = d, self._depth_valid(d)
            files["depth"] = files["depth_valid"] = entry[1]
        if "normal" in self.tasks:
            n = annotations.read_normal_npy(self.path(entry[2]))
            mask = annotations.read_mask_npy(self.path(entry[4]))
            self._same_size(entry[2], n, entry[4], mask)
            out["normal"], out["normal_valid"] = self._oriented(n, mask)
            files["normal"], files["normal_valid"] = entry[2], entry[4]
        if "albedo" in self.tasks or "shading" in self.tasks:
            albedo = formats.read_rgb(self.path(sibling("albedo"))).astype(np.float32) / 255.0
            out["albedo"], out["albedo_valid"] = albedo, albedo_valid(albedo)
            files["albedo"] = files["albedo_valid"] = files["shading_valid"] = sibling("albedo")
            if "shading" in self.tasks:
                out["shading"] = formats.read_rgb(self.path(sibling("shading"))).astype(np.float32) / 255.0
                out["shading_valid"] = out["albedo_valid"]
                files["shading"] = sibling("shading")
        f = self.geometry["focal"] * w / self.geometry["size"][1]
        out["K"] = np.array([[f, 0, (w - 1) / 2], [0, f, (h - 1) / 2], [0, 0, 1]])
        return out


# the columns each task's lines need (the release's lists: ``splits.HYPERSIM_LISTS``)
HYPERSIM_COLUMNS = {"depth": (2, 5), "albedo": (2, 5), "shading": (2, 5), "normal": (5,)}
HYPERSIM_COLUMN_NAMES = {2: "rgb depth", 5: "rgb depth normal.npy normal.png normal_mask.npy"}


_VKITTI_RGB = re.compile(r"^original/(Scene\d+)/([^/]+)/frames/rgb/(Camera_\d)/rgb_(\d{5})\.jpg$")


class VirtualKITTI2(Source):
    """Virtual KITTI 2 under ``vkitti_v2/``: ``original/SceneXX/<variation>/frames/<kind>/Camera_k/``
    (rgb jpg, depth png cm, classSegmentation colour png, forwardFlow and forwardSceneFlow 16-bit
    png) and ``normal_estimated/.../frames/normal/Camera_k/normal_NNNNN.npy``.

    The split is per task as the release's lists (``vkitti_<task>_<split>.txt``, one
    annotation path per line); with several tasks the frames listed for all of them are used.
    Augmented as the release trains: a horizontal flip for every task; for optical flow
    also colour jitter and a random 256 x 1024 window (``geometry["train_crop"]``) before
    the resize; scene flow gets no jitter and no crop.
    """

    name = "vkitti"
    root_hint = "vkitti_v2"
    default_split = "train"
    tasks_provided = ("depth", "normal", "semantic", "optical_flow", "scene_flow")
    layout = LAYOUTS[name]
    depth_range = (1e-5, 80.0)
    geometry = {"focal": 725.0087, "cx": 620.5, "cy": 187.0, "train_crop": [256, 1024]}
    jitter = (0.4, 0.4, 0.2, 0.127)
    jitter_tasks = crop_tasks = ("optical_flow",)

    def _read_split(self, split):
        frames = None
        for task in self.tasks:
            keys = []
            for line in self._split_lines(split, f"vkitti_{task}_{split}.txt"):
                parts = line[0].split("/")  # <top>/SceneXX/<variation>/frames/<kind>/Camera_k/<prefix>_NNNNN.<ext>
                number = re.search(r"_(\d{5})\.\w+$", parts[-1])
                if len(parts) != 7 or parts[3] != "frames" or number is None:
                    raise formats.FormatError(f"{self.split_file}: not a vKITTI 2 frame path "
                                              f"(<top>/SceneXX/<variation>/frames/<kind>/Camera_k/<name>_NNNNN.<ext>): {line[0]!r}")
                keys.append((parts[1], parts[2], parts[5], int(number.group(1))))
            listed = set(keys)
            frames = keys if frames is None else [k for k in frames if k in listed]
        return [(f"original/{s}/{v}/frames/rgb/{c}/rgb_{n:05d}.jpg",) for s, v, c, n in frames]

    def annotation_path(self, rgb_path: str, task: str, frame_offset: int = 0) -> str:
        m = _VKITTI_RGB.match(rgb_path)
        scene, variation, camera, number = m.group(1), m.group(2), m.group(3), int(m.group(4)) + frame_offset
        if task == "rgb":
            return f"original/{scene}/{variation}/frames/rgb/{camera}/rgb_{number:05d}.jpg"
        folder, prefix, ext, top = VKITTI_ANNOTATIONS[task]
        return f"{top}/{scene}/{variation}/frames/{folder}/{camera}/{prefix}_{number:05d}.{ext}"

    def _load(self, entry):
        rgb_path = entry[0]
        out = {"rgb": self._rgb(rgb_path)}
        files = out["files"] = {"rgb": rgb_path}
        for task in self.tasks:
            files[task] = files[f"{task}_valid"] = self.annotation_path(rgb_path, task)
        if self.needs_next_frame():
            files["rgb_next"] = self.annotation_path(rgb_path, "rgb", 1)
            out["rgb_next"] = self._rgb(files["rgb_next"])
            files["scene_flow_valid"] = self.annotation_path(rgb_path, "optical_flow")
        if "depth" in self.tasks or "normal" in self.tasks:
            depth_file = self.annotation_path(rgb_path, "depth")
            depth = annotations.read_vkitti_depth(self.path(depth_file))
            depth_valid = self._depth_valid(depth)
            if "depth" in self.tasks:  # raw: the sky keeps 655.35 m (its target is +1, as the release's)
                out["depth"], out["depth_valid"] = depth, depth_valid
            if "normal" in self.tasks:
                n = annotations.read_normal_npy(self.path(files["normal"]))
                self._same_size(files["normal"], n, depth_file, depth)
                out["normal"], out["normal_valid"] = self._oriented(n, depth_valid)
                files["normal_valid"] = depth_file
        if "semantic" in self.tasks:
            labels = annotations.read_vkitti_semantic(self.path(self.annotation_path(rgb_path, "semantic")))
            out["semantic"], out["semantic_valid"] = labels, labels != IGNORE_INDEX
        if self.needs_next_frame():
            flow, flow_valid = annotations.read_vkitti_flow(self.path(self.annotation_path(rgb_path, "optical_flow")))
            if "optical_flow" in self.tasks:
                out["optical_flow"], out["optical_flow_valid"] = flow, flow_valid
            if "scene_flow" in self.tasks:
                sf, _ = annotations.read_vkitti_scene_flow(self.path(self.annotation_path(rgb_path, "scene_flow")))
                out["scene_flow"], out["scene_flow_valid"] = sf, flow_valid  # raw where the flow is invalid
        g = self.geometry
        out["K"] = np.array([[g["focal"], 0, g["cx"]], [0, g["focal"], g["cy"]], [0, 0, 1]])
        return out


class FlyingThings3D(Source):
    """FlyingThings3D as StableMTL preprocesses it: ``<split>/image_clean/NNNNNNN.png`` (frame 2 =
    id + 1), ``flow_2d/`` (KITTI-style 16-bit flow png), ``pc/`` (.npz, ``pc1`` N x 3) and
    ``flow_3d/`` (.npy, N x 3). Split lines name the flow_2d file.

    Everything is centre-cropped to 536 x 960. Scene flow is splatted onto the
    crop by projecting ``pc1`` with f = 1050, cx = 479.5, cy = 269.5 and the
    crop offset (the release ignored the 2-row offset: a documented fix).
    Augmented as the release trains: horizontal and vertical flips and colour
    jitter, for both tasks.
    """

    name = "flying_things_3d"
    root_hint = "FlyingThings3D_preprocessed"
    default_split = "train"
    tasks_provided = ("optical_flow", "scene_flow")
    layout = LAYOUTS[name]
    depth_range = (1e-5, 35.0)
    geometry = {"focal": 1050.0, "cx": 479.5, "cy": 269.5, "crop": [536, 960]}
    jitter = (0.3, 0.3, 0.3, 0.159)
    jitter_tasks = ("optical_flow", "scene_flow")
    vertical_flip = True

    def _load(self, entry):
        flow_path = entry[0]
        folder, file = flow_path.rsplit("/flow_2d/", 1)
        number = int(Path(file).stem)
        image = lambda n: f"{folder}/image_clean/{n:07d}.png"  # noqa: E731
        rgb, rgb_next = self._rgb(image(number)), self._rgb(image(number + 1))
        self._same_size(image(number + 1), rgb_next, image(number), rgb)
        h, w = rgb.shape[:2]
        top, left = transforms.center_crop(h, w, self.geometry["crop"])
        ch, cw = self.geometry["crop"]
        crop = lambda a: a[top:top + ch, left:left + cw]  # noqa: E731
        out = {"rgb": crop(rgb), "rgb_next": crop(rgb_next)}
        out["files"] = {"rgb": image(number), "rgb_next": image(number + 1), "optical_flow": flow_path,
                        "optical_flow_valid": flow_path, "scene_flow": f"{folder}/flow_3d/{number:07d}.npy",
                        "scene_flow_valid": f"{folder}/pc/{number:07d}.npz"}
        g = self.geometry
        if "optical_flow" in self.tasks:
            flow, valid = annotations.read_kitti_flow(self.path(flow_path))
            self._same_size(flow_path, flow, image(number), rgb)
            out["optical_flow"], out["optical_flow_valid"] = crop(flow), crop(valid)
        if "scene_flow" in self.tasks:
            pc1 = formats.read_npz(self.path(f"{folder}/pc/{number:07d}.npz"), "pc1").reshape(-1, 3)
            sf = formats.read_npy(self.path(f"{folder}/flow_3d/{number:07d}.npy"), ndim=2, channels=3,
                                  kinds="f")
            if len(sf) != len(pc1):
                raise formats.FormatError(f"{folder}/flow_3d/{number:07d}.npy has {len(sf)} vectors for {len(pc1)} points")
            scene_flow = np.zeros((ch, cw, 3), np.float32)
            valid = np.zeros((ch, cw), bool)
            z = pc1[:, 2]
            ok = z > 0
            u = np.round(g["focal"] * pc1[ok, 0] / z[ok] + g["cx"]).astype(np.int64) - left
            v = np.round(g["focal"] * pc1[ok, 1] / z[ok] + g["cy"]).astype(np.int64) - top
            inside = (u >= 0) & (u < cw) & (v >= 0) & (v < ch)
            scene_flow[v[inside], u[inside]] = sf[ok][inside]
            valid[v[inside], u[inside]] = True
            out["scene_flow"], out["scene_flow_valid"] = scene_flow, valid
        out["K"] = np.array([[g["focal"], 0, g["cx"] - left], [0, g["focal"], g["cy"] - top], [0, 0, 1]])
        return out
