"""Our Hopper (Gluon) kernels of `sage` and `sage_int8`.

On any machine: they compile for sm_90 with the installed Triton, with wgmma pipelined (not serialized by ptxas),
TMA loads and (with the Triton they were tuned on) no register spills; the backends pick them only where they run, and fall back to the Triton kernel
when this Triton cannot compile them. On a Hopper GPU: they match float64 attention (and its log-sum-exp) and
the Triton kernel on shapes with partial tiles, both head dims and several (batch, head) pairs.
"""

import re
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton", reason="our attention kernels are Triton / Gluon")
gs = pytest.importorskip("smartdiff.services.denoiser.attention.gluon_sage", exc_type=ImportError,
                         reason="this Triton has no Gluon Hopper API")

from smartdiff.services.denoiser.attention import sage  # noqa: E402

TUNED_ON = "3.6."  # the benchmark machine's Triton (docs/benchmarks.md); later ones may allocate differently
HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
SASS_LINE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)([^;]*);")


def sass(kernel) -> list[tuple[str, str]]:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        text = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    return SASS_LINE.findall(text)


@pytest.mark.parametrize("pv", ["fp16", "int8"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_compiles_for_hopper_with_pipelined_wgmma(pv, head_dim):
    ops = sass(gs.compile_sm90(pv, head_dim))
    names = [op for op, _ in ops]
    mma = [(op, rest) for op, rest in ops if op.startswith(("HGMMA", "IGMMA"))]
    assert mma and any(op.startswith("UTMALDG") for op in names), "no wgmma / TMA in the kernel"
    if triton.__version__.startswith(TUNED_ON):  # register use was fitted with this Triton's code generation
        assert not any(op.startswith(("STL", "LDL")) for op in names), "registers spill to local memory"
    # ptxas serializes wgmma (C7512-C7514) by making every one wait for itself: each would carry gsb0
    waited = sum("gsb0" in rest for _, rest in mma)
    assert waited < len(mma) / 2, f"{waited} of {len(mma)} wgmma wait for themselves: serialized"


def test_backends_pick_gluon_only_where_it_runs(monkeypatch):
    assert not sage.gluon_supported(torch.device("cpu"), 128)
    assert sage._build_int8(None, torch.device("cpu"), torch.float32, 128).label == "sage_int8[triton]"
    monkeypatch.setattr(sage, "gluon_supported", lambda device, head_dim: True)
    assert sage._build_int8(None, torch.device("cpu"), torch.float32, 128).label == "sage_int8[gluon]"
    assert sage._build_sage(None, torch.device("cpu"), torch.float32, 128).label == "sage[gluon]"


def test_falls_back_to_triton_when_gluon_does_not_compile(monkeypatch):
    from triton.compiler.errors import CompilationError

    kern = sage.GluonSageKernel("sage_int8", torch.device("cpu"), "int8")
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise CompilationError("", None, "unsupported in this Triton")

    def triton_kernel(q, k, v, pv, cfg, lse=False):
        return ("triton", pv, lse)

    monkeypatch.setattr(kern, "run", broken)
    monkeypatch.setattr(sage.TritonSageKernel, "__init__", lambda self, name, device, pv: (
        setattr(self, "run", triton_kernel), setattr(self, "cfg", None), setattr(self, "label", f"{name}[triton]"))[0])
    q = torch.zeros(1, 4, 1, 64)
    assert kern(q, q, q) == ("triton", "int8", False)
    assert kern.label == "sage_int8[triton]"
    assert kern.with_lse(q, q, q) == ("triton", "int8", True)
    assert calls == [1]  # tried once, not on every call


def reference(q, k, v):
    qd, kd, vd = (x.double().transpose(1, 2) for x in (q, k, v))
    s = qd @ kd.transpose(-1, -2) * q.shape[-1] ** -0.5
    return (torch.softmax(s, -1) @ vd).transpose(1, 2), torch.logsumexp(s, -1)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU (sm_90)")
@pytest.mark.parametrize("pv,tol", [("fp16", 2.5e-2), ("int8", 3e-2)])
@pytest.mark.parametrize("shape", [(1, 200, 333, 2, 128), (2, 130, 128, 3, 128), (1, 64, 1000, 2, 64),
                                   (1, 300, 100, 2, 128), (1, 4100, 4100, 1, 128)])
def test_matches_float64_and_the_triton_kernel(pv, tol, shape):
    from smartdiff.services.denoiser.attention import triton_sage as ts

    b, lq, lk, h, d = shape
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(b, lq, h, d, device="cuda", generator=g, dtype=torch.bfloat16)
    k = torch.randn(b, lk, h, d, device="cuda", generator=g, dtype=torch.bfloat16) + 0.5
    v = torch.randn(b, lk, h, d, device="cuda", generator=g, dtype=torch.bfloat16)
    ref, ref_lse = reference(q, k, v)
    out, lse = gs.sage_attention(q, k, v, pv, lse=True)
    assert torch.isfinite(out).all()
    assert rel(out, ref) < tol
    assert (lse.double() - ref_lse).abs().max().item() < 3e-2
    assert rel(out, ts.sage_attention(q, k, v, pv)) < tol


@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU (sm_90)")
def test_int8_never_wraps_the_largest_probability():
    """Large scores (q, k scaled by 6): 127 p of a row's maximum must stay 127, not wrap to -128."""
    g = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(1, 512, 2, 128, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3))
    q, k = q * 6, k * 6
    ref, _ = reference(q, k, v)
    same_qk = rel(gs.sage_attention(q, k, v, "fp16"), ref)  # the INT8 Q.K^T error of such peaked rows
    assert rel(gs.sage_attention(q, k, v, "int8"), ref) < 1.2 * same_qk


@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU (sm_90)")
def test_backends_run_gluon_on_hopper():
    from smartdiff.services.denoiser import attention as A

    for name in ("sage", "sage_int8"):
        choice = A.AttentionChoice(name)
        res = A.resolve(choice, torch.device("cuda"), torch.bfloat16, 128)
        kern = A.handle.build_kernel(res, choice, torch.device("cuda"), torch.bfloat16, 128)
        if name == "sage" and sage.sageattention_package() is not None:
            continue
        assert kern.label == f"{name}[gluon]"
