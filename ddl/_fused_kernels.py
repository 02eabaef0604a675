"""Triton kernels of the fused delta update; imported by ``ddl.fused`` on first use only.

Rows are tokens; a row's state is d x d_v, d_v innermost. d_v = 1 (``_fwd_kernel``): one program owns
``ROWS`` whole rows (``BLOCK_D`` = next power of two >= d, masked). d_v > 1 (``_fwd_tile_kernel``):
a row's (d, d_v) tile at a time, one row a program or each program striding over rows (``TILE_LAUNCH``);
with ``READ`` they also make, or take the gradient of, the next CC readout. Either way every row
reduction stays in registers: each kernel reads its inputs once and writes its outputs once. Math and
the backward derivation: ``ddl.fused``. Only long-stable Triton APIs (program_id, arange, masked
load/store, sum, sqrt, loops, constexpr branches, calls of jit functions): the GPU machine runs the
Triton bundled with its torch, older than the one the CPU interpreter tests use.
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


@triton.jit
def _tile_setup(W, d, dv, READ: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr):
    # a (d, d_v) tile's indices and masks, and W (d, d_v) in fp32 where READ (zeros, never read, elsewhere)
    i, j = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_V)
    i_ok, j_ok = i < d, j < dv
    mask = i_ok[:, None] & j_ok[None, :]
    tile = i[:, None] * dv + j[None, :]
    if READ:
        w = tl.load(W + tile, mask=mask, other=0.0).to(tl.float32)
    else:
        w = tl.zeros((BLOCK_D, BLOCK_V), dtype=tl.float32)
    return i, j, i_ok, j_ok, mask, tile, w


@triton.jit
def _fwd_tile_token(X, H, V, BETA, OUT, Y, RNORM, P, row, d, dv, eps2, i, j, i_ok, j_ok, mask, tile, w,
                    READ: tl.constexpr):
    # one token: its state is a (d, d_v) tile, d_v innermost. READ: also the next readout of the new
    # state, y[i] = sum_j W[i, j] out[i, j]
    offs = row * d * dv + tile
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_D, BLOCK_V)
    h = tl.load(H + row * d + i, mask=i_ok, other=0.0).to(tl.float32)
    v = tl.load(V + row * dv + j, mask=j_ok, other=0.0).to(tl.float32)
    beta = tl.load(BETA + row).to(tl.float32)
    rnorm = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) + eps2)
    k = h * rnorm
    p = tl.sum(k[:, None] * x, axis=0)  # (BLOCK_V,)
    delta = beta * (v - p)
    upd = (k[:, None] * delta[None, :]).to(OUT.dtype.element_ty).to(tl.float32)
    out = (x + upd).to(OUT.dtype.element_ty)
    tl.store(OUT + offs, out, mask=mask)
    if READ:
        tl.store(Y + row * d + i, tl.sum(out.to(tl.float32) * w, axis=1).to(Y.dtype.element_ty), mask=i_ok)
    tl.store(RNORM + row, rnorm)
    tl.store(P + row * dv + j, p, mask=j_ok)


@triton.jit
def _fwd_tile_kernel(X, H, V, BETA, W, OUT, Y, RNORM, P, n, d, dv, eps2,
                     READ: tl.constexpr, STRIDED: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr):
    # d_v > 1. STRIDED: program pid takes tokens pid, pid + programs, ...; else token pid alone, straight-line
    # code (a loop of one trip ran the forward at half the speed on an H100)
    pid, programs = tl.program_id(0), tl.num_programs(0)
    i, j, i_ok, j_ok, mask, tile, w = _tile_setup(W, d, dv, READ, BLOCK_D, BLOCK_V)
    if STRIDED:
        for r in range(pid, n, programs):
            _fwd_tile_token(X, H, V, BETA, OUT, Y, RNORM, P, tl.cast(r, tl.int64), d, dv, eps2, i, j, i_ok, j_ok,
                            mask, tile, w, READ)
    else:
        _fwd_tile_token(X, H, V, BETA, OUT, Y, RNORM, P, pid.to(tl.int64), d, dv, eps2, i, j, i_ok, j_ok,
                        mask, tile, w, READ)


@triton.jit
def _bwd_tile_token(G, GY, X, H, V, BETA, RNORM, P, GX, GH, GV, GBETA, row, d, dv, i, j, i_ok, j_ok, mask, tile,
                    w, gw, READ: tl.constexpr):
    # one token. READ: the readout's gradient, g += gy W^T, joins the update's, and the token's share of
    # grad W = sum_t gy[t] out[t] (out recomputed as forward rounded it) is added to gw, which is returned
    offs = row * d * dv + tile
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    h = tl.load(H + row * d + i, mask=i_ok, other=0.0).to(tl.float32)
    v = tl.load(V + row * dv + j, mask=j_ok, other=0.0).to(tl.float32)
    p = tl.load(P + row * dv + j, mask=j_ok, other=0.0)
    beta = tl.load(BETA + row).to(tl.float32)
    rnorm = tl.load(RNORM + row)
    k = h * rnorm
    delta = beta * (v - p)
    if READ:
        gy = tl.load(GY + row * d + i, mask=i_ok, other=0.0).to(tl.float32)
        g += gy[:, None] * w
        upd = (k[:, None] * delta[None, :]).to(GX.dtype.element_ty).to(tl.float32)
        gw += gy[:, None] * (x + upd).to(GX.dtype.element_ty).to(tl.float32)
    gk = tl.sum(g * k[:, None], axis=0)  # k^T g, (BLOCK_V,)
    a = beta * gk
    grad_k = tl.sum(g * delta[None, :] - x * a[None, :], axis=1)  # (BLOCK_D,)
    c = tl.sum(gk * (delta - beta * p), axis=0)  # k.grad_k in closed form; masked lanes add 0
    tl.store(GX + offs, (g - k[:, None] * a[None, :]).to(GX.dtype.element_ty), mask=mask)
    tl.store(GH + row * d + i, (rnorm * (grad_k - c * k)).to(GH.dtype.element_ty), mask=i_ok)
    tl.store(GV + row * dv + j, a, mask=j_ok)
    tl.store(GBETA + row, tl.sum((v - p) * gk, axis=0))
    return gw


@triton.jit
def _bwd_tile_kernel(G, GY, X, H, V, BETA, W, RNORM, P, GX, GH, GV, GBETA, GW, n, d, dv,
                     READ: tl.constexpr, STRIDED: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr):
    # tokens as in _fwd_tile_kernel. READ: each program writes its partial of grad W to GW[pid]
    pid, programs = tl.program_id(0), tl.num_programs(0)
    i, j, i_ok, j_ok, mask, tile, w = _tile_setup(W, d, dv, READ, BLOCK_D, BLOCK_V)
    gw = tl.zeros((BLOCK_D, BLOCK_V), dtype=tl.float32)
    if STRIDED:
        for r in range(pid, n, programs):
            gw = _bwd_tile_token(G, GY, X, H, V, BETA, RNORM, P, GX, GH, GV, GBETA, tl.cast(r, tl.int64), d, dv,
                                 i, j, i_ok, j_ok, mask, tile, w, gw, READ)
    else:
        gw = _bwd_tile_token(G, GY, X, H, V, BETA, RNORM, P, GX, GH, GV, GBETA, pid.to(tl.int64), d, dv,
                             i, j, i_ok, j_ok, mask, tile, w, gw, READ)
    if READ:
        tl.store(GW + pid.to(tl.int64) * d * dv + tile, gw, mask=mask)


TILE_LAUNCH = {"forward": (1, 16), "backward": (1, 16), "forward_read": (8, 4)}
"""d_v > 1: (tokens a program, warps) of each tile kernel for a 4096-element tile (d = 768, d_v = 4; warps
scale with the tile). One token a program runs straight-line code, more loop over tokens. Measured on an
H100 (16384 tokens, bf16 state, 2026-11-23): one token under 16 warps took 133 us forward and 200 us
backward a site inside the compiled model (fourth session's profile, before the loop existed); as a loop,
8 tokens under 4 warps took 160 and 255 us and one token under 16 warps 269 and 311 us
(bench/fused_kernels.py). The folded forward: 8 tokens under 4 warps, 198 us, against 313 us for one
token under 16 warps in a loop. The folded backward: READ_PROGRAMS and READ_WARPS."""


def _tile_warps(warps: int, block_d: int, block_v: int) -> int:
    return max(1, min(16, warps * block_d * block_v // 4096))


def _launch(d: int, launch: tuple[int, int] | None = None) -> tuple[int, int, int]:
    """d_v = 1: (ROWS, BLOCK_D, num_warps) for rows of width d: about 4096 elements a program under a warp
    per 512, so d = 768 runs four rows under 8 warps (on an H100: forward 47 us, backward 71 us for 16384
    tokens, against 87 and 379 us for two rows under 8 warps)."""
    block_d = triton.next_power_of_2(d)
    if launch is not None:
        return launch[0], block_d, launch[1]
    rows = max(1, 4096 // block_d)
    return rows, block_d, min(max(rows * block_d // 512, 1), 16)


def _tile_launch(kernel: str, n: int, d: int, dv: int,
                 launch: tuple[int, int] | None = None) -> tuple[int, int, int, int]:
    """d_v > 1: (programs, BLOCK_D, BLOCK_V, num_warps) of ``kernel`` (a TILE_LAUNCH key, or "backward_read"
    for READ_PROGRAMS programs under READ_WARPS). ``launch`` = (tokens a program, warps) overrides it."""
    block_d, block_v = triton.next_power_of_2(d), triton.next_power_of_2(dv)
    if launch is not None:
        return max(1, triton.cdiv(n, launch[0])), block_d, block_v, launch[1]
    if kernel == "backward_read":
        return max(1, min(n, READ_PROGRAMS)), block_d, block_v, _tile_warps(READ_WARPS, block_d, block_v)
    tokens, warps = TILE_LAUNCH[kernel]
    return max(1, triton.cdiv(n, tokens)), block_d, block_v, _tile_warps(warps, block_d, block_v)


def forward(X: torch.Tensor, h: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, eps: float,
            launch: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Contiguous X (n, d, d_v), h (n, d), v (n, d_v), beta (n, 1) fp32 -> out like X, rnorm (n, 1) and
    p (n, d_v) fp32. ``launch``: (rows a program, warps), for bench/fused_kernels.py's sweep."""
    out, rnorm, p, _ = _forward(X, h, v, beta, eps, None, launch)
    return out, rnorm, p


def backward(g: torch.Tensor, X: torch.Tensor, h: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
             rnorm: torch.Tensor, p: torch.Tensor, launch: tuple[int, int] | None = None,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Contiguous g and X (n, d, d_v), h (n, d) and forward's fp32 row scalars -> grad_X, grad_h (their
    inputs' dtypes), grad_v (n, d_v), grad_beta (n, 1) fp32."""
    gX, gh, gv, gbeta, _ = _backward(g, None, X, h, v, beta, None, rnorm, p, launch)
    return gX, gh, gv, gbeta


READ_PROGRAMS = 1024
"""Programs of the folded backward; each sums its tokens' part of grad W into one (d, d_v) partial.
READ_WARPS: its warps. Measured on an H100 (16384 tokens, d = 768, d_v = 4, bf16, bench/fused_kernels.py,
2026-11-23): 16 tokens a program under 8 warps ran it in 310 us, against 431 us under 4 warps; 4 to 32
tokens a program made no difference beyond noise."""
READ_WARPS = 8


def forward_read(X: torch.Tensor, h: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, W: torch.Tensor, eps: float,
                 launch: tuple[int, int] | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`forward` for d_v > 1, and y (n, d) like X's dtype: the readout sum_j W[i, j] out[i, j] of the
    new state by W (d, d_v), contiguous."""
    out, rnorm, p, y = _forward(X, h, v, beta, eps, W, launch)
    return out, y, rnorm, p


def backward_read(g: torch.Tensor, gy: torch.Tensor, X: torch.Tensor, h: torch.Tensor, v: torch.Tensor,
                  beta: torch.Tensor, W: torch.Tensor, rnorm: torch.Tensor, p: torch.Tensor,
                  launch: tuple[int, int] | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`backward` with the readout's gradient gy (n, d) -> also grad W (d, d_v) fp32."""
    return _backward(g, gy, X, h, v, beta, W, rnorm, p, launch)


def _forward(X, h, v, beta, eps, W, launch):
    """Both forwards: W (d_v > 1 only) adds the readout y; -> (out, rnorm, p, y or None)."""
    n, d, dv = X.shape
    out = torch.empty_like(X)
    rnorm = torch.empty(n, 1, dtype=torch.float32, device=X.device)
    p = torch.empty(n, dv, dtype=torch.float32, device=X.device)
    y = None if W is None else torch.empty(n, d, dtype=X.dtype, device=X.device)
    if dv == 1:
        rows, block_d, num_warps = _launch(d, launch)
        _fwd_kernel[(triton.cdiv(n, rows),)](X, h, v, beta, out, rnorm, p, n, d, eps * eps,
                                             ROWS=rows, BLOCK_D=block_d, num_warps=num_warps)
    else:  # without W, the unused pointers point at tensors at hand
        kernel = "forward" if W is None else "forward_read"
        programs, block_d, block_v, num_warps = _tile_launch(kernel, n, d, dv, launch)
        _fwd_tile_kernel[(programs,)](X, h, v, beta, X if W is None else W, out, out if y is None else y, rnorm, p,
                                      n, d, dv, eps * eps, READ=W is not None, STRIDED=programs < n,
                                      BLOCK_D=block_d, BLOCK_V=block_v, num_warps=num_warps)
    return out, rnorm, p, y


def _backward(g, gy, X, h, v, beta, W, rnorm, p, launch):
    """Both backwards: gy and W (d_v > 1 only) add the readout's gradient; -> (gX, gh, gv, gbeta, gW or None)."""
    n, d, dv = X.shape
    gX, gh = torch.empty_like(X), torch.empty_like(h)
    gv = torch.empty(n, dv, dtype=torch.float32, device=X.device)
    gbeta = torch.empty(n, 1, dtype=torch.float32, device=X.device)
    if dv == 1:
        rows, block_d, num_warps = _launch(d, launch)
        _bwd_kernel[(triton.cdiv(n, rows),)](g, X, h, v, beta, rnorm, p, gX, gh, gv, gbeta, n, d,
                                             ROWS=rows, BLOCK_D=block_d, num_warps=num_warps)
        return gX, gh, gv, gbeta, None
    read = W is not None
    programs, block_d, block_v, num_warps = _tile_launch("backward_read" if read else "backward", n, d, dv, launch)
    gw = torch.empty(programs, d, dv, dtype=torch.float32, device=X.device) if read else gv
    _bwd_tile_kernel[(programs,)](g, gy if read else g, X, h, v, beta, W if read else X, rnorm, p, gX, gh, gv, gbeta,
                                  gw, n, d, dv, READ=read, STRIDED=programs < n, BLOCK_D=block_d, BLOCK_V=block_v,
                                  num_warps=num_warps)
    return gX, gh, gv, gbeta, gw.sum(0) if read else None
