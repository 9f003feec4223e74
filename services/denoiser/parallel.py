"""CFG, Ulysses and ring parallelism for the DiT over torch.distributed (NCCL on GPUs, gloo on the CPU).

Rank layout, innermost first: ulysses (all-to-all over heads, wants the fastest links), ring (sequence
blocks passed around), cfg (the two guidance branches):  rank = cfg_rank * (R * U) + ring_rank * U + ulysses_rank.
The sequence is split into S = U * R shards; shard s = ring_rank * U + ulysses_rank. Sequences that do not
divide are padded at the end; padded keys are dropped before attention, so padding never changes a result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .fp8 import Fp8Linear
from .fused import head_groups

# (q, k, v) [B, L, N, D] -> (out [B, Lq, N, D], lse [B, N, Lq] float32)
AttentionWithLse = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class ParallelConfigError(ValueError):
    """A parallel layout that cannot run: says the rule and suggests a valid layout."""


@dataclass(frozen=True)
class ParallelConfig:
    """Parallel degrees of the denoiser (system parameters)."""

    cfg: int = 1
    ulysses: int = 1
    ring: int = 1

    @property
    def world_size(self) -> int:
        return self.cfg * self.ulysses * self.ring

    @property
    def sp(self) -> int:
        return self.ulysses * self.ring

    def __str__(self) -> str:
        return f"cfg{self.cfg} x ulysses{self.ulysses} x ring{self.ring}"

    def validate(self, world_size: int, num_heads: int) -> None:
        """Refuse impossible layouts at start-up, naming the rule and suggesting one that works."""
        for name, value in (("cfg", self.cfg), ("ulysses", self.ulysses), ("ring", self.ring)):
            if value < 1:
                raise ParallelConfigError(f"{name} degree must be >= 1, got {value}")
        if self.cfg not in (1, 2):
            raise ParallelConfigError(f"cfg degree must be 1 or 2 (two guidance branches), got {self.cfg}; "
                                      f"suggested: {suggest_layout(world_size, num_heads)}")
        if num_heads % self.ulysses:
            raise ParallelConfigError(
                f"ulysses degree {self.ulysses} must divide the model's {num_heads} attention heads; "
                f"suggested: {suggest_layout(world_size, num_heads)}")
        if self.world_size != world_size:
            raise ParallelConfigError(
                f"world size {world_size} must equal cfg x ulysses x ring = {self.cfg} x {self.ulysses} x "
                f"{self.ring} = {self.world_size}; suggested: {suggest_layout(world_size, num_heads)}")


def suggest_layout(world_size: int, num_heads: int) -> str:
    """cfg 2 first (no communication inside a step), then the largest Ulysses degree dividing the heads, then ring."""
    cfg = 2 if world_size % 2 == 0 else 1
    rest = world_size // cfg
    ulysses = max(u for u in range(1, rest + 1) if rest % u == 0 and num_heads % u == 0)
    return f"--cfg-degree {cfg} --ulysses-degree {ulysses} --ring-degree {rest // ulysses}"


class ParallelState:
    """This rank's place in the layout and its process groups (built once per process, all ranks together)."""

    def __init__(self, config: ParallelConfig, rank: int, backend_groups: bool = True,
                 ranks: list[int] | None = None):
        """`rank`: this process's global rank. `ranks`: the global ranks the layout runs on (default
        0 .. world-1); every process of the job must construct the same states in the same order."""
        self.config = config
        self.ranks = list(ranks) if ranks is not None else list(range(config.world_size))
        self.member = rank in self.ranks
        self.rank = self.ranks.index(rank) if self.member else -1  # rank inside the layout
        u, sp = config.ulysses, config.sp
        self.cfg_rank, within = divmod(max(self.rank, 0), sp)
        self.ring_rank, self.ulysses_rank = divmod(within, u)
        self.shard = self.ring_rank * u + self.ulysses_rank
        self.cfg_group = self.sp_group = self.ulysses_group = self.ring_group = None
        self.ring_ranks: list[int] = []
        if backend_groups and config.world_size > 1:
            self._build_groups()

    def _build_groups(self) -> None:
        """Every rank must create every group, in the same order (torch.distributed's rule)."""
        c, u, r, sp = self.config.cfg, self.config.ulysses, self.config.ring, self.config.sp
        rank_of = lambda ci, ri, ui: self.ranks[ci * sp + ri * u + ui]  # noqa: E731
        for ri in range(r):
            for ui in range(u):
                g = dist.new_group([rank_of(ci, ri, ui) for ci in range(c)])
                if (self.ring_rank, self.ulysses_rank) == (ri, ui):
                    self.cfg_group = g
        for ci in range(c):
            g = dist.new_group([rank_of(ci, ri, ui) for ri in range(r) for ui in range(u)])
            if self.cfg_rank == ci:
                self.sp_group = g
            for ri in range(r):
                g = dist.new_group([rank_of(ci, ri, ui) for ui in range(u)])
                if (self.cfg_rank, self.ring_rank) == (ci, ri):
                    self.ulysses_group = g
            for ui in range(u):
                ranks = [rank_of(ci, ri, ui) for ri in range(r)]
                g = dist.new_group(ranks)
                if (self.cfg_rank, self.ulysses_rank) == (ci, ui):
                    self.ring_group, self.ring_ranks = g, ranks

    # ------------------------------------------------------------------ sequence sharding of the tokens
    def padded_length(self, length: int) -> int:
        sp = self.config.sp
        return -(-length // sp) * sp

    def shard_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, ...] -> this rank's shard [B, L_pad / S, ...] (zero padding at the end of the sequence)."""
        if self.config.sp == 1:
            return x
        pad = self.padded_length(x.shape[1]) - x.shape[1]
        if pad:
            x = torch.cat([x, x.new_zeros(x.shape[0], pad, *x.shape[2:])], dim=1)
        return x.chunk(self.config.sp, dim=1)[self.shard].contiguous()

    def gather_tokens(self, x: torch.Tensor, length: int) -> torch.Tensor:
        """This rank's shard [B, L_pad / S, ...] -> the whole sequence [B, length, ...] on every rank."""
        if self.config.sp == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.config.sp)]
        dist.all_gather(parts, x.contiguous(), group=self.sp_group)
        return torch.cat(parts, dim=1)[:, :length]

    def gather_branches(self, x: torch.Tensor) -> list[torch.Tensor]:
        """CFG parallel: [this branch's output] -> [cond, uncond] on every rank of the cfg pair."""
        parts = [torch.empty_like(x) for _ in range(self.config.cfg)]
        dist.all_gather(parts, x.contiguous(), group=self.cfg_group)
        return parts


