"""Stable Diffusion 2's tokenizer (offline, from openai-clip's BPE file), its configs at a width,
random SD2-layout bases (write_sd2_base) and parameter counts from configs alone."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from stablemtl.guard import InputError
from stablemtl.model import base as B
from stablemtl.model import sd2 as D
from stablemtl.model import streams as S
from stablemtl.model.fingerprint import weights_fingerprint
from stablemtl.tasks import TASK_NAMES, get_task

WIDTH = 0.1

# strings on which CLIP's text cleaning (ftfy, HTML unescaping, whitespace) changes nothing but the
# whitespace: SD2's tokenizer must give them exactly the ids of CLIP's own tokenizer
PLAIN = [
    "Hello, World.", "a,b;c:d?e", "#hashtag @user $5 %50 ^ * ( ) [ ] { } | ~ ` += a_b-c/d\\e",
    "3.14159, 42 and 2024-06-10", "MiXeD CaSe WoRdS", "don't it's we're I'll you've I'm he'd",
    "café naïve résumé Ångström ß straße İstanbul", "cafe\u0301 (decomposed accent)",
    "Ελληνικά κείμενο, русский текст, 日本語のテキスト", "a — b – c … d", "a   b\t\tc\n\nd",
    "  leading and trailing  ", "tab\u00a0nbsp", "emoji 😀 here 🚀", "<|endoftext|> inside", "",
    "The quick brown fox jumps over the lazy dog while five boxing wizards jump quickly; sphinx of black quartz, "
    "judge my vow. " * 3,
]
# strings CLIP's cleaning changes (HTML entities, curly quotes, a ligature, full-width letters, a
# titlecase digraph): transformers' CLIPTokenizer does not clean, so they match after that cleaning
NEEDS_CLEANING = ["fish &amp; chips", "&lt;b&gt; x &quot;q&quot; &amp;amp;", "“curly quotes” and ‘single’",
                  "ﬁne ligature", "ＦＵＬＬＷＩＤＴＨ", "ǅ titlecase"]


@pytest.fixture(scope="module")
def clip_reference():
    """openai-clip's own ``SimpleTokenizer``, loaded from its file without importing the ``clip``
    package (whose ``__init__`` imports torchvision), on the same BPE file."""
    folder = Path(list(importlib.util.find_spec("clip").submodule_search_locations)[0])
    spec = importlib.util.spec_from_file_location("_clip_simple_tokenizer", folder / "simple_tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert "clip" not in sys.modules
    return module, module.SimpleTokenizer(str(D.clip_bpe_path()))


@pytest.fixture(scope="module")
def tokenizer():
    return D.sd2_tokenizer()


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A random SD2 base at width 0.1 (seed 5), loaded."""
    folder = D.write_sd2_base(tmp_path_factory.mktemp("sd2") / "base", width=WIDTH, seed=5, progress=False)
    return folder, B.load_base(folder)


def test_tokenizer_gives_the_ids_of_clips_own_tokenizer(tokenizer, clip_reference):
    module, reference = clip_reference
    ids = lambda text: [49406] + reference.encode(text) + [49407]  # noqa: E731
    for text in [get_task(t).prompt for t in TASK_NAMES] + PLAIN:
        assert tokenizer(text).input_ids == ids(text), text
    for text in NEEDS_CLEANING:
        cleaned = module.whitespace_clean(module.basic_clean(text))
        assert tokenizer(cleaned).input_ids == ids(text), text
    # SD2's pad token is "!": transformers splits it out of any text as id 0 (CLIP: "!</w>" 256, "!!" 748)
    assert tokenizer("wow!! hello!").input_ids == [49406, ids("wow")[1], 0, 0, ids("hello")[1], 0, 49407]
    assert ids("hello!")[-2] == 256 and ids("wow!!")[-2] == 748
    # task prompts are short: BOS, 1 to 3 word pieces, EOS
    assert all(3 <= len(tokenizer(get_task(t).prompt).input_ids) <= 5 for t in TASK_NAMES)


