"""The probe's reductions over the sites' sampled rows in two Triton launches for all sites (CUDA).

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

Where k is ``ddl.delta.KDirection``'s (``_hooks``), no k is read: both kernels make it from the rows of h
(``DERIVE``), k = h / sqrt(||h||^2 + eps^2), so every dot of unit vectors is a dot of raw rows times their two
scales, and the sum of k a second pass over h's rows once the scale is known. Eagerly the probe calls
:func:`stacked_reduce`; in a model the user compiles, the op :func:`probe_rows`, which inductor calls as it is.

Rows are read in ``BLOCK``-wide chunks and reduced in fp32. Only long-stable Triton APIs (program_id,
arange, masked load/store, sum, loops), and an int64 -> pointer cast for the address tables.
"""

from __future__ import annotations

import logging
import os

import torch
import triton
import triton.language as tl

from probes import _stats
from probes._layout import TINY

log = logging.getLogger("deltascope.probes")

ROWS, BLOCK, WARPS = 2, 256, 2
"""Sampled tokens a program, the width of a row chunk (rows of d = 768: three chunks), warps a program. On an H100
(small preset, d_v = 1, 24 sites, every 8th token; ``bench/probe_stats.py --kernels --launches``) ``_rows_kernel``
took 0.221 ms, 3.1 TB/s of the rows it reads (the site before's k mostly from L2: the grid runs the sites of one
token group side by side); (4, 256, 4) 0.302 ms, (4, 512, 4) 0.254, (4, 128, 2) 0.269, (8, 256, 4) 0.345,
(16, 256, 8) 0.733."""
XBLOCK = 1024
"""The widest chunk of the state's rows (d x d_v elements a token: 3,072 at d_v = 4). On an H100 (small preset,
d_v = 4, the rest as above) ``_rows_kernel`` took 0.232 ms with 1024, 0.262 ms with 256; at d_v = 1 (768) 0.175 and
0.173 ms."""


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
def _rows_kernel(PX, PH, PK, X0, H0, K0, XN, HN, KN, NXT, COS, NF, KPART, n_tok, m, T, stride, dx, d, eps2,
                 ROWS: tl.constexpr, BLOCK: tl.constexpr, XBLOCK: tl.constexpr, DERIVE: tl.constexpr):
    # DERIVE: no k in memory; k = r h with r = 1 / sqrt(||h||^2 + eps2), as ddl.delta.KDirection makes it (PK is PH)
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
    xn = tl.sqrt(_sq_sum(xb, tl.where(ok, row * dx, -1), dx, ROWS, XBLOCK))
    hh = tl.zeros((ROWS,), dtype=tl.float32)
    kk = tl.zeros((ROWS,), dtype=tl.float32)  # DERIVE: ||h one token later||^2
    kx = tl.zeros((ROWS,), dtype=tl.float32)
    kp = tl.zeros((ROWS,), dtype=tl.float32)
    pp = tl.zeros((ROWS,), dtype=tl.float32)  # DERIVE: ||h of the site before||^2
    nf = tl.zeros((ROWS,), dtype=tl.float32)
    for c in range(0, d, BLOCK):
        i = c + tl.arange(0, BLOCK)
        msk = ok[:, None] & (i[None, :] < d)
        off = row[:, None] * d + i[None, :]
        h = tl.load(hb + off, mask=msk, other=0.0).to(tl.float32)
        hh += tl.sum(h * h, axis=1)
        nf += tl.sum(tl.where(h - h == 0.0, 0.0, 1.0), axis=1)  # NaN and +-inf give NaN; masked lanes hold 0
        k = h if DERIVE else tl.load(kb + off, mask=msk, other=0.0).to(tl.float32)
        kn1 = tl.load(kb + off + d, mask=nxt_ok[:, None] & (i[None, :] < d), other=0.0).to(tl.float32)
        kpr = tl.load(pb + off, mask=msk, other=0.0).to(tl.float32)
        kx += tl.sum(k * kn1, axis=1)
        kp += tl.sum(k * kpr, axis=1)
        if DERIVE:
            kk += tl.sum(kn1 * kn1, axis=1)
            pp += tl.sum(kpr * kpr, axis=1)
        else:
            kk += tl.sum(k * k, axis=1)
            tl.store(KPART + (s * n_prog + pid).to(tl.int64) * d + i, tl.sum(k, axis=0), mask=i < d)
    if DERIVE:  # the dots of raw rows scaled to unit ones; masked rows (r unused) kept finite for eps = 0
        r = tl.where(ok, 1.0 / tl.sqrt(hh + eps2), 0.0)
        kx = kx * r * tl.where(nxt_ok, 1.0 / tl.sqrt(kk + eps2), 0.0)
        kp = kp * r * tl.where(ok, 1.0 / tl.sqrt(pp + eps2), 0.0)
        kk = hh * r * r
        for c in range(0, d, BLOCK):  # the sum of k: h's rows again (from L1/L2), now that r is known
            i = c + tl.arange(0, BLOCK)
            h = tl.load(hb + row[:, None] * d + i[None, :], mask=ok[:, None] & (i[None, :] < d),
                        other=0.0).to(tl.float32)
            tl.store(KPART + (s * n_prog + pid).to(tl.int64) * d + i, tl.sum(h * r[:, None], axis=0), mask=i < d)
    o = s.to(tl.int64) * n_tok + q
    tl.store(XN + o, xn, mask=ok)
    tl.store(HN + o, tl.sqrt(hh), mask=ok)
    tl.store(KN + o, tl.sqrt(kk), mask=ok)
    tl.store(NXT + o, tl.abs(kx), mask=ok)
    tl.store(COS + o, tl.abs(kp), mask=ok)
    tl.store(NF + o, nf, mask=ok)


