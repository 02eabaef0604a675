"""Triton kernels of the fused delta update; imported by ``ddl.fused`` on first use only.

Rows are tokens; a row's state is d x d_v, d_v innermost. d_v = 1 (``_fwd_kernel``): one program owns
``ROWS`` whole rows (``BLOCK_D`` = next power of two >= d, masked), in registers. d_v > 1, the plain update
(``_fwd_chunk_kernel``): one token a program in two passes over ``BLOCK_C`` rows of its state at a time, the
first for the reductions over d, the second, reading the rows again from cache, for the writes; d_v is a
compile-time constant there, so that a row block's loads and stores are wide (``CHUNK_LAUNCH``). The update
with the next CC readout folded in (``READ``) runs the same two passes: the forward also writes the readout,
the backward joins the readout's gradient to the state's; grad W is left to the caller (why:
``CHUNK_LAUNCH``). The one-tile kernels (``_fwd_tile_kernel``, ``_bwd_tile_kernel``: a token's whole (d, d_v)
tile in registers) run where a sweep's launch asks for them. Every kernel reads its inputs from HBM
once and writes its outputs once. Math and the backward derivation: ``ddl.fused``. Only long-stable
Triton APIs (program_id, arange, masked load/store, sum, sqrt, loops, constexpr branches, calls of jit
functions): the GPU machine runs the Triton bundled with its torch, older than the one the
CPU interpreter tests use."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton


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
                    w, READ: tl.constexpr):
    # one token. READ: the readout's gradient, g += gy W^T, joins the update's (grad W is the caller's)
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
        g += tl.load(GY + row * d + i, mask=i_ok, other=0.0).to(tl.float32)[:, None] * w
    gk = tl.sum(g * k[:, None], axis=0)  # k^T g, (BLOCK_V,)
    a = beta * gk
    grad_k = tl.sum(g * delta[None, :] - x * a[None, :], axis=1)  # (BLOCK_D,)
    c = tl.sum(gk * (delta - beta * p), axis=0)  # k.grad_k in closed form; masked lanes add 0
    tl.store(GX + offs, (g - k[:, None] * a[None, :]).to(GX.dtype.element_ty), mask=mask)
    tl.store(GH + row * d + i, (rnorm * (grad_k - c * k)).to(GH.dtype.element_ty), mask=i_ok)
    tl.store(GV + row * dv + j, a, mask=j_ok)
    tl.store(GBETA + row, tl.sum((v - p) * gk, axis=0))


@triton.jit
def _bwd_tile_kernel(G, GY, X, H, V, BETA, W, RNORM, P, GX, GH, GV, GBETA, n, d, dv,
                     READ: tl.constexpr, STRIDED: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr):
    # tokens as in _fwd_tile_kernel
    pid, programs = tl.program_id(0), tl.num_programs(0)
    i, j, i_ok, j_ok, mask, tile, w = _tile_setup(W, d, dv, READ, BLOCK_D, BLOCK_V)
    if STRIDED:
        for r in range(pid, n, programs):
            _bwd_tile_token(G, GY, X, H, V, BETA, RNORM, P, GX, GH, GV, GBETA, tl.cast(r, tl.int64), d, dv,
                            i, j, i_ok, j_ok, mask, tile, w, READ)
    else:
        _bwd_tile_token(G, GY, X, H, V, BETA, RNORM, P, GX, GH, GV, GBETA, pid.to(tl.int64), d, dv,
                        i, j, i_ok, j_ok, mask, tile, w, READ)


@triton.jit
def _row_block(row, i0, d, dv, BLOCK_C: tl.constexpr, BLOCK_V: tl.constexpr):
    # rows i0 .. i0 + BLOCK_C of token row's (d, d_v) state: the rows, their mask, the tile's mask and offsets
    i, j = i0 + tl.arange(0, BLOCK_C), tl.arange(0, BLOCK_V)
    i_ok = i < d
    return i, i_ok, i_ok[:, None] & (j < dv)[None, :], row * d * dv + i[:, None] * dv + j[None, :]


@triton.jit
def _h_dot_state(H, Y, GY, W, row, d, dv, READ: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_V: tl.constexpr,
                 UNROLL: tl.constexpr):
    # the first pass: ||h||^2 and h^T Y (BLOCK_V,) for one token, BLOCK_C rows of its state at a time. READ
    # (backward, Y the update's gradient): h^T (Y + gy W^T), the readout's gradient gy joined
    ss = tl.zeros((BLOCK_C,), dtype=tl.float32)
    hy = tl.zeros((BLOCK_C, BLOCK_V), dtype=tl.float32)
    for i0 in tl.range(0, d, BLOCK_C, loop_unroll_factor=UNROLL):
        i, i_ok, m, offs = _row_block(row, i0, d, dv, BLOCK_C, BLOCK_V)
        h = tl.load(H + row * d + i, mask=i_ok, other=0.0).to(tl.float32)
        ss += h * h
        y = tl.load(Y + offs, mask=m, other=0.0).to(tl.float32)
        if READ:
            y += _gy_w(GY, W, row, d, dv, i, i_ok, m, offs)
        hy += h[:, None] * y
    return tl.sum(ss, axis=0), tl.sum(hy, axis=0)


@triton.jit
def _gy_w(GY, W, row, d, dv, i, i_ok, m, offs):
    # a row block of gy W^T: the readout's gradient as the state's
    w = tl.load(W + (offs - row * d * dv), mask=m, other=0.0).to(tl.float32)
    return tl.load(GY + row * d + i, mask=i_ok, other=0.0).to(tl.float32)[:, None] * w


@triton.jit
def _fwd_chunk_kernel(X, H, V, BETA, W, OUT, Y, RNORM, P, d, dv: tl.constexpr, eps2, READ: tl.constexpr,
                      BLOCK_C: tl.constexpr, BLOCK_V: tl.constexpr, UNROLL: tl.constexpr):
    # d_v > 1, one token a program in two passes over BLOCK_C rows of its (d, d_v) state at a time: the
    # first sums ||h||^2 and h^T X, the second reads the rows again (from cache) and writes. No padding of d
    # to a power of two, and a small tile in registers: more programs an SM. READ: also the next readout of
    # the new state, y[i] = sum_j W[i, j] out[i, j]
    row = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, BLOCK_V)
    hh, hx = _h_dot_state(H, X, X, X, row, d, dv, False, BLOCK_C, BLOCK_V, UNROLL)
    rnorm = 1.0 / tl.sqrt(hh + eps2)
    p = hx * rnorm
    delta = tl.load(BETA + row).to(tl.float32) * (tl.load(V + row * dv + j, mask=j < dv, other=0.0) - p)
    for i0 in tl.range(0, d, BLOCK_C, loop_unroll_factor=UNROLL):
        i, i_ok, m, offs = _row_block(row, i0, d, dv, BLOCK_C, BLOCK_V)
        k = tl.load(H + row * d + i, mask=i_ok, other=0.0).to(tl.float32) * rnorm
        x = tl.load(X + offs, mask=m, other=0.0).to(tl.float32)
        upd = (k[:, None] * delta[None, :]).to(OUT.dtype.element_ty).to(tl.float32)
        out = (x + upd).to(OUT.dtype.element_ty)
        tl.store(OUT + offs, out, mask=m)
        if READ:
            w = tl.load(W + i[:, None] * dv + j[None, :], mask=m, other=0.0).to(tl.float32)
            tl.store(Y + row * d + i, tl.sum(out.to(tl.float32) * w, axis=1).to(Y.dtype.element_ty), mask=i_ok)
    tl.store(RNORM + row, rnorm)
    tl.store(P + row * dv + j, p, mask=j < dv)


@triton.jit
def _bwd_chunk_kernel(G, GY, X, H, V, BETA, W, RNORM, P, GX, GH, GV, GBETA, d, dv: tl.constexpr, READ: tl.constexpr,
                      BLOCK_C: tl.constexpr, BLOCK_V: tl.constexpr, UNROLL: tl.constexpr, PREFETCH: tl.constexpr):
    # _bwd_tile_kernel in _fwd_chunk_kernel's two passes: k^T g first, then the gradients row block by block.
    # READ: the readout's gradient, g += gy W^T, joins the update's in both passes (grad W is the caller's).
    # PREFETCH: the second pass, the first to read X, loads the next row block's X before this one's stores
    row = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, BLOCK_V)
    j_ok = j < dv
    rnorm = tl.load(RNORM + row)
    _, hg = _h_dot_state(H, G, GY, W, row, d, dv, READ, BLOCK_C, BLOCK_V, UNROLL)
    gk = hg * rnorm
    v = tl.load(V + row * dv + j, mask=j_ok, other=0.0).to(tl.float32)
    p = tl.load(P + row * dv + j, mask=j_ok, other=0.0)
    beta = tl.load(BETA + row).to(tl.float32)
    delta = beta * (v - p)
    a = beta * gk
    kgk = tl.sum(gk * (delta - beta * p), axis=0)
    x_next = tl.zeros((BLOCK_C, BLOCK_V), dtype=tl.float32)
    if PREFETCH:
        _, _, m, offs = _row_block(row, 0, d, dv, BLOCK_C, BLOCK_V)
        x_next = tl.load(X + offs, mask=m, other=0.0).to(tl.float32)
    for i0 in tl.range(0, d, BLOCK_C, loop_unroll_factor=UNROLL):
        i, i_ok, m, offs = _row_block(row, i0, d, dv, BLOCK_C, BLOCK_V)
        if PREFETCH:
            x = x_next
            _, _, m_next, offs_next = _row_block(row, i0 + BLOCK_C, d, dv, BLOCK_C, BLOCK_V)
            x_next = tl.load(X + offs_next, mask=m_next, other=0.0).to(tl.float32)
        else:
            x = tl.load(X + offs, mask=m, other=0.0).to(tl.float32)
        k = tl.load(H + row * d + i, mask=i_ok, other=0.0).to(tl.float32) * rnorm
        g = tl.load(G + offs, mask=m, other=0.0).to(tl.float32)
        if READ:
            g += _gy_w(GY, W, row, d, dv, i, i_ok, m, offs)
        grad_k = tl.sum(g * delta[None, :] - x * a[None, :], axis=1)
        tl.store(GX + offs, (g - k[:, None] * a[None, :]).to(GX.dtype.element_ty), mask=m)
        tl.store(GH + row * d + i, (rnorm * (grad_k - kgk * k)).to(GH.dtype.element_ty), mask=i_ok)
    tl.store(GV + row * dv + j, a, mask=j_ok)
    tl.store(GBETA + row, tl.sum((v - p) * gk, axis=0))


CHUNK_LAUNCH = (512, 4)
"""d_v > 1: (elements of the state a pass holds, warps[, Triton's num_stages[, UNROLL[, PREFETCH]]]) of the
two-pass kernels (``_fwd_chunk_kernel``, ``_bwd_chunk_kernel``); d = 768, d_v = 4 runs 128 rows of d a pass under 4
warps, with Triton's default stages, loops not unrolled and no prefetch.

d_v is a compile-time constant of these kernels. Passed as a runtime integer, the compiler could not prove a
row block's d_v entries contiguous and aligned, and moved the state two bytes at a time. Measured on an H100
(16384 tokens, bf16 state, the folded kernels, old and new side by side in one process, the twelfth GPU
session):

- runtime d_v, 128 rows under 2 warps (the old default): forward 129 us, backward 225 us;
- constant d_v, 128 rows under 2 warps: 121 and 178 us;
- constant d_v, **128 rows under 4 warps**: **98 and 142 us** (2.6 and 2.7 TB/s); 256 rows under 2 or 4 warps
  and 512 under 4: 101-107 and 150-155 us.

The other entries are for the sweep (the twenty-first session, the folded kernels, d = 768,
docs/bench/fused-kernels-unroll-h100-2026-12-07.jsonl): ``num_stages`` 1, 2 or 4 changes nothing (Triton does not
pipeline these loops; 141.1-141.4 us backward at 128 rows, 4 warps). ``UNROLL`` 3 (the row-block loops'
``loop_unroll_factor``) and ``PREFETCH`` (the backward's second pass, the first to read X, loads the next row
block's X before this one's stores) take the backward from 141.1 to 135.5 us; either alone, 138.7 and 146.4 us.
The forwards read 97-105 us at every setting, within the sweep's spread (99.9 and 104.4 us for the same launch).
In the model, UNROLL 3 both ways left the step where it was (49.02 against 48.92 ms block-synced).

The fold's kernels (``READ``) leave grad W = sum_t gy_t out_t to the caller: ``ddl.fused`` writes it as a
product and a sum, one inductor reduction a site (56 us on an H100). Summed in the kernels instead (the eighth
GPU session, runtime d_v), it cost more than it saved: each program adding a stride of tokens' grad W into its
own partial in memory, 406-1263 us over 27 launches; the one-tile loop (16 tokens a program under 8 warps, the
partial in registers) 311 us; one token a program with a second kernel for grad W, 513 us. A single pass by row
blocks across tokens, with grad W in registers and k^T g from a first kernel (the twelfth session), took
288-774 us. The two passes over 2 to 16 tokens a program, their share of grad W summed a row block at a time
into a partial a program and the update's result recomputed (the seventeenth session, constant d_v, kernels
timed as CUDA graphs): at best 219 us (4 tokens, 256 rows, 4 warps) against 141 + 46 us for this kernel and
the reduction beside it, and the step 0.8 ms slower. Nor does a kernel of its own beat inductor's reduction (the
nineteenth session): 2-D tiles of the flattened state, each program summing its tokens in registers into a
partial, took 63-240 us over ten launches against inductor's 47 us
(docs/bench/wgrad-kernel-h100-2026-12-06.jsonl)."""


CHUNK_BWD_LAUNCH: tuple | None = None
"""The backward's own launch, in ``CHUNK_LAUNCH``'s form, where it differs (None: ``CHUNK_LAUNCH``); for benchmarks
(bench/throughput.py's ``:bwdpf``, ``(512, 4, None, 3, True)``: the sweep's best backward, 135.5 against 141.1 us)."""


def _launch(d: int, launch: tuple[int, int] | None = None) -> tuple[int, int, int]:
    """d_v = 1: (ROWS, BLOCK_D, num_warps) for rows of width d: about 4096 elements a program under a warp
    per 512, so d = 768 runs four rows under 8 warps (on an H100: forward 47 us, backward 71 us for 16384
    tokens, against 87 and 379 us for two rows under 8 warps)."""
    block_d = triton.next_power_of_2(d)
    if launch is not None:
        return launch[0], block_d, launch[1]
    rows = max(1, 4096 // block_d)
    return rows, block_d, min(max(rows * block_d // 512, 1), 16)


def _chunk_launch(d: int, dv: int, launch: tuple | None,
                  default: tuple | None = None) -> tuple[int, int, dict, bool] | None:
    """d_v > 1: (BLOCK_C, BLOCK_V, launch options, the backward's PREFETCH) of the two-pass kernels, or None where
    ``launch`` = (tokens a program, warps[, registers]) asks for the one-tile kernels; ``("chunk", rows, warps[,
    stages[, unroll[, prefetch]]])`` sets the rows of d a pass (Triton's ``num_stages``, None for its default; the
    passes' ``loop_unroll_factor``; whether the backward's second pass loads the next row block's X first)."""
    block_v = triton.next_power_of_2(dv)
    if launch is None:  # (elements, warps[, stages[, unroll[, prefetch]]])
        default = default or CHUNK_LAUNCH
        rows = min(max(1, default[0] // block_v), triton.next_power_of_2(d))
        return rows, block_v, *_options(*default[1:])
    if launch[0] != "chunk":
        return None
    return launch[1], block_v, *_options(*launch[2:])


def _options(warps: int, stages: int | None = None, unroll: int = 1, prefetch: bool = False) -> tuple[dict, bool]:
    """Both chunk kernels' launch options (``num_warps``, ``num_stages`` where one is given, else Triton's default,
    and the ``UNROLL`` of their row-block loops), and the backward's ``PREFETCH``."""
    options = {"num_warps": warps, "UNROLL": unroll}
    return (options if stages is None else {**options, "num_stages": stages}), bool(prefetch)


def _regs(launch: tuple[int, ...] | None) -> dict:
    """A launch's optional third entry caps the registers a thread (Triton's ``maxnreg``), for the sweep."""
    return {"maxnreg": launch[2]} if launch is not None and len(launch) > 2 else {}


def _tile_launch(n: int, d: int, dv: int, launch: tuple[int, ...]) -> tuple[int, int, int, int]:
    """d_v > 1: (programs, BLOCK_D, BLOCK_V, num_warps) of the one-tile kernels for ``launch`` = (tokens a
    program, warps): more than one token a program loops over them."""
    block_d, block_v = triton.next_power_of_2(d), triton.next_power_of_2(dv)
    return max(1, triton.cdiv(n, launch[0])), block_d, block_v, launch[1]


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
    return _backward(g, None, X, h, v, beta, None, rnorm, p, launch)


def forward_read(X: torch.Tensor, h: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, W: torch.Tensor, eps: float,
                 launch: tuple[int, ...] | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`forward` for d_v > 1, and y (n, d) like X's dtype: the readout sum_j W[i, j] out[i, j] of the
    new state by W (d, d_v), contiguous."""
    out, rnorm, p, y = _forward(X, h, v, beta, eps, W, launch)
    return out, y, rnorm, p


def backward_read(g: torch.Tensor, gy: torch.Tensor, X: torch.Tensor, h: torch.Tensor, v: torch.Tensor,
                  beta: torch.Tensor, W: torch.Tensor, rnorm: torch.Tensor, p: torch.Tensor,
                  launch: tuple[int, ...] | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`backward` with the readout's gradient gy (n, d) joined to the state's, g + gy W^T. grad W =
    sum_t gy_t out_t is left to the caller."""
    return _backward(g, gy, X, h, v, beta, W, rnorm, p, launch)


def _forward(X, h, v, beta, eps, W, launch):
    """Both forwards: W (d_v > 1 only) adds the readout y; -> (out, rnorm, p, y or None). Without W, the
    kernels' unused pointers point at tensors at hand."""
    n, d, dv = X.shape
    out = torch.empty_like(X)
    rnorm = torch.empty(n, 1, dtype=torch.float32, device=X.device)
    p = torch.empty(n, dv, dtype=torch.float32, device=X.device)
    y = None if W is None else torch.empty(n, d, dtype=X.dtype, device=X.device)
    read, W, Y = W is not None, X if W is None else W, out if y is None else y
    if dv == 1:
        rows, block_d, num_warps = _launch(d, launch)
        wrap_triton(_fwd_kernel)[(triton.cdiv(n, rows),)](X, h, v, beta, out, rnorm, p, n, d, eps * eps, ROWS=rows,
                                                          BLOCK_D=block_d, num_warps=num_warps)
    elif (chunk := _chunk_launch(d, dv, launch)) is not None:
        block_c, block_v, options, _ = chunk  # prefetch: the backward's alone
        wrap_triton(_fwd_chunk_kernel)[(n,)](X, h, v, beta, W, out, Y, rnorm, p, d, dv, eps * eps, READ=read,
                                             BLOCK_C=block_c, BLOCK_V=block_v, **options)
    else:
        programs, block_d, block_v, num_warps = _tile_launch(n, d, dv, launch)
        wrap_triton(_fwd_tile_kernel)[(programs,)](X, h, v, beta, W, out, Y, rnorm, p, n, d, dv, eps * eps,
                                                   READ=read, STRIDED=programs < n, BLOCK_D=block_d, BLOCK_V=block_v,
                                                   num_warps=num_warps, **_regs(launch))
    return out, rnorm, p, y


def _backward(g, gy, X, h, v, beta, W, rnorm, p, launch):
    """Both backwards: gy and W (d_v > 1 only) add the readout's gradient; -> (gX, gh, gv, gbeta)."""
    n, d, dv = X.shape
    gX, gh = torch.empty_like(X), torch.empty_like(h)
    gv = torch.empty(n, dv, dtype=torch.float32, device=X.device)
    gbeta = torch.empty(n, 1, dtype=torch.float32, device=X.device)
    if dv == 1:
        rows, block_d, num_warps = _launch(d, launch)
        wrap_triton(_bwd_kernel)[(triton.cdiv(n, rows),)](g, X, h, v, beta, rnorm, p, gX, gh, gv, gbeta, n, d,
                                                          ROWS=rows, BLOCK_D=block_d, num_warps=num_warps)
        return gX, gh, gv, gbeta
    read, gy, W = W is not None, g if gy is None else gy, X if W is None else W
    if (chunk := _chunk_launch(d, dv, launch, CHUNK_BWD_LAUNCH)) is not None:
        block_c, block_v, options, prefetch = chunk
        wrap_triton(_bwd_chunk_kernel)[(n,)](g, gy, X, h, v, beta, W, rnorm, p, gX, gh, gv, gbeta, d, dv,
                                             READ=read, BLOCK_C=block_c, BLOCK_V=block_v, PREFETCH=prefetch,
                                             **options)
    else:
        programs, block_d, block_v, num_warps = _tile_launch(n, d, dv, launch)
        wrap_triton(_bwd_tile_kernel)[(programs,)](g, gy, X, h, v, beta, W, rnorm, p, gX, gh, gv, gbeta, n, d,
                                                   dv, READ=read, STRIDED=programs < n, BLOCK_D=block_d,
                                                   BLOCK_V=block_v, num_warps=num_warps, **_regs(launch))
    return gX, gh, gv, gbeta


# -- EC expansion with the first CC readout folded in (d_v > 1) -----------------------------------------
# X[r, i, j] = sum_q w[i, j, q] e[r - s_q, i], s_q = K - 1 - q, zeros before the start of r's sequence (T tokens a
# sequence, rows r = b T + t); y[r, i] = sum_j W[i, j] X[r, i, j]. A program owns TB tokens and BC rows of d, its tiles
# (BLOCK_K, TB, BC, BLOCK_V) with the taps as a dimension: the sums over taps, d_v and a block's tokens are reductions
# over tile dimensions, which Triton can keep in a thread's registers while it spreads the rows of d over the threads,
# and the partials accumulate in the layout those sums leave (the kernels before looped over the taps, the backward
# adding each tap's sum over tokens into a (rows, d_v, taps) partial through a select: each about twice as slow on an
# H100, EC_FWD_LAUNCH and EC_BWD_LAUNCH say by how much). Nothing couples rows of d, so the backward's sums over
# tokens (grad w, and C below for grad W) run over a program's STEPS token blocks into one partial a program, which
# a small sum finishes.


@triton.jit
def _ec_fwd_kernel(E, WC, W, X, Y, n, T, d, K: tl.constexpr, dv: tl.constexpr, TB: tl.constexpr, BC: tl.constexpr,
                   BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    r = tl.program_id(0) * TB + tl.arange(0, TB)
    i = tl.program_id(1) * BC + tl.arange(0, BC)
    j = tl.arange(0, BLOCK_V)
    kq = tl.arange(0, BLOCK_K)
    r_ok, i_ok, j_ok, k_ok = r < n, i < d, j < dv, kq < K
    t = r % T
    s = K - 1 - kq  # each tap's lag
    tile = i[:, None] * dv + j[None, :]
    iw = i_ok[:, None] & j_ok[None, :]
    ok = k_ok[:, None] & r_ok[None, :] & (t[None, :] >= s[:, None])  # (BK, TB): the tap's token in r's sequence
    e = tl.load(E + (r[None, :] - s[:, None]).to(tl.int64)[:, :, None] * d + i[None, None, :],
                mask=ok[:, :, None] & i_ok[None, None, :], other=0.0).to(tl.float32)  # (BK, TB, BC)
    wc = tl.load(WC + tile[None, :, :] * K + kq[:, None, None], mask=k_ok[:, None, None] & iw[None, :, :],
                 other=0.0).to(tl.float32)  # (BK, BC, BV)
    x = tl.sum(e[:, :, :, None] * wc[:, None, :, :], axis=0).to(X.dtype.element_ty)  # (TB, BC, BV)
    offs = r.to(tl.int64)[:, None, None] * (d * dv) + tile[None, :, :]
    tl.store(X + offs, x, mask=r_ok[:, None, None] & iw[None, :, :])
    wr = tl.load(W + tile, mask=iw, other=0.0).to(tl.float32)
    y = tl.sum(x.to(tl.float32) * wr[None, :, :], axis=2)
    tl.store(Y + r.to(tl.int64)[:, None] * d + i[None, :], y.to(Y.dtype.element_ty), mask=r_ok[:, None] & i_ok[None, :])


@triton.jit
def _ec_bwd_kernel(GX, GY, E, WC, W, GE, GWP, CP, n, T, d, K: tl.constexpr, dv: tl.constexpr, STEPS: tl.constexpr,
                   TB: tl.constexpr, BC: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    # g = gX + gy W^T, the whole gradient of X. With r' = r - s_q:
    #   grad e[r', i]    = sum_q sum_j g[r' + s_q, i, j] w[i, j, q]
    #   grad w[i, j, q]  = sum_r' g[r' + s_q, i, j] e[r', i]
    #   C[i, q]          = sum_r' gy[r' + s_q, i] e[r', i]     (grad W[i, j] = sum_q w[i, j, q] C[i, q], by the caller)
    # each over the r' whose r' + s_q lies in the same sequence. Partials: GWP (programs along tokens, d, dv, K),
    # CP (programs along tokens, d, K), fp32, accumulated in the layout the sums over tokens leave them in.
    pt = tl.program_id(0)
    i = tl.program_id(1) * BC + tl.arange(0, BC)
    j = tl.arange(0, BLOCK_V)
    kq = tl.arange(0, BLOCK_K)
    i_ok, j_ok, k_ok = i < d, j < dv, kq < K
    s = K - 1 - kq
    tile = i[:, None] * dv + j[None, :]
    iw = i_ok[:, None] & j_ok[None, :]
    wr = tl.load(W + tile, mask=iw, other=0.0).to(tl.float32)
    wc = tl.load(WC + tile[None, :, :] * K + kq[:, None, None], mask=k_ok[:, None, None] & iw[None, :, :],
                 other=0.0).to(tl.float32)  # (BK, BC, BV)
    gw = tl.zeros((BLOCK_K, BC, BLOCK_V), dtype=tl.float32)
    cq = tl.zeros((BLOCK_K, BC), dtype=tl.float32)
    for step in range(STEPS):
        r = (pt * STEPS + step) * TB + tl.arange(0, TB)
        r_ok = r < n
        t = r % T
        ok = k_ok[:, None] & r_ok[None, :] & (t[None, :] + s[:, None] < T)  # (BK, TB): r + s in r's sequence
        rs = (r[None, :] + s[:, None]).to(tl.int64)
        g = tl.load(GX + rs[:, :, None, None] * (d * dv) + tile[None, None, :, :],
                    mask=ok[:, :, None, None] & iw[None, None, :, :], other=0.0).to(tl.float32)  # (BK, TB, BC, BV)
        gy = tl.load(GY + rs[:, :, None] * d + i[None, None, :], mask=ok[:, :, None] & i_ok[None, None, :],
                     other=0.0).to(tl.float32)  # (BK, TB, BC)
        e = tl.load(E + r.to(tl.int64)[:, None] * d + i[None, :], mask=r_ok[:, None] & i_ok[None, :],
                    other=0.0).to(tl.float32)  # (TB, BC)
        g += gy[:, :, :, None] * wr[None, None, :, :]
        ge = tl.sum(tl.sum(g * wc[:, None, :, :], axis=3), axis=0)  # (TB, BC)
        tl.store(GE + r.to(tl.int64)[:, None] * d + i[None, :], ge.to(GE.dtype.element_ty),
                 mask=r_ok[:, None] & i_ok[None, :])
        gw += tl.sum(g * e[None, :, :, None], axis=1)
        cq += tl.sum(gy * e[None, :, :], axis=1)
    base = pt.to(tl.int64) * d
    tl.store(GWP + ((base + i[None, :, None]) * dv + j[None, None, :]) * K + kq[:, None, None], gw,
             mask=k_ok[:, None, None] & iw[None, :, :])
    tl.store(CP + (base + i[None, :]) * K + kq[:, None], cq, mask=k_ok[:, None] & i_ok[None, :])


EC_FWD_LAUNCH = (4, 128, 4)
"""(tokens a program, rows of d a program, warps) of ``_ec_fwd_kernel``. From ``bench/ec_kernels.py``'s sweep on an H100
(16384 tokens, d = 768, d_v = 4, K = 4; the twentieth session, docs/bench/ec-kernels-v3-h100-2026-12-07.jsonl): 94 us,
1.6 TB/s, against 96-176 us for the other launches swept, and against 158-177 us for the kernel before, which
summed the taps one at a time over a (tokens, rows, d_v) tile (docs/bench/ec-kernels-v1-h100-2026-12-06b.jsonl)."""

EC_BWD_LAUNCH = (1, 64, 2, 64)
"""(tokens a block, rows of d a program, warps, token blocks a program) of ``_ec_bwd_kernel``. From the same sweep:
267 us (0.66 TB/s, the partials included), against 272-947 us for the other launches swept. The kernel before
(the taps one at a time, each sum over a block's tokens leaving the threads' registers) took 551-816 us over ten
launches; a version on 2-D tiles of the flattened state 343-8424 us (docs/bench/ec-kernels-v2-h100-2026-12-06.jsonl);
the PyTorch formulas compiled by inductor, 947 us, and the step 0.8 ms slower."""


def _ec_shape(e: torch.Tensor, w: torch.Tensor) -> tuple[int, int, int, int, int]:
    B, T, d = e.shape
    return B * T, T, d, w.shape[1], w.shape[2]


def ec_forward(e: torch.Tensor, w: torch.Tensor, W: torch.Tensor,
               launch: tuple[int, int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """e (B, T, d), w (d, d_v, K) and W (d, d_v), contiguous -> X (B, T, d, d_v) in e's dtype and its readout
    y (B, T, d) = sum_j W[:, j] X[..., j]. ``launch``: ``EC_FWD_LAUNCH``'s, for the sweep."""
    n, T, d, dv, K = _ec_shape(e, w)
    tb, bc, warps = launch or EC_FWD_LAUNCH
    X, y = torch.empty(*e.shape, dv, dtype=e.dtype, device=e.device), torch.empty_like(e)
    wrap_triton(_ec_fwd_kernel)[(triton.cdiv(n, tb), triton.cdiv(d, bc))](
        e, w, W, X, y, n, T, d, K=K, dv=dv, TB=tb, BC=bc, BLOCK_V=triton.next_power_of_2(dv),
        BLOCK_K=triton.next_power_of_2(K), num_warps=warps)
    return X, y


def ec_backward(gX: torch.Tensor, gy: torch.Tensor, e: torch.Tensor, w: torch.Tensor, W: torch.Tensor,
                launch: tuple[int, int, int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """gX (B, T, d, d_v) and gy (B, T, d), contiguous -> (grad e in e's dtype, grad w (d, d_v, K) and grad W
    (d, d_v), fp32). ``launch``: ``EC_BWD_LAUNCH``'s, for the sweep."""
    n, T, d, dv, K = _ec_shape(e, w)
    tb, bc, warps, steps = launch or EC_BWD_LAUNCH
    programs = triton.cdiv(n, tb * steps)
    ge = torch.empty_like(e)
    gwp = torch.empty(programs, d, dv, K, dtype=torch.float32, device=e.device)
    cp = torch.empty(programs, d, K, dtype=torch.float32, device=e.device)
    wrap_triton(_ec_bwd_kernel)[(programs, triton.cdiv(d, bc))](
        gX, gy, e, w, W, ge, gwp, cp, n, T, d, K=K, dv=dv, STEPS=steps, TB=tb, BC=bc,
        BLOCK_V=triton.next_power_of_2(dv), BLOCK_K=triton.next_power_of_2(K), num_warps=warps)
    return ge, gwp.sum(0), (w.float() * cp.sum(0)[:, None, :]).sum(-1)


# -- the weight and bias gradients of a narrow head (ddl.layers.NarrowLinear, d_v > 1) -----------------------------
# gW = G^T x and gb = sum_t G_t for G (N, o) fp32 and x (N, n) over N tokens, o <= 8 outputs. A program owns a chunk
# of TOKENS tokens and BLOCK_N columns of x; it walks the chunk BLOCK_T tokens at a time, G's rows rounded to x's dtype
# (as autocast's Linear rounds them) and multiplied on the tensor cores into an fp32 (BLOCK_O, BLOCK_N) partial; the
# programs of column block 0 also sum G in fp32 for the bias. A partial a chunk, which a small sum finishes.


@triton.jit
def _narrow_wgrad_kernel(G, X, P, N, n, o: tl.constexpr, TOKENS: tl.constexpr, BLOCK_T: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr, IEEE: tl.constexpr):
    # IEEE: the rounded G and x multiplied in fp32 (their products exact), for Triton's interpreter, whose dot of
    # bf16 tiles returns garbage
    chunk, cb = tl.program_id(0), tl.program_id(1)
    cols = cb * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ok = cols < n
    oo = tl.arange(0, BLOCK_O)
    o_ok = oo < o
    acc = tl.zeros((BLOCK_O, BLOCK_N), dtype=tl.float32)
    gsum = tl.zeros((BLOCK_O,), dtype=tl.float32)
    t0 = chunk.to(tl.int64) * TOKENS
    for ts in tl.range(0, TOKENS, BLOCK_T):
        t = t0 + ts + tl.arange(0, BLOCK_T)
        t_ok = t < N
        g = tl.load(G + t[None, :] * o + oo[:, None], mask=o_ok[:, None] & t_ok[None, :], other=0.0)  # (O, T)
        x = tl.load(X + t[:, None] * n + cols[None, :], mask=t_ok[:, None] & c_ok[None, :], other=0.0)  # (T, N)
        if IEEE:
            acc = tl.dot(g.to(x.dtype).to(tl.float32), x.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(g.to(x.dtype), x, acc)
        gsum += tl.sum(g, axis=1)
    base = P + chunk.to(tl.int64) * o * (n + 1)
    tl.store(base + oo[:, None] * (n + 1) + cols[None, :], acc, mask=o_ok[:, None] & c_ok[None, :])
    if cb == 0:
        tl.store(base + oo * (n + 1) + n, gsum, mask=o_ok)


NARROW_WGRAD_LAUNCH = (256, 64, 128, 4)
"""(tokens a program, tokens a step, columns a program, warps) of ``_narrow_wgrad_kernel``: 16384 tokens and d = 768
make 64 x 6 programs, each reading 64 KB of x."""


def narrow_weight_grad(g: torch.Tensor, x: torch.Tensor,
                       launch: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """g (N, o) fp32 and x (N, n) bf16 or fp16, contiguous -> (o, n + 1) fp32: gW = g^T x in the first n columns,
    gb = sum_t g_t in the last; g rounded to x's dtype for gW, as autocast's Linear rounds it, summed in fp32 for gb."""
    N, o = g.shape
    n = x.shape[1]
    tokens, block_t, block_n, warps = launch or NARROW_WGRAD_LAUNCH
    if tokens % block_t:
        raise ValueError(f"narrow_weight_grad: tokens a program ({tokens}) must be a multiple of a step ({block_t})")
    chunks = max(1, triton.cdiv(N, tokens))
    partial = torch.empty(chunks, o, n + 1, dtype=torch.float32, device=x.device)
    wrap_triton(_narrow_wgrad_kernel)[(chunks, triton.cdiv(n, block_n))](
        g, x, partial, N, n, o=o, TOKENS=tokens, BLOCK_T=block_t, BLOCK_N=block_n,
        BLOCK_O=max(16, triton.next_power_of_2(o)), IEEE=not x.is_cuda, num_warps=warps)
    return partial.sum(0)


@triton.jit
def _narrow_fwd_kernel(X, W, B, Y, N, n, o: tl.constexpr, HAS_B: tl.constexpr, BLOCK_T: tl.constexpr,
                       BLOCK_K: tl.constexpr, BLOCK_O: tl.constexpr, IEEE: tl.constexpr):
    # y = x W^T + b for BLOCK_T tokens a program: x read once, in BLOCK_K columns at a time, W's rows rounded to x's
    # dtype (as autocast's Linear rounds them) and multiplied on the tensor cores into fp32. IEEE: in fp32, for
    # Triton's interpreter
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < N
    oo = tl.arange(0, BLOCK_O)
    o_ok = oo < o
    acc = tl.zeros((BLOCK_T, BLOCK_O), dtype=tl.float32)
    for k0 in tl.range(0, n, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < n
        x = tl.load(X + t[:, None] * n + k[None, :], mask=t_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(W + oo[None, :] * n + k[:, None], mask=k_ok[:, None] & o_ok[None, :], other=0.0).to(x.dtype)
        if IEEE:  # noqa: SIM108 (a constexpr branch, one side compiled)
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w, acc)
    if HAS_B:
        acc += tl.load(B + oo, mask=o_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + t[:, None] * o + oo[None, :], acc, mask=t_ok[:, None] & o_ok[None, :])


NARROW_FWD_LAUNCH = (64, 128, 4)
"""(tokens a program, columns a step, warps) of ``_narrow_fwd_kernel``."""


def narrow_product(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                   launch: tuple[int, int, int] | None = None) -> torch.Tensor:
    """x (N, n) bf16 or fp16, w (o, n), b (o,) or None, contiguous -> y = x w^T + b (N, o) fp32, w taken in x's
    dtype."""
    N, n = x.shape
    o = w.shape[0]
    tokens, block_k, warps = launch or NARROW_FWD_LAUNCH
    y = torch.empty(N, o, dtype=torch.float32, device=x.device)
    wrap_triton(_narrow_fwd_kernel)[(triton.cdiv(N, tokens),)](
        x, w, w if b is None else b, y, N, n, o=o, HAS_B=b is not None, BLOCK_T=tokens, BLOCK_K=block_k,
        BLOCK_O=max(16, triton.next_power_of_2(o)), IEEE=not x.is_cuda, num_warps=warps)
    return y
