"""Training: losses fall, resume is exact, checkpoints survive kills, two processes agree."""

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_base

from stablemtl.model.pipeline import MODEL_FILE
from stablemtl import train as T
from stablemtl import train_config as TC
from stablemtl.data import mini
from stablemtl.tasks import TASK_NAMES

RES = {"hypersim": [32, 48], "vkitti": [32, 104], "flying_things_3d": [32, 64]}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_base_dir):
    root = tmp_path_factory.mktemp("train")
    mini.write_mini_datasets(root / "data", "smoke", workers=1, progress=False)
    shutil.copytree(tiny_base_dir, root / "base")
    return root


def config(setup, out, **changes):
    values = dict(base=str(setup / "base"), data_root=str(setup / "data"), resolution=RES, effective_batch=2,
                  batch_per_device=2, iterations=4, warmup=2, decay_steps=50, checkpoint_every=2, backup_every=4,
                  output_dir=str(out), task_attention={"query_hidden": 16, "heads": 4, "mask_prob": 0.4})
    values.update(changes)
    return TC.TrainConfig.from_dict(values)


def state(trainer):
    return trainer._trainable_state()


def log(path):
    with open(Path(path) / "train_log.csv", newline="") as f:
        return [(r["step"], r["task"], r["dataset"], r["loss"]) for r in csv.DictReader(f)]


def test_schedule_and_latent_mask_follow_the_reference():
    assert T.lr_factor(0, 100, 25000, 0.01) == 0.0  # the release's warm-up: step / warmup
    assert T.lr_factor(50, 100, 25000, 0.01) == 0.5
    assert T.lr_factor(99, 100, 25000, 0.01) == 0.99
    assert T.lr_factor(100, 100, 25000, 0.01) == 1.0
    assert T.lr_factor(25000, 100, 25000, 0.01) == pytest.approx(0.01)
    assert T.lr_factor(12550, 100, 25000, 0.01) == pytest.approx(0.1)
    valid = torch.ones(1, 1, 4, 8, dtype=torch.bool)
    valid[0, 0, 0, 1] = False  # one invalid pixel spoils its whole 2 x 2 latent window
    mask = T.latent_valid(valid, 2)
    assert mask.shape == (1, 1, 2, 4) and mask.sum() == 7 and not mask[0, 0, 0, 0]
    pred, target = torch.zeros(1, 4, 2, 4), torch.ones(1, 4, 2, 4)
    target[0, :, 0, 0] = 100.0  # ignored
    assert T.masked_latent_mse(pred, target, mask) == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["single_stream", "multi_stream"])
def test_resume_is_bitwise_identical(setup, tmp_path, kind):
    extra = {}
    if kind == "multi_stream":
        single = T.train(config(setup, tmp_path / "init", iterations=1), progress=False)
        extra = {"kind": kind, "init": str(single.save_model())}
    straight = T.train(config(setup, tmp_path / "straight", **extra), progress=False)
    first = T.Trainer(config(setup, tmp_path / "resumed", **extra), progress=False)
    first.train(until=2)
    second = T.Trainer(config(setup, tmp_path / "resumed", **extra), progress=False)
    assert second.step == 2 and second.resumed_from.name == "latest"
    second.train()
    a, b = state(straight), state(second)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert log(tmp_path / "straight") == log(tmp_path / "resumed")  # same tasks, datasets, losses
    assert [r[1] for r in log(tmp_path / "straight")] == list(TASK_NAMES[:4])
    assert (tmp_path / "straight/checkpoint/iter_000004/weights.safetensors").is_file()


