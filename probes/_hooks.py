"""The forward hooks: per-site statistics accumulated on the device, with no host sync.

Every hook first reads ``_Shared.mode``, a plain Python int; between log steps it is OFF and the
hook returns at once (under torch.compile that read is a guard: one graph for log steps, one for
the rest). On a log step the children's hooks keep their tensors (detached) and the residual's own
hook hands them all to one pure function, ``_stats.site_block``, adding the fixed-shape result
into the site's block of the shared flat buffer with one in-place add. Nothing reads a tensor's
value on the host: no ``.item()``, no Python ``if`` on a tensor, no boolean-mask indexing, no
data-dependent shape; that is what lets the hooks run under
``torch.cuda.set_sync_debug_mode("error")`` and trace with ``fullgraph=True``.

Fusion: an eager model on CUDA would pay about a hundred small kernel launches per site, so there
``site_block`` runs as a ``torch.compile``d copy (``fuse``; on by default on CUDA): one Python call
and a few fused kernels per site. Inside a model the user compiles it is inlined into the user's
graph instead. A compile failure falls back to the plain function, with one warning.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from probes import _stats
from probes._layout import MAX_SLOTS, SLOT, Layout
from server.thresholds import Thresholds

log = logging.getLogger("deltascope.probes")

OFF, ACCUM, PROBE = 0, 1, 2
"""Hook modes: idle (between log steps), accumulate (log step), fixed probe batch run."""
FUSE_BACKEND = "inductor"
"""torch.compile backend of the fused statistics (tests on CPU use "aot_eager")."""
FUSE_OPTIONS = {"combo_kernels": True}
"""Inductor options: combine the many small independent reductions into few launches."""


class _Shared:
    """State every hook of one Probe reads: the mode switch, the one device buffer, fusion."""

    def __init__(self, n_sites: int, fuse: bool | None = None, n_scalars: int = 8) -> None:
        self.mode = ACCUM
        self.n_sites = n_sites
        self.n_scalars = n_scalars
        self.buf: torch.Tensor | None = None
        self.layout: Layout | None = None
        self.prev_k: torch.Tensor | None = None  # k of the previous site in forward order
        self.probe_prev: list[torch.Tensor | None] = [None] * n_sites
        self.fuse = fuse  # None: on CUDA only
        self._fused: dict[str, Callable[..., Any]] = {}

    def ensure(self, device: torch.device, d: int) -> None:
        """Allocate the buffer on the activations' device, once (again only if the model moves)."""
        if self.buf is not None and self.buf.device == device:
            return
        self.allocate(device, Layout(self.n_sites, d, self.n_scalars))

    def allocate(self, device: torch.device, layout: Layout, old: torch.Tensor | None = None) -> None:
        dtype = torch.float32 if device.type == "mps" else torch.float64
        buf = torch.zeros(layout.size, dtype=dtype, device=device)
        buf[layout.sum_end :].fill_(float("-inf"))
        if old is not None and self.layout is not None:  # keep what this step accumulated
            prev = self.layout
            buf[: prev.scalars].copy_(old[: prev.scalars])
            buf[layout.sum_end :].copy_(old[prev.sum_end :])
        self.buf, self.layout = buf, layout

    def reset(self) -> None:
        """Zero the sums and set the maxima to -inf, in place (stream-ordered after the copy)."""
        assert self.buf is not None and self.layout is not None
        self.buf[: self.layout.sum_end].zero_()
        self.buf[self.layout.sum_end :].fill_(float("-inf"))

    def call(self, name: str, *args: Any) -> Any:
        """``_stats.<name>(*args)``, through its compiled copy when fusing."""
        fn = getattr(_stats, name)
        if torch.compiler.is_compiling() or not self._fusing():
            return fn(*args)
        fused = self._fused.get(name)
        if fused is None:
            options = FUSE_OPTIONS if FUSE_BACKEND == "inductor" else None
            fused = self._fused[name] = torch.compile(fn, fullgraph=True, backend=FUSE_BACKEND,
                                                      options=options)
        try:
            return fused(*args)
        except Exception as e:  # never let fusion take training down: plain ops from now on
            log.warning("fused probe statistics failed to compile, using plain ops: %r", e)
            self.fuse = False
            self._fused.clear()
            return fn(*args)

    def _fusing(self) -> bool:
        if self.fuse is None:
            return self.buf is not None and self.buf.device.type == "cuda"
        return self.fuse


