"""The forward hooks: per-site statistics accumulated on the device, with no host sync.

Every hook first reads ``_Shared.mode``, a plain Python int; between log steps it is OFF and the
hook returns at once (under torch.compile that read is a guard: one graph for log steps, one for
the rest). On a log step the children's hooks (``logit``, ``k_dir``, ``write``) keep references
to their tensors in the probe's ``_Shared``. Nothing reads a
tensor's value on the host: no ``.item()``, no Python ``if`` on a tensor, no boolean-mask
indexing, no data-dependent shape; that is what lets the hooks run under
``torch.cuda.set_sync_debug_mode("error")`` and trace with ``fullgraph=True``.

The residual's hook keeps its site's tensors until the last site of the forward, then
``_Shared.flush`` stacks every site's sampled rows along a site axis and makes one call of
``_stats.sites_block`` for all of them, adding the result into the flat buffer with one add.
Eagerly on CUDA that call is a ``torch.compile``d copy (``fuse``; a few fused kernels and one
Python call per forward, where per-site statistics cost ~300 launches); a compile failure falls
back to the plain function, with one warning. There, with triton importable, two Triton kernels
(``probes._stats_kernels``) first reduce every site's sampled rows where they lie, and the compiled
call (``_stats.stacked_finish``) does the rest from their per-token results. Inside a model the
user compiles, dynamo inlines the same stacked call into the user's graph, the two kernels as one
opaque op (``deltascope::probe_rows``) on CUDA where k is made from h (below), and the rest as
inductor writes it (its stacking cats kept to one kernel each by ``widen_pointwise_cat``). A forward
that stops short, or sites of unequal shapes, take one ``site_block`` call per site instead.

Where a site's ``k_dir`` is exactly ``ddl.delta.KDirection`` and its ``write`` exactly ``Write``, with
only observers hooking them (``_formula``), the hooks keep neither k nor delta: the statistics make
them from h, and from v, p and beta, by the same formulas. In a compiled model k and delta are never
written out then (each was a copy kernel a site); eagerly, the kernels read h (bf16) where they read k
(fp32). Any other k_dir or write, or a hook that may change what they return, is read as it is.
"""

from __future__ import annotations

import importlib.util
import itertools
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ddl.delta import OBSERVER, KDirection, Write
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
STATS_KERNELS = True
"""Eagerly on CUDA, reduce the sites' sampled rows with ``probes._stats_kernels`` (two Triton launches that
read them where they lie, never stacked) before the compiled ``_stats.stacked_finish``; False: the
compiled ``stacked_block`` does it all. ``bench/probe_stats.py --kernels`` times both."""
KERNEL_DEVICES = ("cuda",)
"""Device types whose sites' rows ``probes._stats_kernels`` reduces (eagerly, and in a model the user compiles
through its op ``deltascope::probe_rows``); tests add "cpu" under Triton's interpreter."""
DEFER = True
"""Compute all sites' statistics in one call over a site axis at the end of the forward (eager on
CUDA: one compiled call and a few kernels; on CPU: ~8x fewer op dispatches; inside a model the
user compiles: one set of statistics kernels instead of one per site)."""


def _keep(t: torch.Tensor) -> torch.Tensor:
    """A tensor a hook keeps for the statistics: detached inside a compiled graph (free there);
    eagerly as is, the statistics running under no_grad (120 detaches per forward cost ~0.3 ms
    of the training thread on the small model)."""
    return t.detach() if torch.compiler.is_compiling() else t


def _detached(a: Any) -> Any:
    return a.detach() if isinstance(a, torch.Tensor) and a.requires_grad else a


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


def _kernels_module() -> Any:
    """``probes._stats_kernels``, imported (its op registered) before any trace reaches it; None if it fails."""
    try:
        from probes import _stats_kernels
    except Exception as e:  # a broken triton install: the torch ops do it all
        log.warning("probe statistics kernels unavailable, using torch ops: %r", e)
        return None
    return _stats_kernels


_Rows = tuple[torch.Tensor, ...] | torch.Tensor
"""The sites' tensors of one role: one a site, or stacked along a site axis."""


