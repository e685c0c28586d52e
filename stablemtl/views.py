"""What the notebooks show: tables and figures of a run's data, base model, training and results.

Plotting and display only: the work of every stage lives in the module that owns it
(``stablemtl.data``, ``model.base``, ``train``, ``evaluate``, ``report``, ``figures``; a run's folders and
its stages in ``stages``).
"""

from __future__ import annotations

from stablemtl import figures
from stablemtl.benchmarks import BENCHMARKS
from stablemtl.data import synthetic
from stablemtl.data.mixing import TASK_DATASET_PROBS
from stablemtl.data.sources import SOURCES
from stablemtl.guard import StageError
from stablemtl.model import prior
from stablemtl.model.base import base_configs, build_report, load_base
from stablemtl.model.sd2 import count_parameters
from stablemtl.model.streams import TASK_ATTENTION
from stablemtl.model.vae import vae_roundtrip
from stablemtl.paths import KINDS
from stablemtl.report import main_table
from stablemtl.results import read_metrics
from stablemtl.stages import Study, require
from stablemtl.tasks import TASK_NAMES, get_task, to_grey


def dataset_table(roots: dict):
    """One row per dataset: loader class, images of the study's split, annotated tasks, folder."""
    import pandas as pd

    rows = []
    for name, root in roots.items():
        cls = SOURCES[name]
        rows.append({"dataset": name, "class": cls.__name__, "images": len(cls(root)),
                     "tasks": ", ".join(cls.tasks_provided), "folder": str(root)})
    return pd.DataFrame(rows).set_index("dataset")


def annotation_matrix():
    """Task x dataset: the training sampling probability (the release's) or 'eval' for the zero-shot benchmarks."""
    import pandas as pd

    table = pd.DataFrame("", index=list(TASK_NAMES), columns=list(SOURCES))
    for task, probs in TASK_DATASET_PROBS.items():
        for dataset, p in probs.items():
            table.loc[task, dataset] = f"train {p:g}"
    for b in BENCHMARKS.values():
        table.loc[b.task, b.dataset] = "eval"
    for dataset, cls in SOURCES.items():
        for task in cls.tasks_provided:
            if not table.loc[task, dataset]:
                table.loc[task, dataset] = "annotated"
    return table


def _sample_panels(sample: dict, tasks) -> list[tuple[str, object]]:
    panels = [("rgb", sample["rgb"].permute(1, 2, 0).numpy())]
    for task in tasks:
        if task in sample:
            x, v = sample[task][None], sample[f"{task}_valid"][None]
            if task == "shading" and x.shape[1] == 3:  # RGB shading shown as the grey the model predicts
                x = to_grey(x, dim=1, keepdim=True)
            if task == "depth":
                vals = x[v.expand_as(x)]
                lo, hi = (float(vals.min()), float(vals.max())) if vals.numel() else (0.0, 1.0)
                img = get_task(task).colorize(x, v, value_range=(lo, max(hi, lo + 1e-6)))[0]
            else:
                img = get_task(task).colorize(x, v)[0]
            panels.append((task, img))
    return panels


