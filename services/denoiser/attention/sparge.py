"""`sparge`: training-free block-sparse attention in the SpargeAttn style (lossy).

Per request parameters (SpargeParams): each query block keeps the key blocks that carry its attention mass,
judged on mean-pooled blocks (softmax of pooled q . pooled k), either the top-k fraction or the smallest set
reaching a cumulative threshold; blocks whose tokens are not self-similar (mean pairwise cosine below
sim_threshold: their mean does not summarise them) are always kept, as whole rows (query) or columns (key).
The kept blocks then run through our block-sparse `sage` kernel (INT8 Q.K, FP16 P.V, walking a list of key
blocks): the Gluon one on Hopper, the Triton one elsewhere and when P.V of blocks negligible in every row is to be
skipped (pv_threshold, a Triton-kernel option). `spas_sage_attn` (not on PyPI) is used instead when installed.
"""

from __future__ import annotations

import importlib.util
import math

import torch

from .base import Backend, BackendInfo, Kernel, package_version, triton_reason
from .choice import SpargeParams
from . import sage
from .sage import DTYPES, HEAD_DIMS
GLUON_BLOCKS = (128, 128)  # (query rows, keys) of a sparse block on the Gluon walk (the Triton walk: its tiles)

INFO = BackendInfo(
    name="sparge", description="SpargeAttn-style block-sparse attention (pooled-score block mask, top-k or "
                               "cumulative threshold) on our sage kernel (Gluon on Hopper, Triton elsewhere); "
                               "spas_sage_attn when installed (lossy)",
    lossy=True, devices=("cuda", "cpu"), dtypes=DTYPES, head_dims=HEAD_DIMS, returns_lse=True,
)


def block_mask(q_pool: torch.Tensor, q_sim: torch.Tensor, k_pool: torch.Tensor, k_sim: torch.Tensor,
               params: SpargeParams) -> torch.Tensor:
    """Which (query block, key block) pairs to compute: bool [BH, nq, nk] (the plain-torch statement of the
    selection that triton_sage.block_plan makes in one kernel; the tests compare them).

    q_pool [BH, nq, D], k_pool [BH, nk, D]: block means; q_sim [BH, nq], k_sim [BH, nk]: self-similarity.
    """
    p = params.resolved()
    nk = k_pool.shape[1]
    k_ok = k_sim > p.sim_threshold  # self-similar: the block mean stands for its tokens
    q_ok = q_sim > p.sim_threshold
    score = torch.bmm(q_pool, k_pool.transpose(1, 2)) * q_pool.shape[-1] ** -0.5
    prob = torch.softmax(score.masked_fill(~k_ok[:, None, :], -math.inf), dim=-1).nan_to_num_(0.0)
    keep = torch.zeros_like(prob, dtype=torch.bool)
    if p.topk is not None:
        n = min(nk, max(1, int(p.topk * nk)))
        keep.scatter_(-1, prob.topk(n, dim=-1).indices, True)
    else:  # the smallest prefix of blocks, by decreasing pooled probability, whose mass reaches the threshold
        sorted_p, order = prob.sort(dim=-1, descending=True)
        n = (sorted_p.cumsum(-1) < p.cdf_threshold).sum(-1, keepdim=True) + 1
        keep.scatter_(-1, order, torch.arange(nk, device=prob.device) < n)
    keep |= ~k_ok[:, None, :]
    keep |= ~q_ok[:, :, None]
    return keep