class _Shared:
    """State every hook of one Probe reads: the mode switch, the one device buffer, fusion."""

    def __init__(self, n_sites: int, fuse: bool | None = None, n_scalars: int = 8, stride: int = 1,
                 beta_max: float = 2.0, thresholds: Thresholds | None = None) -> None:
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
        self.kernels = importlib.util.find_spec("triton") is not None  # False after a failed launch
        self._stats_kernels = _kernels_module() if self.kernels else None
        if self.defer:
            widen_pointwise_cat(n_sites)
        self.pending: list[tuple[torch.Tensor, ...] | None] = [None] * n_sites
        t = thresholds if thresholds is not None else Thresholds()
        self.consts = (beta_max, t.identity_below, t.projection_band, t.reflection_above, t.logit_saturation)
        # what each site's children handed over this forward, for its residual's hook
        self.logit: list[torch.Tensor | None] = [None] * n_sites
        self.hk: list[tuple[torch.Tensor, torch.Tensor | None] | None] = [None] * n_sites
        self.eps: list[float | None] = [None] * n_sites  # k_dir's eps where k is made from h (k kept as None)
        self.vpbd: list[tuple[torch.Tensor, ...] | None] = [None] * n_sites

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

    def reset(self, buf: torch.Tensor | None = None) -> None:
        """Zero the sums and set the maxima to -inf, in place (stream-ordered after the copy), in
        ``buf`` (default: the buffer the hooks write)."""
        buf = self.buf if buf is None else buf
        assert buf is not None and self.layout is not None
        buf[: self.layout.sum_end].zero_()
        buf[self.layout.sum_end :].fill_(float("-inf"))

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
        args = tuple(tuple(map(_detached, a)) if isinstance(a, tuple) else _detached(a) for a in args)
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
        eps = {self.eps[i] for i, e in enumerate(pending) if e is not None and e[3] is None}
        if (all(e is not None for e in pending) and len(eps) <= 1
                and len({tuple(t is None or t.shape for t in e) for e in pending}) == 1):
            # each site sampled as site_block samples it, stacked along a site axis: one call; k (and delta)
            # None at every site: made from h (v, p, beta) by the formulas of k_dir (write)
            X, logit, h, k, v, p, beta, delta = zip(*pending, strict=True)
            logit, k, delta = (None if t[0] is None else t for t in (logit, k, delta))
            e = eps.pop() if eps else None
            if (red := self._reduce_by_kernels(X, h, k, e, p)) is not None:
                *red, p = red
                sums, mx = self.call("stacked_finish", *red, logit, v, p, beta, delta, st, *self.consts,
                                     self.buf.dtype)
            else:
                sums, mx = self.call("stacked_block", X, logit, h, k, v, p, beta, delta, st, *self.consts,
                                     self.buf.dtype, e)
            if sums.shape[1] == L.width:
                self.buf.narrow(0, 0, L.scalars).add_(sums.reshape(-1))
            seg = self.buf.narrow(0, L.sum_end, mx.numel())
            seg.copy_(torch.maximum(seg, mx.reshape(-1)))
            return
        prev = None
        for i, e in enumerate(pending):
            if e is not None:
                X, logit, h, k, *vpbd = e
                k = self._k(i, h, k)
                pr = prev if prev is not None and prev.shape == k.shape else None
                block, mx = self.call("site_block", X, vpbd[2], logit, h, k, pr, *vpbd, st, *self.consts,
                                      self.buf.dtype)
                self.add_site(i, block, mx)
                prev = k
            else:
                prev = None

    def _k(self, i: int, h: torch.Tensor, k: torch.Tensor | None) -> torch.Tensor:
        """Site ``i``'s k, made whole from h where its hook kept none (the per-site paths)."""
        if k is not None:
            return k
        eps = self.eps[i]
        assert eps is not None
        return _stats.unit(h, eps)

    def _reduce_by_kernels(self, X: tuple[torch.Tensor, ...], h: tuple[torch.Tensor, ...],
                           k: tuple[torch.Tensor, ...] | None, eps: float | None, p: tuple[torch.Tensor, ...]
                           ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], _Rows] | None:
        """The sites' reductions over their sampled rows from ``probes._stats_kernels``, two Triton launches
        reading the rows in place, or None (the torch ops of ``_stats.stacked_block`` do them). Eagerly (fusing,
        ``STATS_KERNELS``), a failing launch switches them off for good, with one warning. In a model the user
        compiles, with k made from h, as the op ``deltascope::probe_rows``: where inductor would stack every
        site's sampled rows of h and k (two copy kernels a site, and k written out), one opaque call reads h
        where it lies, and returns the sites' p stacked (one copy, where inductor makes one a site of a fused
        update's p); the op falls back to torch ops by itself. Returns (xn, kred, p): p as given, or stacked."""
        if not (STATS_KERNELS and self.kernels and h[0].device.type in KERNEL_DEVICES):
            return None
        if torch.compiler.is_compiling():
            if k is not None or self._stats_kernels is None or not self._stats_kernels.supported(X, h, None):
                return None  # a k of the user's own k_dir: the inlined torch ops read it where inductor puts it
            xn, *red, ps = torch.ops.deltascope.probe_rows(list(X), list(h), [], list(p), self.stride, eps)
            return xn, tuple(red), ps
        if not self._fusing() or (kern := self._stats_kernels) is None:
            return None
        try:
            if not kern.supported(X, h, k):
                return None
            return *kern.stacked_reduce(X, h, k, self.stride, eps), p
        except Exception as e:  # never let the statistics take training down: the compiled path from now on
            log.warning("probe statistics kernels failed, using the compiled statistics: %r", e)
            self.kernels = False
            return None

    def site_done(self, i: int, X: torch.Tensor) -> None:
        """Site ``i``'s residual ran (state ``X``): keep its tensors for the stacked statistics at
        the last site, or (not deferring) turn them into statistics now."""
        logit, hk, vpbd = self.logit[i], self.hk[i], self.vpbd[i]
        self.logit[i] = self.hk[i] = self.vpbd[i] = None
        if hk is None or vpbd is None:  # not a delta residual's usual pass
            return
        # beta is the write's: the gate's output as the update used it (a hook replacing it included)
        self.ensure(X.device, X.shape[2])
        h, k = hk
        if self.defer:
            # keep the tensors (autograd holds X and k anyway) until the last site of the forward
            self.pending[i] = (X, logit, h, k, *vpbd)
            if i == self.n_sites - 1:
                self.flush()
            return
        k = self._k(i, h, k)
        prev = self.prev_k if i > 0 else None
        if prev is not None and prev.shape != k.shape:
            prev = None
        assert self.buf is not None
        block, mx = self.call("site_block", _keep(X), vpbd[2], logit, h, k, prev, *vpbd, self.stride,
                              *self.consts, self.buf.dtype)
        self.prev_k = k if i < self.n_sites - 1 else None  # the last site lets go of it
        self.add_site(i, block, mx)

    def k_probe(self, i: int, k: torch.Tensor) -> None:
        """Fixed probe batch (eager, no_grad): per-token |cos| against this batch's previous run."""
        prev = self.probe_prev[i]
        if prev is not None and prev.shape == k.shape and self.buf is not None and self.layout is not None:
            o = self.layout.site(i) + SLOT["n_probe"]
            self.buf.narrow(0, o, 2).add_(_stats.probe_cos(k, prev, self.buf.dtype))
        self.probe_prev[i] = k.clone()

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