def _exchange(send: torch.Tensor, group) -> tuple[torch.Tensor, dist.Work]:
    """Start an all-to-all of send [U, ...]: part u goes to Ulysses rank u; part u of the result came from it."""
    recv = torch.empty_like(send)
    return recv, dist.all_to_all_single(recv, send, group=group, async_op=True)


def _sequence_from_ranks(recv: torch.Tensor) -> torch.Tensor:
    """[U, B, Ls, Nh, D] (sequence shard u from rank u) -> [B, U * Ls, Nh, D]: a view when B == 1."""
    u, b, length, n, d = recv.shape
    return recv.transpose(0, 1).reshape(b, u * length, n, d)


def merge_partial(out: torch.Tensor | None, lse: torch.Tensor | None, o_b: torch.Tensor, lse_b: torch.Tensor):
    """Merge two softmax-normalised partial attentions over disjoint key sets (float32).

    out/o_b [B, L, N, D], lse/lse_b [B, N, L]: the result is exactly attention over the union of keys.
    """
    o_b = o_b.float()
    if out is None:
        return o_b, lse_b
    new = torch.logaddexp(lse, lse_b)
    w_old = torch.exp(lse - new).transpose(1, 2).unsqueeze(-1)  # [B, L, N, 1]
    w_new = torch.exp(lse_b - new).transpose(1, 2).unsqueeze(-1)
    return out * w_old + o_b * w_new, new


