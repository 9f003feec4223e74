"""The denoiser engine: one denoising loop for every model, sampler, guidance setting and expert layout."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from smartdiff.shared.checkpoint import CheckpointLayout
from smartdiff.shared.config import ModelConfig
from smartdiff.shared.errors import Cancelled
from smartdiff.shared.memory import MemoryPolicy
from smartdiff.shared.request import ResolvedRequest

from .attention import EXACT, AttentionChoice, AttentionReport, ring_refusal
from .attention import attach as attach_attention
from .cache import CacheCalibration, CacheConfig, CacheStats, FlexCache
from .dit import WanDiT
from .fp8 import check_gemm, quantize_blocks_fp8
from .offload import BlockOffloader
from .parallel import ParallelState, SequenceParallelAttention, attention_with_lse
from .samplers import make_sampler
from .weights import load_dit, random_dit

ProgressFn = Callable[[int, int, float, int], None]  # (steps done, total, timestep of the step, expert)


class BlockInterrupt:
    """The check run between two DiT blocks: Cancelled once `interrupt()` says so, naming the step.

    The CPU launches work far ahead of a GPU (a whole forward can sit in the launch queue), so a check made at
    launch time alone would stop the GPU only after all of that. On CUDA this also records an event after each
    block and waits for the one LOOKAHEAD blocks back: the GPU always has a block queued (launching one takes
    well under a millisecond, running one at video sizes tens of milliseconds and more), and a stop takes
    effect within LOOKAHEAD blocks of GPU time."""

    LOOKAHEAD = 2

    def __init__(self, interrupt: Callable[[], bool], steps: int, device: torch.device):
        self.interrupt, self.steps, self.step = interrupt, steps, 0
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        self._events = [torch.cuda.Event() for _ in range(self.LOOKAHEAD)] if cuda else None  # a ring
        self._calls = 0

    def __call__(self) -> None:
        if self._events is not None:
            event = self._events[self._calls % self.LOOKAHEAD]
            event.synchronize()  # recorded LOOKAHEAD calls ago (returns at once if never recorded)
            event.record(torch.cuda.current_stream(self.device))  # the model's device, whatever the current one
            self._calls += 1
        if self.interrupt():
            raise Cancelled(f"cancelled during step {self.step + 1}/{self.steps}")


def initial_noise(shape: Sequence[int], seed: int, device: torch.device) -> torch.Tensor:
    """float32 N(0, 1) noise drawn as Wan and diffusers draw it: a torch.Generator on `device` seeded with `seed`."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float32, device=device)


def pad_context(emb: torch.Tensor, text_len: int) -> torch.Tensor:
    """[L, C] trimmed prompt embedding -> [text_len, C], zero padded as Wan pads it (truncated if longer)."""
    emb = emb[:text_len]
    return F.pad(emb, (0, 0, 0, text_len - emb.shape[0]))


