"""``StableMTLPipeline``: images -> predictions of any set of tasks, in one batched pass."""

from __future__ import annotations

import torch

from stablemtl.model.streams import FLOW_TASKS, MultiStream, SingleStream
from stablemtl.tasks import get_task


class StableMTLPipeline:
    """Predict dense tasks with a ``SingleStream`` or ``MultiStream`` model.

    ``pipe(images, tasks=None, next_images=None)`` takes RGB ``[B, 3, H, W]`` in
    [0, 1] (H and W multiples of the VAE factor; the next frame is required for
    optical_flow and scene_flow) and returns ``{task: output}`` with each task's
    decoded output (``stablemtl.tasks``: relative depth ``[B, 1]``, unit normals
    ``[B, 3]``, class ids ``[B, 1]``, scale-free flow ``[B, 2]`` / scene flow
    ``[B, 3]``, albedo ``[B, 3]``, shading ``[B, 1]``). Everything runs in one
    batch: the image latents are encoded once, the model predicts every
    requested task together (single stream: 1 UNet call; multi stream: 2), and
    all task latents are decoded in one VAE call.
    """

    def __init__(self, model: SingleStream | MultiStream):
        if not isinstance(model, (SingleStream, MultiStream)):
            raise TypeError(f"expected a SingleStream or MultiStream model, got {type(model).__name__}")
        self.model = model

    @property
    def device(self):
        return next(self.model.unet.parameters()).device

    def _check(self, images, what: str) -> torch.Tensor:
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"{what}: expected a torch tensor [B, 3, H, W] in [0, 1], got {type(images).__name__}")
        if not images.is_floating_point():
            raise TypeError(f"{what}: expected floats in [0, 1], got {images.dtype} (divide uint8 images by 255)")
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{what}: expected [B, 3, H, W] RGB (3 channels), got shape {tuple(images.shape)}")
        factor = self.model.frozen.vae_factor
        h, w = images.shape[-2:]
        if h % factor or w % factor:
            raise ValueError(f"{what}: size {h}x{w} is not a multiple of the VAE factor {factor}; "
                             f"resize to e.g. {h // factor * factor or factor}x{w // factor * factor or factor}")
        if images.min() < -1e-3 or images.max() > 1 + 1e-3:
            raise ValueError(f"{what}: expected values in [0, 1], got {float(images.min()):.3g}..{float(images.max()):.3g}")
        return images.to(self.device, torch.float32)

    @torch.no_grad()
    def __call__(self, images, tasks=None, next_images=None, return_latents: bool = False,
                 colorize: bool = False) -> dict:
        tasks = list(self.model.tasks if tasks is None else [tasks] if isinstance(tasks, str) else tasks)
        for task in tasks:
            get_task(task)  # unknown task -> a ValueError listing the valid ones
        images = self._check(images, "images")
        z_next = None
        if any(t in FLOW_TASKS for t in tasks):
            if next_images is None:
                raise ValueError(f"{', '.join(t for t in tasks if t in FLOW_TASKS)} need the next frame: pass next_images")
            next_images = self._check(next_images, "next_images")
            if next_images.shape != images.shape:
                raise ValueError(f"next_images {tuple(next_images.shape)} must match images {tuple(images.shape)}")
        frozen = self.model.frozen
        was_training = self.model.training
        self.model.eval()
        try:
            pair = images if next_images is None else torch.cat([images, next_images])
            z = frozen.encode(pair * 2 - 1)
            z_image, z_next = (z, None) if next_images is None else z.chunk(2)
            latents = self.model.predict_latents(z_image, z_next, tasks)  # [T, B, 4, h, w]
            decoded = frozen.decode(latents.flatten(0, 1)).view(len(tasks), images.shape[0], 3, *images.shape[-2:])
        finally:
            self.model.train(was_training)
        out = {task: get_task(task).decode(decoded[i]) for i, task in enumerate(tasks)}
        if return_latents:
            out["latents"] = {task: latents[i] for i, task in enumerate(tasks)}
        if colorize:
            out["colorized"] = {task: get_task(task).colorize(out[task]) for task in tasks}
        return out
