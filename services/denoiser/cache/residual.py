"""The block-stack hook shared by TeaCache and MagCache: per CFG branch, run every block or reuse the residual.

Batch rows are CFG branches. Each row's strategy state decides on its own (as TeaCache4Wan2.1 and MagCache keep
separate accumulators for the cond and uncond calls); when rows disagree, only the rows that must be computed
go through the blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from ..dit import BlockStackFn, ForwardHooks
from .session import CacheStats, StepInfo


@dataclass
class ResidualState:
    """One (expert, branch): the block stack's residual at its last computed step, [1, L, C]."""

    residual: torch.Tensor | None = None


class ResidualCache:
    """Base of residual-reuse strategies: subclasses implement `new_state` and `should_compute`."""

    name = "residual"

    def __init__(self, stats: CacheStats):
        self.stats = stats
        self.states: dict[tuple[int, int], ResidualState] = {}

    def new_state(self) -> ResidualState:
        return ResidualState()

    def should_compute(self, state: ResidualState, step: StepInfo, branch: int, e: torch.Tensor,
                       e6: torch.Tensor) -> bool:
        """Decide one branch's step (and update its accumulators). e [C], e6 [6, C] of this row, float32."""
        raise NotImplementedError

    def keep_residual(self, step: StepInfo) -> bool:
        """Whether a later step could still reuse what this step computed (else it is dropped at once)."""
        return step.next_t is not None

    def hooks(self, step: StepInfo, branches: tuple[int, ...]) -> ForwardHooks:
        return ForwardHooks(blocks=partial(self._blocks, step, branches))

    def close(self) -> None:
        self.states.clear()

    def _blocks(self, step: StepInfo, branches: tuple[int, ...], run: BlockStackFn, tokens: torch.Tensor,
                e: torch.Tensor, e6: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        """tokens [B, L, C] (row r = branch branches[r]) -> block stack output [B, L, C]."""
        if tokens.shape[0] != len(branches):
            raise ValueError(f"{len(branches)} branches for a batch of {tokens.shape[0]}")
        states = [self.states.setdefault((step.expert, b), self.new_state()) for b in branches]
        compute = [self.should_compute(s, step, b, e[r], e6[r]) or s.residual is None
                   for r, (b, s) in enumerate(zip(branches, states))]
        rows = [r for r, c in enumerate(compute) if c]
        self.stats.count("block_stack", len(rows), len(branches) - len(rows))
        if len(rows) == len(branches):
            out = run(tokens, e6, ctx)
            computed = out
        elif not rows:
            out = tokens + (torch.cat([s.residual for s in states]) if len(states) > 1 else states[0].residual)
            computed = None
        else:
            idx = torch.tensor(rows, device=tokens.device)
            computed = run(tokens.index_select(0, idx), e6.index_select(0, idx), ctx.index_select(0, idx))
            parts, j = [], 0
            for r, s in enumerate(states):
                if compute[r]:
                    parts.append(computed[j:j + 1])
                    j += 1
                else:
                    parts.append(tokens[r:r + 1] + s.residual)
            out = torch.cat(parts)
        keep = self.keep_residual(step)
        for j, r in enumerate(rows):
            states[r].residual = (computed[j:j + 1] - tokens[r:r + 1]) if keep else None
        if not keep:
            for s in states:
                s.residual = None
        return out
