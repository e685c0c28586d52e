"""The generative prior of the tiny base, the committed base, and the study's seeds, ablation and
single-task baselines (which trainings stages 03 and 04 run, and where)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from stablemtl.model import base as B
from stablemtl.model import prior as P
from stablemtl.stages import context
from stablemtl.presets import load_preset


def _cfg(**changes):
    return {**load_preset("smoke")["model"]["base"], "vae_steps": 3, "vae_images": 6, "report_images": 2, **changes}


def test_v_prediction_recovers_the_clean_latent_as_sd2_defines_it():
    # SD2's v-parameterisation: z_t = sqrt(a) z0 + sqrt(1 - a) e, v = sqrt(a) e - sqrt(1 - a) z0, so
    # z0 = sqrt(a) z_t - sqrt(1 - a) v and e = sqrt(1 - a) z_t + sqrt(a) v, at every timestep
    scheduler = P.make_scheduler()
    assert scheduler.config.prediction_type == "v_prediction" and scheduler.config.beta_schedule == "scaled_linear"
    g = torch.Generator().manual_seed(0)
    z0, noise = torch.randn(4, 4, 6, 8, generator=g), torch.randn(4, 4, 6, 8, generator=g)
    t = torch.tensor([0, 250, 700, 999])
    zt, v = scheduler.add_noise(z0, noise, t), scheduler.get_velocity(z0, noise, t)
    a = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(a.sqrt() * zt - (1 - a).sqrt() * v, z0, atol=1e-5, rtol=0)
    torch.testing.assert_close((1 - a).sqrt() * zt + a.sqrt() * v, noise, atol=1e-5, rtol=0)
    # SD2's published schedule ends at alpha_bar(999) = 0.0047 (a nearly pure-noise last step)
    assert math.isclose(float(scheduler.alphas_cumprod[-1]), 0.00466, rel_tol=0.01)


def test_the_prior_learns_the_world_and_is_deterministic():
    cfg = _cfg(prior_steps=40, prior_images=12, prior_batch=8, prior_lr=0.002)
    a, info = B.make_tiny_base(cfg, seed=3, progress=False)
    b, _ = B.make_tiny_base(cfg, seed=3, progress=False)
    sa, sb = a.unet.state_dict(), b.unet.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    held = info["prior"]["held_out"]
    # at every reported timestep the pretrained UNet denoises held-out renders better than at initialisation
    assert all(p < r for p, r in zip(held["prior"], held["random_init"])), held
    assert a.scheduler.config.prediction_type == "v_prediction"
    assert "generative prior: 40 steps" in B.format_build_report(info)
    # scene prompts are single tokens of the base's tokenizer, beside the task prompts
    ids = a.tokenizer(P.scene_prompt("street", "real")).input_ids
    assert len(ids) == 4 and a.tokenizer.convert_ids_to_tokens(ids[1:3]) == ["street</w>", "photo</w>"]
    images = P.sample(a, ["indoor render", "street photo"], (16, 24), steps=4)
    assert images.shape == (2, 3, 16, 24) and images.min() >= 0 and images.max() <= 1
    torch.testing.assert_close(images, P.sample(a, ["indoor render", "street photo"], (16, 24), steps=4))


def test_without_prior_steps_the_unet_stays_at_initialisation():
    base, info = B.make_tiny_base(_cfg(prior_steps=0), seed=3, progress=False)
    assert "prior" not in info and base.scheduler.config.prediction_type == "sample"
    assert "no generative prior" in B.format_build_report(info)


def test_the_committed_demo_base_is_the_demo_presets_and_is_copied_not_rebuilt(tmp_path):
    committed = B.committed_base(B.base_params(load_preset("demo")))
    assert committed is not None, "bases/demo (the built demo base) is missing from the checkout"
    report = B.build_report(committed)
    config = load_preset("demo")
    params = {"base": config["model"]["base"], "seed": config["seed"], "version": B.BUILD_VERSION}
    assert report["params"] == json.loads(json.dumps(params)), "bases/demo was built with other parameters"
    # the prior is there and learned: its held-out loss is below the random UNet's at every timestep
    held = report["prior"]["held_out"]
    assert all(p < r for p, r in zip(held["prior"], held["random_init"]))
    out = B.build_tiny_base(tmp_path / "base", "demo", progress=False)
    for file in committed.rglob("*.safetensors"):
        assert (out / file.relative_to(committed)).read_bytes() == file.read_bytes()
    base = B.load_base(out)
    assert base.scheduler.config.prediction_type == "v_prediction"
    assert committed.name == "demo" and B.committed_base(dict(report["params"], seed=1)) is None
    # a copy of the preset under another name, same base settings: the same committed weights, no rebuild
    from stablemtl.presets import PRESET_DIR

    copy = tmp_path / "mine.yaml"
    copy.write_text("".join(line for line in (PRESET_DIR / "demo.yaml").read_text().splitlines(keepends=True)
                            if not line.startswith("name:")))
    mine = B.build_tiny_base(tmp_path / "mine", str(copy), progress=False)
    for file in committed.rglob("*.safetensors"):
        assert (mine / file.relative_to(committed)).read_bytes() == file.read_bytes()


# a rebuild from scratch takes about 10 minutes on 2 cores (docs/running.md, "Measured times"): run it with `pytest --rebuild-base`
REBUILD_TOLERANCE = {"psnr_db": 0.5, "ceiling_relative": 0.15, "prior_loss_relative": 0.15}


@pytest.mark.rebuild
def test_a_rebuild_matches_the_committed_report(tmp_path):
    committed = B.build_report(B.committed_base(B.base_params(load_preset("demo"))))
    B.build_tiny_base(tmp_path / "base", "demo", progress=False, rebuild=True)
    rebuilt = B.build_report(tmp_path / "base")
    assert rebuilt["params"] == committed["params"]
    for name, value in committed["psnr"].items():
        assert abs(rebuilt["psnr"][name] - value) <= REBUILD_TOLERANCE["psnr_db"], name
    for task, values in committed["vae_ceiling"].items():
        for metric, value in values.items():
            got = rebuilt["vae_ceiling"][task][metric]
            assert abs(got - value) <= REBUILD_TOLERANCE["ceiling_relative"] * abs(value), (task, got, value)
    for got, value in zip(rebuilt["prior"]["held_out"]["prior"], committed["prior"]["held_out"]["prior"]):
        assert abs(got - value) <= REBUILD_TOLERANCE["prior_loss_relative"] * value


# --------------------------------------------------------------------------- seeds, ablation, baselines

def test_seeds_and_their_folders():
    study = context("demo")
    assert study.seeds() == [2024] and study.seeds(3) == [2024, 2025, 2026] and study.seeds(2, 7) == [7, 8]
    assert study.train_dir("single_stream", 2024) == study.output_dir / "single_stream"
    assert study.train_dir("multi_stream", 2026) == study.output_dir / "seed2026" / "multi_stream"
    assert study.model_dir("single_stream") == study.output_dir / "single_stream" / "model"
    with pytest.raises(ValueError, match="seeds=0"):
        study.seeds(0)


def test_training_jobs_train_each_seed_the_ablation_and_one_baseline_per_task():
    from stablemtl.tasks import TASK_NAMES
    from stablemtl.stages import train_config, training_jobs

    study = context("demo")
    assert [n for n, _ in training_jobs(study, "single_stream")] == ["single_stream", "single_stream_random"]
    jobs = training_jobs(study, "single_stream", seeds=2, single_task=True)
    names = [(name, o["seed"]) for name, o in jobs]
    assert names[:4] == [("single_stream", 2024), ("single_stream_random", 2024), ("single_stream", 2025),
                         ("single_stream_random", 2025)]
    assert names[4:] == [(f"single_task_{t}", 2024) for t in TASK_NAMES]
    joint = train_config(study, "single_stream").iterations
    for name, overrides in jobs[4:]:
        # the steps the task gets in the joint run, which gives each step to one task in turn
        assert overrides["iterations"] == math.ceil(joint / len(TASK_NAMES)) and overrides["tasks"] == [name[12:]]
    assert dict(jobs)["single_stream_random"]["unet_init"] == "random"
    config = train_config(study, "single_stream_random", **dict(jobs[3][1]))
    assert config.output_dir == str(study.output_dir / "seed2025" / "single_stream_random")
    multi = training_jobs(study, "multi_stream", seeds=2)
    assert [(n, o["seed"]) for n, o in multi] == [("multi_stream", 2024), ("multi_stream", 2025)]
    assert train_config(study, "multi_stream", **multi[1][1]).init == str(study.model_dir("single_stream", 2025))
    # with tasks given, the baselines are those tasks' only
    assert [n for n, _ in training_jobs(study, "single_stream", single_task=True, random_init=False, tasks=["depth"])] == [
        "single_stream", "single_task_depth"]


def test_a_random_init_single_stream_has_the_same_architecture_and_no_prior(tiny_base_dir, tmp_path):
    import shutil

    from stablemtl.data import mini
    from stablemtl.model.streams import SingleStream
    from stablemtl.train import Trainer
    from stablemtl.train_config import TrainConfig

    mini.write_mini_datasets(tmp_path / "data", "smoke", workers=1, progress=False)
    shutil.copytree(tiny_base_dir, tmp_path / "base")
    made = {}
    for name, init in (("random_a", "random"), ("random_b", "random"), ("prior", "base")):
        config = TrainConfig(tasks=["depth"], base=str(tmp_path / "base"), data_root=str(tmp_path / "data"),
                             unet_init=init, iterations=1, effective_batch=2, batch_per_device=2,
                             resolution={"hypersim": [32, 48], "vkitti": [32, 104]}, output_dir=str(tmp_path / name))
        made[name] = Trainer(config, progress=False).model.unet.state_dict()
    pretrained = SingleStream.from_base(B.load_base(tmp_path / "base")).unet.state_dict()
    assert made["random_a"].keys() == pretrained.keys()
    assert all(torch.equal(made["random_a"][k], made["random_b"][k]) for k in pretrained)  # seeded
    assert not torch.equal(made["random_a"]["conv_out.weight"], pretrained["conv_out.weight"])
    assert all(torch.equal(made["prior"][k], pretrained[k]) for k in pretrained)
    with pytest.raises(ValueError, match="unet_init='random'"):
        TrainConfig(kind="multi_stream", unet_init="random").validate()


def test_stage_05_sets_aside_the_rows_of_seeds_the_run_no_longer_has(tmp_path):
    import csv

    from stablemtl.results import METRIC_FIELDS, SAMPLE_FIELDS, CsvRows, edited_results, set_aside_stale_rows

    def row(model, seed, run="demo"):
        return {"run": run, "model": model, "seed": seed, "benchmark": "kitti_depth", "dataset": "kitti_depth",
                "task": "depth", "metric": "abs_rel", "value": "0.5", "higher_is_better": "False", "n_images": "3"}

    rows = [row("trivial", ""), row("single_stream", ""), row("single_stream", "2024"), row("single_stream", "2025"),
            row("multi_stream", "2025"), row("single_stream", "2025", run="other")]
    CsvRows(tmp_path / "metrics.csv", METRIC_FIELDS).write(rows)
    CsvRows(tmp_path / "per_sample.csv", SAMPLE_FIELDS).write([])
    notes = []
    removed = set_aside_stale_rows(tmp_path, "demo", {"trivial": {""}, "single_stream": {"2024"}}, log=notes.append)
    assert removed == 2 and "single_stream (seed 2025), single_stream (seed none)" in notes[0]
    with open(tmp_path / "metrics.csv", newline="") as f:
        kept = [(r["run"], r["model"], r["seed"]) for r in csv.DictReader(f)]
    # other models and other runs are left alone; the recorded hashes follow the rewrite
    assert kept == [("demo", "trivial", ""), ("demo", "single_stream", "2024"), ("demo", "multi_stream", "2025"),
                    ("other", "single_stream", "2025")]
    assert edited_results(tmp_path) == []
    # nothing is lost: the rows moved out are next to the CSV, and a second move appends
    aside = CsvRows(tmp_path / "metrics.set_aside.csv", METRIC_FIELDS).read()
    assert [(r["model"], r["seed"]) for r in aside] == [("single_stream", ""), ("single_stream", "2025")]
    assert "moved to metrics.set_aside.csv" in notes[0]
    assert set_aside_stale_rows(tmp_path, "demo", {"single_stream": {"2024"}}, log=notes.append) == 0 and len(notes) == 1
    assert set_aside_stale_rows(tmp_path, "demo", {"multi_stream": {"2024"}}, log=notes.append) == 1
    assert len(CsvRows(tmp_path / "metrics.set_aside.csv", METRIC_FIELDS).read()) == 3
