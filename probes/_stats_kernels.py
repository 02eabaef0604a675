"""The eager probe's reductions over the sites' sampled rows in two Triton launches for all sites (CUDA).

Compiled by inductor, ``_stats.stacked_reduce`` stacks the sites' sampled h, k and k one token later into new
tensors and reads them again from there. Here the sites are never stacked: each launch takes a table of the
sites' base addresses and reads their rows in place. On an H100 (small preset, d_v = 1, 24 sites, every 8th
token, ``bench/probe_stats.py``) the whole statistics call took 1.02 ms of kernels before (20 launches), and
0.44 ms with these two (20 launches, the compiled ``_stats.stacked_finish`` included); the rows it must read
weigh 536 MB, 0.18 ms at 3 TB/s.

- ``_rows_kernel``, one program for ``ROWS`` sampled tokens of one site: per token ||X|| (X's (d, d_v) as
  one row), ||h||, ||k||, k . k one token later, k . k of the site before at the same token, h's
  non-finite count; and the program's sum of k over its tokens (a partial, summed by torch after).
- ``_conc_kernel``: per token |k . m|, m the site's mean direction, known only from the sums: k's rows
  read a second time.

Rows are read in ``BLOCK``-wide chunks and reduced in fp32. Only long-stable Triton APIs (program_id,
arange, masked load/store, sum, loops), and an int64 -> pointer cast for the address tables.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from probes._layout import TINY

ROWS, BLOCK, WARPS = 2, 256, 2
"""Sampled tokens a program, the width of a row chunk (rows of d = 768: three chunks), warps a program. On an H100
(small preset, d_v = 1, 24 sites, every 8th token; ``bench/probe_stats.py --kernels --launches``) ``_rows_kernel``
took 0.221 ms, 3.1 TB/s of the rows it reads (the site before's k mostly from L2: the grid runs the sites of one
token group side by side); (4, 256, 4) 0.302 ms, (4, 512, 4) 0.254, (4, 128, 2) 0.269, (8, 256, 4) 0.345,
(16, 256, 8) 0.733."""


@triton.jit
def _sq_sum(base, off, n, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    # sum of squares of n elements from base + off (ROWS,), BLOCK at a time; off < 0: a masked row
    acc = tl.zeros((ROWS,), dtype=tl.float32)
    for c in range(0, n, BLOCK):
        i = c + tl.arange(0, BLOCK)
        x = tl.load(base + off[:, None] + i[None, :], mask=(off[:, None] >= 0) & (i[None, :] < n),
                    other=0.0).to(tl.float32)
        acc += tl.sum(x * x, axis=1)
    return acc


@triton.jit
def _rows_kernel(PX, PH, PK, X0, H0, K0, XN, HN, KN, NXT, COS, NF, KPART, n_tok, m, T, stride, dx, d,
                 ROWS: tl.constexpr, BLOCK: tl.constexpr):
    s, pid = tl.program_id(0), tl.program_id(1)
    n_prog = tl.num_programs(1)
    xb = tl.load(PX + s).to(X0.dtype)  # this site's base addresses, typed as the first site's tensors
    hb = tl.load(PH + s).to(H0.dtype)
    kb = tl.load(PK + s).to(K0.dtype)
    pb = tl.load(PK + tl.maximum(s - 1, 0)).to(K0.dtype)  # the site before (site 0: itself, result unused)
    q = pid * ROWS + tl.arange(0, ROWS)  # sampled token index, b * m + j
    ok = q < n_tok
    t = (q % m) * stride
    row = (q // m).to(tl.int64) * T + t  # token row in (B, T)
    nxt_ok = ok & (t + 1 < T)
    xn = tl.sqrt(_sq_sum(xb, tl.where(ok, row * dx, -1), dx, ROWS, BLOCK))
    hh = tl.zeros((ROWS,), dtype=tl.float32)
    kk = tl.zeros((ROWS,), dtype=tl.float32)
    kx = tl.zeros((ROWS,), dtype=tl.float32)
    kp = tl.zeros((ROWS,), dtype=tl.float32)
    nf = tl.zeros((ROWS,), dtype=tl.float32)
    for c in range(0, d, BLOCK):
        i = c + tl.arange(0, BLOCK)
        msk = ok[:, None] & (i[None, :] < d)
        off = row[:, None] * d + i[None, :]
        h = tl.load(hb + off, mask=msk, other=0.0).to(tl.float32)
        k = tl.load(kb + off, mask=msk, other=0.0).to(tl.float32)
        hh += tl.sum(h * h, axis=1)
        nf += tl.sum(tl.where(h - h == 0.0, 0.0, 1.0), axis=1)  # NaN and +-inf give NaN; masked lanes hold 0
        kk += tl.sum(k * k, axis=1)
        kn1 = tl.load(kb + off + d, mask=nxt_ok[:, None] & (i[None, :] < d), other=0.0).to(tl.float32)
        kx += tl.sum(k * kn1, axis=1)
        kp += tl.sum(k * tl.load(pb + off, mask=msk, other=0.0).to(tl.float32), axis=1)
        tl.store(KPART + (s * n_prog + pid).to(tl.int64) * d + i, tl.sum(k, axis=0), mask=i < d)
    o = s.to(tl.int64) * n_tok + q
    tl.store(XN + o, xn, mask=ok)
    tl.store(HN + o, tl.sqrt(hh), mask=ok)
    tl.store(KN + o, tl.sqrt(kk), mask=ok)
    tl.store(NXT + o, tl.abs(kx), mask=ok)
    tl.store(COS + o, tl.abs(kp), mask=ok)
    tl.store(NF + o, nf, mask=ok)


@triton.jit
def _conc_kernel(PK, K0, MDIR, CONC, n_tok, m, T, stride, d, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    s, pid = tl.program_id(0), tl.program_id(1)
    kb = tl.load(PK + s).to(K0.dtype)
    q = pid * ROWS + tl.arange(0, ROWS)
    ok = q < n_tok
    row = (q // m).to(tl.int64) * T + (q % m) * stride
    acc = tl.zeros((ROWS,), dtype=tl.float32)
    for c in range(0, d, BLOCK):
        i = c + tl.arange(0, BLOCK)
        k = tl.load(kb + row[:, None] * d + i[None, :], mask=ok[:, None] & (i[None, :] < d), other=0.0)
        acc += tl.sum(k.to(tl.float32) * tl.load(MDIR + s * d + i, mask=i < d, other=0.0)[None, :], axis=1)
    tl.store(CONC + s.to(tl.int64) * n_tok + q, tl.abs(acc), mask=ok)


def supported(X: tuple[torch.Tensor, ...], h: tuple[torch.Tensor, ...], k: tuple[torch.Tensor, ...]) -> bool:
    """Whether :func:`stacked_reduce` takes these sites: every tensor contiguous, of one dtype a role, k
    (B, T, d) like h, and X (B, T, ...) over the same tokens."""
    first = (X[0], h[0], k[0])
    B, T, d = k[0].shape
    return (h[0].shape == k[0].shape and X[0].shape[:2] == (B, T)
            and all(t.is_contiguous() and t.dtype == f.dtype and t.shape == f.shape and t.device == f.device
                    for col, f in zip((X, h, k), first, strict=True) for t in col))


def _addresses(cols: tuple[tuple[torch.Tensor, ...], ...], dev: torch.device) -> torch.Tensor:
    """The tensors' base addresses, (len(cols), S) int64 on ``dev``: on CUDA one copy from pinned memory,
    queued without a host sync (the training loop runs under ``set_sync_debug_mode("error")`` in the tests)."""
    table = torch.tensor([[t.data_ptr() for t in col] for col in cols], dtype=torch.int64)
    return table.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else table


def stacked_reduce(X: tuple[torch.Tensor, ...], h: tuple[torch.Tensor, ...], k: tuple[torch.Tensor, ...],
                   stride: int) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """``_stats.stacked_reduce`` (same arguments, same results, fp32) in two launches; inputs as
    :func:`supported` asks."""
    S, (B, T, d) = len(k), k[0].shape
    dx = X[0][0, 0].numel()
    m = len(range(0, T, stride))
    n_tok = B * m
    dev = k[0].device
    table = _addresses((X, h, k), dev)
    block = min(triton.next_power_of_2(d), BLOCK)
    grid = (S, triton.cdiv(n_tok, ROWS))
    xn, hn, kn, nxt, cos, nf = torch.empty(6, S, n_tok, dtype=torch.float32, device=dev)
    part = torch.empty(S, grid[1], d, dtype=torch.float32, device=dev)
    _rows_kernel[grid](*table, X[0], h[0], k[0], xn, hn, kn, nxt, cos, nf, part, n_tok, m, T, stride, dx, d,
                       ROWS=ROWS, BLOCK=block, num_warps=WARPS)
    ksum = part.sum(1)
    mdir = ksum / torch.linalg.vector_norm(ksum, dim=-1, keepdim=True).clamp_min(TINY)
    conc = torch.empty(S, n_tok, dtype=torch.float32, device=dev)
    _conc_kernel[grid](table[2], k[0], mdir, conc, n_tok, m, T, stride, d, ROWS=ROWS, BLOCK=block, num_warps=WARPS)
    tok = (B, m)
    return xn.view(S, *tok), (hn.view(S, *tok), kn.view(S, *tok), nxt.sum(1), ksum, conc.sum(1), nf.sum(1),
                              cos[1:].sum(1))