@pytest.mark.slow
def test_augmentation_is_drawn_anew_every_epoch_and_survives_a_resume(setup, tmp_path):
    """Every draw of an image gets the flips of its stream's epoch: different across epochs,
    the same for the same seed, and the same after restoring the sampler mid-run."""
    def draws(trainer, n):
        out = []
        for _ in range(n):
            mb, batch = trainer.next_batch()
            out += [(mb.epoch, index, flip) for index, flip, _ in batch["keys"]]
        return out

    cfg = config(setup, tmp_path / "a", tasks=["albedo"])  # 4 Hypersim images, 2 per micro-batch
    trainer = T.Trainer(cfg, progress=False)
    seen = draws(trainer, 16)  # 8 epochs of the stream
    assert sorted({epoch for epoch, _, _ in seen}) == list(range(8))
    flips = {}
    for epoch, index, flip in seen:
        flips.setdefault(index, set()).add(flip)
    assert all(len(f) == 2 for f in flips.values())  # each image seen both flipped and not
    assert draws(T.Trainer(config(setup, tmp_path / "b", tasks=["albedo"]), progress=False), 16) == seen
    resumed = T.Trainer(config(setup, tmp_path / "c", tasks=["albedo"]), progress=False)
    replay = T.Trainer(config(setup, tmp_path / "d", tasks=["albedo"]), progress=False)
    draws(replay, 5)
    resumed.sampler.load_state_dict(replay.sampler.state_dict())
    assert draws(resumed, 11) == seen[10:]


@pytest.mark.slow
def test_a_kill_during_the_save_leaves_a_loadable_latest(setup, tmp_path, monkeypatch):
    trainer = T.Trainer(config(setup, tmp_path), progress=False)
    trainer.train(until=2)
    real_save = torch.save

    def dying_save(obj, f, *args, **kwargs):
        if str(f).endswith("states.pt"):
            raise KeyboardInterrupt("killed while writing the checkpoint")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(until=4)
    monkeypatch.setattr(torch, "save", real_save)
    partial = tmp_path / "checkpoint/.latest.partial"
    assert not partial.exists()  # an interrupted write removes its partial folder
    partial.mkdir()  # what a hard kill (no cleanup) leaves: a half-written one, never loaded
    (partial / "weights.safetensors").write_bytes(b"half")
    resumed = T.Trainer(config(setup, tmp_path), progress=False)
    assert resumed.step == 2
    resumed.train()
    assert resumed.step == 4


@pytest.mark.slow
def test_loss_decreases_for_every_task(setup, tmp_path):
    for task in TASK_NAMES:
        trainer = T.Trainer(config(setup, tmp_path / task, tasks=[task], iterations=12, lr=2e-3, warmup=1,
                                   augment=False, checkpoint_every=0, backup_every=0), progress=False)
        mb = trainer.sampler.next()
        source = trainer.sources[(mb.task, mb.dataset)]
        batch = T.collate([source[i] for i in range(2)], task)
        trainer.sampler.position = 0
        with torch.no_grad():
            before = float(trainer.loss(batch, task))
        trainer.train()
        with torch.no_grad():
            after = float(trainer.loss(batch, task))
        assert after < 0.8 * before, (task, before, after)


@pytest.mark.slow
def test_non_finite_loss_stops_with_the_step_task_and_dataset(setup, tmp_path, monkeypatch):
    trainer = T.Trainer(config(setup, tmp_path), progress=False)
    real_loss = trainer.loss
    monkeypatch.setattr(trainer, "loss", lambda batch, task, dataset=None: real_loss(batch, task, dataset) * (float("nan") if trainer.step == 3 else 1))
    with pytest.raises(FloatingPointError, match=r"step 3, task 'normal', dataset '(hypersim|vkitti)'.*checkpoint/latest"):
        trainer.train()
    assert T.Trainer(config(setup, tmp_path), progress=False).step == 2


