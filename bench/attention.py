"""Attention backends on one GPU, in one run: kernel TFLOP/s and relative error beside cuDNN SDPA and
sageattention 1.0.6, then one DiT forward per backend (time and relative error of the output).

Run: python bench/attention.py --out bench_results/attention.json [--sweep] [--e2e 1.3B 14B] [--check]
Needs a CUDA GPU; the peer `sageattention` (1.0.6 from PyPI) is run when installed.
TFLOP/s counts exact attention FLOPs (4 * B * N * L^2 * D) for every backend, sparse ones included.
Random inputs / weights make attention diffuse: errors of lossy backends here are a lower bound on difficulty.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from smartdiff.services.denoiser import attention as A
from smartdiff.services.denoiser.attention import triton_sage as ts
from smartdiff.services.denoiser.attention.sparge import SpargeKernel

from common import cuda_time, git_commit, rel_err as rel

SHAPES = {"1.3B-480p": (1, 32760, 12, 128), "14B-480p": (1, 32760, 40, 128),  # B, L, N, D
          "14B-720p": (1, 75600, 40, 128)}
MODELS = {"1.3B": "Wan2.1-T2V-1.3B", "14B": "Wan2.1-T2V-14B"}


def sdpa_views(q, k, v, backends=None):
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    if backends is None:  # the engine's old path: PyTorch's own choice
        return F.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2)
    with sdpa_kernel(backends):
        return F.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2)


def sweep_rows() -> list[tuple[str, object]]:
    """Our kernel's tile and pipelining-depth variants (labels start with 'sweep fp16', 'sweep fp8', 'sweep int8')."""
    dev = torch.device("cuda")
    rows = []
    eight_bit = [(64, 128, 4, 3), (64, 128, 4, 2), (64, 64, 4, 4), (128, 64, 4, 3), (128, 128, 8, 3)]
    for pv, cfgs in (("fp16", [(128, 64, 4, 3), (128, 64, 4, 2), (128, 64, 4, 4), (64, 64, 4, 3), (64, 128, 4, 2),
                               (128, 64, 8, 3)]),
                     ("fp8", eight_bit), ("int8", eight_bit + [(128, 128, 4, 2), (64, 128, 4, 4)])):
        for c in cfgs:
            cfg = ts.KernelConfig(*c)
            rows.append((f"sweep {pv} {c}",
                         lambda q, k, v, cfg=cfg, pv=pv: (lambda: ts.sage_attention(q, k, v, pv, cfg)), cfg))
    for pv, c in [("fp16", (128, 64, 4, 3)), ("fp16", (64, 128, 4, 2)), ("int8", (64, 128, 4, 3))]:
        def sp(q, k, v, cfg=ts.KernelConfig(*c), pv=pv):
            kern = SpargeKernel(A.SpargeParams(topk=0.5), dev)
            kern.pv, kern.cfg = pv, cfg
            return lambda: kern(q, k, v)
        rows.append((f"sweep sparge0.5 {pv} {c}", sp, None))

    def plan_only(q, k, v):  # quantization + pooled mask + LUT, no attention
        cfg, params = ts.default_config(dev, "fp16"), A.SpargeParams(topk=0.5).resolved()

        def fn():
            quant = ts.quantize(q, k, v, cfg, "fp16", pool=True)
            ts.block_plan(quant, params.topk, params.cdf_threshold, params.sim_threshold)
            return q
        return fn
    rows.append(("sparge plan only (quant+mask+lut)", plan_only, None))
    rows.append(("sage quantize only", lambda q, k, v: (lambda: (ts.quantize(q, k, v, ts.default_config(dev, "fp16"),
                                                                             "fp16"), q)[1]), None))
    return rows


