"""Ulysses and ring attention over gloo processes equal single-process attention; layouts are validated."""

import pytest
import torch

from smartdiff.services.denoiser.parallel import (
    ParallelConfig, ParallelConfigError, ParallelState, SequenceParallelAttention, exact_attention_with_lse,
    merge_partial, suggest_layout,
)
from distributed_helpers import run_ranks


def reference(q, k, v):
    return exact_attention_with_lse(q.double(), k.double(), v.double())[0]


def _sp_attention(rank, world, ulysses, ring, length):
    state = ParallelState(ParallelConfig(1, ulysses, ring), rank)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, length, 4, 8, generator=g) for _ in range(3))
    attn = SequenceParallelAttention(state, lambda a, b, c: exact_attention_with_lse(a, b, c)[0],
                                     exact_attention_with_lse, valid=length)
    out = attn(state.shard_tokens(q), state.shard_tokens(k), state.shard_tokens(v))
    return state.gather_tokens(out, length), reference(q, k, v)


@pytest.mark.parametrize("ulysses,ring,length", [(2, 1, 13), (1, 2, 13), (2, 2, 21), (4, 1, 16), (1, 4, 10)])
def test_sequence_parallel_attention_matches_single_process(ulysses, ring, length):
    results = run_ranks(_sp_attention, ulysses * ring, ulysses, ring, length)
    for out, ref in results:
        assert out.shape == ref.shape
        assert ((out.double() - ref).norm() / ref.norm()) < 1e-6


def test_merge_of_partials_is_exact():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 5, 3, 4, generator=g, dtype=torch.float64) for _ in range(3))
    o1, l1 = exact_attention_with_lse(q, k[:, :2], v[:, :2])
    o2, l2 = exact_attention_with_lse(q, k[:, 2:], v[:, 2:])
    out, _ = merge_partial(*merge_partial(None, None, o1, l1), o2, l2)
    assert torch.allclose(out.double(), reference(q, k, v), atol=1e-6)


@pytest.mark.parametrize("layout,world,heads,words", [
    ((1, 5, 1), 5, 12, ["ulysses degree 5 must divide the model's 12 attention heads", "suggested"]),
    ((2, 2, 1), 8, 12, ["world size 8 must equal cfg x ulysses x ring", "--cfg-degree 2 --ulysses-degree 4"]),
    ((3, 1, 1), 3, 12, ["cfg degree must be 1 or 2"]),
])
def test_invalid_layouts_are_refused_with_rule_and_suggestion(layout, world, heads, words):
    with pytest.raises(ParallelConfigError) as err:
        ParallelConfig(*layout).validate(world, heads)
    for w in words:
        assert w in str(err.value)


def test_suggestions_are_valid():
    for world in (1, 2, 4, 8):
        for heads in (12, 40):
            s = suggest_layout(world, heads).split()
            cfg = ParallelConfig(int(s[1]), int(s[3]), int(s[5]))
            cfg.validate(world, heads)
