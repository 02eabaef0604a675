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

from server.catalogue import BETA_BINS, H_NORM_BINS, H_NORM_LOG10_RANGE

TINY = 1e-30
"""Floor for norms we divide by or take the log of (representable in fp32)."""
F32 = torch.float32


def nonfinite(x: torch.Tensor) -> torch.Tensor:
    """Count of NaN and +-inf values. Eager: x - x is 0 exactly where x is finite, 3x cheaper on
    CPU than isfinite; compiled: isfinite, fused anyway (count_nonzero(x - x) miscounts under
    inductor in torch 2.11)."""
    if torch.compiler.is_compiling():
        return x.numel() - torch.isfinite(x).sum()
    return torch.count_nonzero(x - x)


def hist(x: torch.Tensor, lo: float, hi: float, n: int, dtype: torch.dtype) -> torch.Tensor:
    """Counts of the finite values of ``x`` in ``n`` equal bins on [lo, hi]; values beyond either
    end land in the end bins."""
    w = torch.isfinite(x).to(dtype).reshape(-1)
    pos = (torch.nan_to_num(x, nan=lo, posinf=hi, neginf=lo) - lo) * (n / (hi - lo))
    idx = pos.floor().clamp(0, n - 1).long().reshape(-1)
    return torch.zeros(n, dtype=dtype, device=x.device).index_add_(0, idx, w)


def beta_block(beta: torch.Tensor, beta_max: float, identity_below: float, projection_band: float,
               reflection_above: float, dtype: torch.dtype) -> torch.Tensor:
    """beta (B, T, 1) -> BETA_SLOTS then the beta histogram; moments in ``dtype`` (float64)."""
    b = beta.reshape(-1).to(dtype)
    head = torch.stack([
        b.new_full((), b.numel()),
        b.sum(),
        (b * b).sum(),
        (b < identity_below).sum(dtype=dtype),
        ((b - 1).abs() < projection_band).sum(dtype=dtype),
        (b > reflection_above).sum(dtype=dtype),
        (b > 1).sum(dtype=dtype),
        nonfinite(b).to(dtype),
    ])
    return torch.cat([head, hist(b, 0.0, beta_max, BETA_BINS, dtype)])


def logit_block(logit: torch.Tensor, saturation: float, dtype: torch.dtype) -> torch.Tensor:
    """Pre-sigmoid logit (B, T, 1) -> LOGIT_SLOTS."""
    return torch.stack([
        logit.new_full((), logit.numel(), dtype=dtype),
        (logit.float().abs() > saturation).sum(dtype=dtype),
    ])


def x_norm(X: torch.Tensor) -> torch.Tensor:
    """Per-token Frobenius norm of the state: (B, T, d) or (B, T, d, d_v) -> (B, T) fp32."""
    return torch.linalg.vector_norm(X.flatten(2), dim=-1, dtype=F32)