def block_lut(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bool [BH, nq, nk] -> (kept key-block indices ascending, padded, int32 [BH*nq, nk]; count int32 [BH*nq]).
    The kernels need at least one kept block per query block (block_mask and block_plan always keep one)."""
    nk = keep.shape[-1]
    idx = torch.arange(nk, device=keep.device, dtype=torch.int32)
    lut = torch.where(keep, idx, idx + nk).sort(dim=-1).values  # kept first, ascending
    return lut.reshape(-1, nk).contiguous(), keep.sum(-1, dtype=torch.int32).reshape(-1).contiguous()


class SpargeKernel(Kernel):
    """Our block-sparse walk: the plan (quantization pass + triton_sage.block_plan), then the kept blocks through
    gluon_sage on Hopper (head dim 64 / 128, no pv_threshold; GLUON_BLOCKS) or triton_sage (its tiles are the
    blocks). A Gluon build failure is logged and remembered for the process, as for `sage`."""

    name = "sparge"

    def __init__(self, params: SpargeParams, device: torch.device, head_dim: int | None = None):
        from . import triton_sage

        self.ts = triton_sage
        self.params = params.resolved()
        self.pv = "fp16"  # P.V precision of the kept blocks (INT8 P.V measured slower here: docs/benchmarks.md)
        self.cfg = triton_sage.default_config(device, self.pv)  # its tiles are the sparse blocks
        self.key = ("sparge", head_dim)
        self.gluon = None
        if head_dim is not None and self.params.pv_threshold is None and sage.gluon_usable(device, head_dim, self.key):
            from triton.errors import TritonError

            from . import gluon_sage

            self.gluon, self.build_errors = gluon_sage, TritonError
            self.triton_cfg, self.cfg = self.cfg, triton_sage.KernelConfig(*GLUON_BLOCKS, 4, 2)
        self.label = "sparge[gluon]" if self.gluon is not None else "sparge[triton]"
        self.kept: torch.Tensor | None = None  # kept blocks summed over calls
        self.total = 0

    def _run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lse: bool):
        p = self.params
        if self.gluon is not None and sage.gluon_failure(self.key):  # another instance's build failed meanwhile
            self.gluon, self.label, self.cfg = None, "sparge[triton]", self.triton_cfg
        quant = self.ts.quantize(q, k, v, self.cfg, self.pv, pool=True)
        lut, n_sel = self.ts.block_plan(quant, p.topk, p.cdf_threshold, p.sim_threshold)  # block_mask + block_lut
        if self.gluon is not None:
            try:
                out = self.gluon.attention_forward(quant, q.shape, k.shape[1], q.dtype, self.pv, lse=lse, lut=lut,
                                                   n_sel=n_sel)
            except self.build_errors as e:  # raised before the kernel launches: the Triton kernel takes this call
                sage.gluon_failed(self.key, self.name, e)
                self.gluon, self.label, self.cfg = None, "sparge[triton]", self.triton_cfg
                return self._run(q, k, v, lse)  # planned again on the Triton walk's blocks
        else:
            out = self.ts.attention_forward(quant, q.shape, k.shape[1], q.dtype, self.cfg, self.pv, lut, n_sel,
                                            p.pv_threshold, lse=lse)
        kept = n_sel.sum(dtype=torch.int64)  # on the device: no sync per call
        self.kept = kept if self.kept is None else self.kept + kept
        self.total += lut.numel()
        return quant, out

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self._run(q, k, v, lse=False)[1]

    def with_lse(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """LSE over the kept blocks only (what the output is normalised by)."""
        quant, (out, lse) = self._run(q, k, v, lse=True)
        return out, self.ts.true_lse(lse, quant, q)

    def density(self) -> float | None:
        """Fraction of block pairs computed so far in this request."""
        return None if self.kept is None else self.kept.item() / self.total

    def describe(self) -> str:
        d = self.density()
        kept = f", kept {100 * d:.0f}% of blocks" if d is not None else ""
        return f"{self.label} ({self.params.summary()}{kept})"


class PackageSpargeKernel(Kernel):
    """spas_sage_attn's SpargeAttn+SageAttention2 kernels, [B, L, N, D] layout."""

    name = "sparge"

    def __init__(self, params: SpargeParams, version: str | None):
        import spas_sage_attn

        self.params = params.resolved()
        self.mod = spas_sage_attn
        self.label = f"sparge[spas_sage_attn{' ' + version if version else ''}]"

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        p = self.params
        common = dict(simthreshd1=p.sim_threshold, pvthreshd=p.pv_threshold if p.pv_threshold is not None else 50,
                      tensor_layout="NHD", output_dtype=q.dtype)
        if p.topk is not None:
            return self.mod.spas_sage2_attn_meansim_topk_cuda(q, k, v, topk=p.topk, **common)
        return self.mod.spas_sage2_attn_meansim_cuda(q, k, v, cdfthreshd=p.cdf_threshold, **common)

    def with_lse(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return SpargeKernel(self.params, q.device, q.shape[-1]).with_lse(q, k, v)  # the package has no LSE output

    def describe(self) -> str:
        return f"{self.label} ({self.params.summary()})"


def _package() -> bool:
    return importlib.util.find_spec("spas_sage_attn") is not None


def _check(device: torch.device, dtype: torch.dtype | None, head_dim: int | None) -> str | None:
    if device.type == "cuda" and _package() and dtype != torch.float32:
        return None
    return triton_reason(device, (8, 0), " (INT8 tensor cores)")


def build(choice, device: torch.device, dtype: torch.dtype, head_dim: int) -> Kernel:
    params = choice.sparge if choice is not None else SpargeParams()
    if device.type == "cuda" and _package() and dtype != torch.float32:
        return PackageSpargeKernel(params, package_version("spas_sage_attn") or package_version("spas-sage-attn"))
    return SpargeKernel(params, device, head_dim)


BACKEND = Backend(INFO, _check, build)