def plot_dataset_samples(roots: dict, index: int = 0):
    """One row per dataset: the input and every annotation it has, colourised (black = invalid)."""
    import matplotlib.pyplot as plt

    rows = []
    for name, root in roots.items():
        cls = SOURCES[name]
        ds = cls(root)
        rows.append((name, _sample_panels(ds[min(index, len(ds) - 1)], cls.tasks_provided)))
    cols = max(len(p) for _, p in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(2.0 * cols, 1.3 * len(rows)), squeeze=False)
    for r, (name, panels) in enumerate(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(panels):
                ax.imshow(panels[c][1])
                ax.set_title(panels[c][0], fontsize=7)
        axes[r][0].text(-0.08, 0.5, name, transform=axes[r][0].transAxes, rotation=90, va="center", ha="right",
                        fontsize=7)
    fig.tight_layout()
    return fig


def plot_prior_samples(study: Study, per_prompt: int = 3, steps: int = 30, guidance: float = 3.0, seed: int = 0):
    """Images the base's generative prior draws for each scene prompt (``stablemtl.model.prior.sample``),
    beside a render of the world for the same prompt."""
    import matplotlib.pyplot as plt

    require(study, "02")
    if not study.procedural:
        print(f"{study.base_dir}: Stable Diffusion 2, whose prior is the published one (not drawn here)")
        return None
    if "prior" not in build_report(study.base_dir):
        print(f"{study.base_dir}: no generative prior (the preset's model.base sets no prior_steps)")
        return None
    base = load_base(study.base_dir)
    h, w = (study.preset["model"]["base"]["vae_size"])
    kinds = [(k, d) for k in synthetic.KINDS for d in synthetic.DOMAINS]
    prompts = [prior.scene_prompt(k, d) for k, d in kinds]
    drawn = prior.sample(base, [p for p in prompts for _ in range(per_prompt)], (h, w), steps, guidance, seed)
    fig, axes = plt.subplots(len(prompts), per_prompt + 1, figsize=(1.6 * (per_prompt + 1), 1.25 * len(prompts)),
                             squeeze=False)
    for r, ((kind, domain), prompt) in enumerate(zip(kinds, prompts)):
        render = synthetic.render_sample(kind, synthetic.stable_seed("view", r), h, w, domain)["rgb"]
        panels = [render] + [drawn[r * per_prompt + i].permute(1, 2, 0).numpy() for i in range(per_prompt)]
        for c, img in enumerate(panels):
            axes[r][c].imshow(img)
            axes[r][c].axis("off")
        axes[r][0].set_title(f"render: {prompt}" if r == 0 else prompt, fontsize=7)
        axes[r][1].set_title("drawn by the prior" if r == 0 else "", fontsize=7)
    fig.tight_layout()
    return fig


def plot_vae_roundtrips(study: Study, index: int = 0):
    """Each task's target encoding of one training sample and its reconstruction through the frozen VAE."""
    import matplotlib.pyplot as plt
    from diffusers import AutoencoderKL

    require(study, "01", "02")
    roots = study.dataset_roots()

    vae = AutoencoderKL.from_pretrained(study.base_dir, subfolder="vae", local_files_only=True).eval()
    resolution = (study.preset.get("train") or {}).get("resolution") or {}
    samples = {}
    for name in ("hypersim", "vkitti", "flying_things_3d"):
        if name in roots:  # at the training resolution: what the VAE encodes in training (not 1024 x 768)
            ds = SOURCES[name](roots[name], resolution=resolution.get(name))
            samples[name] = ds[min(index, len(ds) - 1)]
    rows = []
    for task in TASK_NAMES:
        name = next((n for n, s in samples.items() if task in s), None)
        if name is None:
            continue
        s = samples[name]
        t = get_task(task)
        target, valid = t.encode(s[task][None], s[f"{task}_valid"][None])
        recon = vae_roundtrip(vae, target)
        show = (lambda x: ((x[0].permute(1, 2, 0).clamp(-1, 1) + 1) / 2).numpy())  # noqa: E731
        rows.append((f"{task} ({name})", show(target), show(recon)))
    fig, axes = plt.subplots(len(rows), 2, figsize=(5.0, 1.3 * len(rows)), squeeze=False)
    for r, (label, a, b) in enumerate(rows):
        for c, (img, title) in enumerate(((a, "target encoding"), (b, "through the VAE"))):
            axes[r][c].imshow(img)
            axes[r][c].axis("off")
            if r == 0:
                axes[r][c].set_title(title, fontsize=8)
        axes[r][0].text(-0.05, 0.5, label, transform=axes[r][0].transAxes, rotation=90, va="center", ha="right",
                        fontsize=6)
    fig.tight_layout()
    return fig


def parameter_table(study: Study):
    """Parameters of the base's components and of what each model kind trains."""
    import pandas as pd

    ta = dict((study.preset.get("model") or {}).get("task_attention") or {})
    # counted from the configs on the meta device: SD2's models are never materialised for a table
    n = count_parameters(configs=base_configs(study.base_dir), tasks=TASK_NAMES,
                         query_hidden=ta.get("query_hidden", TASK_ATTENTION["query_hidden"]),
                         heads=ta.get("heads", TASK_ATTENTION["heads"]))
    rows = [{"component": c, "parameters": n[c], "trained": False} for c in ("unet", "vae", "text_encoder")]
    rows.append({"component": "single stream (widened UNet)", "parameters": n["unet_widened"], "trained": True})
    rows.append({"component": "multi stream: main UNet + task attention",
                 "parameters": n["unet_widened"] + n["task_attention"], "trained": True})
    rows.append({"component": "  of which task attention", "parameters": n["task_attention"], "trained": True})
    return pd.DataFrame(rows).set_index("component")


def plot_training_curves(study: Study, kinds=KINDS, smooth: int = 10):
    """The loss per task against the step of each trained kind (a PNG next to the last kind's log)."""
    logs = {k: v for k, v in study.training_logs().items() if k in kinds}
    if not logs:
        raise StageError(f"no training log under {study.output_dir} for {list(kinds)}; train first")
    out_file = study.output_dir / list(logs)[-1] / "training_curves.png"
    return figures.plot_training_curves(logs, out_file, smooth=smooth)


def metrics_table(study: Study):
    """The main table (headline metric per task, Delta_m when single-task rows exist) as a DataFrame."""
    import pandas as pd

    rows = [r for r in read_metrics(study.results_dir) if r["run"] == study.run_name]
    header, body = main_table(rows, paper=False)
    return pd.DataFrame(body, columns=header).set_index("model")


def plot_outputs(image, colorized: dict, title: str = ""):
    """One input image and each task's colourised output (``StableMTLOutput.colorized``) side by side."""
    import matplotlib.pyplot as plt

    panels = [("input", image.permute(1, 2, 0).cpu().numpy())] + [(t, img[0]) for t, img in colorized.items()]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.2 * len(panels), 1.6), squeeze=False)
    for ax, (name, img) in zip(axes[0], panels):
        ax.imshow(img)
        ax.set_title(name, fontsize=8)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot_task_attention(weights: dict, tasks, aux_tasks, latent_size, image=None, task: str | None = None):
    """What ``MultiStream.predict_latents(..., attention_weights=weights)`` recorded for one image.

    Left: each main task's attention (rows) over the auxiliary tasks (columns), averaged over the
    sites, the pixels and the heads (its own column is 0: a task never attends to itself). Right:
    for ``task`` (default: depth, else the first), the attention map over each other task at the
    finest site on one colour scale (0 to the largest weight), after the input ``image`` ``[3, H, W]``
    when given.
    """
    import math

    import matplotlib.pyplot as plt
    import numpy as np

    tasks, aux_tasks = list(tasks), list(aux_tasks)
    per_site = {site: w[0][:, 0] for site, w in weights.items()}  # [Tm, N, Ta] of the first image
    matrix = np.mean([w.mean(dim=1).cpu().numpy() for w in per_site.values()], axis=0)
    task = task or ("depth" if "depth" in tasks else tasks[0])
    finest = max(per_site, key=lambda s: per_site[s].shape[1])
    n, (h, w) = per_site[finest].shape[1], tuple(latent_size)
    grid = next(((math.ceil(h / f), math.ceil(w / f)) for f in (1, 2, 4, 8, 16, 32)
                 if math.ceil(h / f) * math.ceil(w / f) == n), None)
    others = [t for t in aux_tasks if t != task]
    panels = [("input", image.permute(1, 2, 0).cpu().numpy())] if image is not None else []
    top = 1.0
    if grid is not None:
        maps = per_site[finest][tasks.index(task)].reshape(*grid, len(aux_tasks)).cpu().numpy()
        panels += [(f"{task} -> {t}", maps[..., aux_tasks.index(t)]) for t in others]
        top = float(maps.max()) or 1.0  # one colour scale for every map
    fig, axes = plt.subplots(1, 1 + len(panels), figsize=(3.2 + 1.9 * len(panels), 2.6), squeeze=False,
                             gridspec_kw={"width_ratios": [2.2] + [1.4] * len(panels)})
    ax = axes[0][0]
    im = ax.imshow(matrix, cmap="viridis", vmin=0)
    ax.set_xticks(range(len(aux_tasks)), aux_tasks, rotation=60, fontsize=7, ha="right")
    ax.set_yticks(range(len(tasks)), tasks, fontsize=7)
    ax.set_xlabel("attends to", fontsize=8)
    ax.set_title("mean task attention", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.046)
    for ax, (name, img) in zip(axes[0][1:], panels):
        ax.imshow(img, cmap=None if img.ndim == 3 else "magma", vmin=None if img.ndim == 3 else 0,
                  vmax=None if img.ndim == 3 else top)
        ax.set_title(name, fontsize=7)
        ax.axis("off")
    fig.tight_layout()
    return fig
