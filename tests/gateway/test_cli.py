"""`smartdiff generate`: the README's main command writes a playable mp4 of the requested size; bad input refused."""

import pytest
import torch
from safetensors.torch import load_file

from smartdiff.services.gateway.cli import main
from smartdiff.services.vae.video import probe_mp4


def test_generate_writes_mp4_and_latents(tmp_path, capsys):
    out, lat = tmp_path / "v.mp4", tmp_path / "lat.safetensors"
    rc = main(["generate", "--prompt", "a red fox in snow", "--width", "64", "--height", "48", "--frames", "9",
               "--steps", "3", "--seed", "7", "--out", str(out), "--save-latents", str(lat)])
    assert rc == 0
    frames, width, height, fps = probe_mp4(out)
    assert (frames, width, height, fps) == (9, 64, 48, 16)
    latents = load_file(str(lat))["latents"]
    assert latents.dtype == torch.float32 and latents.shape == (1, 16, 3, 6, 8)
    err = capsys.readouterr()
    assert "RANDOM weights" in err.err and "seed=7" in err.out
    assert "vae: 100%" in err.err and "mp4: 100%" in err.err  # a bar for the decode and one for the encode


def test_same_seed_same_latents(tmp_path):
    paths = [tmp_path / f"{i}.safetensors" for i in range(2)]
    for p in paths:
        assert main(["generate", "--prompt", "x", "--width", "32", "--height", "32", "--frames", "5", "--steps", "2",
                     "--seed", "11", "--out", str(tmp_path / "v.mp4"), "--save-latents", str(p)]) == 0
    assert torch.equal(load_file(str(paths[0]))["latents"], load_file(str(paths[1]))["latents"])


