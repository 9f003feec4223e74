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
