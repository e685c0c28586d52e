"""The model: base loading, single stream, multi stream, the batched pipeline."""

import copy
import json

import pytest
import torch
from diffusers.utils import BaseOutput

from stablemtl.model import base as B
from stablemtl.model import pipeline as P
from stablemtl.model import streams as S
from stablemtl.model.fingerprint import model_fingerprint
from stablemtl.model.pipeline import StableMTLPipeline
from stablemtl.presets import load_preset
from stablemtl.tasks import TASK_NAMES

from reference_model import predict_latents_reference  # tests/reference_model.py: the release's scheme
from rounding import network_tolerance, sum_bound, unit_roundoff  # tests/rounding.py: tolerances from the arithmetic

H, W = 32, 48


def _cfg(**changes):
    return {**load_preset("smoke")["model"]["base"], "vae_steps": 3, "vae_images": 6, "report_images": 2, **changes}


@pytest.fixture(scope="module")
def base_dir(tiny_base_dir):
    return tiny_base_dir


@pytest.fixture(scope="module")
def base(tiny_base):
    return tiny_base


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
    # equal thirds: [z, z, z] through the new kernel == z through the old one, up to rounding: the new sum has
    # 3 x 36 products of the rounded weight / 3, the old one 36 (+ the bias), summed in any order: each within
    # (n - 1) u sum|terms| of the exact value, plus u for the division by 3 (sum_bound covers both with room)
    z = torch.randn(1, 4, 8, 8)
    terms = torch.nn.functional.conv2d(z.abs(), old.weight.abs(), old.bias.abs(), old.stride, old.padding)
    with torch.no_grad():
        difference = (new(torch.cat([z, z, z], 1)) - old(z)).abs()
    assert (difference <= sum_bound(3 * 36 + 1, terms)).all()
    assert base.unet.config.in_channels == 4  # the base is not modified


def test_multi_stream_equals_single_stream_at_initialisation(single):
    """Bit for bit: the main UNet is a copy of the single stream's and makes the same call (the same batch of
    tasks and images); the zero-initialised output projection adds exactly 0 to every attention branch."""
    multi = S.MultiStream.from_single_stream(single, query_hidden=32).eval()
    images, nxt = _images()
    a = StableMTLPipeline.from_model(single)(images, next_images=nxt, return_latents=True)
    b = StableMTLPipeline.from_model(multi)(images, next_images=nxt, return_latents=True)
    _assert_same_outputs(a, b)


@pytest.mark.parametrize("kind", ["single", "multi"])
def test_batched_pipeline_equals_task_by_task(single, kind):
    """The same latents whatever the batch. A batch of 7 tasks and one of 1 sum in other orders (the kernels
    block by the batch size, and by the CPU), so they agree to within rounding only: in float64 (copies of the
    models), where the bound of ``rounding.network_tolerance`` (3e-12 of the latents' scale) holds on every
    machine and still tells any mix-up of tasks or images, which moves latents by 1e-2 or more."""
    model = copy.deepcopy(single if kind == "single" else _perturbed_multi(single)).double()
    pipe = StableMTLPipeline.from_model(model)
    assert pipe.model is model
    images, nxt = (x.double() for x in _images(1))
    together = pipe(images, next_images=nxt, return_latents=True)
    for task in TASK_NAMES:
        alone = pipe(images, tasks=[task], next_images=nxt, return_latents=True)
        tolerance = network_tolerance(together.latents[task], torch.float64)
        assert (together.latents[task] - alone.latents[task]).abs().max() <= tolerance, task
    if kind == "multi":  # the reference scheme (6 aux passes per main task) gives the same latents
        z = model.frozen.encode(torch.cat([images, nxt]) * 2 - 1)
        with torch.no_grad():
            ref = predict_latents_reference(model, *z.chunk(2), list(TASK_NAMES))
        for i, task in enumerate(TASK_NAMES):
            tolerance = network_tolerance(together.latents[task], torch.float64)
            assert (ref[i] - together.latents[task]).abs().max() <= tolerance, task
        plain = StableMTLPipeline.from_model(copy.deepcopy(single).double())(images, next_images=nxt,
                                                                              return_latents=True)
        assert (together.latents["depth"] - plain.latents["depth"]).abs().max() > 1e-3