@triton.jit
def _conc_kernel(PK, K0, MDIR, HN, CONC, n_tok, m, T, stride, d, eps2, ROWS: tl.constexpr, BLOCK: tl.constexpr,
                 DERIVE: tl.constexpr):
    # DERIVE: PK holds h; k = h / sqrt(||h||^2 + eps2), ||h|| from _rows_kernel's HN
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
    o = s.to(tl.int64) * n_tok + q
    if DERIVE:
        hn = tl.load(HN + o, mask=ok, other=0.0)
        acc = acc * tl.where(ok, 1.0 / tl.sqrt(hn * hn + eps2), 0.0)
    tl.store(CONC + o, tl.abs(acc), mask=ok)


def supported(X: tuple[torch.Tensor, ...], h: tuple[torch.Tensor, ...], k: tuple[torch.Tensor, ...] | None) -> bool:
    """Whether :func:`stacked_reduce` takes these sites: every tensor contiguous, of one dtype a role, k
    (B, T, d) like h (or None: made from h), and X (B, T, ...) over the same tokens."""
    cols = (X, h) if k is None else (X, h, k)
    B, T, d = h[0].shape
    return ((k is None or k[0].shape == h[0].shape) and X[0].shape[:2] == (B, T)
            and all(t.is_contiguous() and t.dtype == col[0].dtype and t.shape == col[0].shape
                    and t.device == col[0].device for col in cols for t in col))


_last_table: tuple[tuple, torch.Tensor] | None = None


def _addresses(cols: tuple[tuple[torch.Tensor, ...], ...], dev: torch.device) -> torch.Tensor:
    """The tensors' base addresses, (len(cols), S) int64 on ``dev``: on CUDA one copy from pinned memory,
    queued without a host sync (the training loop runs under ``set_sync_debug_mode("error")`` in the tests).
    The last table is kept and used again while the addresses are the same (a training loop's activations
    mostly come back to the same blocks of the caching allocator at every step): no copy then."""
    global _last_table
    ptrs = tuple(tuple(t.data_ptr() for t in col) for col in cols)
    key = (dev, ptrs)
    if _last_table is not None and _last_table[0] == key:
        return _last_table[1]
    table = torch.tensor(ptrs, dtype=torch.int64)
    if dev.type == "cuda":
        table = table.pin_memory().to(dev, non_blocking=True)
    _last_table = (key, table)
    return table


