"""The tiny base's generative prior: its UNet pretrained as a latent diffusion model.

StableMTL's premise is that a pretrained latent diffusion model is a strong starting point
for dense prediction. Stable Diffusion 2 learned its prior on billions of captioned images;
the tiny base learns one, with the same recipe in miniature, on the procedural world's
images: latents of the frozen tiny VAE (posterior mean x scaling factor), Gaussian noise at a
timestep drawn uniformly from SD2's 1,000 (scaled-linear betas 0.00085 .. 0.012), and the UNet
trained to predict the velocity ``v = sqrt(a) noise - sqrt(1 - a) z0`` (SD2's
``v_prediction``), conditioned through cross-attention on a scene prompt (``"<kind> <look>"``:
the world's scene kind and whether it is rendered for training or looks "real") encoded by
the frozen text encoder. One prompt in ten is replaced by the empty prompt, so the prior also
models images unconditionally (classifier-free guidance at sampling).

``pretrain_prior`` trains it; ``prior_report`` measures it on held-out images (the denoising
loss at fixed timesteps against the same UNet at random initialisation: a prior that learned
the world predicts the noise of its images much better); ``sample`` draws images from it with
DDIM, for notebook 02 to show that it learned the world.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from stablemtl.data import synthetic
from stablemtl.progress import bar as progress_bar

# SD2's noise schedule and parameterisation (stabilityai/stable-diffusion-2, scheduler/scheduler_config.json)
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False, steps_offset=1)
LOOKS = {"train": "render", "real": "photo"}  # the world's domains as prompt words
REPORT_TIMESTEPS = (100, 400, 700, 950)
DROP_PROMPT = 0.1  # the share of empty prompts in training (classifier-free guidance)
PROMPT_TOKENS = 8  # BOS, the prompt's words, EOS, then padding


def scene_prompt(kind: str, domain: str) -> str:
    """The prompt of a rendered scene: its kind (indoor, street, flying) and its look."""
    return f"{kind} {LOOKS[domain]}"


def prompt_words() -> list[str]:
    """Every word of the scene prompts (``scene_prompt``): the world's scene kinds and its looks."""
    return sorted(set(synthetic.KINDS) | set(LOOKS.values()))


