"""The three stage engines composed in one process: the reference path the gRPC services must reproduce."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from smartdiff.services.denoiser.engine import DenoiserEngine
from smartdiff.services.text_encoder.engine import TextEncoderEngine
from smartdiff.services.vae.engine import VaeEngine
from smartdiff.shared.checkpoint import CheckpointLayout
from smartdiff.shared.config import ModelConfig
from smartdiff.shared.request import ResolvedRequest

StageProgress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass
class GenerationResult:
    latents: torch.Tensor  # [1, 16, F', H/8, W/8] float32
    frames: torch.Tensor  # [F, H, W, 3] uint8
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage


class LocalPipeline:
    """text encoder -> denoiser -> VAE, in-process."""

    def __init__(self, model: ModelConfig, text_encoder: TextEncoderEngine, denoiser: DenoiserEngine, vae: VaeEngine):
        self.model = model
        self.text_encoder = text_encoder
        self.denoiser = denoiser
        self.vae = vae

    @classmethod
    def load(cls, model: ModelConfig, layout: CheckpointLayout | None, device: torch.device,
             dtype: torch.dtype, low_mem_level: int = 0) -> "LocalPipeline":
        """Load every stage from `layout`, or give random-weight presets their seeded random weights."""
        level = low_mem_level
        if layout is None:
            te = TextEncoderEngine.random(model.text_encoder, device, dtype, seed=0, low_mem_level=level)
            vae = VaeEngine.random(model.vae, device, torch.float32, seed=0, low_mem_level=level)
        else:
            te = TextEncoderEngine.from_checkpoint(layout.kind, layout.text_encoder, layout.tokenizer,
                                                   model.text_encoder, device, dtype, low_mem_level=level)
            vae = VaeEngine.from_checkpoint(layout.vae, layout.kind, model.vae, device, torch.float32,
                                            low_mem_level=level)
        return cls(model, te, DenoiserEngine.load(model, layout, device, dtype, low_mem_level=level), vae)

    def generate(self, req: ResolvedRequest, progress: StageProgress | None = None) -> GenerationResult:
        timings: dict[str, float] = {}
        start = time.perf_counter()
        prompts = [req.prompt, req.negative_prompt] if req.uses_cfg else [req.prompt]
        embeddings = self.text_encoder.encode(prompts)
        timings["text_encoder"] = time.perf_counter() - start
        if progress:
            progress("text_encoder", 1, 1)

        start = time.perf_counter()
        step_cb = (lambda i, n, *_: progress("denoiser", i, n)) if progress else None
        negative = embeddings[1] if req.uses_cfg else None
        latents = self.denoiser.denoise(req, embeddings[0], negative, progress=step_cb)
        timings["denoiser"] = time.perf_counter() - start

        start = time.perf_counter()
        vae_cb = (lambda i, n: progress("vae", i, n)) if progress else None
        frames = self.vae.decode(latents, progress=vae_cb)[0]
        timings["vae"] = time.perf_counter() - start
        return GenerationResult(latents.float().cpu(), frames.cpu(), timings)
