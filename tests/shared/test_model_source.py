"""A checkpoint folder's config files with the wrong shape are a CheckpointError naming the file, the field and the
rule (the stage exits 2 with that line), never a Python error from deep in the loader."""

import json
import shutil

import pytest

from smartdiff.shared.checkpoint import CheckpointError
from smartdiff.shared.model_source import resolve_model


def damaged(diffusers_dir, tmp_path, rel: str, change) -> str:
    root = tmp_path / "ckpt"
    shutil.copytree(diffusers_dir, root)
    path = root / rel
    data = json.loads(path.read_text())
    path.write_text(json.dumps(change(data)))
    return root


@pytest.mark.parametrize("rel,change,words", [
    ("transformer/config.json", lambda c: [], "transformer/config.json: must hold a JSON object, got list"),
    ("transformer/config.json", lambda c: {**c, "num_attention_heads": "x"},
     "field 'num_attention_heads' must be an integer >= 1, got 'x'"),
    ("transformer/config.json", lambda c: {**c, "num_layers": 0}, "field 'num_layers' must be an integer >= 1"),
    ("transformer/config.json", lambda c: {**c, "patch_size": [1, 2]}, "field 'patch_size' must be 3 integers"),
    ("transformer/config.json", lambda c: {**c, "eps": "small"}, "field 'eps' must be a number"),
    ("vae/config.json", lambda c: {**c, "dim_mult": 4}, "vae/config.json: field 'dim_mult' must be a list of integers"),
    ("vae/config.json", lambda c: {**c, "temperal_downsample": [0, 1, 1]},
     "field 'temperal_downsample' must be a list of true / false"),
    ("vae/config.json", lambda c: {**c, "latents_std": ["a"] * 16}, "field 'latents_std' must be a list of numbers"),
    ("text_encoder/config.json", lambda c: {**c, "num_heads": "4"},
     "text_encoder/config.json: field 'num_heads' must be an integer >= 1, got '4'"),
    ("scheduler/scheduler_config.json", lambda c: {**c, "flow_shift": "3"}, "field 'flow_shift' must be a number"),
])
def test_config_fields_of_the_wrong_type_name_the_file_and_the_field(diffusers_dir, tmp_path, rel, change, words):
    with pytest.raises(CheckpointError) as err:
        resolve_model(None, damaged(diffusers_dir, tmp_path, rel, change))
    assert words in str(err.value)


def test_the_undamaged_folder_loads(diffusers_dir):
    cfg, layout = resolve_model(None, diffusers_dir)
    assert layout.kind == "diffusers" and cfg.dit.num_layers >= 1


def test_null_optional_fields_take_their_defaults(diffusers_moe_dir, tmp_path):
    """Diffusers writes unset optional arguments as null (WanPipeline's boundary_ratio=None); the missing
    patch_size is the tuple default (the config stays hashable)."""
    root = damaged(diffusers_moe_dir, tmp_path, "model_index.json", lambda c: {**c, "boundary_ratio": None})
    t = root / "transformer" / "config.json"
    t.write_text(json.dumps({k: v for k, v in json.loads(t.read_text()).items() if k != "patch_size"}))
    cfg, _ = resolve_model(None, root)
    assert cfg.boundary == 0.875 and cfg.dit.patch_size == (1, 2, 2)
    hash(cfg.dit)


# ------------------------------------------------------------------ half-downloaded and mixed-up folders
def copy_of(folder, tmp_path):
    root = tmp_path / "ckpt"
    shutil.copytree(folder, root, symlinks=True)
    return root


def refused(root, *words):
    with pytest.raises(CheckpointError) as err:
        resolve_model(None, root)
    for w in words:
        assert w in str(err.value), str(err.value)


def test_a_wan22_diffusers_folder_without_its_second_expert_is_refused_not_served_as_wan21(diffusers_moe_dir,
                                                                                         tmp_path):
    root = copy_of(diffusers_moe_dir, tmp_path)
    shutil.rmtree(root / "transformer_2")
    refused(root, "missing folders ['transformer_2']", "model_index.json")


@pytest.mark.parametrize("damage,words", [
    (lambda p: p.write_bytes(b""), ["Wan2.1_VAE.pth", "is empty"]),
    (lambda p: p.write_bytes(b"\x80\x02legacy pickle"), ["Wan2.1_VAE.pth", "not a zip archive"]),
    (lambda p: (p.unlink(), p.symlink_to(p.parent / "blobs" / "gone")), ["broken symbolic link", "blobs/gone"]),
])
def test_a_damaged_vae_file_is_refused_before_any_stage_loads(wan_dir, tmp_path, damage, words):
    root = copy_of(wan_dir, tmp_path)
    damage(root / "Wan2.1_VAE.pth")
    refused(root, *words)


def test_a_truncated_transformer_file_is_refused_at_once(diffusers_dir, tmp_path):
    root = copy_of(diffusers_dir, tmp_path)
    path = root / "transformer" / "diffusion_pytorch_model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    refused(root, "diffusion_pytorch_model.safetensors", "truncated or not safetensors")


