"""The tiny base's VAE: pretrained here, and measured.

A frozen random VAE cannot decode, so the tiny base's VAE is trained as an autoencoder
(``pretrain_vae``: L1 + MSE, a small KL term) on procedural RGB images and on the task
encodings of ``stablemtl.tasks`` (``render_encodings``). ``vae_report`` measures it on
held-out renders: the reconstruction PSNR per encoding and the "VAE ceiling", each task's
metric when the encoded-then-decoded ground truth is taken as the prediction (the best a
latent prediction can be); the tiny base's build report (``base.format_build_report``) shows
both. ``vae_roundtrip`` is that round trip, also used by evaluation's ceiling rows.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from stablemtl import metrics
from stablemtl.data import synthetic
from stablemtl.progress import bar as progress_bar
from stablemtl.tasks import FLOW_TASKS, TASK_NAMES, albedo_valid_mask, get_task, to_grey


def _encodings(sample: dict) -> dict[str, torch.Tensor]:
    """RGB and every task's encoded target of a rendered sample: name -> ([3, H, W] in [-1, 1], valid [1, H, W])."""
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).float()  # noqa: E731
    chw = lambda a: t(a).permute(2, 0, 1)[None] if a.ndim == 3 else t(a)[None, None]  # noqa: E731
    hit = chw(sample["depth"] > 0).bool()
    out = {"rgb": (chw(sample["rgb"]) * 2 - 1, torch.ones_like(hit))}
    albedo_valid = hit & albedo_valid_mask(chw(sample["albedo"]))
    inputs = {
        # normals as the datasets store them (pointing away from the camera), the default convention
        "depth": (chw(sample["depth"]), hit), "normal": (-chw(sample["normal"]), hit),
        "albedo": (chw(sample["albedo"]), albedo_valid), "shading": (chw(sample["shading"]), albedo_valid),
        "optical_flow": (chw(sample["optical_flow"]), chw(sample["flow_defined"]).bool()),
        "scene_flow": (chw(sample["scene_flow"]), chw(sample["flow_defined"]).bool()),
    }
    if sample["kind"] == "street":
        inputs["semantic"] = (torch.from_numpy(sample["semantic"].astype(np.int64))[None, None], torch.ones_like(hit))
    for name, (annotation, valid) in inputs.items():
        target, valid = get_task(name).encode(annotation, valid)
        out[name] = (target, valid)
    return {k: (v[0][0], v[1][0]) for k, v in out.items()}


def render_encodings(count: int, size, seed: int) -> list[dict]:
    """``count`` rendered samples of the world at ``size`` and their encodings (``_encodings``), from ``seed``."""
    kinds = [(k, d) for k in synthetic.KINDS for d in synthetic.DOMAINS]
    items = []
    for i in range(count):
        kind, domain = kinds[i % len(kinds)]
        sample = synthetic.render_sample(kind, synthetic.stable_seed("vae", seed, i), size[0], size[1], domain)
        items.append({"sample": sample, "encodings": _encodings(sample)})
    return items


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(4.0 / mse)  # peak-to-peak range 2


def vae_roundtrip(vae, x: torch.Tensor) -> torch.Tensor:
    """``[B, 3, H, W]`` in target space through the VAE: padded (replicate) to a multiple of its
    downsampling factor, encoded (posterior mean), decoded, cropped back to ``H x W``; not clamped."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    h, w = x.shape[-2:]
    padded = torch.nn.functional.pad(x, (0, (-w) % factor, 0, (-h) % factor), mode="replicate")
    with torch.no_grad():
        return vae.decode(vae.encode(padded).latent_dist.mean).sample[..., :h, :w]


def pretrain_vae(vae, cfg: dict, seed: int, progress: bool = True) -> dict:
    """Train the VAE as an autoencoder of RGB and task encodings (L1 + MSE, a small KL term)."""
    size = tuple(cfg["vae_size"])
    items = render_encodings(cfg["vae_images"], size, seed)
    names = ["rgb"] + list(TASK_NAMES)
    pool = {n: torch.stack([it["encodings"][n][0] for it in items if n in it["encodings"]]) for n in names}
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(vae.parameters(), lr=cfg["vae_lr"])
    steps = int(cfg["vae_steps"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    vae.train()
    losses = []
    bar = progress_bar(range(steps), desc="pretraining the tiny VAE", disable=not progress, leave=False)
    for step in bar:
        picks = []
        for k in range(cfg["vae_batch"]):
            name = names[int(torch.randint(len(names), (1,), generator=g))]
            picks.append(pool[name][int(torch.randint(len(pool[name]), (1,), generator=g))])
        x = torch.stack(picks)
        if cfg.get("vae_crop"):  # random crops: more steps per second, the VAE is convolutional
            ch, cw = cfg["vae_crop"]
            top = int(torch.randint(x.shape[-2] - ch + 1, (1,), generator=g))
            left = int(torch.randint(x.shape[-1] - cw + 1, (1,), generator=g))
            x = x[..., top:top + ch, left:left + cw]
        flip = torch.rand(len(x), generator=g) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        posterior = vae.encode(x).latent_dist
        y = vae.decode(posterior.mean).sample
        kl = posterior.kl().mean() / x[0].numel()
        loss = (y - x).abs().mean() + ((y - x) ** 2).mean() + cfg["vae_kl"] * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
    vae.eval()
    return {"final_loss": float(np.mean(losses[-50:])), "steps": steps}


def vae_report(vae, cfg: dict, seed: int) -> dict:
    """PSNR per encoding and the VAE ceiling per task on held-out rendered samples."""
    items = render_encodings(cfg.get("report_images", 12), tuple(cfg["vae_size"]), seed + 1)
    psnr: dict[str, list[float]] = {}
    acc = {"depth": metrics.DepthAccumulator(depth_range=(1e-3, 1e3)), "normal": metrics.NormalAccumulator(),
           "semantic": metrics.SemanticConfusion(), "optical_flow": metrics.FlowAccumulator(),
           "scene_flow": metrics.SceneFlowAccumulator(), "albedo": metrics.IntrinsicAccumulator(),
           "shading": metrics.IntrinsicAccumulator()}
    for it in items:
        s = it["sample"]
        for name, (target, valid) in it["encodings"].items():
            recon = vae_roundtrip(vae, target[None]).clamp(-1, 1)
            psnr.setdefault(name, []).append(_psnr(recon[0], target))
            if name == "rgb":
                continue
            out = get_task(name).decode(recon)[0]
            v = valid[0].numpy()
            hw = lambda x: x.permute(1, 2, 0).numpy()  # noqa: E731
            if name == "depth":
                acc[name].update(out[0].numpy(), s["depth"], v)
            elif name == "semantic":
                acc[name].update(out[0].numpy(), s["semantic"], v)
            elif name == "normal":
                acc[name].update(hw(out), -s["normal"], v)  # the stored convention, as encoded
            elif name in FLOW_TASKS:
                acc[name].update(hw(out), s[name], v)
            elif name == "albedo":
                acc[name].update(hw(out), s["albedo"], v)
            else:
                grey = to_grey(torch.from_numpy(s["shading"]).double(), dim=-1).numpy()
                acc[name].update(out[0].numpy(), grey, v)
    ceiling = {}
    headline = metrics.HEADLINE
    for name, a in acc.items():
        try:
            ceiling[name] = {headline[name]: float(a.compute()[headline[name]])}
        except ValueError:  # no held-out image had this task (e.g. no street scene for semantics)
            ceiling[name] = {headline[name]: float("nan")}
    return {"psnr": {k: round(float(np.mean(v)), 2) for k, v in psnr.items()}, "vae_ceiling": ceiling}