def stacked_reduce(X: tuple[torch.Tensor, ...], h: tuple[torch.Tensor, ...], k: tuple[torch.Tensor, ...] | None,
                   stride: int, eps: float | None = None) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """``_stats.stacked_reduce`` (same arguments, same results, fp32) in two launches; inputs as
    :func:`supported` asks. ``k`` None: k = h / sqrt(||h||^2 + eps^2), made in the kernels from h's rows."""
    S, (B, T, d) = len(h), h[0].shape
    dx = X[0][0, 0].numel()
    m = len(range(0, T, stride))
    n_tok = B * m
    dev = h[0].device
    derive = k is None
    table = _addresses((X, h) if derive else (X, h, k), dev)
    pk, k0 = (table[1], h[0]) if derive else (table[2], k[0])
    eps2 = float(eps) ** 2 if derive else 0.0
    block = min(triton.next_power_of_2(d), BLOCK)
    grid = (S, triton.cdiv(n_tok, ROWS))
    xn, hn, kn = (torch.empty(S, n_tok, dtype=torch.float32, device=dev) for _ in range(3))  # returned: apart
    nxt, cos, nf, conc = torch.empty(4, S, n_tok, dtype=torch.float32, device=dev)  # summed: one allocation
    part = torch.empty(S, grid[1], d, dtype=torch.float32, device=dev)
    _rows_kernel[grid](table[0], table[1], pk, X[0], h[0], k0, xn, hn, kn, nxt, cos, nf, part, n_tok, m, T, stride,
                       dx, d, eps2, ROWS=ROWS, BLOCK=block, XBLOCK=min(triton.next_power_of_2(dx), XBLOCK),
                       DERIVE=derive, num_warps=WARPS)
    ksum = part.sum(1)
    mdir = ksum / torch.linalg.vector_norm(ksum, dim=-1, keepdim=True).clamp_min(TINY)
    _conc_kernel[grid](pk, k0, mdir, hn, conc, n_tok, m, T, stride, d, eps2, ROWS=ROWS, BLOCK=block, DERIVE=derive,
                       num_warps=WARPS)
    tok = (B, m)
    return xn.view(S, *tok), (hn.view(S, *tok), kn.view(S, *tok), nxt.sum(1), ksum, conc.sum(1), nf.sum(1),
                              cos[1:].sum(1))


_warned = False
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_OUT = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
             torch.Tensor, torch.Tensor]


@torch.library.custom_op("deltascope::probe_rows", mutates_args=(),
                         tags=tuple(t for t in (getattr(torch.Tag, "cudagraph_unsafe", None),) if t is not None))
def probe_rows(X: list[torch.Tensor], h: list[torch.Tensor], k: list[torch.Tensor], p: list[torch.Tensor],
               stride: int, eps: float) -> _OUT:
    """:func:`stacked_reduce` as one op for a model the user compiles (``probes._hooks``): inductor cannot trace
    the kernels' table of addresses, so the op is opaque to it, and the kernels read every site's rows where they
    lie where inductor would stack them first. ``k`` empty: made from h with ``eps``. Results flat: xn, then the
    seven of ``kred``, then the sites' readouts ``p`` stacked (S, ...) in fp32: one copy here, where inductor
    copies a fused update's p (written by that op's kernel) into its stack one launch a site. Tagged unsafe for
    CUDA graphs: the address table is copied from host memory on every call. Sites the kernels do not take, or
    a failing launch (one warning), get ``_stats.stacked_reduce``'s torch ops."""
    global _warned
    Xs, hs, ks = tuple(X), tuple(h), tuple(k) or None
    ps = torch.stack(p).float()
    # shapes, dtypes and devices were checked (:func:`supported`) when the graph was traced, and the graph keeps
    # them; what is left to check is the layout inductor gave each buffer (host time: 70 us for the whole check)
    if (hs[0].is_cuda or INTERPRET) and all(t.is_contiguous() for col in (Xs, hs, ks or ()) for t in col):
        try:
            xn, red = stacked_reduce(Xs, hs, ks, stride, eps)
            return (xn, *red, ps)
        except Exception as e:  # never let the statistics take training down
            if not _warned:
                _warned = True
                log.warning("probe statistics kernels failed, using torch ops: %r", e)
    with torch.no_grad():
        xn, red = _stats.stacked_reduce(Xs, hs, ks, stride, eps)
    return (xn, *(t.contiguous() for t in red), ps)


@probe_rows.register_fake
def _(X: list[torch.Tensor], h: list[torch.Tensor], k: list[torch.Tensor], p: list[torch.Tensor], stride: int,
      eps: float) -> _OUT:
    S, (B, T, d) = len(h), h[0].shape
    m = (T + stride - 1) // stride
    out = lambda *shape: h[0].new_empty(shape, dtype=torch.float32)  # noqa: E731
    return out(S, B, m), out(S, B, m), out(S, B, m), out(S), out(S, d), out(S), out(S), out(S - 1), out(S, *p[0].shape)
