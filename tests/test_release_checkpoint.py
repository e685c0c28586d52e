"""Released StableMTL checkpoints: the key mapping, the conversion round trip, the full-size key set."""

import hashlib
import json

import pytest
import torch
import yaml

from stablemtl import cli
from stablemtl.model import release as R
from stablemtl.model import streams as S
from stablemtl.model.pipeline import StableMTLPipeline, read_model_index
from stablemtl.model.sd2 import SD2_CONFIGS

RELEASE_ORDER = ["normal", "depth", "semantic", "optical_flow", "scene_flow", "albedo", "shading"]  # multi config
BLOCKS_2D = {v: k for k, v in R.BLOCKS_3D.items()}


def _release_run(model, run, child=None, **trainer):
    """A run folder as the release writes it for ``model`` (its state dict under the release's names)."""
    (run / "checkpoint/latest/unet").mkdir(parents=True)
    multi = model.kind == "multi_stream"
    state = R.kit_to_release(model.unet.state_dict(), model.task_attention.state_dict() if multi else None,
                             S.attention_sites(model.unet))
    torch.save(state, run / R.WEIGHTS)
    config = {**dict(model.unet.config), "_class_name": "UNet3DConditionModel", "_diffusers_version": "0.25.0"}
    for field in ("down_block_types", "up_block_types"):
        config[field] = [BLOCKS_2D.get(b, b) for b in config[field]]
    config["mid_block_type"] = "UNetMidBlock3DCrossAttn"
    (run / R.UNET_CONFIG).write_text(json.dumps(config, default=str))
    (run / "checkpoint/latest/iter_000042").touch()
    settings = {"output_types": list(model.tasks)}
    if multi:
        settings.update(unet_weight_path="./checkpoints/single_stream_unet.pth", n_attns=4, attn_mask_ratio=0.4,
                        apply_task_attn_to_layers="all", exclude_mainstream_output_type=True,
                        return_feature="afterSelfAttn_residual")
        torch.save(model.aux_unet.state_dict(), child)
    settings.update(trainer)
    config_yaml = {"trainer": settings, "pipeline": {"kwargs": {"input_noise": "deterministic"}}}
    (run / "config.yaml").write_text(yaml.safe_dump(config_yaml))
    return run


@pytest.fixture(scope="module")
def models(tiny_base):
    torch.manual_seed(0)
    single = S.SingleStream.from_base(tiny_base, RELEASE_ORDER).eval()
    with torch.no_grad():
        for p in single.unet.parameters():  # away from the base: a trained single stream
            p.add_(0.01 * torch.randn_like(p))
    multi = S.MultiStream.from_single_stream(single, query_hidden=32).eval()
    with torch.no_grad():
        for p in list(multi.task_attention.parameters()) + list(multi.unet.parameters()):
            p.add_(0.05 * torch.randn_like(p))  # every tensor its own values: a swapped pair would show
    return {"single_stream": single, "multi_stream": multi}


def _images():
    g = torch.Generator().manual_seed(4)
    return torch.rand(1, 3, 32, 48, generator=g), torch.rand(1, 3, 32, 48, generator=g)


@pytest.mark.parametrize("kind", ["single_stream", "multi_stream"])
def test_a_release_run_converts_bit_for_bit(models, tiny_base_dir, tmp_path, kind):
    model = models[kind]
    run = _release_run(model, tmp_path / "run", tmp_path / "single_stream_unet.pth")
    saved = torch.load(run / R.WEIGHTS, weights_only=True)
    if kind == "multi_stream":  # the release's names, 24 per site and task-attention block as in its file
        site = next(iter(S.attention_sites(model.unet)))
        per_site = [k for k in saved if k.startswith(f"{site}.task_")]
        assert len(per_site) == 22 * len(model.tasks) and any(".task_to_q.depth.net.6.bias" in k for k in saved)
    unet, ta = R.release_to_kit(saved)  # the rule and its inverse
    assert R.kit_to_release(unet, ta, S.attention_sites(model.unet)).keys() == saved.keys()
    out = R.convert(run, tmp_path / "converted", base=tiny_base_dir,
                    child=tmp_path / "single_stream_unet.pth" if kind == "multi_stream" else None)
    record = json.loads((out / "release.json").read_text())
    assert record["iteration"] == 42 and record["kind"] == kind and record["tasks"] == RELEASE_ORDER
    pipe = StableMTLPipeline.from_pretrained(out)
    got = pipe.model
    assert got.kind == kind and got.tasks == RELEASE_ORDER and got.normals == "as_stored"
    pairs = [(model.unet, got.unet)]
    if kind == "multi_stream":
        pairs += [(model.aux_unet, got.aux_unet), (model.task_attention, got.task_attention)]
        assert got.settings == {"query_hidden": 32, "heads": 4, "mask_prob": 0.4}
    for a, b in pairs:
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    images, nxt = _images()
    ref = StableMTLPipeline.from_model(model)(images, next_images=nxt, return_latents=True)
    new = pipe(images, next_images=nxt, return_latents=True)
    for task in RELEASE_ORDER:
        assert torch.equal(ref.latents[task], new.latents[task]), task


