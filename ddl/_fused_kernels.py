"""Triton kernels of the fused delta update; imported by ``ddl.fused`` on first use only.

Rows are tokens; a row's state is d x d_v, d_v innermost. d_v = 1 (``_fwd_kernel``): one program owns
``ROWS`` whole rows (``BLOCK_D`` = next power of two >= d, masked), in registers. d_v > 1, the plain update
(``_fwd_chunk_kernel``): one token a program in two passes over ``BLOCK_C`` rows of its state at a time, the
first for the reductions over d, the second, reading the rows again from cache, for the writes
(``CHUNK_LAUNCH``). The update with the next CC readout folded in (``READ``, ``_fwd_tile_kernel``): a token's
whole (d, d_v) tile in registers, one token a program or each program striding over tokens (``READ_LAUNCH``),
making the readout or taking its gradient too. Every kernel reads its inputs from HBM once and writes its
outputs once. Math and the backward derivation: ``ddl.fused``. Only long-stable Triton APIs (program_id,
arange, masked load/store, sum, sqrt, loops, constexpr branches, calls of jit functions): the GPU machine runs
the Triton bundled with its torch, older than the one the CPU interpreter tests use."""

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
                    w, gw, READ: tl.constexpr, SUM_W: tl.constexpr):
    # one token. READ: the readout's gradient, g += gy W^T, joins the update's. SUM_W: the token's share of
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
        if SUM_W:
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
                     READ: tl.constexpr, SUM_W: tl.constexpr, STRIDED: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_V: tl.constexpr):
    # tokens as in _fwd_tile_kernel. SUM_W (with READ, STRIDED): each program writes its partial of grad W to
    # GW[pid]; READ without it leaves grad W to _gw_kernel
    pid, programs = tl.program_id(0), tl.num_programs(0)
    i, j, i_ok, j_ok, mask, tile, w = _tile_setup(W, d, dv, READ, BLOCK_D, BLOCK_V)
    gw = tl.zeros((BLOCK_D, BLOCK_V), dtype=tl.float32)
    if STRIDED:
        for r in range(pid, n, programs):
            gw = _bwd_tile_token(G, GY, X, H, V, BETA, RNORM, P, GX, GH, GV, GBETA, tl.cast(r, tl.int64), d, dv,
                                 i, j, i_ok, j_ok, mask, tile, w, gw, READ, SUM_W)
    else:
        gw = _bwd_tile_token(G, GY, X, H, V, BETA, RNORM, P, GX, GH, GV, GBETA, pid.to(tl.int64), d, dv,
                             i, j, i_ok, j_ok, mask, tile, w, gw, READ, SUM_W)
    if SUM_W:
        tl.store(GW + pid.to(tl.int64) * d * dv + tile, gw, mask=mask)


@triton.jit
def _gw_kernel(GY, OUT, GWP, n, d, dv, chunk, TOK: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_V: tl.constexpr):
    # grad W = sum_t gy[t, i] out[t, i, j], for the folded backward that runs one token a program: program
    # (f, s) sums TOK tokens at a time over tokens [s chunk, (s + 1) chunk) for BLOCK_F entries of the
    # (d, BLOCK_V)-padded tile, and writes its partial to GWP[s]
    f = tl.program_id(0) * BLOCK_F + tl.arange(0, BLOCK_F)
    i, j = f // BLOCK_V, f % BLOCK_V
    ok = (i < d) & (j < dv)
    s = tl.program_id(1)
    start = s * chunk
    stop = tl.minimum(start + chunk, n)
    acc = tl.zeros((TOK, BLOCK_F), dtype=tl.float32)
    for t in range(start, stop, TOK):
        rows = t + tl.arange(0, TOK)
        m = (rows < stop)[:, None] & ok[None, :]
        r = rows.to(tl.int64)[:, None]
        out = tl.load(OUT + r * d * dv + (i * dv + j)[None, :], mask=m, other=0.0).to(tl.float32)
        gy = tl.load(GY + r * d + i[None, :], mask=m, other=0.0).to(tl.float32)
        acc += gy * out
    tl.store(GWP + s.to(tl.int64) * d * dv + i * dv + j, tl.sum(acc, axis=0), mask=ok)


@triton.jit
def _row_block(row, i0, d, dv, BLOCK_C: tl.constexpr, BLOCK_V: tl.constexpr):
    # rows i0 .. i0 + BLOCK_C of token row's (d, d_v) state: the rows, their mask, the tile's mask and offsets
    i, j = i0 + tl.arange(0, BLOCK_C), tl.arange(0, BLOCK_V)
    i_ok = i < d
    return i, i_ok, i_ok[:, None] & (j < dv)[None, :], row * d * dv + i[:, None] * dv + j[None, :]