def test_recorded_attention_weights_are_distributions_over_the_other_tasks(single):
    multi = _perturbed_multi(single)
    images, nxt = _images(3)
    z_image, z_next = multi.frozen.encode(torch.cat([images, nxt]) * 2 - 1).chunk(2)
    tasks = ["depth", "normal", "semantic"]
    aux = multi.aux_tasks_for(tasks)
    weights = {}
    with torch.no_grad():
        recorded = multi.predict_latents(z_image, z_next, tasks, attention_weights=weights)
        plain = multi.predict_latents(z_image, z_next, tasks)
    assert torch.equal(recorded, plain)  # recording changes nothing
    assert set(weights) == set(S.attention_sites(multi.unet))
    for site, (w,) in weights.items():
        assert w.shape[:2] == (len(tasks), len(images)) and w.shape[-1] == len(aux), site
        torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]))  # over the heads' mean: still 1
        for i, task in enumerate(tasks):
            assert float(w[i, ..., aux.index(task)].abs().max()) == 0.0  # a task never attends to itself
            assert float(w[i].mean(dim=(0, 1)).max()) < 1.0  # the others share it


def _count_calls(module):
    calls = []
    handle = module.register_forward_pre_hook(lambda m, args, kwargs: calls.append(args[0].shape[0]), with_kwargs=True)
    return calls, handle


def test_unet_calls_are_batched(single):
    multi = _perturbed_multi(single)
    images, nxt = _images(2, n=3)
    main, h1 = _count_calls(multi.unet)
    aux, h2 = _count_calls(multi.aux_unet)
    StableMTLPipeline.from_model(multi)(images, next_images=nxt)
    h1.remove(), h2.remove()
    assert main == [7 * 3] and aux == [7 * 3]  # 2 UNet calls for 7 tasks x 3 images (the reference: 49)
    calls, h = _count_calls(single.unet)
    StableMTLPipeline.from_model(single)(images, next_images=nxt)
    h.remove()
    assert calls == [21]
    aux, h = _count_calls(multi.aux_unet)
    StableMTLPipeline.from_model(multi)(images, tasks=["depth"])
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
    # masking b leaves attention on c alone, and vice versa: the remaining task's weight is 1 (exp(0) / 1, within
    # 2u) times the same value vectors v (within 3u of v on each side), then the projection `out` (8 products and
    # the bias, within 9u of sum|W| |v| + |bias| on each side): within (6 + 2 x 9) u of that = sum_bound(13, ...)
    v = max(float(ta.value[t](ta.norm_v[t](f[i])).abs().max()) for i, t in ((1, "b"), (2, "c")))
    tolerance = sum_bound(13, float(ta.out.weight.abs().sum(1).max()) * v + float(ta.out.bias.abs().max()))
    for out in masked:
        assert any(torch.allclose(out, o, rtol=0, atol=tolerance) for o in only.values())
        assert not torch.allclose(out, plain)


def _outputs(model, images, nxt):
    return StableMTLPipeline.from_model(model)(images, next_images=nxt, return_latents=True)


def _assert_same_outputs(a, b):
    for task in TASK_NAMES:
        assert torch.equal(a.latents[task], b.latents[task]), task
        assert torch.equal(a.predictions[task], b.predictions[task]), task