def test_cfg_batch_off_gives_the_batched_latents(tmp_path):
    paths = {c: tmp_path / f"{c}.safetensors" for c in ("on", "off")}
    for cfg_batch, p in paths.items():
        assert main(["generate", "--prompt", "x", "--width", "32", "--height", "32", "--frames", "5", "--steps", "2",
                     "--seed", "11", "--cfg-batch", cfg_batch, "--out", str(tmp_path / "v.mp4"),
                     "--save-latents", str(p)]) == 0
    on, off = (load_file(str(p))["latents"] for p in paths.values())
    torch.testing.assert_close(off, on, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("flags,field", [
    (["--width", "100"], "width"),
    (["--height", "8"], "height"),
    (["--frames", "10"], "frames"),
    (["--steps", "0"], "steps"),
    (["--guidance", "5", "3"], "guidance"),
    (["--shift", "0"], "shift"),
    (["--seed", "-1"], "seed"),
])
def test_invalid_requests_refused_before_work(tmp_path, capsys, flags, field):
    out = tmp_path / "v.mp4"
    assert main(["generate", "--prompt", "x", "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert f"invalid request: {field}:" in err
    assert not out.exists()


@pytest.mark.parametrize("flag", ["--out", "--save-latents"])
def test_an_output_path_that_cannot_be_written_is_refused_before_any_work(tmp_path, capsys, monkeypatch, flag):
    from smartdiff.services.gateway.embedded import EmbeddedDeployment

    async def no_work(*a, **kw):
        raise AssertionError("the deployment started")

    monkeypatch.setattr(EmbeddedDeployment, "start", no_work)
    (tmp_path / "a_file").write_bytes(b"")
    paths = {"--out": str(tmp_path / "v.mp4"), "--save-latents": str(tmp_path / "l.safetensors"),
             flag: str(tmp_path / "a_file" / "x")}  # its folder would be a file
    assert main(["generate", "--prompt", "x", "--out", paths["--out"], "--save-latents", paths["--save-latents"]]) == 2
    assert f"error: {flag}: cannot create the folder {tmp_path / 'a_file'}" in capsys.readouterr().err


def test_output_folders_are_created(tmp_path):
    out, lat = tmp_path / "videos" / "v.mp4", tmp_path / "latents" / "deep" / "l.safetensors"
    assert main(["generate", "--prompt", "x", "--width", "32", "--height", "32", "--frames", "5", "--steps", "1",
                 "--out", str(out), "--save-latents", str(lat)]) == 0
    assert out.stat().st_size > 0 and load_file(str(lat))["latents"].shape == (1, 16, 2, 4, 4)


@pytest.mark.parametrize("flags,words", [
    (["--timeout", "0"], "--timeout: must be finite and >= 0.001"),
    (["--timeout", "-3"], "--timeout: must be finite"),
    (["--timeout", "nan"], "--timeout: must be finite"),
    (["--timeout", "inf"], "--timeout: must be finite"),
    (["--gateway", ""], "--gateway: must be a gateway address"),
])
def test_bad_client_flags_are_refused_by_the_parser(capsys, flags, words):
    with pytest.raises(SystemExit):
        main(["generate", "--prompt", "x", *flags])
    assert words in capsys.readouterr().err


def test_unknown_sampler_refused_by_parser(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--prompt", "x", "--sampler", "ddim"])
    assert "sampler" in capsys.readouterr().err


def test_model_without_weights_needs_checkpoint(capsys):
    assert main(["generate", "--prompt", "x", "--model", "Wan2.1-T2V-14B"]) == 2
    assert "--checkpoint" in capsys.readouterr().err


def test_cache_and_attention_parameters_reach_the_denoiser(tmp_path, capsys):
    out = tmp_path / "v.mp4"
    assert main(["generate", "--prompt", "x", "--width", "32", "--height", "32", "--frames", "5", "--steps", "6",
                 "--seed", "1", "--cache", "teacache", "--cache-param", "rel_l1_threshold=5",
                 "--cache-param", "coefficients=1", "--cache-param", "coefficients=0", "--out", str(out)]) == 0
    summary = capsys.readouterr().out
    assert "cache=teacache" in summary and "cached_steps=0" not in summary  # threshold 5 with identity: skips
    assert main(["generate", "--prompt", "x", "--width", "32", "--height", "32", "--frames", "5", "--steps", "2",
                 "--attention", "sage", "--attention-param", "allow_fallback=true", "--out", str(out)]) == 0
    assert "fallback from sage" in capsys.readouterr().out


@pytest.mark.parametrize("flags,words", [
    (["--cache", "pab", "--cache-param", "bogus=1"], ["cache", "unknown field 'bogus'"]),
    (["--cache-param", "rel_l1_threshold=1"], ["--cache-param needs --cache"]),
    (["--attention-param", "sparge.topk=lots"], ["attention", "sparge.topk", "must be a number"]),
    (["--attention-param", "sparge=1"], ["attention", "sparge is a group of settings", "topk"]),
    (["--attention-param", "sparge.topk.x=1"], ["attention", "sparge.topk is a value, it has no field 'x'"]),
    (["--cache", "teacache", "--cache-param", "warmup_steps=-1"], ["cache", "warmup_steps", "does not fit"]),
    (["--cache", "teacache", "--cache-param", "rel_l1_threshold=1e40"],  # a 32-bit float would hold inf
     ["cache", "rel_l1_threshold", "does not fit this field (a 32-bit float"]),
    (["--attention", "sage"], ["attention.backend", "cannot run", "allow_fallback"]),
    (["--attention-param", "sparge.topk=0.5"], ["attention", "--attention-param needs --attention"]),
    (["--cache", "none", "--cache-param", "rel_l1_threshold=1"], ["--cache-param needs --cache", "not none"]),
    (["--attention", "sparge", "--attention-param", "sparge.topk=0.5", "--attention-param", "sparge.topk=0.2"],
     ["attention", "sparge.topk is set twice"]),
])
def test_bad_attention_and_cache_parameters_are_refused(tmp_path, capsys, flags, words):
    assert main(["generate", "--prompt", "x", "--width", "32", "--height", "32", "--frames", "5", "--steps", "2",
                 "--out", str(tmp_path / "v.mp4"), *flags]) == 2
    err = capsys.readouterr().err
    for w in words:
        assert w in err, err


def test_a_prompt_that_is_not_utf8_is_refused(tmp_path, capsys):
    """Command-line bytes that are not UTF-8 reach Python as lone surrogates, which no protobuf string holds."""
    bad = b"fox\xff".decode("utf-8", "surrogateescape")
    assert main(["generate", "--prompt", bad, "--out", str(tmp_path / "v.mp4")]) == 2
    assert "invalid request: prompt: must be valid Unicode text; character 3 is an unpaired surrogate" in \
        capsys.readouterr().err
    assert main(["generate", "--prompt", "x", "--negative-prompt", bad, "--out", str(tmp_path / "v.mp4")]) == 2
    assert "negative_prompt: must be valid Unicode text" in capsys.readouterr().err


def test_no_random_weights_note_when_the_weights_come_from_a_checkpoint(diffusers_dir, tmp_path, capsys):
    assert main(["generate", "--prompt", "x", "--model", "wan-tiny", "--checkpoint", str(diffusers_dir), "--width", "32",
                 "--height", "32", "--frames", "5", "--steps", "2", "--out", str(tmp_path / "v.mp4")]) == 0
    assert "RANDOM" not in capsys.readouterr().err


def test_a_prompt_past_the_token_limit_is_reported_cut(tmp_path, capsys):
    """The text encoder keeps the first 512 tokens; the user is told, not left with a video of half a prompt."""
    long = " ".join(["cat"] * 600)
    assert main(["generate", "--prompt", long, "--width", "32", "--height", "32", "--frames", "5", "--steps", "2",
                 "--guidance", "5", "--negative-prompt", "blurry", "--out", str(tmp_path / "v.mp4")]) == 0
    err = capsys.readouterr().err
    assert "warning: the prompt was cut to the text encoder's token limit" in err and "negative prompt was" not in err


def test_a_drawn_seed_is_printed_before_the_work_starts(tmp_path, capsys, monkeypatch):
    from smartdiff.services.gateway import embedded

    async def fail(*args, **kwargs):
        raise RuntimeError("the deployment failed to start")

    monkeypatch.setattr(embedded.EmbeddedDeployment, "start", fail)
    with pytest.raises(RuntimeError):
        main(["generate", "--prompt", "x", "--width", "32", "--height", "32", "--frames", "5", "--out",
              str(tmp_path / "v.mp4")])
    assert capsys.readouterr().err.count("seed: ") == 1  # kept, although nothing was generated