@pytest.mark.slow
def test_bad_configurations_fail_before_any_work(setup, tmp_path):
    with pytest.raises(ValueError, match="unknown training option"):
        TC.TrainConfig.from_dict({"learning_rate": 1})
    with pytest.raises(ValueError, match="unknown task 'segmentation'"):
        config(setup, tmp_path, tasks=["segmentation"]).validate()
    with pytest.raises(ValueError, match="unknown dataset 'nyu' for task 'depth'"):
        config(setup, tmp_path, tasks=["depth"], probabilities={"depth": {"nyu": 1.0}}).validate()
    with pytest.raises(ValueError, match="does not annotate 'semantic'"):
        config(setup, tmp_path, tasks=["semantic"], probabilities={"semantic": {"hypersim": 1.0}}).validate()
    with pytest.raises(ValueError, match="effective batch 32 is not a multiple of 6 per device x 1"):
        config(setup, tmp_path, effective_batch=32, batch_per_device=6).validate()
    with pytest.raises(FileNotFoundError, match="base model directory"):
        config(setup, tmp_path, base=str(tmp_path / "nowhere")).validate()
    with pytest.raises(FileNotFoundError, match="starts from a trained single-stream checkpoint"):
        config(setup, tmp_path, kind="multi_stream").validate()


@pytest.mark.slow
def test_two_cpu_processes_agree(setup, tmp_path):
    script = tmp_path / "run.py"
    script.write_text(f"""
import sys
from safetensors.torch import save_file
from stablemtl import train as T
from stablemtl import train_config as TC
cfg = TC.TrainConfig.from_dict(dict(base={str(setup / 'base')!r}, data_root={str(setup / 'data')!r}, resolution={RES!r},
    effective_batch=2, batch_per_device=1, iterations=3, warmup=1, decay_steps=50, checkpoint_every=0, backup_every=0,
    output_dir={str(tmp_path / 'out')!r}))
tr = T.Trainer(cfg, progress=False)
tr.train()
assert tr.accelerator.num_processes == 2 and tr.accumulation == 1
save_file(tr._trainable_state(), {str(tmp_path)!r} + f"/rank{{tr.accelerator.process_index}}.safetensors")
""")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
                    str(script)], check=True, env=env, capture_output=True, timeout=300)
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    tasks = [r[1] for r in log(tmp_path / "out")]
    assert tasks == list(TASK_NAMES[:3])


def test_pixel_losses_are_zero_on_the_target_and_depth_is_affine_invariant():
    torch.manual_seed(0)
    target = torch.rand(2, 3, 8, 8) * 2 - 1
    valid = torch.ones(2, 1, 8, 8, dtype=torch.bool)
    depth = target[:, :1].repeat(1, 3, 1, 1)
    assert T.pixel_loss(2.0 * depth + 0.3, depth, valid, "depth") < 1e-5
    assert T.pixel_loss(depth.flip(-1), depth, valid, "depth") > 0.05
    normal = torch.nn.functional.normalize(target, dim=1)
    assert T.pixel_loss(3.0 * normal, normal, valid, "normal") < 1e-2  # angles: the length does not matter
    assert T.pixel_loss(target, target, valid, "albedo") == 0
    assert float(T.pixel_loss(target + 0.1, target, valid, "albedo")) == pytest.approx(0.1, abs=1e-6)


@pytest.mark.slow
def test_pixel_loss_option_trains(setup, tmp_path):
    trainer = T.train(config(setup, tmp_path, tasks=["depth", "normal"], loss="pixel", iterations=2), progress=False)
    assert trainer.step == 2 and all(r[3] != "nan" for r in log(tmp_path))
    with pytest.raises(ValueError, match="loss must be 'latent'"):
        config(setup, tmp_path, loss="l2").validate()


