"""The Llama-style backbone shared by DDL and the additive baseline.

Pre-norm RMSNorm (fp32 inside), rotary embeddings (half-split, base 10000), per-head QK RMSNorm
applied after RoPE (the official order), causal SDPA, SwiGLU MLP; no biases anywhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ddl.config import DDLConfig


class RMSNorm(nn.Module):
    """RMSNorm with a learnable gain, computed in fp32 and cast back to the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps)
        return y.to(x.dtype)


def _narrow_product(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (..., n) times w (o, n)^T in fp32 as one reduction over a (..., o, n) product (``_NarrowProduct`` says why
    not a stack of sums)."""
    return (x.float().unsqueeze(-2) * w.float()).sum(-1)


class _NarrowProduct(torch.autograd.Function):
    """y[..., o] = sum_n x[..., n] w[o, n] in fp32, written as a product and a sum that inductor compiles into a
    reduction, with w's gradient as one matmul over the tokens, G^T x in x's dtype (a cuBLAS launch reading x
    once) rather than a column sum per output, which inductor writes as a partial sum into a (1024, n) workspace
    finished by another launch for each.

    The bias (None or (o,)), added in fp32, is an input too, so that its gradient can come from the weight's kernel:
    with ``kernel`` (``NarrowLinear.WGRAD_KERNEL``), both come from one Triton kernel that reads x once
    (:func:`ddl.fused.narrow_weight_grad`), in place of the transposing copy of g, the matmul, its cast and the
    bias's sum.

    The sum is one reduction over a (..., o, n) product, not a stack of one sum per output. Stacked, rows o > 0 of
    w are read at an offset, which inductor does not count as contiguous: the kernel around the sums (a d_v = 4
    model's RMSNorm, gate and value head, one kernel a site) lost its inner-reduction hint and was looped, x read
    twice, 62 us a site on an H100. As one reduction, the value head is a kernel of its own (x read once more) and
    the norm and gate one persistent reduction: the small preset's d_v = 4 step 0.46 ms faster
    (docs/PERFORMANCE.md, the nineteenth session). A gate's single output (o = 1) stays inside the norm's kernel."""

    @staticmethod
    def forward(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, kernel: bool, fwd_kernel: bool,
                ) -> torch.Tensor:
        if fwd_kernel:
            from ddl import fused

            return fused.narrow_product(x, w, b)
        y = _narrow_product(x, w)
        return y if b is None else y + b.float()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, w, b, ctx.kernel, _ = inputs
        ctx.b_dtype = None if b is None else b.dtype
        ctx.save_for_backward(x, w)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, w = ctx.saved_tensors
        gx = (g.unsqueeze(-1) * w.float()).sum(-2).to(x.dtype)
        if ctx.kernel:
            from ddl import fused

            gw, gb = fused.narrow_weight_grad(g, x)
        else:
            rows = g.reshape(-1, w.shape[0]).t().to(x.dtype)  # (o, tokens), as autocast's Linear rounds it
            gw, gb = torch.mm(rows, x.reshape(-1, w.shape[1])), g.reshape(-1, w.shape[0]).sum(0)
        return gx, gw.to(w.dtype), None if ctx.b_dtype is None else gb.to(ctx.b_dtype), None, None


class _NarrowMatmul(_NarrowProduct):
    """:class:`_NarrowProduct`'s gradients with the product as one matmul (``NarrowLinear``'s ``MM_FORWARD``): a looped
    inductor reduction reads each token's row once per output, a matmul once. On CUDA a bf16/fp16 x meets w in x's
    dtype, as autocast's Linear does, and cuBLAS accumulates into an fp32 output (``out_dtype``) that is never
    rounded to x's dtype; elsewhere the product is taken in fp32."""

    @staticmethod
    def forward(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, kernel: bool, fwd_kernel: bool,
                ) -> torch.Tensor:
        rows = x.reshape(-1, w.shape[1])
        if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16):
            y = torch.mm(rows, w.t().to(x.dtype), out_dtype=torch.float32)
        else:
            y = torch.mm(rows.float(), w.t().float())
        y = y.reshape(*x.shape[:-1], w.shape[0])
        return y if b is None else y + b.float()