def k_block(h: torch.Tensor, k: torch.Tensor, prev: torch.Tensor | None, dtype: torch.dtype
            ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Raw h and unit k, both (B, T, d); ``prev`` the previous site's k or None. Returns the k run
    (K_SLOTS, log10 ||h|| histogram, sum of k), the LAYER_SLOTS pair or None, and the maxima
    (max ||h||, -min ||h||, max | ||k|| - 1 |)."""
    B, T, d = k.shape
    k = k.float()
    hn = torch.linalg.vector_norm(h, dim=-1, dtype=F32)  # (B, T)
    kn = torch.linalg.vector_norm(k, dim=-1)  # (B, T)
    ksum = k.sum(dim=(0, 1))  # (d,)
    m = ksum / torch.linalg.vector_norm(ksum).clamp_min(TINY)  # this call's mean direction
    if torch.compiler.is_compiling():
        # k_t . k_{t+1} over whole rows (rolled), the wrapped last position dropped afterwards:
        # every per-token reduction then shares one (B, T, d) space and fuses into one kernel
        nxt = torch.linalg.vecdot(k, torch.roll(k, -1, dims=1))[:, :-1]  # (B, T-1)
    else:  # eager: no rolled copy of k
        nxt = torch.linalg.vecdot(k[:, 1:], k[:, :-1])  # (B, T-1)
    head = torch.stack([
        hn.new_full((), B * T),
        hn.sum(),
        torch.linalg.vecdot(k, m).abs().sum(),
        hn.new_full((), B * (T - 1)),
        nxt.abs().sum(),
        nonfinite(h).to(F32),
    ])
    hh = hist(torch.log10(hn.clamp_min(TINY)), *H_NORM_LOG10_RANGE, H_NORM_BINS, dtype)
    run = torch.cat([head.to(dtype), hh, ksum.to(dtype)])
    layer = None
    if prev is not None:
        layer = torch.stack([hn.new_full((), B * T), torch.linalg.vecdot(k, prev).abs().sum()]).to(dtype)
    mx = torch.stack([hn.max(), -hn.min(), (kn - 1).abs().max()]).to(dtype)
    return run, layer, mx


def _norm_dv(x: torch.Tensor) -> torch.Tensor:
    """L2 norm over the last (d_v) axis in fp32. Spelled out: torch 2.11's dynamo keeps the axis
    of ``linalg.vector_norm`` when it has size 1 (d_v = 1), which breaks the trace."""
    return x.float().square().sum(-1).sqrt()


def write_block(v: torch.Tensor, p: torch.Tensor, beta: torch.Tensor, delta: torch.Tensor,
                xn: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """write's inputs v, p (B, T, d_v), beta (B, T, 1) and output delta (B, T, d_v); ``xn`` the
    per-token ||X|| from the residual's input (None: no update ratio) -> WRITE_SLOTS."""
    b = beta[..., 0].float()  # (B, T)
    vn, pn, dn = _norm_dv(v), _norm_dv(p), _norm_dv(delta)  # (B, T)
    if xn is None:
        n_upd, upd = dn.new_zeros(()), dn.new_zeros(())
    else:
        n_upd, upd = dn.new_full((), dn.numel()), (dn / xn.clamp_min(TINY)).sum()
    return torch.stack([(b * vn).sum(), (b * pn).sum(), n_upd, upd, nonfinite(delta).to(F32)]).to(dtype)


def site_block(
    X: torch.Tensor, beta: torch.Tensor, logit: torch.Tensor | None, h: torch.Tensor, k: torch.Tensor,
    prev: torch.Tensor | None, v: torch.Tensor, p: torch.Tensor, beta_w: torch.Tensor,
    delta: torch.Tensor, beta_max: float, identity_below: float, projection_band: float,
    reflection_above: float, logit_saturation: float, dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One delta residual's forward pass -> (its whole sum block in ``_layout`` order, maxima).

    One call per site per log step: on CUDA its compiled copy is a few fused kernels and one
    Python call, where the separate hooks' statistics would cost dozens of launches.
    """
    zeros2 = torch.zeros(2, dtype=dtype, device=k.device)
    run_k, layer, mx = k_block(h, k, prev, dtype)
    return torch.cat([
        beta_block(beta, beta_max, identity_below, projection_band, reflection_above, dtype),
        zeros2 if logit is None else logit_block(logit, logit_saturation, dtype),
        zeros2 if layer is None else layer,
        write_block(v, p, beta_w, delta, x_norm(X), dtype),
        zeros2,  # PROBE_SLOTS: the probe batch run
        zeros2,  # STEP_SLOTS: written at Probe.step
        run_k,
    ]), mx


def probe_cos(k: torch.Tensor, prev: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Fixed probe batch: PROBE_SLOTS, per-token |cos| of k against its previous run."""
    cos = torch.linalg.vecdot(k, prev) / (
        torch.linalg.vector_norm(k, dim=-1) * torch.linalg.vector_norm(prev, dim=-1)
    ).clamp_min(TINY)
    return torch.stack([cos.new_full((), cos.numel()), cos.abs().sum()]).to(dtype)
