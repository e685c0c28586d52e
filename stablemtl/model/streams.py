"""The models: the single-stream latent regressor and the multi-stream model with task attention.

Single stream (docs/method.md, "The model"): the base UNet with ``conv_in`` widened to
12 input channels (kernel tiled 3 times x 1/3, bias kept; recorded with
``register_to_config``), input ``[z_image, z_image2, zeros]`` (``z_image2`` is
the next frame's latent for the flow tasks, else ``z_image`` again), fixed
timestep 999, output = the task latent (``sample`` prediction), the task chosen
by its prompt through the frozen text encoder. Prompt embeddings are computed
once and cached; prompts of different lengths are batched with an attention
mask over the padding, which gives the same result as unpadded prompts.

Multi stream: a trainable main UNet and a frozen auxiliary copy, both
initialised from the single-stream UNet. In the auxiliary stream an attention
processor on every ``attn1`` captures the self-attention branch output (after
the output projection, before the residual add); in the main stream the
processor adds task attention to that branch: per pixel, the main task's query
attends to the other tasks' features (keys and values each through a per-task
LayerNorm + MLP C -> C/2 -> C; the query through the main task's LayerNorm + MLP
C -> 640 -> 640 -> 640 -> C; 4 heads; zero-initialised output projection, so the untrained
multi-stream model equals the single-stream one). During training, with
probability 0.4 per layer, the attention probabilities (averaged over batch,
pixels and heads, without gradient) pick one auxiliary task to mask out. These
three settings' defaults are ``TASK_ATTENTION``, the one place that states them.

All requested tasks are predicted together: the single stream makes one UNet
call over the batch of (task, image) pairs; the multi stream one auxiliary call
(features of every needed task, once) and one main call. (The release instead
re-ran the auxiliary stream for every main task: 49 UNet passes for 7 tasks.)

The processors hold no state between calls: what one UNet call needs (the
dictionary the auxiliary stream's features go to and the main stream reads,
the batch layout, the masking probability, optionally a dictionary for the
attention weights) travels with that call in its ``cross_attention_kwargs``
(``task_features``, ``task_layout``, ``task_mask_prob``,
``task_attention_weights``). Every attention processor of both UNets accepts these
keywords, so diffusers passes them on without dropping or warning.

A model records the normal convention it learned (``normals``: ``"as_stored"``,
the release's, or ``"facing"``; ``stablemtl.options``), so that evaluation
compares its normals with ground truth of the same convention.

This module holds the modules only. Saving and loading a model (a self-contained
``StableMTLPipeline`` folder: ``save_model``, ``load_model``) live in
``stablemtl.model.pipeline``, its fingerprint in ``stablemtl.model.fingerprint``.
"""

from __future__ import annotations

import copy
import math

import torch
from diffusers import ConfigMixin, ModelMixin  # module level: see TaskAttentionSites
from diffusers.configuration_utils import register_to_config
from torch import nn

from stablemtl import options
from stablemtl.paths import KINDS
from stablemtl.tasks import FLOW_TASKS, TASK_NAMES, get_task

TIMESTEP = 999
# the task attention's defaults (docs/method.md, "The model"; the release's): the query MLP's hidden width,
# the number of heads, the probability per layer of masking one auxiliary task in training
TASK_ATTENTION = {"query_hidden": 640, "heads": 4, "mask_prob": 0.4}
# the task attention's parameter layout: 2, the release's (separate per-task norms). A training checkpoint
# records it in its identity, since its optimizer state follows it. (Layout 1, the kit's first, is not read.)
TASK_ATTENTION_LAYOUT = 2


def _check_tasks(tasks, allowed) -> list[str]:
    tasks = list(allowed if tasks is None else [tasks] if isinstance(tasks, str) else tasks)
    for task in tasks:
        get_task(task)  # unknown task -> a ValueError listing the valid ones
        if task not in allowed:
            raise ValueError(f"this model was built for {', '.join(allowed)}; it cannot predict {task!r}")
    if not tasks:
        raise ValueError("no task requested")
    return tasks