@triton.jit
def _h_dot_state(H, Y, row, d, dv, BLOCK_C: tl.constexpr, BLOCK_V: tl.constexpr):
    # the first pass: ||h||^2 and h^T Y (BLOCK_V,) for one token, BLOCK_C rows of its state at a time
    ss = tl.zeros((BLOCK_C,), dtype=tl.float32)
    hy = tl.zeros((BLOCK_C, BLOCK_V), dtype=tl.float32)
    for i0 in range(0, d, BLOCK_C):
        i, i_ok, m, offs = _row_block(row, i0, d, dv, BLOCK_C, BLOCK_V)
        h = tl.load(H + row * d + i, mask=i_ok, other=0.0).to(tl.float32)
        ss += h * h
        hy += h[:, None] * tl.load(Y + offs, mask=m, other=0.0).to(tl.float32)
    return tl.sum(ss, axis=0), tl.sum(hy, axis=0)


@triton.jit
def _fwd_chunk_kernel(X, H, V, BETA, OUT, RNORM, P, d, dv, eps2, BLOCK_C: tl.constexpr, BLOCK_V: tl.constexpr):
    # d_v > 1, one token a program in two passes over BLOCK_C rows of its (d, d_v) state at a time: the
    # first sums ||h||^2 and h^T X, the second reads the rows again (from cache) and writes. No padding of d
    # to a power of two, and a small tile in registers: more programs an SM
    row = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, BLOCK_V)
    hh, hx = _h_dot_state(H, X, row, d, dv, BLOCK_C, BLOCK_V)
    rnorm = 1.0 / tl.sqrt(hh + eps2)
    p = hx * rnorm
    delta = tl.load(BETA + row).to(tl.float32) * (tl.load(V + row * dv + j, mask=j < dv, other=0.0) - p)
    for i0 in range(0, d, BLOCK_C):
        i, i_ok, m, offs = _row_block(row, i0, d, dv, BLOCK_C, BLOCK_V)
        k = tl.load(H + row * d + i, mask=i_ok, other=0.0).to(tl.float32) * rnorm
        x = tl.load(X + offs, mask=m, other=0.0).to(tl.float32)
        upd = (k[:, None] * delta[None, :]).to(OUT.dtype.element_ty).to(tl.float32)
        tl.store(OUT + offs, (x + upd).to(OUT.dtype.element_ty), mask=m)
    tl.store(RNORM + row, rnorm)
    tl.store(P + row * dv + j, p, mask=j < dv)


@triton.jit
def _bwd_chunk_kernel(G, X, H, V, BETA, RNORM, P, GX, GH, GV, GBETA, d, dv,
                      BLOCK_C: tl.constexpr, BLOCK_V: tl.constexpr):
    # _bwd_tile_kernel in _fwd_chunk_kernel's two passes: k^T g first, then the gradients row block by block
    row = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, BLOCK_V)
    j_ok = j < dv
    rnorm = tl.load(RNORM + row)
    _, hg = _h_dot_state(H, G, row, d, dv, BLOCK_C, BLOCK_V)
    gk = hg * rnorm
    v = tl.load(V + row * dv + j, mask=j_ok, other=0.0).to(tl.float32)
    p = tl.load(P + row * dv + j, mask=j_ok, other=0.0)
    beta = tl.load(BETA + row).to(tl.float32)
    delta = beta * (v - p)
    a = beta * gk
    kgk = tl.sum(gk * (delta - beta * p), axis=0)
    for i0 in range(0, d, BLOCK_C):
        i, i_ok, m, offs = _row_block(row, i0, d, dv, BLOCK_C, BLOCK_V)
        k = tl.load(H + row * d + i, mask=i_ok, other=0.0).to(tl.float32) * rnorm
        g = tl.load(G + offs, mask=m, other=0.0).to(tl.float32)
        x = tl.load(X + offs, mask=m, other=0.0).to(tl.float32)
        grad_k = tl.sum(g * delta[None, :] - x * a[None, :], axis=1)
        tl.store(GX + offs, (g - k[:, None] * a[None, :]).to(GX.dtype.element_ty), mask=m)
        tl.store(GH + row * d + i, (rnorm * (grad_k - kgk * k)).to(GH.dtype.element_ty), mask=i_ok)
    tl.store(GV + row * dv + j, a, mask=j_ok)
    tl.store(GBETA + row, tl.sum((v - p) * gk, axis=0))


CHUNK_LAUNCH = (512, 2)
"""d_v > 1 without the fold: (elements of the state a pass holds, warps) of the two-pass kernels
(``_fwd_chunk_kernel``, ``_bwd_chunk_kernel``); d = 768, d_v = 4 runs 128 rows of d a pass under 2 warps.
Measured on an H100 (16384 tokens, bf16 state, bench/fused_kernels.py, 2026-11-23, the seventh GPU session): forward
117 us and backward 167 us, against 133 and 199 us for the one-tile kernels' best launch (one token under
16 warps); 256 rows under 4 warps ran 116 and 175 us, 512 rows 164-187 and 250-272 us."""