def sharded(diffusers_dir, tmp_path):
    """The tiny transformer split in two shards with an index, as large checkpoints are."""
    from safetensors.torch import load_file, save_file

    root = copy_of(diffusers_dir, tmp_path)
    folder = root / "transformer"
    sd = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    keys = sorted(sd)
    parts = {f"diffusion_pytorch_model-0000{i + 1}-of-00002.safetensors": keys[i::2] for i in range(2)}
    for name, part in parts.items():
        save_file({k: sd[k] for k in part}, str(folder / name))
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: name for name, part in parts.items() for k in part}}))
    return folder, parts, sd


def test_a_sharded_checkpoint_is_read_key_by_key_from_its_index(diffusers_dir, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from smartdiff.shared.checkpoint import read_state_dict

    folder, parts, sd = sharded(diffusers_dir, tmp_path)
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    got = read_state_dict(index)
    assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd)
    first, second = list(parts)
    stale = parts[first][0]  # a stale zero copy of one of shard 1's tensors left in shard 2
    save_file({**load_file(str(folder / second)), stale: torch.zeros_like(sd[stale])}, str(folder / second))
    with pytest.raises(CheckpointError, match=f"{second} does not match .*holds {stale}"):
        read_state_dict(index)
    (folder / second).unlink()
    refused(folder.parent, f"lists shard {second}, which is missing")


def test_one_tensor_under_two_names_is_refused():
    import torch

    from smartdiff.shared.checkpoint import rename_keys

    sd = {"blocks.0.attn1.to_q.weight": torch.zeros(1), "blocks.0.self_attn.q.weight": torch.ones(1)}
    with pytest.raises(CheckpointError, match="which both load as 'blocks.0.self_attn.q.weight'"):
        rename_keys(sd, lambda k: k.replace("attn1.to_q", "self_attn.q"))


def test_weights_loaded_to_the_cpu_are_copies_not_views_of_the_file(tmp_path):
    """A CPU parameter left as a view of the memory-mapped checkpoint dies with SIGBUS when the file is rewritten
    in place (a re-download, rsync --inplace) while the stage serves."""
    import torch
    from safetensors.torch import load_file, save_file

    from smartdiff.shared.checkpoint import load_strict

    save_file({"weight": torch.randn(4, 4), "bias": torch.randn(4)}, str(tmp_path / "w.safetensors"))
    sd = load_file(str(tmp_path / "w.safetensors"))
    with torch.device("meta"):
        module = torch.nn.Linear(4, 4)
    load_strict(module, sd, "w.safetensors", "cpu", torch.float32)
    assert torch.equal(module.weight, sd["weight"]) and module.weight.data_ptr() != sd["weight"].data_ptr()


def test_an_image_to_video_transformer_is_refused_naming_the_field(diffusers_dir, tmp_path):
    root = damaged(diffusers_dir, tmp_path, "transformer/config.json", lambda c: {**c, "in_channels": 36})
    refused(root, "in_channels 36", "image-to-video")


def test_a_model_name_given_as_the_checkpoint_and_a_folder_given_as_the_model_get_a_hint(diffusers_dir, monkeypatch,
                                                                                         tmp_path):
    from smartdiff.shared.config import ConfigError

    monkeypatch.chdir(tmp_path)
    refused("Wan2.1-T2V-1.3B", "checkpoint folder not found", "is a model name: pass it with --model")
    with pytest.raises(ConfigError, match="it is a folder: pass a checkpoint folder with --checkpoint"):
        resolve_model(str(diffusers_dir), None)


def test_an_index_listing_a_tied_alias_the_shard_stores_once_still_loads(diffusers_dir, tmp_path):
    """Hugging Face indexes of T5 models list the tied embedding under both names while the shard holds it once;
    the strict load (after the text encoder ties it) decides, not the index walk."""
    from smartdiff.shared.checkpoint import read_state_dict

    folder, parts, sd = sharded(diffusers_dir, tmp_path)
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["an.alias.weight"] = next(iter(parts))
    index.write_text(json.dumps(data))
    assert set(read_state_dict(index)) == set(sd)


def test_a_component_diffusers_marks_absent_is_not_required(diffusers_dir, tmp_path):
    root = damaged(diffusers_dir, tmp_path, "model_index.json",
                   lambda c: {**c, "transformer_2": [None, "WanTransformer3DModel"], "image_encoder": [None, None]})
    assert resolve_model(None, root)[1].num_experts == 1


def test_a_tensor_under_two_names_is_converted_once():
    """umT5's tied embedding (2 GiB in bf16) passes as one tensor under two names: one copy, shared."""
    import torch

    from smartdiff.shared.checkpoint import load_strict

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Embedding(8, 4), torch.nn.Embedding(8, 4)

    table = torch.randn(8, 4)
    with torch.device("meta"):
        module = Tied()
    load_strict(module, {"a.weight": table, "b.weight": table}, "tied", "cpu", torch.bfloat16)
    assert module.a.weight.data_ptr() == module.b.weight.data_ptr() != table.data_ptr()
