"""Tokenizers for the text encoder: the checkpoint's umT5 tokenizer, or a tiny T5-style one built offline."""

from __future__ import annotations

import itertools
import string
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from smartdiff.shared.checkpoint import CheckpointError

SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in T5 / umT5
SPACE = "\u2581"  # sentencepiece's word-start marker

_WORDS = (
    "the a an and of in on at to with from by for is are was while as over under into through "
    "cat dog bird horse fish man woman child people car train boat city street forest river ocean sea "
    "beach mountain sky sun moon cloud rain snow tree flower grass water fire light night day red blue "
    "green white black golden small big slow fast walking running flying swimming dancing camera shot "
    "close up view video scene style background cinematic realistic"
).split()


def _pieces() -> list[tuple[str, float]]:
    """The vocabulary in id order, as (piece, log-probability): longer pieces score higher per character."""
    chars = string.ascii_letters + string.digits + string.punctuation
    vocab = [(tok, 0.0) for tok in SPECIAL_TOKENS] + [(SPACE, -2.0)]
    vocab += [(c, -10.0) for c in chars] + [(SPACE + c, -10.0) for c in chars]
    vocab += [(SPACE + w, -8.0) for w in _WORDS]
    return vocab


def _filler():
    """Endless deterministic extra pieces: lowercase bigrams, then trigrams, ..."""
    for n in itertools.count(2):
        for letters in itertools.product(string.ascii_lowercase, repeat=n):
            yield "".join(letters), -6.0 * n


def build_tiny_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A small T5-style Unigram tokenizer with exactly `vocab_size` entries, built without any download.

    Same pipeline as umT5's: Metaspace pre-tokenizer, <pad>=0, </s>=1, <unk>=2, and </s> appended to
    every sequence. Deterministic: two builds give the same ids. Saves with `save_pretrained` and loads
    back with `AutoTokenizer.from_pretrained`.
    """
    vocab = _pieces()
    if vocab_size < len(vocab):
        raise ValueError(f"tiny tokenizer needs vocab_size >= {len(vocab)} (specials + ASCII), got {vocab_size}")
    vocab = vocab[:vocab_size]
    seen = {piece for piece, _ in vocab}
    for piece, score in _filler():
        if len(vocab) == vocab_size:
            break
        if piece not in seen:
            vocab.append((piece, score))
            seen.add(piece)

    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="always")]
    )
    tok.decoder = decoders.Metaspace(replacement=SPACE, prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )


def load_tokenizer(folder: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved in `folder` (umT5's `google/umt5-xxl/`, Diffusers' `tokenizer/`), local files only."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"tokenizer folder not found: {folder}")
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # missing / corrupt tokenizer files
        raise CheckpointError(f"cannot load tokenizer from {folder}: {e}") from None