_LIVE: dict[int, _Shared] = {}
"""Every attached probe's shared state, by key. The hooks are module-level functions that find
their probe here and their site in an attribute of the module they hook (with the module's id,
so that a deep copy of the model stays out of the probe's statistics), so that under
torch.compile dynamo reaches all state through one global (one set of guards) instead of through
each hook's bound object (a set per hook). Guard evaluation is paid on every compiled step,
armed or not: on the small model (96 hooks) a probe adds 46 us to it disarmed and 58 us armed
(10 of them the checks of the modules' ids), where per-site hook objects added 115 and 143 us
(``bench/probe_guards.py``, the 2-core CPU machine; the model alone: ~120 us).
The beta gate needs no hook: the write's inputs carry the beta it used."""
_ATTR = "_deltascope_sites"
_keys = itertools.count()


def _sites(module: nn.Module) -> tuple[tuple[int, int, int], ...]:
    return module.__dict__.get(_ATTR, ())


def _mine(module: nn.Module) -> list[tuple[_Shared, int]]:
    """The probes a hooked module serves, each with its site index. A deep copy of the model (an
    EMA copy, say) carries the hooks and the attribute along and serves none: ids differ."""
    return [(_LIVE[key], i) for key, i, mid in module._deltascope_sites if mid == id(module)]