def exact_attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """Reference attention returning the log-sum-exp, in float32 (CPU / fallback). [B, L, N, D] layout."""
    qf, kf, vf = (t.float().transpose(1, 2) for t in (q, k, v))  # [B, N, L, D]
    scores = qf @ kf.transpose(-1, -2) * q.shape[-1] ** -0.5
    lse = torch.logsumexp(scores, dim=-1)  # [B, N, Lq]
    out = torch.softmax(scores, dim=-1) @ vf
    return out.transpose(1, 2).to(q.dtype), lse


def _cuda_attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """Fused exact attention that also returns the log-sum-exp: cuDNN, else flash, else memory-efficient."""
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # [B, N, L, D]
    length = q.shape[1]
    errors = []
    for op in ("cudnn", "flash", "efficient"):
        try:
            if op == "cudnn":
                out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(qt, kt, vt, None, True)[:2]
            elif op == "flash":
                out, lse = torch.ops.aten._scaled_dot_product_flash_attention(qt, kt, vt)[:2]
            else:
                out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(qt, kt, vt, None, True)[:2]
        except RuntimeError as e:  # kernel not built for this GPU / dtype / head dim
            errors.append(f"{op}: {e}")
            continue
        lse = lse.reshape(lse.shape[0], lse.shape[1], -1)[:, :, :length].float()  # [B, N, Lq]
        return out.transpose(1, 2), lse
    raise RuntimeError("no fused attention kernel returns the log-sum-exp here: " + "; ".join(errors))


def attention_with_lse(device: torch.device) -> AttentionWithLse:
    """The exact attention-with-LSE used by ring attention on this device."""
    return _cuda_attention_with_lse if torch.device(device).type == "cuda" else exact_attention_with_lse


def _heads_from_ranks(recv: torch.Tensor) -> torch.Tensor:
    """The Ulysses exchange's way back, [U, B, Ls, N/U, D] by source rank -> [B, Ls, N * D] (heads in order)."""
    return recv.permute(1, 2, 0, 3, 4).flatten(2)