def test_save_and_load_reproduce_outputs_bit_for_bit(base_dir, tmp_path):
    """``save_model`` writes one self-contained folder: moved elsewhere, with the base it was
    built from deleted, it loads (``from_pretrained``, ``load_model``) to the same bits."""
    import shutil

    own_base = shutil.copytree(base_dir, tmp_path / "base")  # a base of its own, deleted below
    torch.manual_seed(0)
    single = S.SingleStream.from_base(B.load_base(own_base))
    models = {"single_stream": single, "multi_stream": _perturbed_multi(single)}
    images, nxt = _images(3)
    before = {kind: _outputs(model, images, nxt) for kind, model in models.items()}
    for kind, model in models.items():
        assert StableMTLPipeline.from_model(model).save_pretrained(tmp_path / "a" / kind) == tmp_path / "a" / kind
    shutil.move(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(own_base)
    for kind, model in models.items():
        path = tmp_path / "b" / kind
        multi = kind == "multi_stream"
        layout = {"model_index.json", P.MODEL_FILE, "unet", "vae", "text_encoder", "tokenizer", "scheduler"}
        assert {p.name for p in path.iterdir()} == layout | ({"aux_unet", "task_attention"} if multi else set())
        assert sorted(p.name for p in (path / "unet").iterdir()) == \
            ["config.json", "diffusion_pytorch_model.safetensors"]
        assert json.loads((path / "scheduler/scheduler_config.json").read_text())["prediction_type"] == "sample"
        assert not list(path.rglob("*.bin")) and not list(path.rglob("*.pt"))  # nothing to unpickle
        for file in path.rglob("*.json"):  # no absolute path: neither the base's nor the folder's own
            assert str(tmp_path) not in file.read_text() and "name_or_path" not in file.read_text(), file
        settings = {"query_hidden": 32, "heads": 4, "mask_prob": 0.4} if multi else {}
        record = {"kind": kind, "tasks": list(TASK_NAMES), **settings, "normals": "as_stored"}
        assert json.loads((path / P.MODEL_FILE).read_text()) == record
        assert {k: v for k, v in json.loads((path / "model_index.json").read_text()).items() if k in record} == record
        if multi:  # the task attention keeps its state-dict names: <site_key>.<parameter>
            from safetensors import safe_open

            with safe_open(str(path / "task_attention/diffusion_pytorch_model.safetensors"), "pt") as f:
                assert set(f.keys()) == set(model.task_attention.state_dict())
            assert json.loads((path / "model_index.json").read_text())["task_attention"] == \
                ["stablemtl.model.streams", "TaskAttentionSites"]
        pipe = StableMTLPipeline.from_pretrained(path)
        assert type(pipe.model) is type(model) and pipe.model.unet is pipe.unet and pipe.model is pipe.model
        assert (pipe.aux_unet is None) == (not multi) and pipe.config.kind == kind
        if multi:  # the sites in the UNet's module order, as built
            assert list(pipe.task_attention.keys()) == list(model.task_attention.keys())
        _assert_same_outputs(before[kind], pipe(images, next_images=nxt, return_latents=True))
        assert model_fingerprint(pipe.model) == model_fingerprint(model)  # prediction caches stay valid
        loaded = P.load_model(path)
        assert type(loaded) is type(model)
        assert torch.equal(_outputs(loaded, images, nxt).latents["depth"], before[kind].latents["depth"])
    with pytest.raises(ValueError, match="holds a 'single_stream' model"):
        P.load_model(tmp_path / "b/single_stream", expect="multi_stream")


def test_models_of_earlier_formats_are_refused_naming_the_folder_and_the_fix(single, tmp_path):
    """This version reads the self-contained pipeline folder only: the kit's older layout (trained
    weights over a recorded base directory), the first task-attention layout (shared norms) and a
    record without its normal convention are each refused, naming the folder, what was found and
    what to do; a task attention that does not fit is never filled at random."""
    from safetensors.torch import load_file, save_file

    old = tmp_path / "older_layout"  # as the kit wrote it before the pipeline folder
    single.unet.save_pretrained(old / "unet", safe_serialization=True)
    (old / P.MODEL_FILE).write_text(json.dumps({"kind": single.kind, "tasks": single.tasks, "base": str(tmp_path)}))
    for load in (P.load_model, StableMTLPipeline.from_pretrained):
        with pytest.raises(P.ModelFormatError) as err:
            load(old)
        for part in (str(old), "older layout", "unet/", "re-train", "save it again"):
            assert part in str(err.value), part

    multi = _perturbed_multi(single)
    folder = P.save_model(multi, tmp_path / "first_layout")
    weights = next((folder / "task_attention").glob("*.safetensors"))
    state = load_file(str(weights))
    first = {}  # one LayerNorm for a task's keys and values, one query LayerNorm for all tasks
    for key, value in state.items():
        site, part, *rest = key.split(".")
        if part == "norm_k":
            first[".".join([site, "kv_norm", *rest])] = value
        elif part == "norm_q" and rest[0] == multi.tasks[0]:
            first[".".join([site, "query_norm", *rest[1:]])] = value
        elif part not in ("norm_v", "norm_q"):
            first[key] = value
    save_file(first, str(weights))
    with pytest.raises(P.ModelFormatError) as err:
        P.load_model(folder)
    for part in (str(weights), "first layout", "kv_norm", str(folder), "re-train"):
        assert part in str(err.value), part
    save_file({k: v for k, v in state.items() if ".norm_q." not in k}, str(weights))
    with pytest.raises(ValueError, match=r"does not fit the task attention.*missing key\(s\) \['[a-z_0-9]+\.norm_q\."):
        P.load_model(folder)  # never filled at random

    record = json.loads((folder / P.MODEL_FILE).read_text())
    assert P.saved_normals(record) == "as_stored"
    with pytest.raises(P.ModelFormatError, match=f"{folder}.*no normal convention.*re-train"):
        P.saved_normals({k: v for k, v in record.items() if k != "normals"}, folder / P.MODEL_FILE)


def test_from_pretrained_casts_every_component_to_torch_dtype(single, tmp_path):
    import warnings

    multi = _perturbed_multi(single)
    path = P.save_model(multi, tmp_path / "multi")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = StableMTLPipeline.from_pretrained(path, torch_dtype=torch.float64)
    assert not [w for w in caught if "torch_dtype" in str(w.message)]  # passed on as diffusers' ``dtype``
    for name in ("unet", "aux_unet", "vae", "text_encoder", "task_attention"):
        assert {p.dtype for p in getattr(pipe, name).parameters()} == {torch.float64}, name
    images, nxt = _images(6, n=1)
    a = _outputs(multi, images, nxt)
    b = pipe(images, next_images=nxt, return_latents=True)
    for task in TASK_NAMES:  # the float32 model's rounding, against float64 (rounding.network_tolerance, 1 path)
        assert b.latents[task].dtype == torch.float64
        tolerance = network_tolerance(b.latents[task], torch.float32, paths=1)
        assert (a.latents[task].double() - b.latents[task]).abs().max() <= tolerance, task


def test_the_call_context_reaches_every_processor_without_warnings(single):
    """The task-attention keywords travel in ``cross_attention_kwargs``; every processor of both
    UNets names them (diffusers warns about and drops keywords a processor does not take) and keeps
    nothing between calls."""
    import inspect
    import logging

    multi = _perturbed_multi(single)
    for unet in (multi.unet, multi.aux_unet):
        for proc in unet.attn_processors.values():
            keywords = set(inspect.signature(proc.__call__).parameters)
            assert {"task_features", "task_layout", "task_mask_prob"} <= keywords
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    try:
        out = StableMTLPipeline.from_model(multi)(_images(7, n=1)[0], tasks=["depth", "normal"])
    finally:
        logger.removeHandler(handler)
    assert not records, [r.getMessage() for r in records]
    assert isinstance(out, BaseOutput) and list(out.keys()) == ["predictions"] and out.latents is None
    assert set(out.predictions) == {"depth", "normal"}
    assert not hasattr(S, "_Store") and not hasattr(multi, "store")
    for unet in (multi.unet, multi.aux_unet):
        for proc in unet.attn_processors.values():
            assert not any(isinstance(v, (dict, torch.Tensor)) for v in vars(proc).values())
    # without a call's context the main UNet is plain attention: the single stream's UNet
    x, t = torch.randn(1, 12, 4, 6), torch.tensor([S.TIMESTEP])
    prompts = torch.randn(1, 3, single.unet.config.cross_attention_dim)
    with torch.no_grad():
        assert torch.equal(multi.unet(x, t, prompts).sample, single.unet(x, t, prompts).sample)


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
    pipe = StableMTLPipeline.from_model(single)
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
    return n_tasks * (6 * c + 2 * mlp(c, c // 2, c) + mlp(c, q, q, q, c)) + c * c + c  # 3 LayerNorms per task


@pytest.mark.slow
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
    modules = S.TaskAttentionSites(sites, TASK_NAMES)
    assert sum(p.numel() for p in modules.parameters()) == sum(_task_attention_parameters(c) for c in sites.values())
    # the release's task-attention extras per block at widths 320, 640, 1280, and in all
    assert [_task_attention_parameters(c) for c in (320, 640, 1280)] == [10_173_760, 17_671_680, 41_883_520]
    assert sum(p.numel() for p in modules.parameters()) == 390_528_320
    # one forward on a small latent: an auxiliary pass captures 7 tasks' features, then the main
    # pass with task attention (zero-initialised: equal to the plain UNet; perturbed: different)
    x, prompts, t = torch.randn(1, 12, 16, 16), torch.randn(1, 4, 1024), torch.tensor([999])
    with torch.no_grad():
        plain = unet(x, t, encoder_hidden_states=prompts).sample
        S.install_capture(unet, sites)
        features = {}
        unet(x.repeat(7, 1, 1, 1), t.repeat(7), encoder_hidden_states=prompts.repeat(7, 1, 1),
             cross_attention_kwargs={"task_features": features})
        assert len(features) == 16
        S.install_task_attention(unet, modules)
        context = {"task_features": features, "task_layout": (["depth"], list(TASK_NAMES), 1)}
        out = unet(x, t, encoder_hidden_states=prompts, cross_attention_kwargs=context).sample
        assert out.shape == (1, 4, 16, 16)
        torch.testing.assert_close(out, plain)
        for m in modules.values():
            torch.nn.init.normal_(m.out.weight, std=0.01)
        perturbed = unet(x, t, encoder_hidden_states=prompts, cross_attention_kwargs=context).sample
        assert not torch.allclose(perturbed, plain)


def test_paper_base_directory_comes_from_base_ckpt_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("BASE_CKPT_DIR", str(tmp_path))
    assert B.paper_base_dir() == tmp_path / "stable-diffusion-2"
    with pytest.raises(B.BaseModelError, match="missing component"):
        (tmp_path / "stable-diffusion-2" / "unet").mkdir(parents=True)
        B.load_base(B.paper_base_dir())
    monkeypatch.delenv("BASE_CKPT_DIR")
    with pytest.raises(B.BaseModelError, match="BASE_CKPT_DIR is not set"):
        B.paper_base_dir()


# --------------------------------------------------------------------------- precision, compile, devices

def _differences(a, b) -> dict:
    """Per task: max abs difference of the outputs (flows: relative to the reference's max magnitude;
    semantic: the share of pixels whose class differs; normals: the 99th percentile, since a pixel
    whose decoded vector is near zero before normalisation has an ill-conditioned direction)."""
    out = {}
    for task in TASK_NAMES:
        x, y = a.predictions[task], b.predictions[task]
        if task == "semantic":
            out[task] = (x != y).float().mean().item()
        elif task in ("optical_flow", "scene_flow"):
            out[task] = ((x - y).abs().max() / x.abs().max().clamp_min(1e-6)).item()
        elif task == "normal":
            out[task] = (x - y).abs().flatten().float().quantile(0.99).item()
        else:
            out[task] = (x - y).abs().max().item()
    return out


# measured on the tiny base (seed 0 single stream and the perturbed multi stream, 2 images 32x48, CPU):
# max abs differences depth 0.0045, shading 0.0046, albedo 0.010, normal 0.047 (unit vectors); flows 0.037
# relative to the largest flow; semantic 1.4% of pixels of another class. The bounds, with a margin:
BF16_TOLERANCE = {"depth": 0.08, "normal": 0.08, "albedo": 0.08, "shading": 0.08, "optical_flow": 0.1,
                  "scene_flow": 0.1, "semantic": 0.05}


@pytest.mark.slow
def test_bfloat16_inference_agrees_with_float32(single, tmp_path):
    multi = _perturbed_multi(single)
    images, nxt = _images(7)
    for model in (single, multi):
        path = P.save_model(model, tmp_path / model.kind)
        reference = StableMTLPipeline.from_pretrained(path)(images, next_images=nxt, return_latents=True)
        pipe = StableMTLPipeline.from_pretrained(path, torch_dtype=torch.bfloat16)
        seen = set()
        hooks = [m.register_forward_hook(lambda m, i, o: seen.add(o.dtype if torch.is_tensor(o) else o.sample.dtype))
                 for m in (pipe.unet, pipe.vae.decoder)]
        half = pipe(images, next_images=nxt, return_latents=True)
        for h in hooks:
            h.remove()
        assert seen == {torch.bfloat16}  # the call runs in bfloat16 ...
        for task in TASK_NAMES:  # ... and hands out float32
            assert half.latents[task].dtype == torch.float32
            assert half.predictions[task].dtype == reference.predictions[task].dtype, task
        diff = _differences(reference, half)
        print(model.kind, {k: round(v, 4) for k, v in diff.items()})
        for task, value in diff.items():
            assert value <= BF16_TOLERANCE[task], (model.kind, task, value)


def test_float16_on_the_cpu_is_refused_clearly(single, tmp_path, monkeypatch):
    from stablemtl import devices

    path = P.save_model(single, tmp_path / "single")
    monkeypatch.setattr(devices, "available_devices", lambda: ["cpu"])
    with pytest.raises(ValueError, match="float16 is not supported on the CPU.*bfloat16.*float32"):
        StableMTLPipeline.from_pretrained(path, torch_dtype=torch.float16)
    pipe = StableMTLPipeline.from_pretrained(path).to(torch.float16)  # cast afterwards: refused at the call
    with pytest.raises(ValueError, match="float16 is not supported on the CPU"):
        pipe(_images(0, n=1)[0], tasks=["depth"])


@pytest.mark.slow
@pytest.mark.parametrize("when", ["at_compile", "at_first_call"])
def test_compile_falls_back_once_with_a_message_and_the_same_outputs(single, monkeypatch, capsys, when):
    images, nxt = _images(8, n=1)
    expected = _outputs(single, images, nxt)

    def broken(fn=None, *args, **kwargs):
        if when == "at_compile":
            raise RuntimeError("no working C++ compiler")

        def first_call(*a, **k):
            raise RuntimeError("inductor: no working C++ compiler")
        return first_call

    monkeypatch.setattr(torch, "compile", broken)
    try:
        pipe = StableMTLPipeline.from_model(single, compile=True)
        _assert_same_outputs(expected, pipe(images, next_images=nxt, return_latents=True))
        _assert_same_outputs(expected, pipe(images, next_images=nxt, return_latents=True))
    finally:
        for module in (single.unet, single.frozen.vae.encoder, single.frozen.vae.decoder):
            module._compiled_call_impl = None
    printed = capsys.readouterr().out
    assert printed.count("torch.compile failed") == 1 and "running uncompiled" in printed
    assert "no working C++ compiler" in printed


@pytest.mark.slow
def test_channels_last_gives_the_same_outputs(single):
    """The same outputs up to rounding: channels-last kernels sum in another order than contiguous ones, so
    the model runs in float64 (copies), where ``rounding.network_tolerance`` holds on every machine. The tasks
    decode in float32 (``Task.decode``), from float64 decodings that round at most 1 ulp (2u) apart, with sums
    over the 3 channels (depth's mean, a normal's length) whose order follows the layout: each side within 4u
    of its exact decoding (a 3-term sum, a square root, a division), inputs 2u apart, doubled by a normal's
    normalisation: 4u + 4u + 4u <= 16u (predictions are at most 1 in magnitude). Class ids are equal wherever
    the two best classes' scores are further apart than their rounding can move them (each score 2 x_c . p_c
    - |p|^2: inputs 2u apart and 4 terms summed, 10u of its terms' magnitude, twice for two scores; 32u)."""
    from stablemtl.tasks import get_task

    images, nxt = (x.double() for x in _images(9, n=1))
    reference = copy.deepcopy(single).double()
    expected = _outputs(reference, images, nxt)
    model = copy.deepcopy(single).double()
    pipe = StableMTLPipeline.from_model(model, memory_format=torch.channels_last)
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    got = pipe(images, next_images=nxt, return_latents=True)
    f32 = torch.float32
    for task in TASK_NAMES:
        tolerance = network_tolerance(expected.latents[task], torch.float64)
        assert (got.latents[task] - expected.latents[task]).abs().max() <= tolerance, task
        if task != "semantic":
            tolerance = 16 * unit_roundoff(f32)
            assert (got.predictions[task] - expected.predictions[task]).abs().max() <= tolerance, task
    x = reference.frozen.decode(expected.latents["semantic"]).float().clamp(-1, 1).double()  # as the task decodes
    palette = get_task("semantic").palette().double()
    score = 2 * torch.einsum("bchw,kc->bkhw", x, palette) - (palette ** 2).sum(1)[None, :, None, None]
    terms = 2 * torch.einsum("bchw,kc->bkhw", x.abs(), palette.abs()) + (palette ** 2).sum(1)[None, :, None, None]
    best = score.topk(2, dim=1).values
    clear = best[:, :1] - best[:, 1:] > 32 * unit_roundoff(f32) * terms.amax(1, keepdim=True)
    assert clear.float().mean() > 0.99
    assert torch.equal(got.predictions["semantic"][clear], expected.predictions["semantic"][clear])


def test_devices_are_resolved_and_bad_ones_named(monkeypatch):
    from stablemtl import devices

    assert devices.resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(devices, "default_device", lambda: torch.device("cuda:0"))
    assert devices.resolve_device(None) == torch.device("cuda:0")  # None: the GPU when there is one
    monkeypatch.setattr(devices, "available_devices", lambda: ["cpu"])
    for bad in ("cuda", "cuda:7", "nonsense", "mps"):
        with pytest.raises(ValueError, match=f"{bad}.*available: cpu"):
            devices.resolve_device(bad)