@pytest.mark.slow
def test_cached_latents_give_the_same_loss(setup, tmp_path):
    trainer = T.Trainer(config(setup, tmp_path, tasks=["depth"], cache_latents=True), progress=False)
    source = trainer.sources[("depth", "hypersim")]
    batch = T.collate([source[i] for i in range(2)], "depth")
    assert batch["depth_target"].shape == (2, 3, 32, 48) and batch["keys"][0] == (0, (False, False), None)
    with torch.no_grad():
        plain = float(trainer.loss(batch, "depth"))  # no dataset given: no cache
        first = float(trainer.loss(batch, "depth", "hypersim"))
        assert len(trainer.latent_cache) == 4  # 2 image latents + 2 target latents
        again = float(trainer.loss(batch, "depth", "hypersim"))
    # bit for bit: with no image cached yet, the batch is encoded as one, exactly as without the cache (the same
    # VAE call on the same batch), and the cache hands back those latents unchanged
    assert first == plain and again == first


@pytest.mark.slow
def test_the_latent_cache_keeps_each_tasks_images_apart(setup, tmp_path):
    """Sample i of the depth list and sample i of the normal list of one dataset are different images when
    the lists differ (real Hypersim, vKITTI): an image latent is cached per task, never shared by index."""
    trainer = T.Trainer(config(setup, tmp_path, tasks=["depth", "normal"], cache_latents=True), progress=False)
    with torch.no_grad():
        for task in ("depth", "normal"):
            source = trainer.sources[(task, "hypersim")]
            trainer.loss(T.collate([source[i] for i in range(2)], task), task, "hypersim")
    images = sorted(k[:4] for k in trainer.latent_cache if k[0] == "rgb")
    assert images == [("rgb", "depth", "hypersim", 0), ("rgb", "depth", "hypersim", 1),
                      ("rgb", "normal", "hypersim", 0), ("rgb", "normal", "hypersim", 1)]