READ_LAUNCH = (1, 16)
"""The folded forward (the one-tile kernel with ``READ``): (tokens a program, warps) for a 4096-element tile
(d = 768, d_v = 4; warps scale with the tile). One token a program runs straight-line code, more loop over
tokens. Measured on an H100 (16384 tokens, bf16 state, bench/fused_kernels.py): one token under 16 warps,
169 us, against 198 us for 8 tokens under 4 warps. The plain one-tile kernels run only where a sweep's
``launch`` asks (CHUNK_LAUNCH is faster): one token under 16 warps took 133 us forward and 199 us backward;
as a loop, 8 tokens under 4 warps took 160 and 255 us. The folded backward: READ_PROGRAMS, READ_WARPS."""


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


def _chunk_launch(d: int, dv: int, launch: tuple | None) -> tuple[int, int, int] | None:
    """d_v > 1, no fold: (BLOCK_C, BLOCK_V, num_warps) of the two-pass kernels, or None where ``launch`` =
    (tokens a program, warps[, registers]) asks for the one-tile kernels; ``("chunk", rows, warps)`` sets
    the rows of d a pass."""
    block_v = triton.next_power_of_2(dv)
    if launch is None:
        elements, warps = CHUNK_LAUNCH
        return min(max(1, elements // block_v), triton.next_power_of_2(d)), block_v, warps
    if launch[0] == "chunk":
        return launch[1], block_v, launch[2]
    return None


def _regs(launch: tuple[int, ...] | None) -> dict:
    """A launch's optional third entry caps the registers a thread (Triton's ``maxnreg``), for the sweep."""
    return {"maxnreg": launch[2]} if launch is not None and len(launch) > 2 else {}


def _tile_launch(kernel: str, n: int, d: int, dv: int,
                 launch: tuple[int, ...] | None = None) -> tuple[int, int, int, int]:
    """d_v > 1: (programs, BLOCK_D, BLOCK_V, num_warps) of a one-tile ``kernel``: ``launch`` = (tokens a
    program, warps) where given (the plain kernels run only so); else "forward_read" by READ_LAUNCH, and
    "backward_read" READ_PROGRAMS programs under READ_WARPS, or one token a program where READ_PROGRAMS is
    None."""
    block_d, block_v = triton.next_power_of_2(d), triton.next_power_of_2(dv)
    if launch is not None:
        return max(1, triton.cdiv(n, launch[0])), block_d, block_v, launch[1]
    if kernel == "backward_read":
        programs = n if READ_PROGRAMS is None else min(n, READ_PROGRAMS)
        return max(1, programs), block_d, block_v, _tile_warps(READ_WARPS, block_d, block_v)
    assert kernel == "forward_read", kernel
    tokens, warps = READ_LAUNCH
    return max(1, triton.cdiv(n, tokens)), block_d, block_v, _tile_warps(warps, block_d, block_v)


def forward(X: torch.Tensor, h: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, eps: float,
            launch: tuple[int, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Contiguous X (n, d, d_v), h (n, d), v (n, d_v), beta (n, 1) fp32 -> out like X, rnorm (n, 1) and
    p (n, d_v) fp32. ``launch``: (rows a program, warps), for bench/fused_kernels.py's sweep."""
    out, rnorm, p, _ = _forward(X, h, v, beta, eps, None, launch)
    return out, rnorm, p


def backward(g: torch.Tensor, X: torch.Tensor, h: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
             rnorm: torch.Tensor, p: torch.Tensor, launch: tuple[int, ...] | None = None,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Contiguous g and X (n, d, d_v), h (n, d) and forward's fp32 row scalars -> grad_X, grad_h (their
    inputs' dtypes), grad_v (n, d_v), grad_beta (n, 1) fp32."""
    gX, gh, gv, gbeta, _ = _backward(g, None, X, None, h, v, beta, None, rnorm, p, launch)
    return gX, gh, gv, gbeta


READ_PROGRAMS: int | None = 1024
"""Programs of the folded backward; each strides over tokens and sums their part of grad W into one (d, d_v)
partial. None: one token a program (straight-line code, as the plain backward), and grad W summed by a
second kernel (``_gw_kernel``) that reads the update's result again. READ_WARPS: the folded backward's warps
for a 4096-element tile. Measured on an H100 (16384 tokens, d = 768, d_v = 4, bf16, bench/fused_kernels.py,
2026-11-23): 16 tokens a program under 8 warps ran it in 310 us, against 431 us under 4 warps; 4 to 32
tokens a program made no difference beyond noise. One token a program took 490-515 us with its grad W kernel
(the seventh GPU session): that kernel alone took 130-260 us for 125 MB."""
READ_WARPS = 8
GW_LAUNCH = (128, 8, 1024, 8)
"""``_gw_kernel``: (token ranges, tokens a step, tile entries a program, warps)."""


def forward_read(X: torch.Tensor, h: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, W: torch.Tensor, eps: float,
                 launch: tuple[int, ...] | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`forward` for d_v > 1, and y (n, d) like X's dtype: the readout sum_j W[i, j] out[i, j] of the
    new state by W (d, d_v), contiguous."""
    out, rnorm, p, y = _forward(X, h, v, beta, eps, W, launch)
    return out, y, rnorm, p


def backward_read(g: torch.Tensor, gy: torch.Tensor, X: torch.Tensor, out: torch.Tensor, h: torch.Tensor,
                  v: torch.Tensor, beta: torch.Tensor, W: torch.Tensor, rnorm: torch.Tensor, p: torch.Tensor,
                  launch: tuple[int, ...] | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`backward` with the readout's gradient gy (n, d) -> also grad W (d, d_v) fp32. ``out`` is the
    forward's result (n, d, d_v); only a launch of one token a program reads it (for grad W)."""
    return _backward(g, gy, X, out, h, v, beta, W, rnorm, p, launch)


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
    elif W is None and (chunk := _chunk_launch(d, dv, launch)) is not None:
        block_c, block_v, num_warps = chunk
        _fwd_chunk_kernel[(n,)](X, h, v, beta, out, rnorm, p, d, dv, eps * eps, BLOCK_C=block_c, BLOCK_V=block_v,
                                num_warps=num_warps)
    else:  # without W, the unused pointers point at tensors at hand
        kernel = "forward" if W is None else "forward_read"
        programs, block_d, block_v, num_warps = _tile_launch(kernel, n, d, dv, launch)
        _fwd_tile_kernel[(programs,)](X, h, v, beta, X if W is None else W, out, out if y is None else y, rnorm, p,
                                      n, d, dv, eps * eps, READ=W is not None, STRIDED=programs < n,
                                      BLOCK_D=block_d, BLOCK_V=block_v, num_warps=num_warps, **_regs(launch))
    return out, rnorm, p, y


def _backward(g, gy, X, out, h, v, beta, W, rnorm, p, launch):
    """Both backwards: gy, out and W (d_v > 1 only) add the readout's gradient; -> (gX, gh, gv, gbeta, gW or
    None)."""
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
    if not read and (chunk := _chunk_launch(d, dv, launch)) is not None:
        block_c, block_v, num_warps = chunk
        _bwd_chunk_kernel[(n,)](g, X, h, v, beta, rnorm, p, gX, gh, gv, gbeta, d, dv, BLOCK_C=block_c,
                                BLOCK_V=block_v, num_warps=num_warps)
        return gX, gh, gv, gbeta, None
    programs, block_d, block_v, num_warps = _tile_launch("backward_read" if read else "backward", n, d, dv, launch)
    strided = programs < n
    gw = torch.empty(programs, d, dv, dtype=torch.float32, device=X.device) if read and strided else gv
    _bwd_tile_kernel[(programs,)](g, gy if read else g, X, h, v, beta, W if read else X, rnorm, p, gX, gh, gv, gbeta,
                                  gw, n, d, dv, READ=read, SUM_W=read and strided, STRIDED=strided,
                                  BLOCK_D=block_d, BLOCK_V=block_v, num_warps=num_warps, **_regs(launch))
    if not read:
        return gX, gh, gv, gbeta, None
    if not strided:
        gw = _grad_w(gy, out)
    return gX, gh, gv, gbeta, gw.sum(0)


def _grad_w(gy: torch.Tensor, out: torch.Tensor, launch: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """(ranges, d, d_v) fp32 partials of grad W = sum_t gy[t, i] out[t, i, j] for gy (n, d) and out
    (n, d, d_v), by ``_gw_kernel`` under ``launch`` (GW_LAUNCH's form; GW_LAUNCH where None)."""
    n, d, dv = out.shape
    block_v = triton.next_power_of_2(dv)
    ranges, tok, block_f, warps = GW_LAUNCH if launch is None else launch
    chunk = triton.cdiv(n, max(1, min(ranges, n)))
    ranges = triton.cdiv(n, chunk)
    block_f = max(block_v, min(block_f, triton.next_power_of_2(d) * block_v))
    parts = torch.empty(ranges, d, dv, dtype=torch.float32, device=gy.device)
    _gw_kernel[(triton.cdiv(d * block_v, block_f), ranges)](gy, out, parts, n, d, dv, chunk, TOK=tok,
                                                             BLOCK_F=block_f, BLOCK_V=block_v, num_warps=warps)
    return parts