def widen_conv_in(unet, factor: int = 3) -> None:
    """Tile ``conv_in``'s kernel ``factor`` times along the input axis, scaled by 1/factor; keep the bias."""
    old = unet.conv_in
    if old.in_channels != unet.config.in_channels or old.in_channels * factor == old.in_channels:
        raise ValueError("conv_in does not match the UNet config")
    new = nn.Conv2d(old.in_channels * factor, old.out_channels, old.kernel_size, old.stride, old.padding)
    with torch.no_grad():
        new.weight.copy_(old.weight.repeat(1, factor, 1, 1) / factor)
        new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=old.in_channels * factor)


class _Frozen(nn.Module):
    """Frozen base components shared by the streams: VAE, text encoder, tokenizer, prompt cache."""

    def __init__(self, vae, text_encoder, tokenizer, base_path=None):
        super().__init__()
        self.vae, self.text_encoder, self.tokenizer = vae, text_encoder, tokenizer
        self.base_path = base_path
        for m in (vae, text_encoder):
            m.requires_grad_(False).eval()
        self._prompts: dict[str, torch.Tensor] = {}

    def train(self, mode: bool = True):
        return super().train(False)  # frozen parts stay in eval mode

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def prompt(self, task: str) -> torch.Tensor:
        """``[L, D]`` embedding of the task prompt (BOS + tokens + EOS, no padding), cached."""
        if task not in self._prompts:
            ids = self.tokenizer(get_task(task).prompt, padding=False, return_tensors="pt").input_ids
            device = next(self.text_encoder.parameters()).device
            with torch.no_grad():
                self._prompts[task] = self.text_encoder(ids.to(device))[0][0].cpu()
        return self._prompts[task]

    def prompts(self, tasks, repeat: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts of ``tasks`` each repeated ``repeat`` times, padded: (``[T*repeat, L, D]``, mask ``[T*repeat, L]``)."""
        embs = [self.prompt(t) for t in tasks]
        length = max(e.shape[0] for e in embs)
        out = torch.zeros(len(tasks), length, embs[0].shape[1], device=device, dtype=dtype)
        mask = torch.zeros(len(tasks), length, device=device, dtype=dtype)
        for i, e in enumerate(embs):
            out[i, : e.shape[0]] = e.to(device, dtype)
            mask[i, : e.shape[0]] = 1
        return out.repeat_interleave(repeat, 0), mask.repeat_interleave(repeat, 0)

    def encode(self, rgb: torch.Tensor) -> torch.Tensor:
        """RGB in [-1, 1] ``[B, 3, H, W]`` -> scaled posterior-mean latents."""
        with torch.no_grad():
            return self.vae.encode(rgb).latent_dist.mean * self.vae.config.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.vae.decode(latents / self.vae.config.scaling_factor).sample


def _inputs(z_image, z_next, tasks) -> torch.Tensor:
    """Task-major batch ``[T*B, 12, h, w]``: [z_image, z_image2, zeros] per task."""
    rows = []
    for task in tasks:
        second = z_next if (task in FLOW_TASKS and z_next is not None) else z_image
        rows.append(torch.cat([z_image, second, torch.zeros_like(z_image)], 1))
    return torch.cat(rows, 0)


def _unet(unet, x, prompts, mask, context: dict | None = None):
    """One UNet call at the fixed timestep; ``context``: the task-attention keywords of this call."""
    t = torch.full((x.shape[0],), TIMESTEP, device=x.device, dtype=torch.long)
    return unet(x, t, encoder_hidden_states=prompts, encoder_attention_mask=mask, cross_attention_kwargs=context).sample


class SingleStream(nn.Module):
    """The single-stream latent regressor; ``unet`` is the only trainable part."""

    kind = KINDS[0]

    def __init__(self, unet, vae, text_encoder, tokenizer, tasks=TASK_NAMES, base_path=None,
                 normals: str = options.DEFAULTS["normals"]):
        super().__init__()
        if unet.config.in_channels != 3 * vae.config.latent_channels:
            raise ValueError(f"the UNet takes {unet.config.in_channels} channels; the single stream needs "
                             f"3 x {vae.config.latent_channels} (use SingleStream.from_base to widen conv_in)")
        self.unet = unet
        self.frozen = _Frozen(vae, text_encoder, tokenizer, base_path)
        self.tasks = list(tasks)
        self.normals = options.check("normals", normals)

    def forward(self, z_image, z_next, tasks):
        return self.predict_latents(z_image, z_next, tasks)

    def trainable_parameters(self):
        """Exactly the UNet (the VAE and the text encoder are frozen)."""
        return list(self.unet.parameters())

    @classmethod
    def from_base(cls, base, tasks=TASK_NAMES, normals: str = options.DEFAULTS["normals"]) -> "SingleStream":
        unet = copy.deepcopy(base.unet)
        if unet.config.in_channels == base.vae.config.latent_channels:
            widen_conv_in(unet)
        return cls(unet, base.vae, base.text_encoder, base.tokenizer, tasks, base.path, normals)

    def predict_latents(self, z_image, z_next, tasks) -> torch.Tensor:
        """Task latents ``[T, B, 4, h, w]`` for scaled image latents ``[B, 4, h, w]``, one UNet call."""
        tasks = _check_tasks(tasks, self.tasks)
        prompts, mask = self.frozen.prompts(tasks, z_image.shape[0], z_image.device, z_image.dtype)
        out = _unet(self.unet, _inputs(z_image, z_next, tasks), prompts, mask)
        return out.view(len(tasks), *z_image.shape)


# --------------------------------------------------------------------------- multi stream

class _MLP(nn.Sequential):
    def __init__(self, *widths):
        layers = []
        for i in range(len(widths) - 1):
            layers.append(nn.Linear(widths[i], widths[i + 1]))
            if i < len(widths) - 2:
                layers.append(nn.GELU())
        super().__init__(*layers)


class TaskAttention(nn.Module):
    """Per-pixel attention of each main task's query over the other tasks' features, at one site.

    Per task ``t``, as in the release (``stablemtl.model.release`` maps its weights onto these):
    LayerNorms ``norm_k[t]``, ``norm_v[t]``, ``norm_q[t]`` in front of the key and value MLPs
    ``key[t]``, ``value[t]`` (C -> C/2 -> C) and the query MLP ``query[t]`` (C -> 640 -> 640 -> 640
    -> C); one output projection ``out`` (zero-initialised).
    """

    def __init__(self, dim: int, tasks, query_hidden: int = TASK_ATTENTION["query_hidden"],
                 heads: int = TASK_ATTENTION["heads"]):
        super().__init__()
        if dim % heads:
            raise ValueError(f"feature width {dim} is not divisible by {heads} heads")
        self.tasks, self.heads = list(tasks), heads
        self.norm_k, self.norm_v, self.norm_q = (nn.ModuleDict({t: nn.LayerNorm(dim) for t in tasks})
                                                 for _ in range(3))
        self.key = nn.ModuleDict({t: _MLP(dim, dim // 2, dim) for t in tasks})
        self.value = nn.ModuleDict({t: _MLP(dim, dim // 2, dim) for t in tasks})
        self.query = nn.ModuleDict({t: _MLP(dim, query_hidden, query_hidden, query_hidden, dim) for t in tasks})
        self.out = nn.Linear(dim, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, h, main_tasks, features, aux_tasks, mask_prob: float = 0.0, weights: list | None = None):
        """``h`` ``[Tm, B, N, C]``, ``features`` ``[Ta, B, N, C]`` -> the addition to ``h``; ``weights``
        (a list) receives the attention probabilities averaged over the heads, ``[Tm, B, N, Ta]``."""
        tm, b, n, c = h.shape
        d = c // self.heads
        split = lambda x: x.reshape(*x.shape[:-1], self.heads, d)  # noqa: E731
        q = torch.stack([split(self.query[t](self.norm_q[t](h[i]))) for i, t in enumerate(main_tasks)])
        k = torch.stack([split(self.key[t](self.norm_k[t](features[j]))) for j, t in enumerate(aux_tasks)])
        v = torch.stack([split(self.value[t](self.norm_v[t](features[j]))) for j, t in enumerate(aux_tasks)])
        scores = torch.einsum("mbnhd,abnhd->mbnha", q, k) / math.sqrt(d)
        bias = torch.zeros(tm, len(aux_tasks), device=h.device, dtype=h.dtype)
        for i, t in enumerate(main_tasks):  # 1 query vs the N-1 other tasks
            if t in aux_tasks:
                bias[i, aux_tasks.index(t)] = float("-inf")
        if mask_prob > 0 and torch.rand(()) < mask_prob:
            with torch.no_grad():  # attention-guided masking: drop one task, drawn by its mean attention
                probs = (scores + bias[:, None, None, None, :]).softmax(-1).mean(dim=(1, 2, 3))
                for i in range(tm):
                    if torch.isfinite(bias[i]).sum() >= 2:
                        bias[i, torch.multinomial(probs[i], 1)] = float("-inf")
        probs = (scores + bias[:, None, None, None, :]).softmax(-1)
        if weights is not None:
            weights.append(probs.detach().mean(dim=3))
        out = torch.einsum("mbnha,abnhd->mbnhd", probs, v).reshape(tm, b, n, c)
        return self.out(out)


class TaskAttentionSites(ModelMixin, ConfigMixin):
    """The task attention of a multi-stream model: one ``TaskAttention`` per self-attention site.

    ``sites``: each site (the ``attn1`` module's name in the main UNet) with its feature width,
    as ``{site: width}`` or ``[(site, width), ...]`` (the config keeps pairs: JSON objects are
    saved with sorted keys, pairs keep the UNet's module order). A site's module is the child
    ``<site with dots as underscores>``, so the state-dict keys are ``<site_key>.<parameter>``.
    It reads like the ``nn.ModuleDict`` of the sites (``[key]``, ``len``, ``keys``, ``values``,
    ``items``).

    A diffusers model (``ModelMixin``, ``ConfigMixin``): the pipeline saves it as its
    ``task_attention`` component, recorded in ``model_index.json`` as
    ``["stablemtl.model.streams", "TaskAttentionSites"]`` (saved folders name this module: the
    class stays here). The pipeline loads it strictly (``pipeline.load_task_attention``: every
    saved tensor used, every parameter filled) and hands it to diffusers, which resolves the
    library from ``sys.modules`` (it never imports a module a folder names; the pipeline module
    imports this one) and checks the component's type against the base classes this module's
    namespace holds, hence ``ModelMixin`` imported at module level.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(self, sites, tasks=TASK_NAMES, query_hidden: int = TASK_ATTENTION["query_hidden"],
                 heads: int = TASK_ATTENTION["heads"]):
        super().__init__()
        for site, width in (sites.items() if isinstance(sites, dict) else sites):
            self.add_module(site_key(site), TaskAttention(width, list(tasks), query_hidden, heads))

    def __getitem__(self, key: str) -> TaskAttention:
        return self._modules[key]

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules)

    def __contains__(self, key) -> bool:
        return key in self._modules

    def keys(self):
        return self._modules.keys()

    def values(self):
        return self._modules.values()

    def items(self):
        return self._modules.items()


class _Processor:
    """An attention processor that takes the task-attention keywords of ``cross_attention_kwargs``.

    diffusers passes a processor only the keywords its ``__call__`` names (and warns about the
    others), so every processor of a multi-stream UNet names all four; this one ignores them.
    """

    def __init__(self, base):
        self.base = base

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 task_features: dict | None = None, task_layout=None, task_mask_prob: float = 0.0,
                 task_attention_weights: dict | None = None):
        return self.base(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                         attention_mask=attention_mask, temb=temb)


class _CaptureProcessor(_Processor):
    """Auxiliary stream: standard attention; the branch output goes to ``task_features[site]``."""

    def __init__(self, site: str):
        from diffusers.models.attention_processor import AttnProcessor2_0

        super().__init__(AttnProcessor2_0())
        self.site = site

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 task_features: dict | None = None, task_layout=None, task_mask_prob: float = 0.0,
                 task_attention_weights: dict | None = None):
        out = self.base(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                        attention_mask=attention_mask, temb=temb)
        if task_features is not None:
            task_features[self.site] = out
        return out


