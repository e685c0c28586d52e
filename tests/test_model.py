"""The model: base loading, single stream, multi stream, the batched pipeline."""

import json

import pytest
import torch

from stablemtl.model import base as B
from stablemtl.model import streams as S
from stablemtl.model.pipeline import StableMTLPipeline
from stablemtl.presets import load_preset
from stablemtl.tasks import TASK_NAMES

H, W = 32, 48


def _cfg(**changes):
    cfg = dict(load_preset("smoke")["model"]["base"])
    cfg.update({"vae_steps": 3, "vae_images": 6, "report_images": 2, **changes})
    return cfg


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    base, info = B.make_tiny_base(_cfg(), seed=1, progress=False)
    return B.save_base(base, tmp_path_factory.mktemp("base") / "tiny", info)


@pytest.fixture(scope="module")
def base(base_dir):
    return B.load_base(base_dir)


@pytest.fixture(scope="module")
def single(base):
    torch.manual_seed(0)
    return S.SingleStream.from_base(base)


def _perturbed_multi(single):
    multi = S.MultiStream.from_single_stream(single, query_hidden=32)
    torch.manual_seed(1)
    for module in multi.task_attention.values():  # leave the zero init, so the task attention matters
        torch.nn.init.normal_(module.out.weight, std=0.2)
    return multi.eval()


def _images(seed=0, n=2):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, H, W, generator=g), torch.rand(n, 3, H, W, generator=g)


def test_single_stream_widens_conv_in_as_the_reference(base, single):
    old, new = base.unet.conv_in, single.unet.conv_in
    assert new.in_channels == 12 and single.unet.config.in_channels == 12
    torch.testing.assert_close(new.weight, old.weight.repeat(1, 3, 1, 1) / 3)
    torch.testing.assert_close(new.bias, old.bias)
    # equal thirds: [z, z, z] through the new kernel == z through the old one
    z = torch.randn(1, 4, 8, 8)
    torch.testing.assert_close(new(torch.cat([z, z, z], 1)), old(z), atol=1e-5, rtol=1e-5)
    assert base.unet.config.in_channels == 4  # the base is not modified


def test_multi_stream_equals_single_stream_at_initialisation(single):
    multi = S.MultiStream.from_single_stream(single, query_hidden=32).eval()
    images, nxt = _images()
    a = StableMTLPipeline(single)(images, next_images=nxt, return_latents=True)
    b = StableMTLPipeline(multi)(images, next_images=nxt, return_latents=True)
    for task in TASK_NAMES:
        assert (a["latents"][task] - b["latents"][task]).abs().max() <= 1e-5
        assert (a[task].float() - b[task].float()).abs().max() <= 1e-5


@pytest.mark.parametrize("kind", ["single", "multi"])
def test_batched_pipeline_equals_task_by_task(single, kind):
    model = single if kind == "single" else _perturbed_multi(single)
    pipe = StableMTLPipeline(model)
    images, nxt = _images(1)
    together = pipe(images, next_images=nxt, return_latents=True)
    for task in TASK_NAMES:
        alone = pipe(images, tasks=[task], next_images=nxt, return_latents=True)
        assert (together["latents"][task] - alone["latents"][task]).abs().max() <= 1e-5, task
    if kind == "multi":  # the reference scheme (6 aux passes per main task) gives the same latents
        z = model.frozen.encode(torch.cat([images, nxt]) * 2 - 1)
        with torch.no_grad():
            ref = model.predict_latents_reference(*z.chunk(2), list(TASK_NAMES))
        for i, task in enumerate(TASK_NAMES):
            assert (ref[i] - together["latents"][task]).abs().max() <= 1e-5
        assert (together["latents"]["depth"] - StableMTLPipeline(single)(images, next_images=nxt, return_latents=True)["latents"]["depth"]).abs().max() > 1e-3


def _count_calls(module):
    calls = []
    handle = module.register_forward_pre_hook(lambda m, args, kwargs: calls.append(args[0].shape[0]), with_kwargs=True)
    return calls, handle