class NarrowLinear(nn.Linear):
    """A Linear with a few outputs (the gate's logit, the value head): nn.Linear's parameters, state
    dict and hooks, computed under ``torch.compile`` as a product and a sum over the input, in fp32.

    A matmul of 1 to d_v columns runs as its own memory-bound GEMV launch that reads its input again;
    written as a reduction, inductor fuses it into the kernel that produces that input (the RMSNorm
    before the gate, the update before the value head). Eager keeps ``F.linear``: there the product
    would be materialised. The compiled output is fp32, the eager one autocast's dtype; callers take
    ``.float()`` either way.

    ``mm_grad`` (an attribute; ``DeltaResidual`` sets it for d_v > 1): compiled, with at most 8 outputs, the
    weight's gradient is one matmul over the tokens (``_NarrowProduct``) instead of a column sum per output.
    On an H100 (small preset, docs/PERFORMANCE.md) it made the d_v = 4 step 0.3-0.6 ms faster and the d_v = 1
    step about 1.3 ms slower. ``MM_WEIGHT_GRAD``, unless None, overrides every layer's choice (benchmarks).
    ``MM_FORWARD`` (benchmarks; bench/throughput.py's ``:vmm``): where the gradient is a matmul, a layer of more than
    one output computes its product as one too (``_NarrowMatmul``), not as a reduction. ``WGRAD_KERNEL``: where the
    gradient is a matmul, whether the weight's and bias's come from one Triton kernel instead
    (:func:`ddl.fused.narrow_weight_grad`): None on CUDA with x in bf16 or fp16 (bench/throughput.py's ``:wgk``),
    True also elsewhere (the op's PyTorch formulas, or the kernel under Triton's interpreter), False (the default
    until a GPU has timed it in the model) never. ``FWD_KERNEL``, alike (``:fk``): whether a layer of more than one
    output (the d_v > 1 value head) computes its product with one Triton kernel that reads x once
    (:func:`ddl.fused.narrow_product`); a gate's single output stays in the reduction that inductor fuses into the
    RMSNorm before it."""

    MM_WEIGHT_GRAD: bool | None = None
    MM_FORWARD = False
    WGRAD_KERNEL: bool | None = False
    FWD_KERNEL: bool | None = False
    mm_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            return super().forward(x)
        mm = self.mm_grad if self.MM_WEIGHT_GRAD is None else self.MM_WEIGHT_GRAD
        # mm: w's gradient one matmul; else autograd's column sums
        if mm and self.out_features <= 8:
            fn = _NarrowMatmul if self.MM_FORWARD and self.out_features > 1 else _NarrowProduct
            native = x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)  # where the kernels run by default
            kernel = native if self.WGRAD_KERNEL is None else self.WGRAD_KERNEL
            fwd_kernel = (native if self.FWD_KERNEL is None else self.FWD_KERNEL) and self.out_features > 1
            return fn.apply(x, self.weight, self.bias, kernel, fwd_kernel)
        y = _narrow_product(x, self.weight)
        return y if self.bias is None else y + self.bias.float()


class Rotary(nn.Module):
    """Half-split ("NeoX") rotary embedding with fp32 cos/sin tables for block_size positions."""

    def __init__(self, head_dim: int, block_size: int, base: float):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        angles = torch.outer(torch.arange(block_size, dtype=torch.float64), inv_freq)
        self.register_buffer("cos", angles.cos().float(), persistent=False)  # (T, hd/2)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, H, T, hd)
        T, half = x.shape[-2], x.shape[-1] // 2
        cos, sin = self.cos[:T], self.sin[:T]
        x1, x2 = x[..., :half].float(), x[..., half:].float()
        out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
        return out.to(x.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: DDLConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        inner = cfg.n_head * cfg.head_dim
        self.c_q = nn.Linear(cfg.d_model, inner, bias=False)
        self.c_k = nn.Linear(cfg.d_model, inner, bias=False)
        self.c_v = nn.Linear(cfg.d_model, inner, bias=False)
        self.c_proj = nn.Linear(inner, cfg.d_model, bias=False)
        self.rotary = Rotary(cfg.head_dim, cfg.block_size, cfg.rope_base)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else nn.Identity()

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        B, T, _ = c.shape
        q = self.c_q(c).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.c_k(c).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        v = self.c_v(c).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        q, k = self.q_norm(self.rotary(q)), self.k_norm(self.rotary(k))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, d)


class SwiGLU(nn.Module):
    def __init__(self, cfg: DDLConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.d_model, cfg.hidden, bias=False)
        self.fc2 = nn.Linear(cfg.d_model, cfg.hidden, bias=False)
        self.c_proj = nn.Linear(cfg.hidden, cfg.d_model, bias=False)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.silu(self.fc1(c)) * self.fc2(c))