class SiteHooks:
    """The hooks of one delta residual (site, layer), index ``i`` in forward order.

    The children's hooks only keep references to their tensors (which autograd saves anyway);
    the residual's own forward hook, which runs last, turns them into the site's statistics with
    one call of ``_stats.site_block`` and adds them into the buffer.
    """

    def __init__(self, shared: _Shared, i: int, beta_max: float, thresholds: Thresholds) -> None:
        self.sh = shared
        self.i = i
        self.consts = (beta_max, thresholds.identity_below, thresholds.projection_band,
                       thresholds.reflection_above, thresholds.logit_saturation)
        self._clear()

    def _clear(self) -> None:
        self.beta_t: torch.Tensor | None = None
        self.logit_t: torch.Tensor | None = None
        self.hk: tuple[torch.Tensor, torch.Tensor] | None = None
        self.vpbd: tuple[torch.Tensor, ...] | None = None

    # -- children: beta_gate (beta (B, T, 1)), its logit, k_dir (h -> k, (B, T, d)), write -----
    def beta(self, module, args, beta):
        if self.sh.mode == ACCUM:
            self.beta_t = beta.detach()
        return None

    def logit(self, module, args, logit):
        if self.sh.mode == ACCUM:
            self.logit_t = logit.detach()
        return None

    def k(self, module, args, k):
        sh = self.sh
        if sh.mode == ACCUM:
            self.hk = (args[0].detach(), k.detach())
        elif sh.mode == PROBE and sh.buf is not None:
            self._k_probe(k.detach().float())
        return None

    def write(self, module, args, delta):
        """Inputs (v, p, beta) with v, p (B, T, d_v); output delta = beta (v - p)."""
        if self.sh.mode == ACCUM:
            self.vpbd = (*(a.detach() for a in args[:3]), delta.detach())
        return None

    # -- the residual itself: forward(X, ...) with X (B, T, d) or (B, T, d, d_v) ----------------
    def residual(self, module, args, kwargs, out):
        sh = self.sh
        if sh.mode != ACCUM:
            return None
        beta, logit, hk, vpbd = self.beta_t, self.logit_t, self.hk, self.vpbd
        self._clear()
        if beta is None or hk is None or vpbd is None:  # not a delta residual's usual pass
            return None
        X = args[0] if args else kwargs["X"]
        sh.ensure(X.device, X.shape[2])
        h, k = hk
        prev = sh.prev_k if self.i > 0 else None
        if prev is not None and prev.shape != k.shape:
            prev = None
        block, mx = sh.call("site_block", X.detach(), beta, logit, h, k, prev, *vpbd, *self.consts,
                            sh.buf.dtype)
        sh.prev_k = k if self.i < sh.n_sites - 1 else None  # the last site lets go of it
        L = sh.layout
        if block.shape[0] == L.width:
            sh.buf.narrow(0, L.site(self.i), L.width).add_(block)
        seg = sh.buf.narrow(0, L.max_(self.i), len(MAX_SLOTS))
        seg.copy_(torch.maximum(seg, mx))
        return None

    def _k_probe(self, k: torch.Tensor) -> None:
        """Fixed probe batch (eager, no_grad): per-token |cos| against this batch's previous run."""
        sh = self.sh
        prev = sh.probe_prev[self.i]
        if prev is not None and prev.shape == k.shape:
            o = sh.layout.site(self.i) + SLOT["n_probe"]
            sh.buf.narrow(0, o, 2).add_(_stats.probe_cos(k, prev, sh.buf.dtype))
        sh.probe_prev[self.i] = k.clone()
