"""The forward hooks: per-site statistics accumulated on the device, with no host sync.

Every hook first reads ``_Shared.mode``, a plain Python int; between log steps it is OFF and the
hook returns at once (under torch.compile that read is a guard: one graph for log steps, one for
the rest). On a log step the children's hooks keep references to their tensors. Nothing reads a
tensor's value on the host: no ``.item()``, no Python ``if`` on a tensor, no boolean-mask
indexing, no data-dependent shape; that is what lets the hooks run under
``torch.cuda.set_sync_debug_mode("error")`` and trace with ``fullgraph=True``.

The residual's hook keeps its site's tensors until the last site of the forward, then
``_Shared.flush`` stacks every site's sampled rows along a site axis and makes one call of
``_stats.sites_block`` for all of them, adding the result into the flat buffer with one add.
Eagerly on CUDA that call is a ``torch.compile``d copy (``fuse``; a few fused kernels and one
Python call per forward, where per-site statistics cost ~300 launches); a compile failure falls
back to the plain function, with one warning. Inside a model the user compiles, dynamo inlines
the same stacked call into the user's graph (~16 statistics kernels for the small model's 24
sites; its stacking cats are kept to one kernel each by ``widen_pointwise_cat``). A forward that
stops short, or sites of unequal shapes, take one ``site_block`` call per site instead.
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
DEFER = True
"""Compute all sites' statistics in one call over a site axis at the end of the forward (eager on
CUDA: one compiled call and a few kernels; on CPU: ~8x fewer op dispatches; inside a model the
user compiles: one set of statistics kernels instead of one per site)."""


def _keep(t: torch.Tensor) -> torch.Tensor:
    """A tensor a hook keeps for the statistics: detached inside a compiled graph (free there);
    eagerly as is, the statistics running under no_grad (120 detaches per forward cost ~0.3 ms
    of the training thread on the small model)."""
    return t.detach() if torch.compiler.is_compiling() else t


def widen_pointwise_cat(n_sites: int) -> None:
    """Let inductor concatenate the sites' rows in one kernel when the user compiles the model.

    The statistics stack each input of every site along a site axis (``_Shared.flush``). Inductor
    writes a cat of more than ``max_pointwise_cat_inputs`` (8) inputs as one copy kernel per input:
    on the H100, the small model's 24 sites cost +147 launches per compiled step instead of ~16,
    about 2 ms of host time. A wider limit only changes how cats of up to ``n_sites`` inputs are
    generated, in any graph compiled from now on in this process."""
    try:
        from torch._inductor import config
    except ImportError:  # a torch build without inductor: nothing to widen
        return
    if getattr(config, "max_pointwise_cat_inputs", n_sites) < n_sites:
        config.max_pointwise_cat_inputs = n_sites


class _Shared:
    """State every hook of one Probe reads: the mode switch, the one device buffer, fusion."""

    def __init__(self, n_sites: int, fuse: bool | None = None, n_scalars: int = 8, stride: int = 1) -> None:
        self.mode = ACCUM
        self.stride = stride  # token positions sampled for the d-dimensional statistics
        self.n_sites = n_sites
        self.n_scalars = n_scalars
        self.buf: torch.Tensor | None = None
        self.layout: Layout | None = None
        self.prev_k: torch.Tensor | None = None  # k of the previous site in forward order
        self.probe_prev: list[torch.Tensor | None] = [None] * n_sites
        self.fuse = fuse  # None: on CUDA only
        self._fused: dict[str, Callable[..., Any]] = {}
        self.defer = DEFER  # one call per forward for all sites
        if self.defer:
            widen_pointwise_cat(n_sites)
        self.pending: list[tuple[torch.Tensor, ...] | None] = [None] * n_sites
        self.consts: tuple[float, ...] = ()

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
        if torch.compiler.is_compiling():
            return fn(*args)
        with torch.no_grad():  # eager: the kept tensors were not detached (see _keep)
            return self._call(name, fn, *args)

    def _call(self, name: str, fn: Callable[..., Any], *args: Any) -> Any:
        if not self._fusing():
            return fn(*args)
        fused = self._fused.get(name)
        if fused is None:
            options = FUSE_OPTIONS if FUSE_BACKEND == "inductor" else None
            fused = self._fused[name] = torch.compile(fn, fullgraph=True, backend=FUSE_BACKEND,
                                                      options=options)
        # dynamo inspects .grad of inputs that require it (a warning on non-leaf tensors)
        args = tuple(a.detach() if isinstance(a, torch.Tensor) and a.requires_grad else a for a in args)
        try:
            return fused(*args)
        except Exception as e:  # never let fusion take training down: plain ops from now on
            log.warning("fused probe statistics failed to compile, using plain ops: %r", e)
            self.fuse = False
            self._fused.clear()
            return fn(*args)

    @torch.no_grad()
    def flush(self) -> None:
        """Turn the sites kept this forward into statistics: one fused call for all of them when
        every site ran with the same shapes (the usual forward), else one call per site."""
        pending = list(self.pending)
        if all(e is None for e in pending):
            return
        for i in range(self.n_sites):  # in place: under dynamo the list's final state is all None,
            self.pending[i] = None      # so no kept tensor becomes an output of the user's graph
        L, st = self.layout, self.stride
        assert self.buf is not None and L is not None
        if all(e is not None for e in pending) and len({tuple(t.shape for t in e if t is not None)
                                                         for e in pending}) == 1:
            # each site sampled as site_block samples it (views with a site axis of 1), then
            # concatenated along that axis: one copy per input for all sites
            sampled = [_stats.sample(X, h, k, None, st) for X, _, _, h, k, *_ in pending]
            Xs, hs, ks, kn = (torch.cat(col) for col in list(zip(*sampled, strict=True))[:4])
            n_pairs = sampled[0][5]
            _, beta, logit, _, _, v, p, bw, delta = zip(*pending, strict=True)
            sums, mx = self.call(
                "sites_block", Xs, torch.stack(beta), None if logit[0] is None else torch.stack(logit),
                hs, ks, kn, None, True, n_pairs, torch.stack(v), torch.stack(p), torch.stack(bw),
                torch.stack(delta), st, *self.consts, self.buf.dtype)
            if sums.shape[1] == L.width:
                self.buf.narrow(0, 0, L.scalars).add_(sums.reshape(-1))
            seg = self.buf.narrow(0, L.sum_end, mx.numel())
            seg.copy_(torch.maximum(seg, mx.reshape(-1)))
            return
        prev = None
        for i, e in enumerate(pending):
            if e is not None:
                X, beta, logit, h, k, *vpbd = e
                pr = prev if prev is not None and prev.shape == k.shape else None
                block, mx = self.call("site_block", X, beta, logit, h, k, pr, *vpbd, st, *self.consts,
                                      self.buf.dtype)
                self.add_site(i, block, mx)
            prev = None if e is None else e[4]

    def add_site(self, i: int, block: torch.Tensor, mx: torch.Tensor) -> None:
        """Site ``i``'s sum block and maxima into the buffer: one add, one max."""
        assert self.buf is not None and self.layout is not None
        L = self.layout
        if block.shape[0] == L.width:
            self.buf.narrow(0, L.site(i), L.width).add_(block)
        seg = self.buf.narrow(0, L.max_(i), len(MAX_SLOTS))
        seg.copy_(torch.maximum(seg, mx))

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
            self.beta_t = _keep(beta)
        return None

    def logit(self, module, args, logit):
        if self.sh.mode == ACCUM:
            self.logit_t = _keep(logit)
        return None

    def k(self, module, args, k):
        sh = self.sh
        if sh.mode == ACCUM:
            self.hk = (_keep(args[0]), _keep(k))
        elif sh.mode == PROBE and sh.buf is not None:
            self._k_probe(k.detach().float())
        return None

    def write(self, module, args, delta):
        """Inputs (v, p, beta) with v, p (B, T, d_v); output delta = beta (v - p)."""
        if self.sh.mode == ACCUM:
            self.vpbd = (*(_keep(a) for a in args[:3]), _keep(delta))
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
        if sh.defer:
            # keep the tensors (autograd holds X and k anyway) until the last site of the forward
            sh.consts = self.consts
            sh.pending[self.i] = (X, beta, logit, h, k, *vpbd)
            if self.i == sh.n_sites - 1:
                sh.flush()
            return None
        prev = sh.prev_k if self.i > 0 else None
        if prev is not None and prev.shape != k.shape:
            prev = None
        block, mx = sh.call("site_block", _keep(X), beta, logit, h, k, prev, *vpbd, sh.stride,
                            *self.consts, sh.buf.dtype)
        sh.prev_k = k if self.i < sh.n_sites - 1 else None  # the last site lets go of it
        sh.add_site(self.i, block, mx)
        return None

    def _k_probe(self, k: torch.Tensor) -> None:
        """Fixed probe batch (eager, no_grad): per-token |cos| against this batch's previous run."""
        sh = self.sh
        prev = sh.probe_prev[self.i]
        if prev is not None and prev.shape == k.shape:
            o = sh.layout.site(self.i) + SLOT["n_probe"]
            sh.buf.narrow(0, o, 2).add_(_stats.probe_cos(k, prev, sh.buf.dtype))
        sh.probe_prev[self.i] = k.clone()