@pytest.mark.slow
def test_module_entry_trains_from_a_json_config_as_accelerate_launch_runs_it(setup, tmp_path):
    """``python -m stablemtl.train --config run.json`` (what notebooks 03/04 launch on several GPUs)
    trains the configuration and saves the model, matching the in-process run."""
    import dataclasses
    import json
    import subprocess
    import sys

    cfg = config(setup, tmp_path / "cli", iterations=2)
    path = tmp_path / "run.json"
    path.write_text(json.dumps(dataclasses.asdict(cfg)))
    subprocess.run([sys.executable, "-m", "stablemtl.train", "--config", str(path), "--no-progress"], check=True)
    assert (tmp_path / "cli" / "model" / MODEL_FILE).is_file()
    direct = T.train(config(setup, tmp_path / "direct", iterations=2), progress=False)
    assert log(tmp_path / "cli") == log(tmp_path / "direct")
    assert direct.step == 2
    bad = subprocess.run([sys.executable, "-m", "stablemtl.train", "--config", str(tmp_path / "none.json")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "no training configuration" in bad.stderr


@pytest.mark.slow
def test_a_checkpoint_of_other_settings_or_weights_is_not_resumed(setup, tmp_path):
    import shutil

    T.Trainer(config(setup, tmp_path / "run"), progress=False).train(until=2)
    with pytest.raises(ValueError, match=r"different training \(lr changed\).*move or delete"):
        T.Trainer(config(setup, tmp_path / "run", lr=3e-4), progress=False)
    # a rebuilt base at the same path: same configuration, other weights
    shutil.copytree(setup / "base", tmp_path / "base")
    other = T.Trainer(config(setup, tmp_path / "other", base=str(tmp_path / "base")), progress=False)
    other.train(until=2)  # the copy has the same weights: its checkpoint is compatible so far
    build_tiny_base(tmp_path / "base", seed=2)
    with pytest.raises(ValueError, match=r"base_weights changed"):
        T.Trainer(config(setup, tmp_path / "other", base=str(tmp_path / "base")), progress=False)
    # longer runs continue; a checkpoint past the requested length is named
    longer = T.Trainer(config(setup, tmp_path / "run", iterations=6), progress=False)
    assert longer.step == 2
    longer.train()
    with pytest.raises(ValueError, match="step 6, past iterations=4"):
        T.Trainer(config(setup, tmp_path / "run"), progress=False)


def batches_equal(a, b):
    (mb_a, x), (mb_b, y) = a, b
    return (mb_a == mb_b and x.keys() == y.keys() and x["keys"] == y["keys"]
            and all(torch.equal(x[k], y[k]) for k in x if k != "keys"))


@pytest.mark.slow
def test_worker_processes_read_exactly_the_batches_of_the_training_loop(setup, tmp_path):
    """A DataLoader with 2 workers yields the micro-batches (task, dataset, indices, epoch) and the
    collated, augmented tensors of the synchronous path, in order; the trainer's sampler advances
    only as micro-batches are consumed, not as the workers prefetch them."""
    from stablemtl.data.mixing import micro_batch_loader

    sync = T.Trainer(config(setup, tmp_path / "sync"), progress=False)  # all 7 tasks, 3 datasets
    seen, states = [], []
    for _ in range(36):
        seen.append(sync.next_batch())
        states.append(sync.sampler.state_dict())
    assert len({mb.epoch for mb, _ in seen}) > 1 and len({mb.dataset for mb, _ in seen}) == 3
    workers = T.Trainer(config(setup, tmp_path / "workers", num_workers=2, iterations=100), progress=False)
    read = list(micro_batch_loader(workers.sampler, workers.sources, T.collate, 2, limit=36))
    assert workers.sampler.position == 0 and len(read) == 36
    assert all(batches_equal(a, b) for a, b in zip(seen, read))
    workers.sampler.load_state_dict(states[9])  # mid-run, as after a resume
    batches = workers._batches(stop=30)
    try:
        got = [next(batches) for _ in range(3)]
        assert workers.sampler.state_dict() == states[12]  # consumed, not prefetched
    finally:
        batches.close()
    assert all(batches_equal(a, b) for a, b in zip(seen[10:13], got))


@pytest.mark.slow
def test_a_run_with_workers_killed_mid_run_resumes_bit_for_bit(setup, tmp_path, monkeypatch):
    """With 2 workers and 2 micro-batches per step: killed at step 3 (checkpoint at step 2, workers
    ahead of it), resumed, it ends with the weights of an uninterrupted run with workers and of the
    synchronous run; the checkpoint's sampler state is the one after the trained micro-batches."""
    import json
    import multiprocessing

    tasks = ["depth", "semantic", "optical_flow"]  # the 3 datasets

    def cfg(out, **kw):
        return config(setup, tmp_path / out, effective_batch=4, tasks=tasks, **kw)

    sync = T.train(cfg("sync"), progress=False)
    straight = T.train(cfg("straight", num_workers=2), progress=False)
    killed = T.Trainer(cfg("resumed", num_workers=2), progress=False)
    assert killed.accumulation == 2
    real_loss = killed.loss

    def dying_loss(batch, task, dataset=None):
        if killed.step == 3:
            raise KeyboardInterrupt("killed")
        return real_loss(batch, task, dataset)

    monkeypatch.setattr(killed, "loss", dying_loss)
    with pytest.raises(KeyboardInterrupt):
        killed.train()
    assert not multiprocessing.active_children()  # the workers were stopped
    saved = json.loads((tmp_path / "resumed/checkpoint/latest/sampler.json").read_text())
    assert saved["position"] == 4  # 2 steps x 2 micro-batches
    resumed = T.Trainer(cfg("resumed", num_workers=2), progress=False)
    assert resumed.step == 2
    resumed.train()
    a, b, c = state(sync), state(straight), state(resumed)
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)
    assert log(tmp_path / "sync") == log(tmp_path / "straight") == log(tmp_path / "resumed")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["single_stream", "multi_stream"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(setup, tmp_path, kind):
    """Bit for bit; with the task attention's random masking on (the recomputation replays the same RNG
    draws). The recomputation runs the forward's kernels again on the same batch, shapes and layouts (on any
    one machine, the same kernels), and the backward accumulates the same terms in an order its graph sets,
    not the CPU: so the two runs make the same operations in the same order on every machine."""
    extra = {}
    if kind == "multi_stream":
        single = T.train(config(setup, tmp_path / "init", iterations=1), progress=False)
        extra = {"kind": kind, "init": str(single.save_model())}
    results = []
    for checkpointing in (False, True):
        trainer = T.Trainer(config(setup, tmp_path / str(checkpointing), gradient_checkpointing=checkpointing,
                                   **extra), progress=False)
        assert trainer.model.unet.is_gradient_checkpointing == checkpointing
        trainer.ddp_model.train()
        mb, batch = trainer.next_batch()
        torch.manual_seed(0)  # the same masking draws
        loss = trainer.loss(batch, mb.task, mb.dataset)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        results.append((loss.item(), grads))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_b == loss_a
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for name in grads_a:
        assert torch.equal(grads_b[name], grads_a[name]), name


@pytest.mark.slow
def test_bad_data_and_optimizer_settings_are_named(setup, tmp_path):
    import importlib.util

    with pytest.raises(ValueError, match="num_workers must be an integer >= 0, got -1"):
        config(setup, tmp_path, num_workers=-1).validate()
    with pytest.raises(ValueError, match="prefetch_factor must be an integer >= 1, got 0"):
        config(setup, tmp_path, prefetch_factor=0).validate()
    with pytest.raises(ValueError, match="optimizer must be one of 'adam', 'adam_fused', 'adam8bit', got 'sgd'"):
        config(setup, tmp_path, optimizer="sgd").validate()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="'adam_fused'.*needs a CUDA device"):
            config(setup, tmp_path, optimizer="adam_fused").validate()
    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(ValueError, match="'adam8bit' needs the bitsandbytes package"):
            config(setup, tmp_path, optimizer="adam8bit").validate()
    # the optimizer is part of a checkpoint's identity; workers and checkpointing may change on resume
    assert "optimizer" not in TC.RESUMABLE_CHANGES
    assert {"num_workers", "prefetch_factor", "gradient_checkpointing"} <= set(TC.RESUMABLE_CHANGES)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["single_stream", "multi_stream"])
