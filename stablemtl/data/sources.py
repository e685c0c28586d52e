"""One ``torch.utils.data.Dataset`` per dataset, reading the dataset's real layout.

Each source reads a split list (see ``stablemtl.data.splits``) under a root
directory laid out as the real dataset (or its StableMTL preprocessing), and
returns samples as dicts of tensors:

- ``rgb`` (and ``rgb_next`` for the flow tasks): float32 ``[3, H, W]`` in [0, 1];
- per task ``t``: ``sample[t]`` the annotation in natural units (depth ``[1]``
  metres, normal ``[3]`` unit vectors, semantic ``[1]`` int64 class ids with 250
  = ignore, albedo ``[3]`` and shading ``[3]`` in [0, 1], optical_flow ``[2]``
  pixels, scene_flow ``[3]`` metres) and ``sample[f"{t}_valid"]`` bool ``[1, H, W]``;
  with ``encode_targets=True`` (training) ``sample[f"{t}_target"]`` ``[3, H, W]``
  in [-1, 1] replaces the annotation (``stablemtl.tasks``);
- ``dataset``, ``id`` (the split line's first file), ``index``, ``K`` (3 x 3
  intrinsics of the returned raster, NaN where the dataset does not give them),
  ``depth_range`` (the dataset's valid depth range), ``flip`` and ``crop`` (the
  augmentation drawn).

The StableMTL release's behaviour is the default everywhere (docs/method.md,
"Release parity"); each alternative is a named option (``stablemtl.options``):

- annotations keep their raw values at invalid pixels (the vKITTI sky's 655.35 m,
  scene flow where the flow is invalid); only non-finite values become 0;
- normals are returned as the files store them (``normals="as_stored"``; camera
  frame x right, y down, z forward, pointing away from the camera: Hypersim
  preprocessed, vKITTI estimated, DIODE after its (-nx, ny, nz) conversion);
  ``normals="facing"`` negates them to face the camera;
- a sample is augmented at the file's resolution (flips, the vKITTI optical-flow
  crop, colour jitter), its targets are encoded there and then resized
  (``target_order="normalise_then_resize"``; the alternative resizes the
  annotation first);
- resizing (``resolution=(H, W)``) samples every raster nearest-exact; the
  annotation's flow vectors are rescaled with the image (``rescale_flow=True``,
  a documented fix of the release; the KITTI flow benchmark keeps full-resolution
  pixels, as the release scores it) and ``rgb_resize="antialias"`` resizes the
  images with antialiasing instead.

Augmentation is a function of (seed, epoch, index): ``source[(index, epoch)]``
draws that epoch's flips, crop and jitter (``source[index]`` uses ``set_epoch``).

Geometry constants (crops, intrinsics) default to the real datasets' values.
A dataset root may carry ``stablemtl_dataset.json`` whose ``geometry`` entry
overrides them: the procedural miniatures do, as they are rendered smaller.

Here: ``SOURCES`` (dataset name -> source class) and the sources' public names. The
machinery they share is ``stablemtl.data.source_base.Source``; the training sources are
in ``stablemtl.data.training_sources``, the evaluation sources in
``stablemtl.data.evaluation_sources``.
"""

from __future__ import annotations

from stablemtl.data.evaluation_sources import DIODE, Cityscapes, KittiDepth, KittiFlow, MIDIntrinsics
from stablemtl.data.formats import DatasetLayoutError
from stablemtl.data.source_base import META_FILE, Source
from stablemtl.data.training_sources import FlyingThings3D, Hypersim, VirtualKITTI2

__all__ = ["SOURCES", "Source", "META_FILE", "DatasetLayoutError", "Hypersim", "VirtualKITTI2", "FlyingThings3D",
           "Cityscapes", "KittiDepth", "KittiFlow", "DIODE", "MIDIntrinsics"]

SOURCES = {cls.name: cls for cls in (Hypersim, VirtualKITTI2, FlyingThings3D, Cityscapes, KittiDepth,
                                     KittiFlow, DIODE, MIDIntrinsics)}
