"""low_mem_level: what each level turns on, what the hardware check refuses, the per-request peak memory."""

from __future__ import annotations

import pytest
import torch

from smartdiff.services.text_encoder.engine import TextEncoderEngine
from smartdiff.shared.config import load_model_config
from smartdiff.shared.memory import LowMemLevel, MemoryPolicy, MemoryPolicyError, PeakMemory, measure_peak


def test_levels_include_the_ones_below():
    flags = [(p.vae_tiling, p.text_encoder_on_cpu, p.dit_offload) for p in map(MemoryPolicy, range(4))]
    assert flags == [(False, False, False), (True, False, False), (True, True, False), (True, True, True)]
    assert MemoryPolicy(2).level is LowMemLevel.TEXT_ENCODER_ON_CPU
    assert MemoryPolicy(3).describe().startswith("low_mem_level 3 (")


@pytest.mark.parametrize("bad", [4, -1, 1.0, "2", True, None])
def test_unknown_levels_are_refused_naming_the_parameter(bad):
    with pytest.raises(MemoryPolicyError, match=r"low_mem_level: must be one of 0, 1, 2, 3"):
        MemoryPolicy(bad)


def test_level_3_needs_cuda_for_the_denoiser_only():
    with pytest.raises(MemoryPolicyError, match=r"--low-mem-level 3 .* needs a CUDA device, got device cpu"):
        MemoryPolicy.resolve(3, "cpu", "denoiser")
    for stage in ("vae", "text_encoder"):  # their part of level 3 (tiles, T5 on the CPU) runs anywhere
        assert MemoryPolicy.resolve(3, "cpu", stage).level == 3
    for level in range(3):
        MemoryPolicy.resolve(level, "cpu", "denoiser")
    # The test-only override runs the streaming mechanism with the CPU as both host and device.
    assert MemoryPolicy.resolve(MemoryPolicy(3, offload_without_cuda=True), "cpu", "denoiser").dit_offload


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_level_3_on_a_cuda_device_name_without_cuda_is_refused():
    with pytest.raises(MemoryPolicyError, match="--low-mem-level 3 needs CUDA"):
        MemoryPolicy.resolve(3, "cuda", "denoiser")


def test_peak_memory_is_not_available_on_the_cpu():
    with measure_peak("cpu") as peak:
        torch.ones(1000).sum()
    assert peak.bytes is None and str(peak) == "n/a"
    assert str(PeakMemory(3 * 2**30 // 2)) == "1.50 GiB" and PeakMemory(2**30).gib == 1.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_peak_memory_counts_what_a_request_allocated():
    dev = torch.device("cuda")
    with measure_peak(dev) as peak:
        x = torch.empty(64 * 2**20, dtype=torch.uint8, device=dev)
        del x
    assert peak.bytes >= 64 * 2**20


def test_level_2_runs_t5_on_the_cpu_with_the_same_embeddings():
    cfg = load_model_config("wan-tiny").text_encoder
    resident = TextEncoderEngine.random(cfg, "cpu", torch.float32, seed=0)
    on_cpu = TextEncoderEngine.random(cfg, "cpu", torch.float32, seed=0, low_mem_level=2)
    assert resident.device.type == on_cpu.device.type == on_cpu.output_device.type == "cpu"
    assert on_cpu.model.shared.weight.device.type == "cpu"
    for a, b in zip(resident.encode(["a red fox", "snow"]), on_cpu.encode(["a red fox", "snow"])):
        assert torch.equal(a, b)