def test_bf16_training_halves_the_frozen_parts_and_saves_them_in_float32(setup, tmp_path, kind):
    """fp32 then bf16 in one process (accelerate's process-wide state follows the new precision):
    the trainable weights stay float32 masters, the frozen modules compute in bfloat16 with the
    float32 prompts, the losses agree with fp32 within 1 %, a bf16 resume is exact, and the saved
    model's frozen parts are the fp32 run's, bit for bit."""
    from stablemtl.model.fingerprint import module_fingerprint
    from stablemtl.model.pipeline import load_model

    extra = {}
    if kind == "multi_stream":
        single = T.train(config(setup, tmp_path / "init", iterations=1), progress=False)
        extra = {"kind": kind, "init": str(single.save_model())}
    fp32 = T.train(config(setup, tmp_path / "fp32", iterations=2, **extra), progress=False)
    halves = T.Trainer(config(setup, tmp_path / "bf16", iterations=2, mixed_precision="bf16", **extra),
                       progress=False)
    assert halves.autocast == torch.bfloat16 and halves.accelerator.mixed_precision == "no"
    frozen = [getattr(owner, name) for owner, name in T.frozen_modules(halves.model)]
    assert len(frozen) == (3 if kind == "multi_stream" else 2)
    assert {p.dtype for m in frozen for p in m.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in halves.model.trainable_parameters()} == {torch.float32}
    assert halves.model.frozen._prompts.keys() == set(halves.model.tasks)
    for task, prompt in halves.model.frozen._prompts.items():
        assert prompt.dtype == torch.float32 and torch.equal(prompt, fp32.model.frozen.prompt(task))
    halves.train(until=1)
    resumed = T.Trainer(config(setup, tmp_path / "bf16", iterations=2, mixed_precision="bf16", **extra),
                        progress=False)
    assert resumed.step == 1
    resumed.train()
    straight = T.train(config(setup, tmp_path / "bf16_straight", iterations=2, mixed_precision="bf16", **extra),
                       progress=False)
    a, b = state(straight), state(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    ref, got = log(tmp_path / "fp32"), log(tmp_path / "bf16")
    assert [r[:3] for r in got] == [r[:3] for r in ref]
    # bfloat16 keeps 8 significant bits (u = 2**-8 = 0.39 %): the bf16 frozen VAE's latents and the autocast
    # forward differ from fp32 by about that, the losses (means of squares) by 0.23 % and 0.09 % on the tiny base.
    # That difference is set by bfloat16's rounding, not by the order in which the CPU's kernels sum (1e-7)
    for (*_, loss_ref), (*_, loss_bf16) in zip(ref, got):
        assert float(loss_bf16) == pytest.approx(float(loss_ref), rel=1e-2)
    saved = [load_model(t.save_model(tmp_path / f"model_{i}")) for i, t in enumerate((fp32, resumed))]
    for model in saved:
        assert {p.dtype for p in model.parameters()} == {torch.float32}
    prints = [{name: module_fingerprint({name: getattr(owner, name)}) for owner, name in T.frozen_modules(m)}
              for m in saved]
    assert prints[0] == prints[1]
    assert {p.dtype for m in frozen for p in m.parameters()} == {torch.bfloat16}  # still computing in bf16


@pytest.mark.slow
def test_only_the_newest_backups_are_kept_and_a_resume_still_finds_them(setup, tmp_path):
    """``keep_backups``: a backup at every step, the two newest stay; it is bookkeeping, not the identity."""
    out = tmp_path / "keep"
    T.train(config(setup, out, iterations=4, checkpoint_every=1, backup_every=1, keep_backups=2), progress=False)
    root = out / "checkpoint"
    assert sorted(p.name for p in root.glob("iter_*")) == ["iter_000003", "iter_000004"]
    trainer = T.Trainer(config(setup, out, iterations=5, checkpoint_every=1, backup_every=1, keep_backups=None),
                        progress=False)
    assert trainer.resumed_from == root / "latest" and trainer.step == 4


def test_memory_is_counted_from_the_configs_and_a_training_that_cannot_fit_is_refused(tiny_base_dir):
    from stablemtl.model.base import load_base
    from stablemtl.model.streams import MultiStream, SingleStream
    from stablemtl.guard import StageError

    ta = {"query_hidden": 16, "heads": 4, "mask_prob": 0.4}
    cfg = lambda **k: TC.TrainConfig(base=str(tiny_base_dir), task_attention=ta, **k)  # noqa: E731
    single_cfg = cfg()
    count = TC.memory_count(single_cfg)
    base = load_base(tiny_base_dir)
    single = SingleStream.from_base(base)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count["trainable"] == n(single.unet) and count["frozen"] == n(base.vae) + n(base.text_encoder)
    assert count["static_gib"] * 1024 ** 3 == count["trainable"] * 16 + count["frozen"] * 4
    multi = MultiStream.from_single_stream(single, **ta)
    m = TC.memory_count(cfg(kind="multi_stream"))
    assert m["trainable"] == n(multi.unet) + n(multi.task_attention) and m["frozen"] == count["frozen"] + n(single.unet)
    assert TC.memory_count(cfg(optimizer="adam8bit"))["bytes_per_trainable"] == 10
    assert TC.memory_count(cfg(mixed_precision="bf16"))["bytes_per_frozen"] == 6
    assert TC.check_cpu_memory(single_cfg, available=2 ** 40) == count
    with pytest.raises(StageError, match=r"does not fit in this machine's memory: it needs .* GiB before any "
                                         r"activation .* and 0\.0 GiB is available.*adam8bit"):
        TC.check_cpu_memory(single_cfg, available=1024)
