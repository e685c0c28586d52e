"""The release's multi-stream scheme, slow, kept as a reference for the batched one (tests and
``benchmarks/bench_pipeline.py``).

The release re-ran the auxiliary stream for every main task: per main task, one auxiliary pass
per other task (its features alone), then the main pass; 49 UNet passes for 7 tasks, where
``MultiStream.predict_latents`` makes 2. Both must give the same latents.
"""

from __future__ import annotations

import torch

from stablemtl.model import streams as S


def predict_latents_reference(model: S.MultiStream, z_image, z_next, tasks) -> torch.Tensor:
    """Task latents ``[T, B, 4, h, w]`` of ``model`` by the release's scheme: per main task, one
    auxiliary pass per other task."""
    tasks = S._check_tasks(tasks, model.tasks)
    b = z_image.shape[0]
    outs = []
    for task in tasks:
        aux = [t for t in model.tasks if t != task]
        captured: dict[str, list] = {}
        for t in aux:
            features: dict[str, torch.Tensor] = {}
            prompts, mask = model.frozen.prompts([t], b, z_image.device, z_image.dtype)
            with torch.no_grad():
                S._unet(model.aux_unet, S._inputs(z_image, z_next, [t]), prompts, mask, {"task_features": features})
            for site, f in features.items():
                captured.setdefault(site, []).append(f)
        context = {"task_features": {site: torch.cat(f, 0) for site, f in captured.items()},
                   "task_layout": ([task], aux, b), "task_mask_prob": 0.0}
        prompts, mask = model.frozen.prompts([task], b, z_image.device, z_image.dtype)
        outs.append(S._unet(model.unet, S._inputs(z_image, z_next, [task]), prompts, mask, context))
    return torch.stack(outs)