def test_tokenizer_settings_and_files(tokenizer, tmp_path):
    assert len(tokenizer) == D.SD2_VOCAB_SIZE == 49408
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("!", 0)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token) == (49406, 49407, "<|endoftext|>")
    assert tokenizer.model_max_length == 77
    # CLIP's order: the bytes that stand for themselves ("!" .. "ÿ"), the other 68 bytes (from "Ā"), the same
    # with "</w>", then the merges ("i n" first)
    assert tokenizer.convert_ids_to_tokens([0, 187, 188, 256, 512]) == ["!", "ÿ", "Ā", "!</w>", "in"]
    folder = D.write_sd2_tokenizer(tmp_path / "tokenizer")
    assert sorted(p.name for p in folder.iterdir()) == ["merges.txt", "special_tokens_map.json",
                                                        "tokenizer_config.json", "vocab.json"]
    merges = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0] == "#version: 0.2" and len(merges) == 1 + 48894 and merges[1] == "i n"
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 49408 and vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab["in"] == 512
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    # a tokenizer_config.json naming another pad (as clip-vit-large-patch14's, "<|endoftext|>"): the map's "!" wins
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(config, pad_token="<|endoftext|>")))
    from transformers import CLIPTokenizer

    assert CLIPTokenizer.from_pretrained(folder, local_files_only=True).pad_token_id == 0


def test_missing_or_foreign_clip_package_is_named_with_the_fix(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "clip" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match=r"openai-clip.*\./setup\.sh"):
        D.sd2_tokenizer()
    monkeypatch.undo()
    monkeypatch.setattr(D, "CLIP_BPE_SHA256", "0" * 64)
    with pytest.raises(B.BaseModelError, match=r"bpe_simple_vocab_16e6\.txt\.gz: SHA-256 .* expected 0000"):
        D.clip_bpe_path()


