"""Instruction counts of our attention kernels' main loop, per P.V precision, without a GPU.

Compiles triton_sage._attn_fwd_kernel (or, with --gluon, gluon_sage's Hopper kernels) for an sm_90 target with
the installed Triton (its bundled ptxas), then counts the SASS instructions of the longest loop that issues
tensor-core MMAs and stores nothing (the key-block loop: one thread's instructions per trip, and per score of its
share of the trip's tiles) and reads the register count (for the Gluon kernels: the launch count; the compute
warpgroups raise theirs with setmaxnreg).
Use the Triton version of the benchmark machine (the counts move between versions). Example:

    python bench/kernel_sass.py                      # fp16, fp8, int8 at their Hopper tile configs
    python bench/kernel_sass.py --pv int8 --tile 64 64 4 3
    python bench/kernel_sass.py --gluon              # the Gluon kernels (fp16, int8)
    python bench/kernel_sass.py --gluon --pv exact   # the Gluon kernel of exact attention
"""

from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from smartdiff.services.denoiser.attention import triton_sage as ts

ARGS = [("Q8", "*i8"), ("K8", "*i8"), ("V", None), ("QS", "*fp32"), ("KS", "*fp32"), ("VS", "*fp32"),
        ("LUT", "*i32"), ("NSEL", "*i32"), ("O", "*bf16"), ("LSE", "*fp32"), ("stride_ob", "i32"),
        ("stride_ol", "i32"), ("stride_oh", "i32"), ("Lq", "i32"), ("Lk", "i32"), ("H", "i32"),
        ("n_q_blocks", "i32"), ("n_k_blocks", "i32"), ("Lq_pad", "i32"), ("Lk_pad", "i32"), ("pv_thr", "fp32")]
ALIGNED = {"Q8", "K8", "V", "QS", "KS", "VS", "LUT", "NSEL", "O", "LSE", "stride_ob", "stride_ol", "stride_oh",
           "Lq_pad", "Lk_pad"}  # what the runtime specialises as divisible by 16 in our launches
V_TYPE = {"fp16": "*fp16", "fp8": "*fp8e4nv", "int8": "*i8"}
LINE = re.compile(r"\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)[^;]*;")


def compile_sass(pv: str, cfg: ts.KernelConfig | None, gluon: bool = False) -> tuple[str, int]:
    if gluon:
        from smartdiff.services.denoiser.attention import gluon_sage

        kernel = gluon_sage.compile_sm90(pv)
    else:
        sig = {name: (V_TYPE[pv] if name == "V" else ty) for name, ty in ARGS}
        consts = dict(D=128, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, PV=ts.pv_index(pv), SPARSE=False,
                      PV_SKIP=False, HAS_TAIL=True, WRITE_LSE=False)
        sig.update({k: "constexpr" for k in consts})
        attrs = {(i,): [["tt.divisibility", 16]] for i, (name, _) in enumerate(ARGS) if name in ALIGNED}
        kernel = triton.compile(ASTSource(ts._attn_fwd_kernel, sig, consts, attrs),
                                target=GPUTarget("cuda", 90, 32),
                                options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    return sass, regs


def loop_histogram(sass: str) -> Counter:
    """Opcodes of the longest loop (backward branch) whose body issues wgmma, stores nothing to global memory and,
    where there is such a loop, masks no tail (the exact kernel runs its last key block in a loop of its own)."""
    ops = {int(m.group(1), 16): (m.group(2), m.group(0)) for m in LINE.finditer(sass)}
    loops = []
    for addr, (op, text) in ops.items():
        target = re.search(r"BRA\s+(?:`?\(?\.L_x_\d+\)?\s*)?0x([0-9a-f]+)", text) if op == "BRA" else None
        if target and int(target.group(1), 16) < addr:
            lo = int(target.group(1), 16)
            body = [o for a, (o, _) in ops.items() if lo <= a <= addr]
            if any(o.startswith(("IGMMA", "HGMMA", "QGMMA")) for o in body) and not any(o == "STG" for o in body):
                loops.append((not any(o.startswith("FSEL") for o in body), addr - lo, lo, addr))
    if not loops:
        raise RuntimeError("no MMA loop found in the SASS")
    _, _, lo, hi = max(loops)  # a loop with no tail mask (FSEL: the exact kernel's last block) first
    return Counter(op.split(".")[0] for addr, (op, _) in ops.items() if lo <= addr <= hi)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pv", nargs="*", default=list(ts.PV_MODES), choices=[*ts.PV_MODES, "exact"],
                   help="P.V precisions; 'exact' is the Gluon kernel of exact bfloat16 attention (with --gluon)")
    p.add_argument("--tile", nargs=4, type=int, metavar=("BLOCK_M", "BLOCK_N", "WARPS", "STAGES"),
                   help="default: the Hopper config of each precision")
    p.add_argument("--gluon", action="store_true", help="gluon_sage's Hopper kernels (fp16, int8) instead")
    args = p.parse_args()
    if args.gluon and args.tile:
        p.error("--tile applies to the Triton kernel; the Gluon kernels' tiles are gluon_sage.WARPGROUPS / BLOCK_N")
    print(f"triton {triton.__version__}, target sm_90")
    print(f"{'P.V':<5} {'tile':<18} {'regs':>4} {'loop':>5} {'per score':>9}  top opcodes of the loop")
    for pv in args.pv:
        if args.gluon:
            from smartdiff.services.denoiser.attention import gluon_sage as gs

            if pv not in gs.STAGES and pv != "exact":
                print(f"{pv:<5} (no Gluon kernel: the Triton kernel runs it)")
                continue
            cfg = None
            scores = 64 * gs.BLOCK_N / 128  # a thread's share of one warpgroup's 64 rows x BLOCK_N keys
            stages = gs.EXACT_STAGES if pv == "exact" else gs.STAGES[pv]
            tile = f"{gs.WARPGROUPS.value}x64x{gs.BLOCK_N} s{stages}"
        elif pv == "exact":
            print(f"{pv:<5} (Gluon only: add --gluon)")
            continue
        else:
            cfg = ts.KernelConfig(*args.tile) if args.tile else ts.HOPPER_CONFIG[pv]
            scores = cfg.block_m * cfg.block_n / (32 * cfg.num_warps)  # a thread's share of the tile
            tile = f"{cfg.block_m}x{cfg.block_n} w{cfg.num_warps} s{cfg.num_stages}"
        sass, regs = compile_sass(pv, cfg, args.gluon)
        hist = loop_histogram(sass)
        n = sum(hist.values())
        per_score = n / scores
        top = ", ".join(f"{op} {c}" for op, c in hist.most_common(8))
        print(f"{pv:<5} {tile:<18} {regs:>4} {n:>5} {per_score:>9.2f}  {top}")


if __name__ == "__main__":
    main()
