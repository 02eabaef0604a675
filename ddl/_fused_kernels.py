"""Triton kernels of the fused scalar delta update (d_v = 1); imported by ``ddl.fused`` on first use only.

Rows are tokens, the last dim d is contiguous. One program owns ``ROWS`` whole rows (``BLOCK_D`` =
next power of two >= d, masked), so every row reduction stays in registers: each kernel reads its
inputs once and writes its outputs once. Math and the backward derivation: ``ddl.fused``.
Only long-stable Triton APIs (program_id, arange, masked load/store, sum, sqrt, where): the GPU
machine runs the Triton bundled with its torch, older than the one the CPU interpreter tests use.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _fwd_kernel(X, H, V, BETA, OUT, RNORM, P, n_rows, d, eps2, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols[None, :] < d)
    offs = rows.to(tl.int64)[:, None] * d + cols[None, :]  # int64: B*T*d passes 2^31 at long contexts
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    h = tl.load(H + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(V + rows, mask=row_ok, other=0.0).to(tl.float32)
    beta = tl.load(BETA + rows, mask=row_ok, other=0.0).to(tl.float32)
    rnorm = 1.0 / tl.sqrt(tl.sum(h * h, axis=1) + eps2)  # (ROWS,)
    k = h * rnorm[:, None]
    p = tl.sum(k * x, axis=1)
    delta = beta * (v - p)
    # round the update to X's dtype before adding, as X + (k * delta).to(X.dtype) does eagerly
    upd = (k * delta[:, None]).to(OUT.dtype.element_ty).to(tl.float32)
    tl.store(OUT + offs, (x + upd).to(OUT.dtype.element_ty), mask=mask)
    tl.store(RNORM + rows, rnorm, mask=row_ok)
    tl.store(P + rows, p, mask=row_ok)


@triton.jit
def _bwd_kernel(G, X, H, V, BETA, RNORM, P, GX, GH, GV, GBETA, n_rows, d,
                ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols[None, :] < d)
    offs = rows.to(tl.int64)[:, None] * d + cols[None, :]
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    h = tl.load(H + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(V + rows, mask=row_ok, other=0.0).to(tl.float32)
    beta = tl.load(BETA + rows, mask=row_ok, other=0.0).to(tl.float32)
    rnorm = tl.load(RNORM + rows, mask=row_ok, other=0.0)
    p = tl.load(P + rows, mask=row_ok, other=0.0)
    k = h * rnorm[:, None]
    gk = tl.sum(g * k, axis=1)  # g.k, the one reduction
    delta = beta * (v - p)
    a = beta * gk
    grad_k = delta[:, None] * g - a[:, None] * x
    c = gk * (delta - beta * p)  # k.grad_k in closed form
    tl.store(GX + offs, (g - a[:, None] * k).to(GX.dtype.element_ty), mask=mask)
    tl.store(GH + offs, (rnorm[:, None] * (grad_k - c[:, None] * k)).to(GH.dtype.element_ty), mask=mask)
    tl.store(GV + rows, a, mask=row_ok)
    tl.store(GBETA + rows, (v - p) * gk, mask=row_ok)


def _launch(d: int) -> tuple[int, int, int]:
    """(ROWS, BLOCK_D, num_warps) for rows of width d: about 2048 elements a program, so that small d
    packs several rows and d = 768 runs two rows under 8 warps. A first guess, untuned on hardware."""
    block_d = triton.next_power_of_2(d)
    rows = max(1, 2048 // block_d)
    num_warps = min(max(rows * block_d // 256, 1), 16)
    return rows, block_d, num_warps


def forward(X: torch.Tensor, h: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
            eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Contiguous X, h (n, d); v, beta (n,) fp32 -> out (n, d) in X's dtype, rnorm (n,), p (n,) fp32."""
    n, d = X.shape
    out = torch.empty_like(X)
    rnorm = torch.empty(n, dtype=torch.float32, device=X.device)
    p = torch.empty(n, dtype=torch.float32, device=X.device)
    rows, block_d, num_warps = _launch(d)
    _fwd_kernel[(triton.cdiv(n, rows),)](X, h, v, beta, out, rnorm, p, n, d, eps * eps,
                                         ROWS=rows, BLOCK_D=block_d, num_warps=num_warps)
    return out, rnorm, p


def backward(g: torch.Tensor, X: torch.Tensor, h: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
             rnorm: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Contiguous g, X, h (n, d) and the (n,) fp32 row scalars -> grad_X, grad_h (their inputs' dtypes),
    grad_v, grad_beta (n,) fp32."""
    n, d = X.shape
    gX, gh = torch.empty_like(X), torch.empty_like(h)
    gv = torch.empty(n, dtype=torch.float32, device=X.device)
    gbeta = torch.empty_like(gv)
    rows, block_d, num_warps = _launch(d)
    _bwd_kernel[(triton.cdiv(n, rows),)](g, X, h, v, beta, rnorm, p, gX, gh, gv, gbeta, n, d,
                                         ROWS=rows, BLOCK_D=block_d, num_warps=num_warps)
    return gX, gh, gv, gbeta