def kernel_rows() -> list[tuple[str, object]]:
    """(label, factory(q, k, v) -> fn) for every kernel to time."""
    dev = torch.device("cuda")
    from smartdiff.services.denoiser.attention.sdpa import SdpaKernel

    def contiguous_sdpa(q, k, v):
        kern = SdpaKernel(dev, contiguous=True)
        return lambda: kern(q, k, v)

    rows = [
        ("sdpa default (old engine path)", lambda q, k, v: (lambda: sdpa_views(q, k, v))),
        ("sdpa[flash]", lambda q, k, v: (lambda: sdpa_views(q, k, v, [SDPBackend.FLASH_ATTENTION]))),
        ("sdpa cudnn, BNLD copies incl.", contiguous_sdpa),
    ]
    for name in ("sdpa", "flash_attn", "sage", "sage_fp8", "sage_int8"):
        rows.append((name, lambda q, k, v, name=name: _backend_fn(name, A.AttentionChoice(name), q, k, v)))
    for name, pv in (("sage", "fp16"), ("sage_int8", "int8")):  # beside the Gluon kernels the backends run on Hopper
        rows.append((f"{name} [triton kernel]", lambda q, k, v, pv=pv: (lambda: ts.sage_attention(q, k, v, pv))))
    from smartdiff.services.denoiser.attention.sage import gluon_supported

    if gluon_supported(dev, 128):  # our exact Hopper kernel, beside cuDNN
        from smartdiff.services.denoiser.attention import gluon_sage

        rows.append(("exact [gluon kernel]", lambda q, k, v: (lambda: gluon_sage.exact_attention(q, k, v))))
    for label, params in (("sparge topk 0.5", A.SpargeParams(topk=0.5)),
                          ("sparge topk 0.25", A.SpargeParams(topk=0.25)),
                          ("sparge cdf 0.98 (default)", A.SpargeParams())):
        rows.append((label, lambda q, k, v, p=params: _backend_fn("sparge", A.AttentionChoice("sparge", sparge=p),
                                                                   q, k, v)))

    def triton_sparge(q, k, v):  # the Triton walk beside the Gluon one the backend runs on Hopper (own 128x64 plan)
        kern = SpargeKernel(A.SpargeParams(topk=0.5), dev)  # no head dim given: never the Gluon walk
        return lambda: kern(q, k, v)

    rows.append(("sparge topk 0.5 [triton kernel]", triton_sparge))
    try:
        from sageattention import sageattn

        def peer(q, k, v):
            k2 = k.clone()  # sageattn 1.0.6 subtracts K's mean in place (idempotent after the first call)
            return lambda: sageattn(q, k2, v, tensor_layout="NHD", is_causal=False)

        rows.append(("sageattention 1.0.6 (peer)", peer))
    except ImportError:
        print("sageattention not installed: peer skipped")
    return rows


def _backend_fn(name, choice, q, k, v):
    res = A.resolve(choice, q.device, q.dtype, q.shape[-1])
    kern = A.handle.build_kernel(res, choice, q.device, q.dtype, q.shape[-1])
    fn = lambda: kern(q, k, v)  # noqa: E731
    fn.kernel = kern
    return fn


def adopt_best(rows: list[dict], configs: dict) -> None:
    """Make the fastest swept configuration of each P.V precision the default for the rest of this run."""
    for pv in ts.PV_MODES:
        cands = [r for r in rows if r["label"].startswith(f"sweep {pv} ")]
        if cands:
            best = min(cands, key=lambda r: r["seconds"])
            ts.HOPPER_CONFIG[pv] = configs[best["label"]]
            print(f"adopted for {pv} P.V: {best['label']} {configs[best['label']]}")


