"""The scalar delta update (d_v = 1) as one opaque op: one fused Triton kernel forward, one backward.

Per token (a row of d features), with k = h / sqrt(||h||^2 + eps^2)::

    p = k.X    delta = beta (v - p)    out = X + (k delta).to(X.dtype)

The unfused path (``DeltaResidual`` with its ``k_dir`` and ``write`` taps) materialises k, an fp32
(B, T, d) tensor, and reads it again in backward. Here each kernel reads h and X once and keeps k in
registers; backward gets only two fp32 scalars a row from forward, rnorm = 1/sqrt(||h||^2 + eps^2)
and p, and recomputes k = rnorm h.

Backward, by hand (g = grad_out; every row reduction is one dot product, g.k)::

    gk        = g.k
    grad_v    = beta gk
    grad_beta = (v - p) gk
    grad_X    = g - beta gk k
    grad_k    = delta g - beta gk X
    grad_h    = rnorm (grad_k - (k.grad_k) k),   k.grad_k = gk (delta - beta p)

the last from dk/dh = rnorm (I - k k^T) with k = rnorm h, exact for any eps (k is not quite unit).
tests/ddl/test_fused.py checks all four against torch.autograd in float64.

``torch.ops.deltascope.delta_update_dv1`` and its ``_backward`` are ``torch.library`` custom ops with
fake kernels, so ``torch.compile(fullgraph=True)`` keeps each as one node. They run the Triton
kernels on CUDA (or on CPU tensors under TRITON_INTERPRET=1) and the same formulas in PyTorch
elsewhere, so the op and its hand-written backward are checked on machines without triton.
Triton is imported on the first launch only: ``import ddl.fused`` works without it.
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import Tensor

HAS_TRITON = importlib.util.find_spec("triton") is not None
MAX_D = 16384
"""Widest row the kernels take whole into registers; wider rows run the PyTorch formulas."""


def supported(X: Tensor) -> bool:
    """Whether ``DeltaResidual`` should take the fused op for state X: CUDA, Triton, d <= MAX_D."""
    return X.is_cuda and HAS_TRITON and X.shape[-1] <= MAX_D


def delta_update_dv1_reference(X: Tensor, h: Tensor, v: Tensor, beta: Tensor, eps: float) -> Tensor:
    """The unfused PyTorch path, op for op as ``DeltaResidual`` (KDirection, Write) computes it.

    X (..., d) any float dtype; h (..., d); v, beta (..., 1) fp32 -> (..., d) in X's dtype."""
    h = h.float()
    k = h * torch.rsqrt(h.square().sum(-1, keepdim=True) + eps**2)
    p = (k * X.float()).sum(-1, keepdim=True)
    delta = beta * (v - p)
    return X + (k * delta).to(X.dtype)


def delta_update_dv1(X: Tensor, h: Tensor, v: Tensor, beta: Tensor, eps: float) -> Tensor:
    """The fused op; same signature and result as :func:`delta_update_dv1_reference`.

    v and beta broadcast to (..., 1) and are taken in fp32; X and h are made contiguous."""
    lead = (*X.shape[:-1], 1)
    v, beta = v.float().expand(lead), beta.float().expand(lead)
    return torch.ops.deltascope.delta_update_dv1(X, h, v, beta, eps)[0]


def _use_triton(t: Tensor) -> bool:
    if not HAS_TRITON or t.shape[-1] > MAX_D:
        return False
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def _rows(t: Tensor) -> Tensor:
    return t.contiguous().view(-1, t.shape[-1])  # (n, d): tokens are rows


@torch.library.custom_op("deltascope::delta_update_dv1", mutates_args=())
def _op(X: Tensor, h: Tensor, v: Tensor, beta: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """-> (out (..., d) in X's dtype, rnorm (..., 1) fp32, p (..., 1) fp32); the last two for backward."""
    lead = (*X.shape[:-1], 1)
    if X.numel() == 0 or not _use_triton(X):
        h32 = h.float()
        rnorm = torch.rsqrt(h32.square().sum(-1, keepdim=True) + eps**2)
        k = h32 * rnorm
        p = (k * X.float()).sum(-1, keepdim=True)
        return (X + (k * (beta * (v - p))).to(X.dtype)).contiguous(), rnorm, p
    from ddl import _fused_kernels

    out, rnorm, p = _fused_kernels.forward(_rows(X), _rows(h), _rows(v.float()), _rows(beta.float()), eps)
    return out.view(X.shape), rnorm.view(lead), p.view(lead)


@_op.register_fake
def _(X, h, v, beta, eps):
    lead = (*X.shape[:-1], 1)
    row = X.new_empty(lead, dtype=torch.float32)
    return X.new_empty(X.shape), row, torch.empty_like(row)


@torch.library.custom_op("deltascope::delta_update_dv1_backward", mutates_args=())
def _op_backward(g: Tensor, X: Tensor, h: Tensor, v: Tensor, beta: Tensor, rnorm: Tensor,
                 p: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (grad_X, grad_h, grad_v, grad_beta) in the dtypes of X, h, v, beta (the last two fp32)."""
    if X.numel() == 0 or not _use_triton(X):
        g32, x32, h32 = g.float(), X.float(), h.float()
        k = h32 * rnorm
        gk = (g32 * k).sum(-1, keepdim=True)
        delta = beta * (v - p)
        a = beta * gk
        grad_k = delta * g32 - a * x32
        grad_h = rnorm * (grad_k - gk * (delta - beta * p) * k)
        return ((g32 - a * k).to(X.dtype).contiguous(), grad_h.to(h.dtype).contiguous(),
                a.to(v.dtype), ((v - p) * gk).to(beta.dtype))
    from ddl import _fused_kernels

    gX, gh, gv, gbeta = _fused_kernels.backward(_rows(g), _rows(X), _rows(h), _rows(v.float()),
                                                _rows(beta.float()), _rows(rnorm), _rows(p))
    return gX.view(X.shape), gh.view(h.shape), gv.view(v.shape).to(v.dtype), gbeta.view(beta.shape).to(beta.dtype)


@_op_backward.register_fake
def _(g, X, h, v, beta, rnorm, p):
    return X.new_empty(X.shape), h.new_empty(h.shape), v.new_empty(v.shape), beta.new_empty(beta.shape)


def _setup_context(ctx, inputs, output):
    X, h, v, beta, eps = inputs
    _, rnorm, p = output
    ctx.mark_non_differentiable(rnorm, p)  # saved row scalars, not results: no gradient flows into them
    ctx.save_for_backward(X, h, v, beta, rnorm, p)


def _backward(ctx, grad_out, _grad_rnorm, _grad_p):
    X, h, v, beta, rnorm, p = ctx.saved_tensors
    gX, gh, gv, gbeta = torch.ops.deltascope.delta_update_dv1_backward(grad_out, X, h, v, beta, rnorm, p)
    return gX, gh, gv, gbeta, None


_op.register_autograd(_backward, setup_context=_setup_context)
