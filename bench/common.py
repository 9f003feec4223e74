"""Helpers shared by the benchmark scripts (run as `python bench/<script>.py`, so this folder is on sys.path)."""

from __future__ import annotations

import os
import subprocess
import time

import torch


def git_commit() -> str:
    """The commit the results belong to: $SMARTDIFF_COMMIT when the launcher sets it (a lent machine's copy of the
    checkout may have a stale HEAD), else this checkout's short hash, with "-dirty" for uncommitted changes
    ("unknown" outside a git checkout)."""
    if os.environ.get("SMARTDIFF_COMMIT"):
        return os.environ["SMARTDIFF_COMMIT"]
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def provenance(commit: str | None = None) -> dict:
    """What a results file needs to be reproduced: the commit (pass the launcher's when the checkout here may be
    stale, as on a lent machine), the command, the library versions, the card and its power limit."""
    import importlib.metadata
    import sys

    versions = {}
    for name in ("torch", "triton", "diffusers", "smart-diffusion"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    try:
        limit = subprocess.run(["nvidia-smi", "--query-gpu=power.limit", "--format=csv,noheader", "-i", "0"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        limit = None
    return dict(commit=commit or git_commit(), command=" ".join(sys.argv), versions=versions, card=card,
                power_limit=limit, date=time.strftime("%Y-%m-%d"))


def cuda_time(fn, warmup: int, iters: int) -> list[float]:
    """Seconds of each of `iters` calls of fn (CUDA events), after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


# Kernel name patterns -> op class, first match wins (profile of one forward, --profile).
OP_CLASSES = [
    ("communication (nccl)", ("nccl",)),
    ("compiled elementwise (triton)", ("triton_",)),  # Inductor's kernels (their names list the fused ops)
    ("q/k norm + RoPE (our triton kernel)", ("_rms_rope",)),
    ("attention", ("fmha", "flash", "attention", "sdpa", "_attn", "sage", "sparge")),
    ("gemm", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "sm90_", "sm80_", "matmul", "splitk")),
    ("copies", ("copy", "memcpy", "memset", "catarraybatched", "fill")),
    ("norms", ("norm",)),
    ("conv (patch embedding)", ("conv", "implicit", "im2col")),
]


def profile_forward(fn, label: str, top: int = 12) -> dict:
    """CUDA kernel time of one forward by op class, plus the largest kernels and the gaps (wall - kernels)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    kernels: dict[str, list[float]] = {}
    spans = []
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            kernels.setdefault(ev.name, []).append(ev.device_time / 1e6)  # us -> s
            spans.append((ev.time_range.start, ev.time_range.end))
    busy_union, reach = 0.0, float("-inf")  # GPU busy time: kernels on several streams (NCCL) overlap
    for a, b in sorted(spans):
        if b > reach:
            busy_union += (b - max(a, reach)) / 1e6
            reach = b
    classes: dict[str, float] = {}
    for name, times in kernels.items():
        lower = name.lower()
        cls = next((c for c, pats in OP_CLASSES if any(p in lower for p in pats)), "other")
        classes[cls] = classes.get(cls, 0.0) + sum(times)
    busy = sum(classes.values())
    biggest = sorted(((sum(t), len(t), n) for n, t in kernels.items()), reverse=True)[:top]
    print(f"\nprofile: {label}: wall {wall * 1e3:.1f} ms, kernels {busy * 1e3:.1f} ms (summed over streams), "
          f"GPU busy {busy_union * 1e3:.1f} ms, idle gaps {(wall - busy_union) * 1e3:.1f} ms")
    for cls, sec in sorted(classes.items(), key=lambda kv: -kv[1]):
        print(f"  {cls:<32}{sec * 1e3:9.1f} ms {sec / busy:7.1%}")
    for sec, calls, name in biggest:
        print(f"    {sec * 1e3:8.1f} ms {calls:5d}x  {name[:110]}")
    return dict(wall_s=wall, kernels_s=busy, busy_s=busy_union, classes_s=classes,
                top=[dict(seconds=s, calls=c, name=n) for s, c, n in biggest])


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative L2 error ||out - ref|| / ||ref|| in float32 (ref moved to out's device)."""
    ref = ref.to(out.device).float()
    return ((out.float() - ref).norm() / ref.norm()).item()


def same_weight_vaes(cfg, device, dtype):
    """(diffusers' AutoencoderKLWan with seed-0 random weights on the CPU, our WanVAE with the same weights on
    `device` in `dtype`), both in eval mode without gradients."""
    from diffusers import AutoencoderKLWan

    from smartdiff.services.vae.model import WanVAE
    from smartdiff.services.vae.weights import convert_diffusers_state_dict
    from smartdiff.shared.checkpoint import load_strict

    torch.manual_seed(0)
    ref = AutoencoderKLWan(base_dim=cfg.base_dim, z_dim=cfg.z_dim, num_res_blocks=cfg.num_res_blocks).eval()
    ref.requires_grad_(False)
    with torch.device("meta"):
        ours = WanVAE(cfg)
    ours = load_strict(ours, convert_diffusers_state_dict(ref.state_dict(), cfg.num_res_blocks),
                       "diffusers reference", device, dtype)
    return ref, ours.eval()


def diffusers_dit(cfg, device: torch.device, dtype: torch.dtype):
    """diffusers' WanTransformer3DModel with random weights in `dtype`, its fp32-kept modules float32 (as
    from_pretrained(torch_dtype=...) leaves them). Built in float32 on the device first (57 GB for 14B)."""
    import diffusers

    with torch.device(device):
        model = diffusers.WanTransformer3DModel(
            patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
            in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
            ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=cfg.eps)
    model = model.to(dtype).eval().requires_grad_(False)
    for name, param in model.named_parameters():
        if any(k in name.split(".") for k in model._keep_in_fp32_modules):
            param.data = param.data.float()
    return model