class DenoiserEngine:
    """Holds the DiT expert(s) of one model and turns (request, text embeddings) into final latents."""

    def __init__(self, model: ModelConfig, experts: Sequence[WanDiT], device: torch.device | str,
                 dtype: torch.dtype, batch_cfg: bool = True, enable_flexcache: bool = False,
                 cache_calibration: CacheCalibration | None = None, parallel: ParallelState | None = None,
                 low_mem_level: int | MemoryPolicy = 0, gemm: str = "exact"):
        if len(experts) != model.num_experts:
            raise ValueError(f"{model.name} needs {model.num_experts} experts, got {len(experts)}")
        self.memory = MemoryPolicy.resolve(low_mem_level, device, "denoiser")
        # `gemm` "fp8" (lossy, opt-in): the blocks' linears quantized here, before level 3 packs the weights (it
        # then streams the FP8 ones); quantized on the run device, wherever the weights are kept.
        self.gemm = check_gemm(gemm, device, dtype, model.dit)
        if self.gemm == "fp8":
            for dit in experts:
                quantize_blocks_fp8(dit, device)
        # Level 3: the experts' weights move to (pinned) host memory and stream through two device slots.
        self.offloader = BlockOffloader(experts, device) if self.memory.dit_offload else None
        self.model = model
        self.experts = list(experts)
        self.device = torch.device(device)
        self.dtype = dtype
        self.batch_cfg = batch_cfg  # run both guidance branches as one batch-2 forward
        self.flexcache = FlexCache(model, enable_flexcache, cache_calibration)  # system flag + calibration
        self.parallel = parallel  # this rank's place in the cfg x ulysses x ring layout (None: one process)

    @classmethod
    def load(cls, model: ModelConfig, layout: CheckpointLayout | None, device: torch.device | str,
             dtype: torch.dtype, seed: int = 0, low_mem_level: int | MemoryPolicy = 0, gemm: str = "exact",
             **options) -> "DenoiserEngine":
        """Experts from a checkpoint, or seeded random weights when the model is a random-weight preset.

        low_mem_level 3 loads them into host memory (refused before any reading without CUDA). gemm "fp8"
        quantizes the blocks' linears once loaded (fp8.py; refused before any reading where it cannot run)."""
        memory = MemoryPolicy.resolve(low_mem_level, device, "denoiser")
        check_gemm(gemm, device, dtype, model.dit)
        run_device, device = device, ("cpu" if memory.dit_offload else device)
        if layout is None:
            if not model.random_weights:
                raise ValueError(f"{model.name} has no embedded weights: pass a checkpoint folder")
            experts = [random_dit(model.dit, device, dtype, seed + i) for i in range(model.num_experts)]
        else:
            if layout.num_experts != model.num_experts:
                raise ValueError(f"{layout.root} holds {layout.num_experts} experts, {model.name} needs {model.num_experts}")
            experts = [load_dit(d, layout.kind, model.dit, device, dtype) for d in layout.dit_dirs]
        return cls(model, experts, run_device, dtype, low_mem_level=memory, gemm=gemm, **options)

    def expert_index(self, t: float) -> int:
        """Wan2.2: the high-noise expert (0) while t >= boundary * num_train_timesteps, then the low-noise one (1)."""
        if self.model.num_experts == 1:
            return 0
        return 0 if t >= self.model.boundary * self.model.num_train_timesteps else 1

    @torch.inference_mode()
    def denoise(self, req: ResolvedRequest, context: torch.Tensor, negative: torch.Tensor | None = None,
                progress: ProgressFn | None = None, cancelled: Callable[[], bool] | None = None,
                cache: CacheConfig | None = None, cache_stats: CacheStats | None = None,
                attention: AttentionChoice | None = None,
                on_attention: Callable[[AttentionReport], None] | None = None,
                interrupt: Callable[[], bool] | None = None) -> torch.Tensor:
        """Run the sampler from seeded noise to the final latents.

        context / negative: prompt and negative-prompt embeddings [L, text_dim] (negative needed when any
        guidance > 1). Returns float32 latents [1, z_dim, F', H/8, W/8]. `cancelled` is polled before each
        step; when it returns True the loop stops and raises Cancelled. `interrupt` is polled between DiT blocks
        as well, so a long step stops within a block or two (BlockInterrupt); under sequence or CFG parallel every
        rank must poll its own and agree (distributed.LockstepStop). `cache`: the request's FlexCache
        choice (refused with RequestError before any work when this deployment cannot run it); `cache_stats`,
        when given, is filled with what the cache computed and reused (and the parameters it applied).
        `attention`: the request's self-attention backend (default here: exact sdpa; the denoiser service
        passes its deployment default, flash_attn on CUDA; RequestError when it cannot run here);
        `on_attention`, when given, receives the AttentionReport of what ran once the loop is done.
        """
        if req.uses_cfg and negative is None:
            raise ValueError("guidance > 1 needs the negative prompt embedding")
        sampler = make_sampler(req.sampler, req.steps, req.shift, self.model.num_train_timesteps)
        session = self.flexcache.start(cache, sampler.timesteps.tolist(), self.expert_index, cache_stats, self.experts)
        latents = initial_noise(req.latent_shape(self.model), req.seed, self.device)
        text_len = self.model.dit.text_len
        ctx = pad_context(context.to(self.device), text_len)[None]
        neg = pad_context(negative.to(self.device), text_len)[None] if negative is not None else None
        embedded: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}  # per expert, computed once
        attn = None
        restore_sp = lambda: None  # noqa: E731
        between_blocks = BlockInterrupt(interrupt, req.steps, self.device) if interrupt is not None else None
        try:
            attn = attach_attention(self.experts, attention, device=self.device)  # per request; detached below
            restore_sp = self._attach_sequence_parallel(req, attn)
            for step, t in enumerate(sampler.timesteps.tolist()):
                if between_blocks is not None:
                    between_blocks.step = step
                if cancelled is not None and cancelled():
                    raise Cancelled(f"cancelled before step {step + 1}/{req.steps}")
                k = self.expert_index(t)
                if k not in embedded:
                    dit = self.experts[k]
                    embedded[k] = (dit.embed_text(ctx), dit.embed_text(neg) if neg is not None else None)
                hooks = session.step(step) if session is not None else None
                flow = self._guided_flow(self.experts[k], latents, t, *embedded[k], req.guidance[k], hooks,
                                         between_blocks)
                latents = sampler.step(flow, step, latents)
                if progress is not None:
                    progress(step + 1, req.steps, t, k)
        finally:
            if attn is not None:
                restore_sp()
                attn.detach()  # the request's attention state goes too
            if session is not None:
                session.close()  # the request's cached tensors go now, whatever happened
        if on_attention is not None:
            on_attention(attn.report())
        return latents

    @torch.inference_mode()
    def plan_cache(self, req: ResolvedRequest, cache: CacheConfig) -> CacheStats:
        """What `cache` would compute and reuse for `req`, without running the block stack.

        Every strategy decides from the schedule and the timestep embedding alone (never from the latents), so
        driving its hooks with the real timestep embeddings and stand-in tensors gives the exact pattern of a
        real run (tests/denoiser/test_cache.py checks it). Used to compare strategies at an equal budget.
        Single-process layout (under CFG parallel each rank runs one branch of the same decisions).
        """
        sampler = make_sampler(req.sampler, req.steps, req.shift, self.model.num_train_timesteps)
        stats = CacheStats()
        session = self.flexcache.start(cache, sampler.timesteps.tolist(), self.expert_index, stats)
        if session is None:
            return stats
        try:
            for i, t in enumerate(sampler.timesteps.tolist()):
                k = self.expert_index(t)
                step = session.step(i)
                for call in self._branch_calls(req.guidance[k]):  # as _guided_flow calls the DiT
                    e, e6 = self.experts[k].embed_time(torch.full((len(call),), t, device=self.device,
                                                                  dtype=torch.float32))
                    self._plan_call(self.experts[k], step(*call), e, e6)
        finally:
            session.close()
        return stats

    def _branch_calls(self, guidance: float) -> list[tuple[int, ...]]:
        """The CFG branches of each DiT call _guided_flow makes for a step at this guidance (single process)."""
        if guidance <= 1.0:
            return [(0,)]
        return [(0, 1)] if self.batch_cfg else [(0,), (1,)]

    @staticmethod
    def _plan_call(dit: WanDiT, hooks, e: torch.Tensor, e6: torch.Tensor) -> None:
        """One DiT call's hooks with stand-in tokens [B, 1, 1]: the block stack calls every attention hook."""
        tokens = torch.zeros(e.shape[0], 1, 1, device=e.device)

        def run(tk, e6_, ctx_):
            if hooks.attention is not None:
                for layer in range(len(dit.blocks)):
                    for kind in ("self", "cross"):
                        hooks.attention(layer, kind, lambda: torch.zeros_like(tk))
            return tk

        if hooks.blocks is not None:
            hooks.blocks(run, tokens, e, e6, tokens)
        else:
            run(tokens, e6, tokens)

    def _guided_flow(self, dit: WanDiT, latents: torch.Tensor, t: float, ctx: torch.Tensor,
                     neg: torch.Tensor | None, guidance: float, hooks=None, between_blocks=None) -> torch.Tensor:
        """Velocity with classifier-free guidance: uncond + g * (cond - uncond), in float32.

        hooks(*branches) -> this call's FlexCache hooks, for batch rows of CFG branches (0 cond, 1 uncond).
        between_blocks: passed to the DiT (the request's interrupt check).
        """
        x = latents.to(self.dtype)
        tt = torch.full((1,), t, device=self.device, dtype=torch.float32)
        hooks = hooks or (lambda *branches: None)
        par = self.parallel if self.parallel is not None and self.parallel.config.world_size > 1 else None

        def run(x_, t_, ctx_, branches):
            return dit(x_, t_, ctx_, context_embedded=True, hooks=hooks(*branches), parallel=par,
                       between_blocks=between_blocks).float()

        if guidance <= 1.0 or neg is None:  # no guidance: the conditional branch alone
            return run(x, tt, ctx, (0,))
        if par is not None and par.config.cfg == 2:  # CFG parallel: this rank's branch, then exchange
            branch = par.cfg_rank
            cond, uncond = par.gather_branches(run(x, tt, ctx if branch == 0 else neg, (branch,)))
            return uncond + guidance * (cond - uncond)
        if self.batch_cfg:
            cond, uncond = run(torch.cat([x, x]), tt.expand(2), torch.cat([ctx, neg]), (0, 1)).chunk(2)
        else:
            cond, uncond = run(x, tt, ctx, (0,)), run(x, tt, neg, (1,))
        return uncond + guidance * (cond - uncond)

    def _attach_sequence_parallel(self, req: ResolvedRequest, attn) -> Callable[[], None]:
        """Under sequence parallel, wrap each block's self-attention (as the request chose it) for sharded tokens.

        Returns the function that puts the request's attention back. Ring attention merges partial results
        with their log-sum-exp: the exact backend gets it from the fused SDPA kernels, `sage` / `sparge` from
        their kernels (`with_lse`: `flash_attn`'s from our kernel on Hopper, else PyTorch's fused ones); `auto`,
        which cannot return it, is refused for ring.
        """
        par = self.parallel
        if par is None or par.config.sp == 1:
            return lambda: None
        backend = attn.resolution.backend
        exact_lse = attention_with_lse(self.device)
        if (refusal := ring_refusal(backend, par.config.ring)) is not None:
            raise refusal
        valid = req.tokens(self.model)
        saved = []
        for dit in self.experts:
            for block in dit.blocks:
                a = block.self_attn
                saved.append((a, a.attention_fn))
                lse_fn = exact_lse if backend == EXACT else getattr(a.attention_fn, "with_lse", None)
                a.attention_fn = SequenceParallelAttention(par, a.attention_fn, lse_fn, valid)

        def restore() -> None:
            for a, fn in reversed(saved):
                a.attention_fn = fn

        return restore
