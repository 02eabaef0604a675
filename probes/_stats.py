"""The per-call statistics as pure tensor functions: tensors in, fixed-shape slot vectors out.

Each function returns exactly the run of slots its hook adds into the buffer (``_layout``), in
the buffer's dtype, so a hook costs one call and one in-place add. Only fixed-shape ops: sums,
norms, max/min, floor+clamp bin indices with ``index_add_`` into a fresh zero vector (which has a
deterministic CUDA implementation, unlike ``histc``); no value ever reaches the host.

Being pure, they can be compiled: on CUDA the hooks call ``torch.compile``d copies (a handful of
fused kernels per hook instead of dozens of small launches); inside a model the user compiles,
dynamo inlines the plain functions into the model's graph.
"""

from __future__ import annotations

import torch

from probes._layout import TINY
from server.catalogue import BETA_BINS, H_NORM_BINS, H_NORM_LOG10_RANGE

F32 = torch.float32


TOK = (1, 2)
"""Token axes of every input: (S, B, T, ...) with S the site axis (1 for one site)."""


def nonfinite(x: torch.Tensor) -> torch.Tensor:
    """Per-site count of NaN and +-inf values, (S,). Eager: x - x is 0 exactly where x is finite,
    3x cheaper on CPU than isfinite; compiled: isfinite, fused anyway (count_nonzero(x - x)
    miscounts under inductor in torch 2.11)."""
    dims = tuple(range(1, x.dim()))
    if torch.compiler.is_compiling():  # the last axis first, as the per-token norms beside it reduce
        return (~torch.isfinite(x)).sum(-1).sum(dims[:-1]) if x.dim() > 2 else (~torch.isfinite(x)).sum(dims)
    return torch.count_nonzero(x - x, dim=dims)


def hist(x: torch.Tensor, lo: float, hi: float, n: int, dtype: torch.dtype) -> torch.Tensor:
    """Per-site counts of the finite values of ``x`` (S, ...) in ``n`` equal bins on [lo, hi],
    (S, n); values beyond either end land in the end bins."""
    S = x.shape[0]
    w = torch.isfinite(x).to(dtype).reshape(-1)
    pos = (torch.nan_to_num(x, nan=lo, posinf=hi, neginf=lo) - lo) * (n / (hi - lo))
    idx = pos.floor().clamp(0, n - 1).long().reshape(S, -1)
    idx = (idx + n * torch.arange(S, device=x.device)[:, None]).reshape(-1)
    return torch.zeros(S * n, dtype=dtype, device=x.device).index_add_(0, idx, w).view(S, n)