def test_unet_calls_are_batched(single):
    multi = _perturbed_multi(single)
    images, nxt = _images(2, n=3)
    main, h1 = _count_calls(multi.unet)
    aux, h2 = _count_calls(multi.aux_unet)
    StableMTLPipeline(multi)(images, next_images=nxt)
    h1.remove(), h2.remove()
    assert main == [7 * 3] and aux == [7 * 3]  # 2 UNet calls for 7 tasks x 3 images (the reference: 49)
    calls, h = _count_calls(single.unet)
    StableMTLPipeline(single)(images, next_images=nxt)
    h.remove()
    assert calls == [21]
    aux, h = _count_calls(multi.aux_unet)
    StableMTLPipeline(multi)(images, tasks=["depth"])
    h.remove()
    assert aux == [6 * 3]  # one main task needs the 6 others


def test_trainable_parameters_are_the_main_unet_and_the_task_attention(single):
    multi = S.MultiStream.from_single_stream(single, query_hidden=32)
    trainable = {id(p) for p in multi.parameters() if p.requires_grad}
    expected = {id(p) for p in list(multi.unet.parameters()) + list(multi.task_attention.parameters())}
    assert trainable == expected == {id(p) for p in multi.trainable_parameters()}
    assert len(multi.task_attention) == len(S.attention_sites(multi.unet)) == 7  # the smoke UNet has 7 blocks
    assert {id(p) for p in single.parameters() if p.requires_grad} == {id(p) for p in single.unet.parameters()}


def test_task_masking_drops_one_task_in_training():
    torch.manual_seed(0)
    ta = S.TaskAttention(8, ["a", "b", "c"], query_hidden=16, heads=2)
    torch.nn.init.normal_(ta.out.weight)
    h, f = torch.randn(1, 2, 5, 8), torch.randn(3, 2, 5, 8)
    plain = ta(h, ["a"], f, ["a", "b", "c"])
    masked = [ta(h, ["a"], f, ["a", "b", "c"], mask_prob=1.0) for _ in range(20)]
    only = {name: ta(h, ["a"], f[[0, i]], ["a", name]) for i, name in ((1, "b"), (2, "c"))}
    for out in masked:  # masking b leaves attention on c alone, and vice versa
        assert any(torch.allclose(out, o, atol=1e-6) for o in only.values())
        assert not torch.allclose(out, plain)