class _TaskAttentionProcessor(_Processor):
    """Main stream: standard attention, then the task attention added to the branch output.

    ``task_layout`` = (main tasks, auxiliary tasks, batch) of the call and ``task_features`` the
    auxiliary stream's captured features; without a layout the processor is plain attention.
    """

    def __init__(self, site: str, module: TaskAttention):
        from diffusers.models.attention_processor import AttnProcessor2_0

        super().__init__(AttnProcessor2_0())
        self.site = site
        self.module = [module]  # a list: the processor must not register the module inside the UNet

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 task_features: dict | None = None, task_layout=None, task_mask_prob: float = 0.0,
                 task_attention_weights: dict | None = None):
        h = self.base(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                      attention_mask=attention_mask, temb=temb)
        if task_layout is None:
            return h
        main_tasks, aux_tasks, b = task_layout
        f = task_features[self.site]
        n, c = h.shape[1], h.shape[2]
        h4 = h.view(len(main_tasks), b, n, c)
        weights = None if task_attention_weights is None else task_attention_weights.setdefault(self.site, [])
        extra = self.module[0](h4, main_tasks, f.view(len(aux_tasks), b, n, c), aux_tasks, task_mask_prob, weights)
        return (h4 + extra).view_as(h)


def attention_sites(unet) -> dict[str, int]:
    """Self-attention (``attn1``) modules of the UNet -> their feature width, in module order."""
    sites = {}
    for name, module in unet.named_modules():
        if name.endswith(".attn1"):
            sites[name] = module.to_out[0].out_features
    return sites