def _on_logit(module: nn.Module, args: Any, logit: torch.Tensor) -> None:
    for sh, i in _mine(module):
        if sh.mode == ACCUM:
            sh.logit[i] = _keep(logit)


def _formula(module: nn.Module, cls: type) -> bool:
    """Whether ``module``'s output is ``cls``'s formula of its input as its hooks see it: exactly a ``cls``, and
    only observers (``ddl.delta.observes``) among its forward hooks. The statistics then make k from h (k_dir)
    and delta from v, p and beta (write) themselves: the same values, where a compiled model would otherwise
    write out every site's k and delta for them."""
    return type(module) is cls and all(getattr(fn, OBSERVER, False) for fn in module._forward_hooks.values())


def _on_k(module: nn.Module, args: Any, k: torch.Tensor) -> None:
    """k_dir: forward(h) -> unit k, (B, T, d)."""
    for sh, i in _mine(module):
        if sh.mode == ACCUM:
            derive = _formula(module, KDirection)
            sh.hk[i] = (_keep(args[0]), None if derive else _keep(k))
            sh.eps[i] = module.eps if derive else None
        elif sh.mode == PROBE and sh.buf is not None:
            sh.k_probe(i, k.detach().float())


def _on_write(module: nn.Module, args: Any, delta: torch.Tensor) -> None:
    """write: inputs (v, p, beta) with v, p (B, T, d_v); output delta = beta (v - p)."""
    for sh, i in _mine(module):
        if sh.mode == ACCUM:
            sh.vpbd[i] = (*(_keep(a) for a in args[:3]), None if _formula(module, Write) else _keep(delta))


def _on_residual(module: nn.Module, args: Any, kwargs: Any, out: torch.Tensor) -> None:
    """The residual itself, forward(X, ...) with X (B, T, d) or (B, T, d, d_v); runs after its
    children's hooks."""
    for sh, i in _mine(module):
        if sh.mode == ACCUM:
            sh.site_done(i, args[0] if args else kwargs["X"])


HOOKS = {"residual": _on_residual, "logit": _on_logit, "k_dir": _on_k, "write": _on_write}
"""The hook of each hooked module, by its role in a DeltaResidual."""


def _armed(module: nn.Module) -> bool:
    """Whether a probe this module serves is collecting (a log step or the probe batch)."""
    return any(sh.mode != OFF for sh, _ in _mine(module))


for _hook in HOOKS.values():
    # observers (the hook contract, ``ddl.delta.observes``): they return None and change nothing, so a
    # model's fused delta update keeps its kernel and calls them, on log steps only, with what the
    # modules would have seen
    _hook.deltascope_observer = _armed


class Attachment:
    """One probe's place in the hooks of a model: registers a module's hook when the first probe
    takes it, removes it when the last one lets go (a second probe on the same modules shares the
    hook, which serves both)."""

    def __init__(self, shared: _Shared) -> None:
        self.sh = shared
        self.key = next(_keys)
        _LIVE[self.key] = shared
        self._taken: list[nn.Module] = []

    def add(self, module: nn.Module, role: str, i: int) -> None:
        sites = _sites(module)
        if not sites:
            fn = HOOKS[role]
            handle = (module.register_forward_hook(fn, with_kwargs=True) if role == "residual"
                      else module.register_forward_hook(fn))
            module.__dict__["_deltascope_handle"] = handle
        # (probe, site, the module's id: see _mine)
        module.__dict__[_ATTR] = (*sites, (self.key, i, id(module)))
        self._taken.append(module)

    def remove(self) -> None:
        """Idempotent."""
        for m in self._taken:
            left = tuple(e for e in _sites(m) if e[0] != self.key)
            if left:
                m.__dict__[_ATTR] = left
            else:
                m.__dict__.pop(_ATTR, None)
                handle = m.__dict__.pop("_deltascope_handle", None)
                if handle is not None:
                    handle.remove()
        self._taken.clear()
        _LIVE.pop(self.key, None)