def _count(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Tokens per site, (S,): a constant."""
    return x.new_full((x.shape[0],), x.shape[1] * x.shape[2], dtype=dtype)


def beta_block(beta: torch.Tensor, beta_max: float, identity_below: float, projection_band: float,
               reflection_above: float, dtype: torch.dtype) -> torch.Tensor:
    """beta (S, B, T, 1) -> BETA_SLOTS then the beta histogram, (S, ...); moments in ``dtype``."""
    b = beta[..., 0].to(dtype)  # (S, B, T)
    head = torch.stack([
        _count(b, dtype),
        b.sum(TOK),
        (b * b).sum(TOK),
        (b < identity_below).sum(TOK, dtype=dtype),
        ((b - 1).abs() < projection_band).sum(TOK, dtype=dtype),
        (b > reflection_above).sum(TOK, dtype=dtype),
        (b > 1).sum(TOK, dtype=dtype),
        nonfinite(b).to(dtype),
    ], dim=1)
    return torch.cat([head, hist(b, 0.0, beta_max, BETA_BINS, dtype)], dim=1)


def logit_block(logit: torch.Tensor, saturation: float, dtype: torch.dtype) -> torch.Tensor:
    """Pre-sigmoid logit (S, B, T, 1) -> LOGIT_SLOTS, (S, 2)."""
    return torch.stack([
        _count(logit, dtype),
        (logit[..., 0].float().abs() > saturation).sum(TOK, dtype=dtype),
    ], dim=1)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-token dot product over the last axis, as a product and a sum: ``linalg.vecdot`` with a
    broadcast operand lowers to a cuBLAS call per site inside a compiled graph (host time on the
    training thread), where a sum fuses into the neighbouring reductions."""
    if torch.compiler.is_compiling():
        return (a * b).sum(-1)
    return torch.linalg.vecdot(a, b)  # eager: no (B, T, d) temporary


def x_norm(X: torch.Tensor) -> torch.Tensor:
    """Per-token Frobenius norm of the state: (S, B, m, d) or (S, B, m, d, d_v) -> (S, B, m) fp32."""
    return torch.linalg.vector_norm(X.flatten(3), dim=-1, dtype=F32)


def unit(h: torch.Tensor, eps: float) -> torch.Tensor:
    """``ddl.delta.KDirection``'s k of h, fp32: h / sqrt(||h||^2 + eps^2) over the last axis. Where a site's
    ``k_dir`` is that module and only observers hook it, the statistics make k from the rows of h they
    sample instead of taking the k the hook saw (``_hooks``): the same numbers, and no k to stack."""
    h = h.float()
    return h * torch.rsqrt(h.square().sum(-1, keepdim=True) + eps**2)


def sample(X: torch.Tensor, h: torch.Tensor, k: torch.Tensor, prev: torch.Tensor | None, stride: int
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
    """One site's (B, T, ...) state, h, k and previous-site k -> the sampled token positions
    t = 0, s, 2s, ... (views, no copy in eager), each with a leading site axis of 1: (X, h, k,
    k at t + 1, prev, number of (t, t + 1) pairs). Compiled, k at t + 1 is a rolled k, as long
    as k: every per-token reduction then shares one iteration space and fuses into one kernel;
    the wrapped pair past the end is dropped afterwards (``k_reduce``'s ``n_pairs``)."""
    T = k.shape[1]
    n_pairs = len(range(1, T, stride))
    k_next = torch.roll(k, -1, dims=1)[:, ::stride] if torch.compiler.is_compiling() else k[:, 1::stride]
    one = lambda x: x[:, ::stride].unsqueeze(0)  # noqa: E731
    return one(X), one(h), one(k), k_next.unsqueeze(0), None if prev is None else one(prev), n_pairs


def k_reduce(h: torch.Tensor, k: torch.Tensor, k_next: torch.Tensor, prev: torch.Tensor | None, n_pairs: int
             ) -> tuple[torch.Tensor, ...]:
    """The reductions of sampled raw h and unit k (S, B, m, d), k one token later (S, B, >= n_pairs, d) and
    ``prev``, another site's sampled k or None, that every k statistic is made from: per token ||h||, ||k||
    (S, B, m); per site the sum of |k . k one token later|, of k (S, d), of |k . m| with m its mean
    direction, the non-finite count of h, and of |k . prev| (None without ``prev``), each (S,)."""
    k = k.float()
    hn = torch.linalg.vector_norm(h, dim=-1, dtype=F32)  # (S, B, m)
    kn = torch.linalg.vector_norm(k, dim=-1)  # (S, B, m)
    ksum = k.sum(dim=TOK)  # (S, d)
    mdir = ksum / torch.linalg.vector_norm(ksum, dim=-1, keepdim=True).clamp_min(TINY)  # mean direction
    rolled = k_next.shape[2] == k.shape[2]  # compiled: as long as k, the wrapped pair cut after the dot
    nxt = _dot(k, k_next.float())[:, :, :n_pairs] if rolled else _dot(k[:, :, :n_pairs], k_next.float())
    conc = _dot(k, mdir[:, None, None, :]).abs().sum(TOK)
    cos = None if prev is None else _dot(k, prev.float()).abs().sum(TOK)
    return hn, kn, nxt.abs().sum(TOK), ksum, conc, nonfinite(h).to(F32), cos


def k_block(hn: torch.Tensor, kn: torch.Tensor, nxt: torch.Tensor, ksum: torch.Tensor, conc: torch.Tensor,
            nonfinite_h: torch.Tensor, cos: torch.Tensor | None, chain: bool, B: int, n_pairs: int,
            dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """:func:`k_reduce`'s results for S sites -> the k run (K_SLOTS, log10 ||h|| histogram, sum of k), the
    LAYER_SLOTS pair or None, and the maxima (max ||h||, -min ||h||, max | ||k|| - 1 |), all (S, ...).
    ``chain``: ``cos`` holds, for sites 1 .. S - 1, the sum against the site before (the first gets no
    pair); else ``cos`` is each site's against a ``prev`` of its own, or None."""
    S = hn.shape[0]
    n_tok = _count(hn, F32)
    head = torch.stack([n_tok, hn.sum(TOK), conc, n_tok.new_full((S,), B * n_pairs), nxt, nonfinite_h], dim=1)
    hh = hist(torch.log10(hn.clamp_min(TINY)), *H_NORM_LOG10_RANGE, H_NORM_BINS, dtype)
    run = torch.cat([head.to(dtype), hh, ksum.to(dtype)], dim=1)
    layer = None
    if chain:
        layer = torch.stack([n_tok, torch.cat([cos.new_zeros(1), cos])], dim=1)
        layer[0, 0] = 0
        layer = layer.to(dtype)
    elif cos is not None:
        layer = torch.stack([n_tok, cos], dim=1).to(dtype)
    mx = torch.stack([hn.amax(TOK), -hn.amin(TOK), (kn - 1).abs().amax(TOK)], dim=1).to(dtype)
    return run, layer, mx


def _norm_dv(x: torch.Tensor) -> torch.Tensor:
    """L2 norm over the last (d_v) axis in fp32. Spelled out: torch 2.11's dynamo keeps the axis
    of ``linalg.vector_norm`` when it has size 1 (d_v = 1), which breaks the trace."""
    return x.float().square().sum(-1).sqrt()


def write_block(v: torch.Tensor, p: torch.Tensor, beta: torch.Tensor, delta: torch.Tensor | None,
                xn: torch.Tensor | None, stride: int, dtype: torch.dtype) -> torch.Tensor:
    """write's inputs v, p (S, B, T, d_v), beta (S, B, T, 1) and output delta (S, B, T, d_v), or None where
    write is ``ddl.delta.Write`` (delta = beta (v - p), made here from the stacked inputs: no delta to stack);
    ``xn`` the per-token ||X|| at the sampled positions (S, B, m) (None: no update ratio)
    -> WRITE_SLOTS, (S, 5). The update ratio is over the sampled positions, the rest over all."""
    if delta is None:
        delta = beta * (v - p)
    b = beta[..., 0].float()  # (S, B, T)
    vn, pn, dn = _norm_dv(v), _norm_dv(p), _norm_dv(delta)  # (S, B, T)
    if xn is None:
        n_upd, upd = dn.new_zeros(dn.shape[0]), dn.new_zeros(dn.shape[0])
    else:
        n_upd, upd = _count(xn, F32), (dn[:, :, ::stride] / xn.clamp_min(TINY)).sum(TOK)
    return torch.stack([(b * vn).sum(TOK), (b * pn).sum(TOK), n_upd, upd, nonfinite(delta).to(F32)],
                       dim=1).to(dtype)


def sites_block(
    xn: torch.Tensor, beta: torch.Tensor, logit: torch.Tensor | None, kred: tuple[torch.Tensor | None, ...],
    chain: bool, v: torch.Tensor, p: torch.Tensor, beta_w: torch.Tensor, delta: torch.Tensor, stride: int,
    beta_max: float, identity_below: float, projection_band: float, reflection_above: float,
    logit_saturation: float, dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """S sites' forward pass -> (their sum blocks in ``_layout`` order, (S, width); maxima (S, 3)).

    Every input has a leading site axis: xn, the per-token norm of the sampled state (:func:`x_norm`); kred,
    :func:`k_reduce`'s results (``chain`` as :func:`k_block` reads it); the (B, T, 1..d_v) ones whole.
    """
    S, B, T = beta.shape[:3]
    zeros2 = torch.zeros(S, 2, dtype=dtype, device=xn.device)
    run_k, layer, mx = k_block(*kred, chain, B, len(range(1, T, stride)), dtype)  # (t, t + 1) pairs, as sampled
    return torch.cat([
        beta_block(beta, beta_max, identity_below, projection_band, reflection_above, dtype),
        zeros2 if logit is None else logit_block(logit, logit_saturation, dtype),
        zeros2 if layer is None else layer,
        write_block(v, p, beta_w, delta, xn, stride, dtype),
        zeros2,  # PROBE_SLOTS: the probe batch run
        run_k,
    ], dim=1), mx


def stacked_reduce(X: tuple[torch.Tensor, ...], h: tuple[torch.Tensor, ...], k: tuple[torch.Tensor, ...] | None,
                   stride: int, eps: float | None = None) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """S sites' state, h and k (one (B, T, ...) tensor a site, in forward order), each sampled as
    :func:`site_block` samples it -> (the per-token norm of the sampled state, (S, B, m); :func:`k_reduce`'s
    results over the stacked sites, each k paired with the site before: the ``kred`` of :func:`stacked_finish`).
    ``k`` None: every site's k is :func:`unit` of its h with ``eps``, made from the stacked rows of h.
    The state, the largest input ((B, T, d, d_v) a site), is reduced to its norms site by site: stacked, its
    sample would be copied once more before the norms read it. ``probes._stats_kernels.stacked_reduce`` is
    the same in two Triton launches (eagerly on CUDA; in a compiled model, as the op ``deltascope::probe_rows``)."""
    derive = k is None
    sampled = [sample(Xi, hi, ki, None, stride) for Xi, hi, ki in zip(X, h, h if derive else k, strict=True)]
    hs, ks, kn = (torch.cat(col) for col in list(zip(*sampled, strict=True))[1:4])
    if derive:  # the rows of h stood in for k's
        assert eps is not None, "k made from h needs k_dir's eps"
        ks, kn = unit(ks, eps), unit(kn, eps)
    *red, _ = k_reduce(hs, ks, kn, None, sampled[0][5])
    cos = _dot(ks[1:].float(), ks[:-1].float()).abs().sum(TOK)  # (S - 1,): each site against the one before
    return torch.cat([x_norm(s[0]) for s in sampled]), (*red, cos)


def stacked_finish(
    xn: torch.Tensor, kred: tuple[torch.Tensor, ...], logit: tuple[torch.Tensor, ...] | None,
    v: tuple[torch.Tensor, ...], p: tuple[torch.Tensor, ...] | torch.Tensor, beta: tuple[torch.Tensor, ...],
    delta: tuple[torch.Tensor, ...] | None, stride: int, beta_max: float, identity_below: float,
    projection_band: float, reflection_above: float, logit_saturation: float, dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sites_block` from :func:`stacked_reduce`'s results and the sites' (B, T, 1..d_v) tensors, stacked
    here (``p`` may come stacked already, (S, B, T, d_v)). ``beta`` is the write's input, which serves as the
    gate's output too; ``delta`` None: the write's formula of them (:func:`write_block`)."""
    b, ps = torch.stack(beta), p if isinstance(p, torch.Tensor) else torch.stack(p)
    return sites_block(xn, b, None if logit is None else torch.stack(logit), kred, True, torch.stack(v), ps, b,
                       None if delta is None else torch.stack(delta), stride, beta_max, identity_below,
                       projection_band, reflection_above, logit_saturation, dtype)


def stacked_block(
    X: tuple[torch.Tensor, ...], logit: tuple[torch.Tensor, ...] | None,
    h: tuple[torch.Tensor, ...], k: tuple[torch.Tensor, ...] | None, v: tuple[torch.Tensor, ...],
    p: tuple[torch.Tensor, ...], beta: tuple[torch.Tensor, ...], delta: tuple[torch.Tensor, ...] | None,
    stride: int, beta_max: float, identity_below: float, projection_band: float, reflection_above: float,
    logit_saturation: float, dtype: torch.dtype, eps: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """S sites of equal shapes, one tensor per site in each tuple, in forward order -> :func:`sites_block`
    over them along a site axis: :func:`stacked_reduce`, then :func:`stacked_finish`. Compiled as one
    function (inside a model the user compiles), the sampling and the stacking are inductor's to fuse into
    the statistics, instead of copies made before the call. ``k`` and ``delta`` None: as
    :func:`stacked_reduce` and :func:`stacked_finish` read them."""
    return stacked_finish(*stacked_reduce(X, h, k, stride, eps), logit, v, p, beta, delta, stride, beta_max,
                          identity_below, projection_band, reflection_above, logit_saturation, dtype)


def site_block(
    X: torch.Tensor, beta: torch.Tensor, logit: torch.Tensor | None, h: torch.Tensor, k: torch.Tensor,
    prev: torch.Tensor | None, v: torch.Tensor, p: torch.Tensor, beta_w: torch.Tensor,
    delta: torch.Tensor | None, stride: int, beta_max: float, identity_below: float, projection_band: float,
    reflection_above: float, logit_saturation: float, dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One delta residual's forward pass (tensors as its hooks saw them; ``delta`` None: the write's formula)
    -> (its sum block, its maxima), flat. One call per site per log step; inside a compiled model it is
    inlined."""
    Xs, hs, ks, kn, ps, n_pairs = sample(X, h, k, prev, stride)
    one = lambda x: x.unsqueeze(0)  # noqa: E731
    block, mx = sites_block(x_norm(Xs), one(beta), None if logit is None else one(logit),
                            k_reduce(hs, ks, kn, ps, n_pairs), False, one(v), one(p), one(beta_w),
                            None if delta is None else one(delta),
                            stride, beta_max, identity_below, projection_band, reflection_above, logit_saturation,
                            dtype)
    return block[0], mx[0]


def probe_cos(k: torch.Tensor, prev: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Fixed probe batch: PROBE_SLOTS, per-token |cos| of k against its previous run."""
    cos = torch.linalg.vecdot(k, prev) / (
        torch.linalg.vector_norm(k, dim=-1) * torch.linalg.vector_norm(prev, dim=-1)
    ).clamp_min(TINY)
    return torch.stack([cos.new_full((), cos.numel()), cos.abs().sum()]).to(dtype)