def make_scheduler():
    """SD2's training-and-sampling scheduler (DDIM over the 1,000 DDPM timesteps, v-prediction)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SCHEDULE)


def _renders(count: int, size, seed: int) -> tuple[torch.Tensor, list[str]]:
    """``count`` RGB renders of the world in [-1, 1] ``[N, 3, H, W]`` and their scene prompts."""
    kinds = [(k, d) for k in synthetic.KINDS for d in synthetic.DOMAINS]
    images, prompts = [], []
    for i in range(count):
        kind, domain = kinds[i % len(kinds)]
        sample = synthetic.render_sample(kind, synthetic.stable_seed("prior", seed, i), size[0], size[1], domain)
        images.append(torch.from_numpy(np.ascontiguousarray(sample["rgb"])).float().permute(2, 0, 1) * 2 - 1)
        prompts.append(scene_prompt(kind, domain))
    return torch.stack(images), prompts


class _Conditioning:
    """Prompt embeddings of the frozen text encoder, computed once per prompt (the empty one too)."""

    def __init__(self, text_encoder, tokenizer):
        self.text_encoder, self.tokenizer, self.cache = text_encoder, tokenizer, {}

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        for p in set(prompts) - set(self.cache):
            # padded by hand to PROMPT_TOKENS with the pad token (asking the tokenizer to pad would
            # leave its padding setting in the saved tokenizer.json)
            ids = self.tokenizer(p, padding=False).input_ids[:PROMPT_TOKENS]
            ids = torch.tensor([ids + [self.tokenizer.pad_token_id] * (PROMPT_TOKENS - len(ids))])
            with torch.no_grad():
                self.cache[p] = self.text_encoder(ids)[0][0]
        return torch.stack([self.cache[p] for p in prompts])


def _latents(vae, images: torch.Tensor, batch: int = 32) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([vae.encode(images[i:i + batch]).latent_dist.mean for i in range(0, len(images), batch)]
                         ) * vae.config.scaling_factor


def _loss(unet, scheduler, z0: torch.Tensor, context: torch.Tensor, t: torch.Tensor, noise: torch.Tensor):
    noisy = scheduler.add_noise(z0, noise, t)
    target = scheduler.get_velocity(z0, noise, t)
    return torch.nn.functional.mse_loss(unet(noisy, t, encoder_hidden_states=context).sample, target)


def pretrain_prior(unet, vae, text_encoder, tokenizer, cfg: dict, seed: int, progress: bool = True) -> dict:
    """Train ``unet`` in place as the latent diffusion prior (module docstring); returns the training record.

    ``cfg`` (a preset's ``model.base``): ``prior_images`` renders at ``vae_size``, ``prior_steps``
    Adam steps of ``prior_batch`` latents at ``prior_lr`` (cosine decay), random horizontal flips."""
    scheduler = make_scheduler()
    images, prompts = _renders(int(cfg["prior_images"]), tuple(cfg["vae_size"]), seed)
    z = _latents(vae, images)
    condition = _Conditioning(text_encoder, tokenizer)
    g = torch.Generator().manual_seed(seed)
    steps, batch = int(cfg["prior_steps"]), int(cfg["prior_batch"])
    opt = torch.optim.Adam(unet.parameters(), lr=float(cfg["prior_lr"]))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    unet.train()
    losses = []
    bar = progress_bar(range(steps), desc="pretraining the tiny UNet as a diffusion prior", disable=not progress,
               leave=False)
    for step in bar:
        pick = torch.randint(len(z), (batch,), generator=g)
        z0 = z[pick]
        flip = torch.rand(batch, generator=g) < 0.5
        z0 = torch.where(flip[:, None, None, None], z0.flip(-1), z0)
        drop = (torch.rand(batch, generator=g) < DROP_PROMPT).tolist()
        context = condition(["" if d else prompts[i] for i, d in zip(pick.tolist(), drop)])
        t = torch.randint(scheduler.config.num_train_timesteps, (batch,), generator=g)
        noise = torch.randn(z0.shape, generator=g)
        loss = _loss(unet, scheduler, z0, context, t, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    unet.eval()
    return {"steps": steps, "images": len(z), "final_loss": float(np.mean(losses[-100:]))}


def prior_report(unet, random_unet, vae, text_encoder, tokenizer, cfg: dict, seed: int) -> dict:
    """The v-prediction loss on held-out renders at ``REPORT_TIMESTEPS`` (the same noise for both),
    of the prior and of the same UNet at random initialisation."""
    scheduler = make_scheduler()
    images, prompts = _renders(int(cfg.get("report_images", 12)), tuple(cfg["vae_size"]), seed + 7)
    z0 = _latents(vae, images)
    context = _Conditioning(text_encoder, tokenizer)(prompts)
    g = torch.Generator().manual_seed(seed + 7)
    out = {"timesteps": list(REPORT_TIMESTEPS), "prior": [], "random_init": []}
    with torch.no_grad():
        for step in REPORT_TIMESTEPS:
            t = torch.full((len(z0),), step, dtype=torch.long)
            noise = torch.randn(z0.shape, generator=g)
            out["prior"].append(round(float(_loss(unet, scheduler, z0, context, t, noise)), 4))
            out["random_init"].append(round(float(_loss(random_unet, scheduler, z0, context, t, noise)), 4))
    return out


def sample(base, prompts: list[str], size, steps: int = 30, guidance: float = 3.0, seed: int = 0) -> torch.Tensor:
    """Images ``[N, 3, H, W]`` in [0, 1] drawn from the base's prior with DDIM (``steps`` steps,
    classifier-free ``guidance``), one per prompt, at ``size`` (height, width; a multiple of the
    VAE factor)."""
    scheduler = make_scheduler()
    scheduler.set_timesteps(steps)
    unet, vae = base.unet, base.vae
    factor = base.vae_factor
    h, w = size
    condition = _Conditioning(base.text_encoder, base.tokenizer)
    context = torch.cat([condition([""] * len(prompts)), condition(list(prompts))])
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(len(prompts), unet.config.in_channels, h // factor, w // factor, generator=g)
    with torch.no_grad():
        for t in scheduler.timesteps:
            v = unet(torch.cat([z, z]), t, encoder_hidden_states=context).sample
            v_uncond, v_cond = v.chunk(2)
            z = scheduler.step(v_uncond + guidance * (v_cond - v_uncond), t, z).prev_sample
        images = vae.decode(z / vae.config.scaling_factor).sample
    return ((images + 1) / 2).clamp(0, 1)