class SequenceParallelAttention:
    """Self-attention over a sequence sharded across U x R ranks: Ulysses all-to-all, then ring over blocks.

    Calling it with this rank's q/k/v shards [B, L_pad / S, N, D] returns this rank's output shard. Under Ulysses
    (`runs_module`) the DiT calls `run_module(attn, x, rope)` instead, which runs the whole self-attention module
    on this rank's tokens. `valid` is the unpadded global sequence length.
    """

    def __init__(self, state: ParallelState, attention: Callable, attention_lse: AttentionWithLse | None,
                 valid: int):
        if state.config.ring > 1 and attention_lse is None:
            raise ParallelConfigError("ring attention needs a backend that returns the log-sum-exp")
        self.state, self.attention, self.attention_lse, self.valid = state, attention, attention_lse, valid
        self.runs_module = state.config.ulysses > 1  # else (ring only) the module projects and calls self(q, k, v)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        u = self.state.config.ulysses
        if u == 1:
            return self._attend(q, k, v)
        exchanges = [_exchange(head_groups(t, u), self.state.ulysses_group) for t in (q, k, v)]
        for _, work in exchanges:
            work.wait()
        recv, work = self._send_back(self._attend(*(_sequence_from_ranks(t) for t, _ in exchanges)))
        work.wait()
        return _heads_from_ranks(recv).unflatten(-1, (-1, q.shape[-1]))  # [B, Ls, N, D]

    def run_module(self, attn, x: torch.Tensor, rope) -> torch.Tensor:
        """The whole self-attention module `attn` (a dit.WanAttention) on this rank's tokens x [B, L/S, C], U > 1.

        The maths of projecting and calling self(q, k, v) (in bf16 the output projection's per-head-group
        partial sums round once more each: ~1e-3 relative), with the exchanges overlapping the compute: v goes
        first and travels while q and k are projected, normed and rotated; the output projection starts on this
        rank's own head group while the others' arrive (it is linear in the head groups: o(y) = b + sum_u y_u
        W_u^T); the received blocks are used where they land (no copy at batch 1). An FP8 output projection waits
        for every group instead: each token's FP8 scale spans all of them."""
        u = self.state.config.ulysses
        group = self.state.ulysses_group
        v = _exchange(head_groups(attn.v(x).unflatten(-1, (attn.num_heads, -1)), u), group)
        q, k = attn.project_qk(x, x, rope, groups=u)  # already [U, B, Ls, N/U, D]
        k = _exchange(k, group)
        q = _exchange(q, group)
        for _, work in (v, k, q):
            work.wait()
        out = self._attend(*(_sequence_from_ranks(t) for t, _ in (q, k, v)))  # [B, L/R, N/U, D]
        recv, work = self._send_back(out)
        if isinstance(attn.o, Fp8Linear):  # a token's FP8 scale spans all head groups
            work.wait()
            return attn.o(_heads_from_ranks(recv))
        mine, width = self.state.ulysses_rank, out.shape[-2] * out.shape[-1]
        weight = attn.o.weight.view(attn.o.weight.shape[0], u, width)  # input columns by head group
        own = out.reshape(out.shape[0], u, -1, width)[:, mine]  # [B, Ls, C / U]: stays on this rank
        y = F.linear(own, weight[:, mine], attn.o.bias)
        work.wait()
        flat = y.view(-1, y.shape[-1])
        for j in range(u):
            if j != mine:
                flat.addmm_(recv[j].reshape(-1, width), weight[:, j].t())
        return y

    def _send_back(self, out: torch.Tensor) -> tuple[torch.Tensor, dist.Work]:
        """Start returning out [B, L/R, Nh, D] to the ranks owning its sequence shards: -> [U, B, Ls, Nh, D]."""
        u = self.state.config.ulysses
        b, length, nh, d = out.shape
        send = out.reshape(b, u, length // u, nh, d).transpose(0, 1).contiguous()  # no copy at batch 1
        return _exchange(send, self.state.ulysses_group)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention of a ring block's queries [B, L/R, Nh, D] over the whole (padded) sequence."""
        if self.state.config.ring == 1:
            return self.attention(q, k[:, : self.valid], v[:, : self.valid])
        return self._ring(q, k, v, q.shape[1])

    def _ring(self, q, k, v, block: int) -> torch.Tensor:
        """Pass K/V blocks around the ring; merge the partial results with their log-sum-exp."""
        st, r = self.state, self.state.config.ring
        out = lse = None
        kv = torch.stack([k, v])
        for i in range(r):
            src = (st.ring_rank - i) % r  # whose block we hold at this turn
            if i + 1 < r:  # start the next exchange before computing on the current block
                recv = torch.empty_like(kv)
                ops = [dist.P2POp(dist.isend, kv, st.ring_ranks[(st.ring_rank + 1) % r], group=st.ring_group),
                       dist.P2POp(dist.irecv, recv, st.ring_ranks[(st.ring_rank - 1) % r], group=st.ring_group)]
                reqs = dist.batch_isend_irecv(ops)
            keep = min(block, max(self.valid - src * block, 0))  # keys of this block inside the real sequence
            if keep > 0:
                o_b, lse_b = self.attention_lse(q, kv[0][:, :keep], kv[1][:, :keep])
                out, lse = merge_partial(out, lse, o_b, lse_b)
            if i + 1 < r:
                for req in reqs:
                    req.wait()
                kv = recv
        return out.to(q.dtype)


def pad_rope(cos: torch.Tensor, sin: torch.Tensor, state: ParallelState) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables [L, 1, D/2] -> this rank's rows (identity rotation on padded rows)."""
    if state.config.sp == 1:
        return cos, sin
    pad = state.padded_length(cos.shape[0]) - cos.shape[0]
    cos = F.pad(cos, (0, 0, 0, 0, 0, pad), value=1.0)
    sin = F.pad(sin, (0, 0, 0, 0, 0, pad), value=0.0)
    return (cos.chunk(state.config.sp, dim=0)[state.shard].contiguous(),
            sin.chunk(state.config.sp, dim=0)[state.shard].contiguous())