def test_a_folder_that_is_not_a_release_run_says_what_is_wrong(models, tiny_base_dir, tmp_path):
    single, multi = models["single_stream"], models["multi_stream"]
    with pytest.raises(R.ReleaseFormatError, match="config.yaml.*missing"):
        (tmp_path / "empty").mkdir()
        R.convert(tmp_path / "empty", tmp_path / "out", base=tiny_base_dir)
    run = _release_run(single, tmp_path / "single")
    state = torch.load(run / R.WEIGHTS, weights_only=True)
    extra = dict(state, **{"mid_block.extra.weight": torch.zeros(1)})
    torch.save(extra, run / R.WEIGHTS)
    with pytest.raises(R.ReleaseFormatError, match=r"1 key\(s\) unused \['mid_block.extra.weight'\]"):
        R.convert(run, tmp_path / "out", base=tiny_base_dir)
    torch.save({k: v for k, v in state.items() if k != "conv_out.bias"}, run / R.WEIGHTS)
    with pytest.raises(R.ReleaseFormatError, match=r"1 kit parameter\(s\) not filled \['conv_out.bias'\]"):
        R.convert(run, tmp_path / "out", base=tiny_base_dir)
    torch.save({"conv_out.bias": 3}, run / R.WEIGHTS)
    with pytest.raises(R.ReleaseFormatError, match="not hold a flat state dict of tensors"):
        R.convert(run, tmp_path / "out", base=tiny_base_dir)
    (run / R.WEIGHTS).write_bytes(b"not a checkpoint")
    with pytest.raises(R.ReleaseFormatError, match="diffusion_pytorch_model.bin is not a readable weights file"):
        R.convert(run, tmp_path / "out", base=tiny_base_dir)
    (run / R.WEIGHTS).unlink()
    with pytest.raises(R.ReleaseFormatError, match="diffusion_pytorch_model.bin missing"):
        R.read_run(run)
    run = _release_run(multi, tmp_path / "multi", tmp_path / "child.pth")
    with pytest.raises(R.ReleaseFormatError, match="single_stream_unet.pth.*--child"):
        R.convert(run, tmp_path / "out", base=tiny_base_dir)
    dec = _release_run(multi, tmp_path / "dec", tmp_path / "child.pth", apply_task_attn_to_layers="dec")
    with pytest.raises(R.ReleaseFormatError, match="apply_task_attn_to_layers is 'dec'"):
        R.read_run(dec)
    assert not (tmp_path / "out").exists()  # nothing half written
    # the command line: a clear message and status 2, then a conversion
    parser = cli.build_parser()
    args = parser.parse_args(["convert-release", str(run), str(tmp_path / "cli"), "--base", str(tiny_base_dir)])
    assert args.func(args) == 2
    args = parser.parse_args(["convert-release", str(run), str(tmp_path / "cli"), "--base", str(tiny_base_dir),
                              "--child", str(tmp_path / "child.pth")])
    assert args.func(args) == 0 and read_model_index(tmp_path / "cli")["kind"] == "multi_stream"


# the release's UNets at the SD2 config (every key and shape, built by the release's own code):
# sha256 of the sorted "key shape" lines (shape as 320x12x3x3), the tensor count and the values
RELEASE_KEYS = {
    "single_stream": ("bbd7f3daf6192b6d966e7a8d84336d727f395792970c6efa783c5c2702fee0dc", 686, 865_933_764),
    "multi_stream": ("8d2f9901bbda67efec173a52d297301e0e34858964bc3c72aaae9773654ebcf2", 3182, 1_256_462_084),
}


def test_the_full_size_key_sets_are_the_releases():
    """The kit's SD2-size models, built on the meta device, map onto exactly the release's keys and shapes."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**{**SD2_CONFIGS["unet"], "in_channels": 12})
        sites = S.attention_sites(unet)
        task_attention = S.TaskAttentionSites(list(sites.items()), RELEASE_ORDER, 640, 4)
    for kind, (digest, count, values) in RELEASE_KEYS.items():
        ta = task_attention.state_dict() if kind == "multi_stream" else None
        state = R.kit_to_release(unet.state_dict(), ta, sites)
        lines = sorted(f"{k} {'x'.join(map(str, v.shape))}" for k, v in state.items())
        assert len(state) == count and sum(v.numel() for v in state.values()) == values, kind
        assert hashlib.sha256("\n".join(lines).encode()).hexdigest() == digest, kind
        back_unet, back_ta = R.release_to_kit(state)
        assert back_unet.keys() == unet.state_dict().keys() and back_ta.keys() == (ta or {}).keys()