def site_key(site: str) -> str:
    """A site's module name in ``TaskAttentionSites``: the ``attn1`` path with dots as underscores."""
    return site.replace(".", "_")


def _set_processors(unet, make) -> None:
    """``make(site)`` at every site it returns a processor for; elsewhere the UNet's own processor,
    wrapped to take the task-attention keywords."""
    processors = {}
    for name, proc in unet.attn_processors.items():
        site = name[: -len(".processor")]
        new = make(site)
        if new is None:
            new = _Processor(proc.base if isinstance(proc, _Processor) else proc)
        processors[name] = new
    unet.set_attn_processor(processors)


def install_capture(unet, sites) -> None:
    """Auxiliary stream: capture the ``attn1`` branch output at ``sites`` into ``task_features``."""
    _set_processors(unet, lambda site: _CaptureProcessor(site) if site in sites else None)


def install_task_attention(unet, task_attention: TaskAttentionSites) -> None:
    """Main stream: add ``task_attention``'s module at each of its sites (when a call gives a ``task_layout``)."""
    sites = dict(task_attention.config.sites)
    _set_processors(unet, lambda site: _TaskAttentionProcessor(site, task_attention[site_key(site)])
                    if site in sites else None)


class MultiStream(nn.Module):
    """Main UNet (trainable) + frozen auxiliary UNet + task attention at every ``attn1``.

    ``task_attention``: a ``TaskAttentionSites`` to use (a saved one); by default a new one,
    zero-initialised output projections, for the main UNet's sites.
    """

    kind = KINDS[1]

    def __init__(self, main_unet, aux_unet, vae, text_encoder, tokenizer, tasks=TASK_NAMES,
                 query_hidden: int = TASK_ATTENTION["query_hidden"], heads: int = TASK_ATTENTION["heads"],
                 mask_prob: float = TASK_ATTENTION["mask_prob"], base_path=None,
                 normals: str = options.DEFAULTS["normals"], task_attention: TaskAttentionSites | None = None):
        super().__init__()
        self.unet, self.aux_unet = main_unet, aux_unet
        self.aux_unet.requires_grad_(False).eval()
        self.frozen = _Frozen(vae, text_encoder, tokenizer, base_path)
        self.tasks = list(tasks)
        self.normals = options.check("normals", normals)
        if len(self.tasks) < 2:
            raise ValueError("the multi-stream model needs at least 2 tasks")
        self.settings = {"query_hidden": query_hidden, "heads": heads, "mask_prob": mask_prob}
        sites = attention_sites(main_unet)
        if task_attention is None:
            task_attention = TaskAttentionSites(list(sites.items()), self.tasks, query_hidden, heads)
        else:
            c = task_attention.config
            found = {"sites": dict(c.sites), "tasks": list(c.tasks), "query_hidden": c.query_hidden, "heads": c.heads}
            wanted = {"sites": sites, "tasks": self.tasks, "query_hidden": query_hidden, "heads": heads}
            wrong = [k for k in wanted if found[k] != wanted[k]]
            if wrong:
                raise ValueError("the task attention does not fit the model: " + "; ".join(
                    f"{k} {found[k]!r}, the model's {wanted[k]!r}" for k in wrong))
        self.task_attention = task_attention
        install_capture(self.aux_unet, sites)
        install_task_attention(self.unet, self.task_attention)

    @classmethod
    def from_single_stream(cls, single: SingleStream, query_hidden: int = TASK_ATTENTION["query_hidden"],
                           heads: int = TASK_ATTENTION["heads"],
                           mask_prob: float = TASK_ATTENTION["mask_prob"]) -> "MultiStream":
        f = single.frozen
        return cls(copy.deepcopy(single.unet), copy.deepcopy(single.unet), f.vae, f.text_encoder, f.tokenizer,
                   single.tasks, query_hidden, heads, mask_prob, f.base_path, single.normals)

    def train(self, mode: bool = True):
        super().train(mode)
        self.aux_unet.eval()
        return self

    def aux_tasks_for(self, tasks) -> list[str]:
        """Every task other than a main task is needed; with 2+ main tasks, all of them."""
        return [t for t in self.tasks if any(t != m for m in tasks)]

    def predict_latents(self, z_image, z_next, tasks, attention_weights: dict | None = None) -> torch.Tensor:
        """Task latents ``[T, B, 4, h, w]``: one auxiliary call for every needed task, one main call.

        ``attention_weights`` (a dict) receives, per site, the list of the task attention's
        probabilities ``[T, B, N, Ta]`` (averaged over heads; ``N`` pixels of the site's feature map,
        ``Ta`` the tasks of ``aux_tasks_for(tasks)``)."""
        tasks = _check_tasks(tasks, self.tasks)
        aux = self.aux_tasks_for(tasks)
        b = z_image.shape[0]
        features: dict[str, torch.Tensor] = {}
        prompts, mask = self.frozen.prompts(aux, b, z_image.device, z_image.dtype)
        with torch.no_grad():
            _unet(self.aux_unet, _inputs(z_image, z_next, aux), prompts, mask, {"task_features": features})
        context = {"task_features": features, "task_layout": (tasks, aux, b),
                   "task_mask_prob": self.settings["mask_prob"] if self.training else 0.0,
                   "task_attention_weights": attention_weights}
        prompts, mask = self.frozen.prompts(tasks, b, z_image.device, z_image.dtype)
        out = _unet(self.unet, _inputs(z_image, z_next, tasks), prompts, mask, context)
        return out.view(len(tasks), *z_image.shape)

    def forward(self, z_image, z_next, tasks):
        return self.predict_latents(z_image, z_next, tasks)

    def trainable_parameters(self):
        """Exactly the main UNet and the task-attention modules."""
        return list(self.unet.parameters()) + list(self.task_attention.parameters())