def test_save_and_load_reproduce_outputs_bit_for_bit(single, base, tmp_path):
    multi = _perturbed_multi(single)
    images, nxt = _images(3)
    for model in (single, multi):
        path = model.save_pretrained(tmp_path / model.kind)
        assert sorted(p.name for p in (path / "unet").iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
        assert json.loads((path / "scheduler/scheduler_config.json").read_text())["prediction_type"] == "sample"
        assert not list(path.rglob("*.bin")) and not list(path.rglob("*.pt"))  # nothing to unpickle
        loaded = S.load_model(path)
        assert type(loaded) is type(model)
        a = StableMTLPipeline(model)(images, next_images=nxt, return_latents=True)
        b = StableMTLPipeline(loaded)(images, next_images=nxt, return_latents=True)
        for task in TASK_NAMES:
            assert torch.equal(a["latents"][task], b["latents"][task])
    with pytest.raises(ValueError, match="holds a 'single_stream' model"):
        S.MultiStream.from_pretrained(tmp_path / "single_stream")


def test_tiny_base_round_trips_through_load_base(base_dir, base):
    again = B.load_base(base_dir)
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(base, name).state_dict(), getattr(again, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert again.tokenizer.get_vocab() == base.tokenizer.get_vocab()
    assert again.tokenizer("optical flow").input_ids == [again.tokenizer.bos_token_id, *again.tokenizer.convert_tokens_to_ids(["optical</w>", "flow</w>"]), again.tokenizer.eos_token_id]
    assert dict(again.scheduler.config) == dict(base.scheduler.config)
    assert json.loads((base_dir / "model_index.json").read_text())["unet"] == ["diffusers", "UNet2DConditionModel"]


def test_tiny_base_building_is_deterministic():
    a, _ = B.make_tiny_base(_cfg(vae_steps=2, vae_images=3), seed=5, progress=False)
    b, _ = B.make_tiny_base(_cfg(vae_steps=2, vae_images=3), seed=5, progress=False)
    for name in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_bad_input_is_named(single, base_dir, tmp_path):
    pipe = StableMTLPipeline(single)
    images, nxt = _images()
    factor = single.frozen.vae_factor
    assert factor == 2  # the smoke base
    with pytest.raises(ValueError, match=f"size 32x47 is not a multiple of the VAE factor {factor}"):
        pipe(images[..., :47], tasks=["depth"])
    with pytest.raises(ValueError, match=r"3 channels\), got shape \(2, 4, 32, 48\)"):
        pipe(torch.rand(2, 4, H, W), tasks=["depth"])
    with pytest.raises(ValueError, match="unknown task 'segmentation'"):
        pipe(images, tasks=["segmentation"])
    with pytest.raises(ValueError, match="need the next frame"):
        pipe(images, tasks=["optical_flow"])
    broken = tmp_path / "broken"
    import shutil
    shutil.copytree(base_dir, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(B.BaseModelError, match=r"missing component folder\(s\) vae/"):
        B.load_base(broken)
    shutil.copytree(base_dir / "vae", broken / "vae")
    config = json.loads((broken / "unet/config.json").read_text())
    config["cross_attention_dim"] = 48
    (broken / "unet/config.json").write_text(json.dumps(config))
    with pytest.raises(B.BaseModelError, match="cross_attention_dim 48 != text encoder hidden size 32"):
        B.load_base(broken)
    with pytest.raises(B.BaseModelError, match="does not exist"):
        B.load_base(tmp_path / "nowhere")


# --------------------------------------------------------------------------- SD2 at full size (no weights)

SD2_UNET = dict(  # stabilityai/stable-diffusion-2, unet/config.json
    sample_size=96, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True, upcast_attention=True,
)
SD2_UNET_PARAMETERS = 865_910_724


def _task_attention_parameters(c: int, n_tasks: int = 7, q: int = 640) -> int:
    mlp = lambda *w: sum(a * b + b for a, b in zip(w[:-1], w[1:]))  # noqa: E731
    return n_tasks * (2 * c + 2 * mlp(c, c // 2, c) + mlp(c, q, q, q, c)) + 2 * c + c * c + c


def test_sd2_architecture_from_its_config():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD2_UNET)
    assert sum(p.numel() for p in unet.parameters()) == SD2_UNET_PARAMETERS
    S.widen_conv_in(unet)
    assert unet.conv_in.in_channels == 12 and unet.config.in_channels == 12
    assert sum(p.numel() for p in unet.parameters()) == SD2_UNET_PARAMETERS + 8 * 320 * 9
    sites = S.attention_sites(unet)
    assert len(sites) == 16
    assert sorted(sites.values()) == sorted([320] * 5 + [640] * 5 + [1280] * 6)
    modules = {s: S.TaskAttention(c, TASK_NAMES) for s, c in sites.items()}
    assert sum(p.numel() for m in modules.values() for p in m.parameters()) == \
        sum(_task_attention_parameters(c) for c in sites.values())
    # one forward on a small latent: an auxiliary pass captures 7 tasks' features, then the main
    # pass with task attention (zero-initialised: equal to the plain UNet; perturbed: different)
    store = S._Store()
    x, prompts, t = torch.randn(1, 12, 16, 16), torch.randn(1, 4, 1024), torch.tensor([999])
    with torch.no_grad():
        plain = unet(x, t, encoder_hidden_states=prompts).sample

        def install(make):
            unet.set_attn_processor({name: make(name[: -len(".processor")]) if name[: -len(".processor")] in sites
                                     else proc for name, proc in unet.attn_processors.items()})

        install(lambda site: S._CaptureProcessor(store, site))
        unet(x.repeat(7, 1, 1, 1), t.repeat(7), encoder_hidden_states=prompts.repeat(7, 1, 1))
        assert len(store.features) == 16
        install(lambda site: S._TaskAttentionProcessor(store, site, modules[site]))
        store.layout = (["depth"], list(TASK_NAMES), 1)
        out = unet(x, t, encoder_hidden_states=prompts).sample
        assert out.shape == (1, 4, 16, 16)
        torch.testing.assert_close(out, plain)
        for m in modules.values():
            torch.nn.init.normal_(m.out.weight, std=0.01)
        assert not torch.allclose(unet(x, t, encoder_hidden_states=prompts).sample, plain)


def test_paper_base_directory_comes_from_base_ckpt_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("BASE_CKPT_DIR", str(tmp_path))
    assert B.paper_base_dir() == tmp_path / "stable-diffusion-2"
    with pytest.raises(B.BaseModelError, match="missing component"):
        (tmp_path / "stable-diffusion-2" / "unet").mkdir(parents=True)
        B.load_base(B.paper_base_dir())
    monkeypatch.delenv("BASE_CKPT_DIR")
    with pytest.raises(B.BaseModelError, match="BASE_CKPT_DIR is not set"):
        B.paper_base_dir()