def test_configs_scale_with_width_and_keep_sd2_at_1():
    assert D.sd2_configs(1.0) == D.SD2_CONFIGS and D.sd2_configs(1) == D.SD2_CONFIGS
    assert D.sd2_configs() is not D.SD2_CONFIGS  # a copy
    sd2 = D.SD2_CONFIGS
    for width in (0.02, 0.1, 0.3, 0.5, 0.75, 1.5):
        c = D.sd2_configs(width)
        unet, vae, text = c["unet"], c["vae"], c["text_encoder"]
        for key in ("layers_per_block", "down_block_types", "up_block_types", "sample_size", "in_channels"):
            assert unet[key] == sd2["unet"][key]
        assert text["num_hidden_layers"] == 23 and text["vocab_size"] == 49408 and text["max_position_embeddings"] == 77
        assert vae["layers_per_block"] == 2 and vae["latent_channels"] == 4 and vae["scaling_factor"] == 0.18215
        for ch, heads in zip(unet["block_out_channels"], unet["attention_head_dim"]):
            assert ch % 32 == 0 and ch % heads == 0 and (ch // heads == 64 or ch == 32)
        assert all(ch % 32 == 0 for ch in vae["block_out_channels"])
        assert text["hidden_size"] == unet["cross_attention_dim"] and text["hidden_size"] % 64 == 0
        assert text["hidden_size"] // text["num_attention_heads"] == 64
        assert list(unet["block_out_channels"]) == sorted(unet["block_out_channels"])
    assert D.sd2_configs(0.5)["unet"]["block_out_channels"] == (192, 320, 640, 640)
    for bad in (0, -0.5, float("nan"), float("inf"), "0.5", None, True):
        with pytest.raises(ValueError, match=f"width {bad!r}"):
            D.sd2_configs(bad)
        with pytest.raises(ValueError, match="width"):
            D.write_sd2_base("/nonexistent/never-written", width=bad)


def test_written_base_loads_with_the_sd2_classes_and_scaled_configs(written):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    folder, base = written
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [".stablemtl", "model_index.json", B.RANDOM_BASE_FILE, *B.COMPONENTS])
    assert sorted(p.name for p in (folder / "unet").iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert sorted(p.name for p in (folder / "text_encoder").iterdir()) == ["config.json", "model.safetensors"]
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["unet"] == ["diffusers", "UNet2DConditionModel"]
    for part, cls in [("unet", UNet2DConditionModel), ("vae", AutoencoderKL), ("text_encoder", CLIPTextModel),
                      ("tokenizer", CLIPTokenizer), ("scheduler", DDIMScheduler)]:
        assert type(getattr(base, part)) is cls, part
    configs = D.sd2_configs(WIDTH)
    for part in ("unet", "vae"):
        loaded = getattr(base, part).config
        for key, value in configs[part].items():
            assert (tuple(loaded[key]) if isinstance(value, tuple) else loaded[key]) == value, (part, key)
    text = base.text_encoder.config
    assert all(getattr(text, k) == v for k, v in configs["text_encoder"].items())
    assert (text.bos_token_id, text.eos_token_id, text.pad_token_id) == (49406, 49407, 0)
    s = base.scheduler.config
    assert (s.prediction_type, s.beta_schedule, s.beta_start, s.beta_end, s.num_train_timesteps) == (
        "v_prediction", "scaled_linear", 0.00085, 0.012, 1000)
    assert (s.clip_sample, s.set_alpha_to_one, s.steps_offset) == (False, False, 1)
    assert len(base.tokenizer) == 49408 and base.tokenizer.pad_token_id == 0
    assert "RANDOM weights" in B.describe(folder)
    # every task prompt embeds through the frozen text encoder: BOS + pieces + EOS, no padding
    frozen = S.SingleStream.from_base(base).frozen
    for task in TASK_NAMES:
        ids = base.tokenizer(get_task(task).prompt).input_ids
        emb = frozen.prompt(task)
        assert emb.shape == (len(ids), configs["text_encoder"]["hidden_size"]) and torch.isfinite(emb).all()
    prompts, mask = frozen.prompts(list(TASK_NAMES), 1, "cpu", torch.float32)
    assert prompts.shape[:2] == mask.shape == (7, 5)


def test_writing_is_seeded_atomic_and_refuses_foreign_folders(written, tmp_path):
    folder, _ = written
    again = D.write_sd2_base(tmp_path / "again", width=WIDTH, seed=5, progress=False)
    assert weights_fingerprint(again) == weights_fingerprint(folder)
    state = torch.random.get_rng_state()
    D.write_sd2_base(again, width=WIDTH, seed=6, progress=False)  # the kit's folder: replaced
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random state is untouched
    assert weights_fingerprint(again) != weights_fingerprint(folder)
    assert json.loads((again / B.RANDOM_BASE_FILE).read_text())["seed"] == 6
    assert not (tmp_path / ".again.partial").exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not written by stablemtl"):
        D.write_sd2_base(foreign, width=WIDTH, progress=False)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]


def test_parameter_counts_from_configs_equal_the_instantiated_modules(written):
    _, base = written
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    counts = D.count_parameters(WIDTH, query_hidden=64)
    single = S.SingleStream.from_base(base)
    multi = S.MultiStream.from_single_stream(single, query_hidden=64, heads=4)
    assert counts == {"unet": count(base.unet), "unet_widened": count(single.unet), "vae": count(base.vae),
                      "text_encoder": count(base.text_encoder), "task_attention": count(multi.task_attention)}
    assert count(multi.unet) + count(multi.task_attention) == sum(p.numel() for p in multi.trainable_parameters())
    # at SD2's width: the numbers tests/test_model.py checks on the instantiated UNet and task attention
    full = D.count_parameters(1.0)
    assert full["unet"] == 865_910_724 and full["unet_widened"] == 865_910_724 + 8 * 320 * 9
    assert full["task_attention"] == 390_528_320
    assert (full["vae"], full["text_encoder"]) == (83_653_863, 340_387_840)
