"""The expanded state X in R^{d x d_v} (d_v > 1): expand the embedding, compress the state.

Layout: (B, T, d, d_v), d_v innermost, so a flattened channel index is i * d_v + j.
- ``ECExpander``: causal grouped conv over tokens, d -> d * d_v channels, identity init (equals
  repetition at step 0). ``Repeat``: the embedding copied into every value channel.
- ``CCCompressor``: per token, a centred conv of kernel d_v along the value channels followed by a
  read vector r; it collapses to x_in[i] = sum_j W_eff[i, j] X[i, j], which is what we compute.
- ``TCCompressor``: causal depthwise conv along tokens over all d * d_v channels, then r.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ddl import fused
from ddl.config import DDLConfig


class Repeat(nn.Module):
    def __init__(self, d_v: int):
        super().__init__()
        self.d_v = d_v

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return e.unsqueeze(-1).expand(*e.shape, self.d_v)  # (B, T, d, d_v)


def hooked(*modules: nn.Module) -> bool:
    """Whether any of ``modules`` has a forward hook or pre-hook: a fused path that would skip its forward stays
    off then, so that the hook sees the module run."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


class ECExpander(nn.Module):
    """X_0[t, i, j] = sum_s u[(i, j), K-1-s] e[t-s, i], zeros before the sequence start."""

    def __init__(self, cfg: DDLConfig):
        super().__init__()
        self.d_v, self.K = cfg.d_v, cfg.embed_conv_kernel
        self.weight = nn.Parameter(torch.empty(cfg.d_model * cfg.d_v, 1, self.K))
        self.fused = cfg.fused_delta
        self.reset_identity()

    def reset_identity(self) -> None:
        """Only the current-token tap is 1: X_0 equals repetition. Call after the global init."""
        with torch.no_grad():
            self.weight.zero_()
            self.weight[:, 0, -1] = 1.0

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        B, T, d = e.shape
        if torch.compiler.is_compiling():
            return self._shifted_sum(e)
        y = F.conv1d(F.pad(e.transpose(1, 2), (self.K - 1, 0)), self.weight.to(e.dtype), groups=d)
        return y.transpose(1, 2).reshape(B, T, d, self.d_v)  # (B, T, d, d_v)

    def expand_and_read(self, e: torch.Tensor, read: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(X, read(X)) from one fused op (``ddl.fused.expand_read``): the state written once, block 0's readout
        of it made in the same kernel, and in the backward the readout's gradient joined to the state's in
        registers. None where it does not apply, and the caller runs ``self`` and ``read`` as modules.

        It applies with ``cfg.fused_delta`` and ``fused.fold_readout()`` (by default, inside ``torch.compile``),
        on CUDA with Triton, for a CC compressor as ``read``, with no hook on either module. Compiled without
        it, inductor's kernels for the shifted sum, the readout and their backward took about 1.5 ms of a
        d_v = 4 step on an H100 (the small preset, docs/PERFORMANCE.md), several times what their bytes need."""
        if not (self.fused and fused.fold_readout() and isinstance(read, CCCompressor) and fused.supported_expand(e)
                and not hooked(self, read)):
            return None
        e, w = self._taps(e)
        return fused.expand_read(e, w, read.w_eff().to(e.dtype))

    def _taps(self, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """e and the weight as (d, d_v, K), both in autocast's dtype (e's outside autocast), as the conv takes them."""
        dtype = torch.get_autocast_dtype(e.device.type) if torch.is_autocast_enabled(e.device.type) else e.dtype
        return e.to(dtype), self.weight.to(dtype).view(e.shape[-1], self.d_v, self.K)

    def _shifted_sum(self, e: torch.Tensor) -> torch.Tensor:
        """The conv as K shifted products (``ddl.fused.shifted_sum``), for inductor: one kernel writes the state
        token-major.

        The conv's output is channel-major, (B, d * d_v, T); its transpose reaches every consumer as a
        strided view, and the fused update copies it to token rows forward and backward. The inputs
        round to autocast's dtype and the result to it, as the conv does under autocast."""
        return fused.shifted_sum(*self._taps(e))  # (B, T, d, d_v)


class CCCompressor(nn.Module):
    """Channel compressor: weight w (d, K = d_v), read r (d_v), centred padding p = (K-1) // 2.

    y[i, o] = sum_s w[i, s] X[i, o + s - p]; x_in[i] = sum_o r_o y[i, o]
            = sum_j W_eff[i, j] X[i, j],  W_eff[i, j] = sum_o r_o w[i, j - o + p].
    """

    def __init__(self, cfg: DDLConfig):
        super().__init__()
        K = cfg.d_v
        self.weight = nn.Parameter(torch.empty(cfg.d_model, K).uniform_(-(K**-0.5), K**-0.5))
        self.read = nn.Parameter(torch.full((cfg.d_v,), 1.0 / cfg.d_v))
        pad = (K - 1) // 2
        # S[s, o, j] = 1 where j = o + s - pad: the taps that land inside [0, d_v)
        S = torch.zeros(K, cfg.d_v, cfg.d_v)
        for s in range(K):
            for o in range(cfg.d_v):
                if 0 <= o + s - pad < cfg.d_v:
                    S[s, o, o + s - pad] = 1.0
        self.register_buffer("taps", S, persistent=False)

    def w_eff(self) -> torch.Tensor:
        """(d, d_v), in the parameters' dtype. A product and a sum rather than an einsum: compiled, that
        is one small kernel each way instead of autocast's casts around two bmm launches, per block."""
        return (self.weight[:, :, None, None] * self.read[:, None] * self.taps).sum((1, 2))

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return (X * self.w_eff().to(X.dtype)).sum(-1)  # (B, T, d)


class TCCompressor(nn.Module):
    """Token compressor: Xt[t, i, j] = sum_s w[(i, j), K-1-s] X[t-s, i, j]; x_in = Xt r."""

    def __init__(self, cfg: DDLConfig):
        super().__init__()
        self.K = cfg.state_conv_kernel
        C = cfg.d_model * cfg.d_v
        self.weight = nn.Parameter(torch.empty(C, 1, self.K).uniform_(-(self.K**-0.5), self.K**-0.5))
        self.read = nn.Parameter(torch.full((cfg.d_v,), 1.0 / cfg.d_v))

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        B, T, d, d_v = X.shape
        x = F.pad(X.reshape(B, T, d * d_v).transpose(1, 2), (self.K - 1, 0))  # (B, C, K-1+T)
        y = F.conv1d(x, self.weight.to(X.dtype), groups=d * d_v)  # (B, C, T), causal
        Xt = y.transpose(1, 2).reshape(B, T, d, d_v)
        return (Xt * self.read.to(X.dtype)).sum(-1)  # (B, T, d)


def make_compressor(cfg: DDLConfig) -> nn.Module:
    return CCCompressor(cfg) if cfg.compressor == "cc" else TCCompressor(cfg)


def make_expander(cfg: DDLConfig) -> nn.Module:
    return ECExpander(cfg) if cfg.expansion == "ec" else Repeat(cfg.d_v)
