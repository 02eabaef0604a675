"""The delta residual: X' = X + beta k (v^T - k^T X), the rank-1 update that replaces x + F(x).

Each DeltaResidual owns the child modules the probes hook (the hook contract; keep the names):
- ``beta_gate``: forward(c) -> beta, shape (B, T, 1), fp32, in (0, beta_max); its child
  ``beta_gate.logit`` (absent when beta is fixed) outputs the pre-sigmoid logit.
- ``k_dir``: forward(h) -> unit k, fp32; its forward input is the raw h whose norm is discarded.
- ``write``: forward(v, p, beta) -> beta * (v - p), the scalars written along k; p = k^T X.
A forward hook that returns a value replaces the module's output: tests inject faults that way.

With ``cfg.fused_delta`` a site may skip ``k_dir`` and ``write`` and run ``ddl.fused`` instead (one
Triton kernel, k never materialised). It does so only while every forward hook on them is an
observer (:func:`observes`) and neither has a forward pre-hook. The site then calls the observers
itself, with the inputs and outputs the modules would have had (k rebuilt from h and the kernel's
1/||h||; p from the kernel). Any other hook sees the module run: that site takes the unfused path,
so a hook that changes an output (the tests' fault injection) changes the update. The contract holds.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ddl import fused
from ddl.config import DDLConfig
from ddl.layers import NarrowLinear
from ddl.state import CCCompressor, hooked

OBSERVER = "deltascope_observer"


def observes(hook, listening=None):
    """Mark a forward hook as an observer: it returns None and changes nothing it is given. A fused site
    keeps its fused op under observers and calls them with what ``k_dir``, ``write`` and the site itself
    would have seen (the probes' hooks are observers). ``listening(module) -> bool``, if given, says
    whether the hook wants this call: when no observer of a module does, the site skips building what
    they would be given (k, a state-sized tensor) and does not call them."""
    setattr(hook, OBSERVER, listening if listening is not None else True)
    return hook


def _observed(m: nn.Module) -> bool:
    """Whether every hook on m is an observer (True for none), so that a fused path may skip m's forward."""
    return not m._forward_pre_hooks and all(getattr(fn, OBSERVER, False) for fn in m._forward_hooks.values())


def _listeners(m: nn.Module) -> list:
    """m's observers that want this call, as (hook id, hook); see :func:`observes`."""
    out = []
    for hid, fn in m._forward_hooks.items():
        mark = getattr(fn, OBSERVER, False)
        if not callable(mark) or mark(m):
            out.append((hid, fn))
    return out


def _notify(m: nn.Module, listeners: list, args: tuple, out) -> None:
    """Call ``listeners`` (from :func:`_listeners`) as ``m(*args)`` returning ``out`` would call them."""
    for hid, fn in listeners:
        if m._forward_hooks_with_kwargs.get(hid, False):
            fn(m, args, {}, out)
        else:
            fn(m, args, out)


class BetaGate(nn.Module):
    """beta = beta_max * sigmoid(g(c)), per token, computed in fp32; or a fixed constant."""

    def __init__(self, cfg: DDLConfig):
        super().__init__()
        self.beta_max, self.beta_fixed = cfg.beta_max, cfg.beta_fixed
        if cfg.beta_fixed is not None:
            self.logit = None
            return
        if cfg.beta_hidden is None:
            self.logit = NarrowLinear(cfg.d_model, 1, bias=True)
            bias = self.logit.bias
        else:
            self.logit = nn.Sequential(
                nn.Linear(cfg.d_model, cfg.beta_hidden, bias=False),
                nn.Tanh(),
                NarrowLinear(cfg.beta_hidden, 1, bias=True),
            )
            bias = self.logit[2].bias
        prob = min(max(cfg.beta_init / cfg.beta_max, 1e-6), 1 - 1e-6)
        with torch.no_grad():
            bias.fill_(math.log(prob / (1 - prob)))  # beta == beta_init at zero input

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        if self.logit is None:
            return torch.full((*c.shape[:-1], 1), self.beta_fixed, device=c.device)
        return self.beta_max * torch.sigmoid(self.logit(c).float())


class KDirection(nn.Module):
    """k = h / sqrt(||h||^2 + eps^2) in fp32: the L2 direction of h, magnitude discarded."""

    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h.float()
        return h * torch.rsqrt(h.square().sum(-1, keepdim=True) + self.eps**2)


class Write(nn.Module):
    """delta = beta (v - p): how far the readout p = k^T X moves toward v. Parameter-free tap."""

    def forward(self, v: torch.Tensor, p: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        return beta * (v - p)


class DeltaResidual(nn.Module):
    """One delta residual, around attention (site 'attn') or the MLP (site 'mlp') of a layer.

    Erase and write along one direction k, gated by beta::

        X ──► p = kᵀX ──► delta = beta (v - p) ──► X' = X + k deltaᵀ
              (read)      (erase old, write new)    (rank-1 along k)

    beta = 0 keeps X; beta = 1 overwrites the readout with v; beta = 2 with v = 0 reflects X
    across the hyperplane orthogonal to k.
    """

    def __init__(self, cfg: DDLConfig, site: str, layer: int):
        super().__init__()
        self.site, self.layer = site, layer
        self.d_v, self.geometry, self.value_head = cfg.d_v, cfg.geometry, cfg.value_head
        self.beta_gate = BetaGate(cfg)
        self.k_dir = KDirection(cfg.k_eps)
        self.write = Write()
        if cfg.geometry == "v_map":
            # k from a light map of the context, v read from the sublayer output
            r = max(cfg.d_model // 4, 1)
            self.k_source = nn.Sequential(
                nn.Linear(cfg.d_model, r, bias=False), nn.SiLU(), nn.Linear(r, cfg.d_model, bias=False)
            )
        self.v_proj = NarrowLinear(cfg.d_model, cfg.d_v, bias=True)
        for head in (self.v_proj, self.beta_gate.logit):
            if isinstance(head, NarrowLinear):  # weight gradients as matmuls: faster at d_v > 1 only
                head.mm_grad = cfg.d_v > 1
        self.v_scale = cfg.v_scale
        self.fused_delta = cfg.fused_delta

    def forward(self, X: torch.Tensor, h: torch.Tensor, c: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """X: state (B, T, d) or (B, T, d, d_v); h: sublayer output; c: its normalised input;
        u: the unnormalised d-vector the sublayer read (X itself when d_v = 1)."""
        beta = self.beta_gate(c)  # (B, T, 1) fp32
        if self.geometry == "v_map":
            k = self.k_dir(self.k_source(c))
            v = self.v_proj(h).float()
        elif self._fuse(X, h):
            # k and p stay in registers; beta and v come from their own modules, as unfused
            v = self._value(c, u)
            out, rnorm, p = fused.delta_update(X, h, v, beta, self.k_dir.eps, taps=True)
            self._notify_taps(h, v, beta, rnorm, p)
            return out
        else:
            k = self.k_dir(h)  # (B, T, d) fp32
            v = self._value(c, u)  # (B, T, d_v) fp32
        if self.d_v == 1:
            p = (k * X.float()).sum(-1, keepdim=True)  # (B, T, 1)
            delta = self.write(v, p, beta)
            return X + (k * delta).to(X.dtype)
        p = (k.unsqueeze(-1) * X.float()).sum(-2)  # (B, T, d_v); einsum would be a bmm of 1 x d_v tiles
        delta = self.write(v, p, beta)  # (B, T, d_v)
        return X + (k.unsqueeze(-1) * delta.unsqueeze(-2)).to(X.dtype)  # (B, T, d, d_v)

    def _value(self, c: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """k_map's value head, (B, T, d_v) fp32."""
        if self.value_head == "code":
            return self.v_scale * torch.sigmoid(self.v_proj(u).float())
        return self.v_proj(c).float()

    def update_and_read(self, X: torch.Tensor, h: torch.Tensor, c: torch.Tensor, u: torch.Tensor,
                        read: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(X', read(X')) from one fused op, the next sublayer's CC readout folded into the update; or
        None where the fold does not apply, and the caller runs ``self`` and ``read`` as modules.

        It applies with ``fused.fold_readout()`` (by default, inside ``torch.compile``) and ``cfg.fused_delta``, for
        d_v > 1, geometry 'k_map', a CC compressor as ``read``, the fused op supported for X, no hook
        on ``read``, and only observers (:func:`observes`) on this module, its ``k_dir`` and ``write``,
        which are called here as the unfused modules would call them. Whatever another hook would see
        runs unfused, as ever."""
        if not (fused.fold_readout() and self.d_v > 1 and self.geometry == "k_map" and isinstance(read, CCCompressor)
                and self._fuse(X, h) and _observed(self) and not hooked(read)):
            return None
        v, beta = self._value(c, u), self.beta_gate(c)
        out, y, rnorm, p = fused.delta_update_read(X, h, v, beta, read.w_eff(), self.k_dir.eps, taps=True)
        self._notify_taps(h, v, beta, rnorm, p)
        if listeners := _listeners(self):  # not a module call here: the site's own hooks too
            _notify(self, listeners, (X, h, c, u), out)
        return out, y

    def _fuse(self, X: torch.Tensor, h: torch.Tensor) -> bool:
        """Whether this call takes the fused op (k_map): flag on, CUDA, only observers on the taps."""
        return self.fused_delta and fused.supported(X, h) and _observed(self.k_dir) and _observed(self.write)

    def _notify_taps(self, h: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, rnorm: torch.Tensor,
                     p: torch.Tensor) -> None:
        """The taps' listening observers, given what the unfused modules take and return: k = h / ||h||
        from the kernel's 1/||h||, and delta = beta (v - p) from its readout p. With none listening (no
        probe, or between log steps) nothing is built."""
        if listeners := _listeners(self.k_dir):
            _notify(self.k_dir, listeners, (h,), h.float() * rnorm)
        if listeners := _listeners(self.write):
            _notify(self.write, listeners, (v, p, beta), beta * (v - p))
