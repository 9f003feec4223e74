"""Text encoder engine (no gRPC): clean and tokenise prompts, run the umT5 encoder, return per-prompt embeddings."""

from __future__ import annotations

import html
import re
from pathlib import Path

import ftfy
import torch
from transformers import PreTrainedTokenizerBase, UMT5EncoderModel

from smartdiff.shared.checkpoint import CheckpointError, load_strict, materialize_random
from smartdiff.shared.config import TextEncoderConfig
from smartdiff.shared.memory import MemoryPolicy

from .tokenizer import build_tiny_tokenizer, load_tokenizer
from .weights import EMBED_KEYS, read_text_encoder, umt5_config

# Wan collapses `\s+` with the `regex` module, whose \s excludes U+001C..U+001F (stdlib `re` includes them).
_WHITESPACE = re.compile(r"[^\S\x1c-\x1f]+")


def clean_prompt(text: str) -> str:
    """Wan's prompt cleaning: fix mojibake, unescape HTML twice, collapse whitespace."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return _WHITESPACE.sub(" ", text).strip()


def _keep_fp32(dtype: torch.dtype) -> tuple[str, ...]:
    # As transformers does for UMT5 in float16 (not bfloat16): the FFN output projection stays float32.
    return ("DenseReluDense.wo",) if dtype == torch.float16 else ()


def build_model(config: TextEncoderConfig) -> UMT5EncoderModel:
    """An empty UMT5EncoderModel on the meta device, to be filled by `load_strict` / `materialize_random`."""
    with torch.device("meta"):
        return UMT5EncoderModel(umt5_config(config))


def _model_device(device: torch.device | str, low_mem_level: int | MemoryPolicy) -> torch.device:
    """Where the encoder runs: the CPU from low_mem_level 2, else `device` (the level is checked here)."""
    memory = MemoryPolicy.resolve(low_mem_level, device, "text_encoder")
    return torch.device("cpu") if memory.text_encoder_on_cpu else torch.device(device)


def _retie(model: UMT5EncoderModel) -> UMT5EncoderModel:
    # Loading assigns one Parameter per state-dict name; make the encoder's table *be* `shared` again.
    model.encoder.embed_tokens.weight = model.shared.weight
    return model


class TextEncoderEngine:
    """umT5 encoder + tokenizer: `encode(prompts)` -> one [L_i, dim] tensor per prompt, padding trimmed.

    `device` is where the embeddings are returned (`output_device`). At low_mem_level >= 2 the encoder is kept
    and run on the CPU (`self.device` is then cpu) and only its output is moved to `output_device`.
    """

    def __init__(self, model: UMT5EncoderModel, tokenizer: PreTrainedTokenizerBase, config: TextEncoderConfig,
                 device: torch.device | str, dtype: torch.dtype, low_mem_level: int | MemoryPolicy = 0):
        if len(tokenizer) > config.vocab_size:
            raise CheckpointError(f"tokenizer has {len(tokenizer)} tokens, more than the encoder's "
                                  f"vocab_size {config.vocab_size}")
        self.memory = MemoryPolicy.resolve(low_mem_level, device, "text_encoder")
        self.output_device = torch.device(device)
        self.device = _model_device(self.output_device, self.memory)
        self.model = model.eval().requires_grad_(False).to(self.device)
        self.tokenizer = tokenizer
        self.config = config
        self.dtype = dtype

    @classmethod
    def from_checkpoint(cls, layout_kind: str, weights: Path, tokenizer_dir: Path, config: TextEncoderConfig,
                        device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16,
                        low_mem_level: int | MemoryPolicy = 0) -> "TextEncoderEngine":
        """Load Wan's `models_t5_umt5-xxl-enc-bf16.pth` (layout_kind "wan") or a Diffusers `text_encoder/`."""
        out_device, device = device, _model_device(device, low_mem_level)
        tokenizer = load_tokenizer(tokenizer_dir)
        sd, source = read_text_encoder(layout_kind, Path(weights), config)
        if EMBED_KEYS[0] in sd:  # cast the tied table once, so both names share one copy on `device`
            table = sd[EMBED_KEYS[0]].to(device=device, dtype=dtype)
            sd = {**sd, EMBED_KEYS[0]: table, EMBED_KEYS[1]: table}
        model = load_strict(build_model(config), sd, source, device, dtype, _keep_fp32(dtype))
        return cls(_retie(model), tokenizer, config, out_device, dtype, low_mem_level)

    @classmethod
    def random(cls, config: TextEncoderConfig, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32, seed: int = 0,
               low_mem_level: int | MemoryPolicy = 0) -> "TextEncoderEngine":
        """Deterministic random weights and the tiny offline tokenizer (for `wan-tiny` and tests)."""
        out_device, device = device, _model_device(device, low_mem_level)
        model = materialize_random(build_model(config), device, dtype, seed, _keep_fp32(dtype))
        tokenizer = build_tiny_tokenizer(config.vocab_size)
        return cls(_retie(model), tokenizer, config, out_device, dtype, low_mem_level)

    def token_counts(self, prompts: list[str]) -> list[int]:
        """Each prompt's token count incl. </s> before truncation to text_len (encode keeps at most text_len)."""
        batch = self.tokenizer([clean_prompt(p) for p in prompts], add_special_tokens=True, truncation=False,
                               verbose=False)
        return [len(ids) for ids in batch.input_ids]

    @torch.inference_mode()
    def encode(self, prompts: list[str], device: torch.device | str | None = None) -> list[torch.Tensor]:
        """Prompts -> [L_i, dim] per prompt in the engine dtype on `device` (default `output_device`); L_i counts the
        tokens incl. </s>, <= text_len."""
        if not prompts:
            return []
        batch = self.tokenizer(
            [clean_prompt(p) for p in prompts],
            padding="max_length",
            max_length=self.config.text_len,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        ids = batch.input_ids.to(self.device)  # [B, text_len]
        mask = batch.attention_mask.to(self.device)  # [B, text_len], 1 on real tokens
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, text_len, dim]
        lengths = mask.sum(dim=1).tolist()
        # own storage, not views; on the caller's device when the encoder runs on the CPU (level >= 2)
        out = self.output_device if device is None else device
        return [h[:n].to(out, self.dtype, copy=True) for h, n in zip(hidden, lengths)]
