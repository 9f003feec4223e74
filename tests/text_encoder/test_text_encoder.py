"""Text encoder engine vs diffusers' WanPipeline prompt encoding, both checkpoint layouts, errors, tiny tokenizer."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, UMT5EncoderModel

from smartdiff.services.text_encoder.engine import TextEncoderEngine, clean_prompt
from smartdiff.services.text_encoder.tokenizer import build_tiny_tokenizer
from smartdiff.services.text_encoder.weights import hf_to_wan, umt5_config
from smartdiff.shared.checkpoint import WAN_T5_FILE, CheckpointError
from smartdiff.shared.config import load_model_config

CONFIG = dataclasses.replace(load_model_config("wan-tiny").text_encoder, text_len=16)
PROMPTS = [
    "A cat   walking\ton the\n beach ,  cinematic",
    "  Tom &amp;amp; Jerry &lt;3 at night  ",
    "The cafÃ© is open; a dog runs\x1cfast",  # mojibake (fixed by ftfy) and a U+001C separator
    "",
    "a very long prompt with many words that goes far beyond sixteen tokens of the tiny text length",
]


@pytest.fixture(scope="module")
def te_dir(tmp_path_factory):
    """A Diffusers-style folder: tokenizer/ and text_encoder/ (tiny UMT5EncoderModel, random weights)."""
    root = tmp_path_factory.mktemp("wan_diffusers")
    torch.manual_seed(0)
    model = UMT5EncoderModel(umt5_config(CONFIG)).eval()
    with torch.no_grad():  # perturb everything so that norms / biases are not at their trivial init
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(root / "text_encoder")
    build_tiny_tokenizer(CONFIG.vocab_size).save_pretrained(root / "tokenizer")
    return root


def _engine(root, **kw):
    return TextEncoderEngine.from_checkpoint("diffusers", root / "text_encoder", root / "tokenizer",
                                             CONFIG, "cpu", torch.float32, **kw)


def test_encode_matches_diffusers_wan_pipeline(te_dir):
    from diffusers import WanPipeline

    pipe = WanPipeline(
        tokenizer=AutoTokenizer.from_pretrained(te_dir / "tokenizer"),
        text_encoder=UMT5EncoderModel.from_pretrained(te_dir / "text_encoder").eval(),
        vae=None,
        scheduler=None,
    )
    with torch.no_grad():
        ref = pipe._get_t5_prompt_embeds(PROMPTS, max_sequence_length=CONFIG.text_len,
                                         device=torch.device("cpu"), dtype=torch.float32)
    ours = _engine(te_dir).encode(PROMPTS)

    assert len(ours) == len(PROMPTS)
    assert [t.shape[0] for t in ours][3:] == [1, CONFIG.text_len]  # "" is just </s>; the long one is truncated
    for got, want in zip(ours, ref):
        n = got.shape[0]
        assert got.shape == (n, CONFIG.dim) and got.dtype == torch.float32
        assert torch.all(want[n:] == 0)  # diffusers re-pads with zeros after the real tokens
        err = (got - want[:n]).norm() / want[:n].norm()
        assert err <= 1e-5, f"relative error {err:.2e}"


def test_prompt_cleaning():
    assert clean_prompt("  Tom &amp;amp; Jerry\n\t rock  ") == "Tom & Jerry rock"
    assert clean_prompt("cafÃ©") == "café"


@pytest.mark.parametrize("embed_keys", [("shared.weight",), ("encoder.embed_tokens.weight",),
                                        ("shared.weight", "encoder.embed_tokens.weight")])
def test_wan_pth_and_diffusers_folder_load_the_same(te_dir, tmp_path, embed_keys):
    saved = load_file(str(te_dir / "text_encoder" / "model.safetensors"))
    table = saved.pop("shared.weight", None)
    table = saved.pop("encoder.embed_tokens.weight", table)
    folder = tmp_path / "text_encoder"  # the tied table under one or both names, as different writers do
    folder.mkdir()
    (folder / "config.json").write_bytes((te_dir / "text_encoder" / "config.json").read_bytes())
    save_file({**saved, **{k: table.clone() for k in embed_keys}}, str(folder / "model.safetensors"))

    wan_sd = hf_to_wan(load_file(str(folder / "model.safetensors")))
    expected = {"token_embedding.weight", "norm.weight"} | {
        f"blocks.{i}.{name}.weight" for i in range(CONFIG.num_layers) for name in (
            "norm1", "attn.q", "attn.k", "attn.v", "attn.o", "pos_embedding.embedding",
            "norm2", "ffn.gate.0", "ffn.fc1", "ffn.fc2")
    }
    assert set(wan_sd) == expected
    torch.save(wan_sd, tmp_path / WAN_T5_FILE)

    wan = TextEncoderEngine.from_checkpoint("wan", tmp_path / WAN_T5_FILE, te_dir / "tokenizer",
                                            CONFIG, "cpu", torch.float32)
    hf = TextEncoderEngine.from_checkpoint("diffusers", folder, te_dir / "tokenizer", CONFIG, "cpu", torch.float32)
    a, b = wan.model.state_dict(), hf.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(b["encoder.embed_tokens.weight"], table)
    for engine in (wan, hf):  # tied: one Parameter, one copy
        assert engine.model.encoder.embed_tokens.weight is engine.model.shared.weight
    for x, y in zip(wan.encode(PROMPTS), hf.encode(PROMPTS)):
        assert torch.equal(x, y)


def test_wan_ffn_names_keep_wan_semantics(te_dir):
    """Wan's FFN is fc2(fc1(x) * gelu_tanh(gate.0(x))): check the renamed weights compute exactly that."""
    engine = TextEncoderEngine.from_checkpoint("diffusers", te_dir / "text_encoder", te_dir / "tokenizer",
                                               CONFIG, "cpu", torch.float32)
    w = hf_to_wan(engine.model.state_dict())
    x = torch.randn(5, CONFIG.dim)
    gate = torch.nn.functional.gelu(x @ w["blocks.1.ffn.gate.0.weight"].T, approximate="tanh")
    want = (x @ w["blocks.1.ffn.fc1.weight"].T * gate) @ w["blocks.1.ffn.fc2.weight"].T
    got = engine.model.encoder.block[1].layer[1].DenseReluDense(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_missing_key_and_wrong_shape_name_file_and_key(te_dir, tmp_path):
    wan_sd = hf_to_wan(UMT5EncoderModel.from_pretrained(te_dir / "text_encoder").state_dict())
    del wan_sd["blocks.1.attn.k.weight"]
    path = tmp_path / WAN_T5_FILE
    torch.save(wan_sd, path)
    with pytest.raises(CheckpointError, match=r"(?s)models_t5_umt5.*missing keys: encoder\.block\.1\.layer\.0\."
                                              r"SelfAttention\.k\.weight"):
        TextEncoderEngine.from_checkpoint("wan", path, te_dir / "tokenizer", CONFIG, "cpu", torch.float32)

    bad = tmp_path / "bad"
    (bad / "text_encoder").mkdir(parents=True)
    (bad / "text_encoder" / "config.json").write_bytes((te_dir / "text_encoder" / "config.json").read_bytes())
    sd = load_file(str(te_dir / "text_encoder" / "model.safetensors"))
    sd["encoder.final_layer_norm.weight"] = torch.ones(CONFIG.dim + 1)
    save_file(sd, str(bad / "text_encoder" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*encoder\.final_layer_norm\.weight: checkpoint"):
        TextEncoderEngine.from_checkpoint("diffusers", bad / "text_encoder", te_dir / "tokenizer",
                                          CONFIG, "cpu", torch.float32)

    with pytest.raises(CheckpointError, match=r"config\.json: text_encoder\.num_layers is 2"):
        TextEncoderEngine.from_checkpoint("diffusers", te_dir / "text_encoder", te_dir / "tokenizer",
                                          dataclasses.replace(CONFIG, num_layers=3), "cpu", torch.float32)

    no_field = tmp_path / "no_field"
    no_field.mkdir()
    config = json.loads((te_dir / "text_encoder" / "config.json").read_text())
    del config["d_kv"]
    (no_field / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"no_field/config\.json: missing field 'd_kv'"):
        TextEncoderEngine.from_checkpoint("diffusers", no_field, te_dir / "tokenizer", CONFIG, "cpu", torch.float32)

    sd["encoder.final_layer_norm.weight"] = torch.ones(CONFIG.dim)
    sd["encoder.embed_tokens.weight"] = sd["shared.weight"] + 1
    save_file(sd, str(bad / "text_encoder" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tied embeddings .* differ"):
        TextEncoderEngine.from_checkpoint("diffusers", bad / "text_encoder", te_dir / "tokenizer",
                                          CONFIG, "cpu", torch.float32)


def test_tiny_tokenizer_is_deterministic_and_round_trips(tmp_path):
    text = [clean_prompt(p) for p in PROMPTS]
    a, b = build_tiny_tokenizer(512), build_tiny_tokenizer(512)
    assert len(a) == 512 and len(build_tiny_tokenizer(300)) == 300
    assert a(text).input_ids == b(text).input_ids
    assert a.convert_ids_to_tokens([0, 1, 2]) == ["<pad>", "</s>", "<unk>"]
    ids = a("a cat on the beach").input_ids
    assert ids[-1] == 1 and 2 not in ids  # </s> appended; ASCII words need no <unk>
    a.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    kw = dict(padding="max_length", max_length=16, truncation=True)
    assert loaded(text, **kw).input_ids == a(text, **kw).input_ids
    assert loaded.decode(ids, skip_special_tokens=True) == "a cat on the beach"


def test_random_engine_is_deterministic():
    e1, e2 = TextEncoderEngine.random(CONFIG, seed=3), TextEncoderEngine.random(CONFIG, seed=3)
    out1, out2 = e1.encode(["a dog", "a red car on the street"]), e2.encode(["a dog", "a red car on the street"])
    assert [t.shape for t in out1] == [(3, CONFIG.dim), (7, CONFIG.dim)]
    assert all(torch.equal(x, y) for x, y in zip(out1, out2))
    assert e1.encode([]) == []
    low = TextEncoderEngine.random(CONFIG, dtype=torch.bfloat16, seed=3).encode(["a dog"])[0]
    assert low.dtype == torch.bfloat16 and torch.allclose(low.float(), out1[0], rtol=0.1, atol=0.1)
    half = TextEncoderEngine.random(CONFIG, dtype=torch.float16, seed=3)
    assert half.model.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32  # as transformers
    assert half.encode(["a dog"])[0].dtype == torch.float16


def test_token_counts_are_before_truncation():
    """A prompt of exactly text_len tokens (with </s>) fits; one more token is truncated (the service's
    truncated_prompts comes from these counts)."""
    engine = TextEncoderEngine.random(CONFIG, seed=3)
    fits, over = " ".join(["cat"] * (CONFIG.text_len - 1)), " ".join(["cat"] * CONFIG.text_len)
    assert engine.token_counts([fits, over, ""]) == [CONFIG.text_len, CONFIG.text_len + 1, 1]
    assert [t.shape[0] for t in engine.encode([fits, over])] == [CONFIG.text_len, CONFIG.text_len]


@pytest.mark.skipif(torch.cuda.is_available(), reason="proves no CUDA call on a machine without CUDA")
def test_the_service_at_level_2_never_touches_the_gpu():
    """At --low-mem-level 2 the encoder runs on the CPU and the service sends from the host: the embeddings made no
    round trip through the GPU (it started a CUDA context and held GPU memory in the text encoder's process)."""
    import asyncio
    import types

    from smartdiff.services.text_encoder.engine import TextEncoderEngine
    from smartdiff.services.text_encoder.server import TextEncoderServicer
    from smartdiff.shared.config import load_model_config
    from smartdiff.shared.worker import StageWorker
    from smartdiff.text_encoder.v1 import text_encoder_pb2

    model = load_model_config("wan-tiny")
    engine = TextEncoderEngine.random(model.text_encoder, "cuda", torch.float32, seed=0, low_mem_level=2)
    servicer = TextEncoderServicer(model, engine, StageWorker("text_encoder"))

    async def main():
        request = text_encoder_pb2.EncodeRequest(prompts=["a fox"])
        return [m async for m in servicer.Encode(request, types.SimpleNamespace(time_remaining=lambda: None))]

    out = asyncio.run(main())
    assert out[-1].summary.token_counts[0] > 0 and out[-1].summary.device == "cpu"