def bench_kernels(shape_name: str, sweep: bool, iters: int, adopt: bool = False,
                  only: list[str] | None = None) -> list[dict]:
    b, l, n, d = SHAPES[shape_name]
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, l, n, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    flops = 4 * b * n * l * l * d
    heads = 2  # float32 reference on the first heads only (memory / time)
    ref32 = sdpa_views(*(x[:, :, :heads].float() for x in (q, k, v)), [SDPBackend.EFFICIENT_ATTENTION])
    base = sdpa_views(q, k, v, [SDPBackend.CUDNN_ATTENTION])
    base_t = None
    out, configs = [], {}
    rows = sweep_rows() + [("adopt", None, None)] if sweep else []
    rows += [(label, factory, None) for label, factory in kernel_rows()
             if not only or label == "sdpa" or any(o in label for o in only)]
    for label, factory, cfg in rows:
        if label == "adopt":
            if adopt:
                adopt_best(out, configs)
            continue
        configs[label] = cfg
        try:
            fn = factory(q, k, v)
            res = fn()
            times = cuda_time(fn, 1, iters)
        except Exception as e:  # noqa: BLE001 - report and go on with the others
            print(f"{shape_name:<10} {label:<34} FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            traceback.print_exc(limit=2, file=sys.stdout)
            continue
        t = statistics.median(times)
        if label == "sdpa":
            base_t = t
        row = dict(shape=shape_name, label=label, kernel=getattr(getattr(fn, "kernel", None), "describe",
                                                                  lambda: label)(),
                   seconds=t, tflops=flops / t / 1e12, rel_err_vs_cudnn=rel(res, base),
                   rel_err_vs_fp32=rel(res[:, :, :heads], ref32), all_seconds=times)
        out.append(row)
        del res
    for row in out:
        row["speedup_vs_cudnn"] = base_t / row["seconds"] if base_t else None
        print(f"{row['shape']:<10} {row['label']:<34} {row['kernel'][:44]:<44} {1e3 * row['seconds']:8.2f} ms "
              f"{row['tflops']:6.0f} TF/s {row['speedup_vs_cudnn'] or 0:5.2f}x  err {row['rel_err_vs_cudnn']:.1e} "
              f"(fp32 ref {row['rel_err_vs_fp32']:.1e})", flush=True)
    del q, k, v, base, ref32
    torch.cuda.empty_cache()
    return out


def bench_mask(shape_name: str, iters: int) -> list[dict]:
    """SpargeAttn's mask prediction against the whole sparge call (topk 0.5 and cdf 0.98): the pooled scores and
    block list alone (one matmul + one Triton kernel, on a quantization pass done beforehand, which the kernel
    needs anyway), the same selection in plain torch (sparge.block_mask + block_lut), and the quantization."""
    from smartdiff.services.denoiser.attention.sparge import block_lut, block_mask

    b, l, n, d = SHAPES[shape_name]
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, l, n, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    dev = q.device
    rows = []
    for label, params in (("topk 0.5", A.SpargeParams(topk=0.5)), ("cdf 0.98", A.SpargeParams())):
        p = params.resolved()
        kern = SpargeKernel(params, dev, d)  # the walk the backend runs (Gluon on Hopper), and its plan's blocks
        cfg = kern.cfg
        quant = ts.quantize(q, k, v, cfg, "fp16", pool=True)
        fns = {
            "sparge call": lambda: kern(q, k, v),
            "mask prediction (triton)": lambda: ts.block_plan(quant, p.topk, p.cdf_threshold, p.sim_threshold),
            "mask prediction (torch)": lambda: block_lut(block_mask(quant.q_pool, quant.q_sim, quant.k_pool,
                                                                    quant.k_sim, p)),
            "quantization + pooling": lambda: ts.quantize(q, k, v, cfg, "fp16", pool=True),
        }
        t = {name: statistics.median(cuda_time(fn, 2, iters)) for name, fn in fns.items()}
        same = torch.equal(ts.block_plan(quant, p.topk, p.cdf_threshold, p.sim_threshold)[1],
                           block_lut(block_mask(quant.q_pool, quant.q_sim, quant.k_pool, quant.k_sim, p))[1])
        row = dict(shape=shape_name, params=label, seconds=t,
                   mask_share=t["mask prediction (triton)"] / t["sparge call"], same_counts_as_torch=same)
        rows.append(row)
        print(f"{shape_name:<10} sparge {label}: call {1e3 * t['sparge call']:.2f} ms, mask prediction "
              f"{1e3 * t['mask prediction (triton)']:.3f} ms ({100 * row['mask_share']:.1f}%; torch "
              f"{1e3 * t['mask prediction (torch)']:.3f} ms), quantization {1e3 * t['quantization + pooling']:.3f} ms,"
              f" same counts as torch: {same}", flush=True)
    q = k = v = quant = None  # free before the next shape (the lambdas above are done)
    torch.cuda.empty_cache()
    return rows


def check_small() -> list[dict]:
    """Correctness on small odd shapes against float64, every Triton and Gluon path (poisoned outputs would show)."""
    from smartdiff.services.denoiser.attention.sage import gluon_supported

    gluon_sage = None
    if gluon_supported(torch.device("cuda"), 128):
        from smartdiff.services.denoiser.attention import gluon_sage
    out = []
    g = torch.Generator(device="cuda").manual_seed(1)
    for (b, l, n, d) in [(2, 1000, 3, 128), (1, 777, 2, 64)]:
        q, k, v = (torch.randn(b, l, n, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
        k = k + 0.5
        ref = sdpa_views(q.double(), k.double(), v.double(), [SDPBackend.MATH])
        for name, fn in (("sage", lambda: ts.sage_attention(q, k, v, "fp16")),
                         ("sage_fp8", lambda: ts.sage_attention(q, k, v, "fp8")),
                         ("sage_int8", lambda: ts.sage_attention(q, k, v, "int8")),
                         *(((f"{backend}[gluon]", lambda pv=pv: gluon_sage.sage_attention(q, k, v, pv))
                            for backend, pv in (("sage", "fp16"), ("sage_int8", "int8"))) if gluon_sage else ()),
                         *((("exact[gluon]", lambda: gluon_sage.exact_attention(q, k, v)),) if gluon_sage else ()),
                         ("sparge topk1", lambda: SpargeKernel(A.SpargeParams(topk=1.0), q.device)(q, k, v)),
                         ("sdpa", lambda: A.get_backend("sdpa").build(None, q.device, q.dtype, d)(q, k, v))):
            o = fn()
            e = rel(o.double(), ref)
            out.append(dict(shape=[b, l, n, d], name=name, rel_err_vs_fp64=e, finite=bool(torch.isfinite(o).all())))
            print(f"check {str((b, l, n, d)):<20} {name:<14} rel err vs fp64 {e:.2e} finite {out[-1]['finite']}")
        from smartdiff.services.denoiser.attention.sparge import block_lut, block_mask
        walks = [("triton", ts.KernelConfig(128, 64, 4, 3)), ("triton", ts.KernelConfig(64, 128, 4, 3))]
        if gluon_sage:
            walks += [("gluon", ts.KernelConfig(128, 64, 4, 3)), ("gluon", ts.KernelConfig(128, 128, 4, 3))]
        for walk, cfg in walks:
            quant = ts.quantize(q, k, v, cfg, "fp16", pool=True)
            keep = block_mask(quant.q_pool, quant.q_sim, quant.k_pool, quant.k_sim, A.SpargeParams(topk=0.5))
            lut, n_sel = block_lut(keep)
            if walk == "gluon":
                o = gluon_sage.attention_forward(quant, q.shape, l, q.dtype, "fp16", lut=lut, n_sel=n_sel)
            else:
                o = ts.attention_forward(quant, q.shape, l, q.dtype, cfg, "fp16", lut, n_sel)
            rows = torch.arange(l, device="cuda")
            tok = keep.view(b, n, *keep.shape[1:])[:, :, rows // cfg.block_m][:, :, :, rows // cfg.block_n]
            qd, kd, vd = (x.double().transpose(1, 2) for x in (q, k, v))
            sc = (qd @ kd.transpose(-1, -2) * d ** -0.5).masked_fill(~tok, float("-inf"))
            refm = (torch.softmax(sc, -1) @ vd).transpose(1, 2)
            e = rel(o.double(), refm)
            out.append(dict(shape=[b, l, n, d], name=f"sparse topk0.5 {walk} {cfg}", rel_err_vs_fp64_masked=e,
                            kept=keep.float().mean().item(), finite=bool(torch.isfinite(o).all())))
            print(f"check {str((b, l, n, d)):<20} sparse {walk} {cfg.block_m}x{cfg.block_n} vs fp64 "
                  f"masked {e:.2e} (kept {keep.float().mean().item():.2f})")
            if walk == "triton":
                o = ts.sage_attention(q, k, v, "fp16", cfg)
                print(f"check {str((b, l, n, d)):<20} dense  {cfg} vs fp64 {rel(o.double(), ref):.2e}")
    return out


def bench_e2e(label: str, iters: int, only: list[str] | None = None) -> list[dict]:
    from smartdiff.services.denoiser.weights import random_dit
    from smartdiff.shared.config import load_model_config

    cfg = load_model_config(MODELS[label]).dit
    dit = random_dit(cfg, "cuda", torch.bfloat16, 0).eval()
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, 16, 21, 60, 104, device="cuda", generator=g, dtype=torch.bfloat16)
    ctx = torch.randn(1, 512, cfg.text_dim, device="cuda", generator=g, dtype=torch.bfloat16)
    t = torch.tensor([900.0], device="cuda")
    choices = [("old sdpa path (no attach)", None), ("sdpa", A.AttentionChoice("sdpa")),
               ("flash_attn", A.AttentionChoice("flash_attn")), ("sage", A.AttentionChoice("sage")),
               ("sage_fp8", A.AttentionChoice("sage_fp8")), ("sage_int8", A.AttentionChoice("sage_int8")),
               ("sparge topk 0.5", A.AttentionChoice("sparge", sparge=A.SpargeParams(topk=0.5))),
               ("sparge cdf 0.98", A.AttentionChoice("sparge")),
               ("auto (tol 2e-2)", A.AttentionChoice("auto")),
               ("auto, sparge topk 0.5", A.AttentionChoice("auto", sparge=A.SpargeParams(topk=0.5))),
               ("auto (tol 5e-2)", A.AttentionChoice("auto", tolerance=5e-2))]
    if only:
        choices = [c for c in choices if c[0] in only or c[0] == "sdpa"]
    rows, ref = [], None
    with torch.inference_mode():
        for name, choice in choices:
            try:
                if choice is None:
                    out = dit(x, t, ctx)
                    times = cuda_time(lambda: dit(x, t, ctx), 1, iters)
                    selection = "dit.sdpa_attention"
                else:
                    with A.attach(dit, choice) as h:
                        out = dit(x, t, ctx)  # auto measures here (exact output)
                        out2 = dit(x, t, ctx)
                        times = cuda_time(lambda: dit(x, t, ctx), 0, iters)
                    selection = h.selection
                    out = out2
            except Exception as e:  # noqa: BLE001
                print(f"e2e {label} {name}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                traceback.print_exc(limit=3, file=sys.stdout)
                continue
            if name == "sdpa":
                ref = out
            rows.append(dict(model=MODELS[label], name=name, selection=selection, seconds=statistics.median(times),
                             all_seconds=times, out=out))
    base = next((r["seconds"] for r in rows if r["name"] == "sdpa"), None)
    for r in rows:
        o = r.pop("out")
        r["rel_err_vs_sdpa"] = rel(o, ref) if ref is not None else None
        r["speedup_vs_sdpa"] = base / r["seconds"] if base else None
        print(f"e2e {label:<5} {r['name']:<26} {r['seconds']:7.3f} s  {r['speedup_vs_sdpa'] or 0:5.2f}x  "
              f"err {r['rel_err_vs_sdpa'] or 0:.1e}  [{r['selection'][:400]}]", flush=True)
    dit = None  # frees the weights (the timing lambdas above hold the name, not a copy)
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--sweep", action="store_true", help="also time our kernel's tile configurations")
    p.add_argument("--sweep-only", action="store_true", help="1.3B-480p sweep only (tuning)")
    p.add_argument("--check", action="store_true", help="small-shape correctness against float64 first")
    p.add_argument("--adopt-best", action="store_true", help="use the sweep's fastest configs for the rest")
    p.add_argument("--kernels", nargs="*", default=None, help="only kernel rows whose label contains one of these")
    p.add_argument("--e2e-choices", nargs="*", default=None, help="only these e2e rows (names as printed)")
    p.add_argument("--e2e", nargs="*", default=[], choices=list(MODELS))
    p.add_argument("--mask", action="store_true", help="time sparge's mask prediction against its whole call")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("bench_results/attention.json"))
    args = p.parse_args()
    res = dict(card=torch.cuda.get_device_name(), date=time.strftime("%Y-%m-%d"), torch=torch.__version__,
               triton=__import__("triton").__version__, argv=sys.argv, commit=git_commit(), check=[], kernels=[],
               mask=[], e2e=[])
    print(f"card: {res['card']}  torch {res['torch']}  triton {res['triton']}", flush=True)
    if args.check:
        res["check"] = check_small()
    for s in args.shapes:
        res["kernels"] += bench_kernels(s, args.sweep and (s == "1.3B-480p" or not args.sweep_only),
                                        args.iters if s == "1.3B-480p" else max(2, args.iters // 2), args.adopt_best,
                                        args.kernels)
        if args.mask:
            res["mask"] += bench_mask(s, args.iters)
        res["configs"] = {str(k): repr(v) for k, v in ts.HOPPER_CONFIG.items()}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1))
    for m in args.e2e:
        res["e2e"] += bench_e2e(m, 3 if m == "1.3B" else 2, args.e2e_choices)
        args.out.write_text(json.dumps(res, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
