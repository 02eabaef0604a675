"""DDLModel: a Llama-style decoder whose residual additions are delta residuals.

Data flows top to bottom: embed (and expand to the d x d_v state), blocks (two delta residuals
each), compress the state back to d (readout), final norm, tied head. ``residual="additive"``
gives the plain x + F(x) baseline with the same backbone and init.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ddl.config import DDLConfig
from ddl.delta import DeltaResidual
from ddl.layers import CausalSelfAttention, RMSNorm, SwiGLU
from ddl.state import ECExpander, make_compressor, make_expander


class Block(nn.Module):
    """Pre-norm block: attention then MLP, each wrapped by its own delta residual.

    For d_v > 1 one compressor per block, shared by both sublayers, reads x_in from the state.
    """

    def __init__(self, cfg: DDLConfig, layer: int):
        super().__init__()
        self.delta = cfg.residual == "delta"
        self.ln_1 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)
        if self.delta:
            self.attn_delta = DeltaResidual(cfg, "attn", layer)
            self.mlp_delta = DeltaResidual(cfg, "mlp", layer)
        self.compress = make_compressor(cfg) if cfg.d_v > 1 else None

    def forward(self, X: torch.Tensor, x_in: torch.Tensor | None = None,
                read_next: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """X -> (X', read_next(X')), or (X', X') without a reader (d_v = 1, additive).

        x_in: this block's first readout of X, when the previous block's last update already made
        it; read_next: the compressor that reads this block's output (the next block's, or the
        model's readout). With ``fused_delta`` an update may fold that read into its kernel."""
        if not self.delta:
            X = X + self.attn(self.ln_1(X))
            X = X + self.mlp(self.ln_2(X))
            return X, X
        if x_in is None:
            x_in = self.compress(X) if self.compress is not None else X  # (B, T, d)
        c = self.ln_1(x_in)
        X, x_in = self._site(self.attn_delta, X, self.attn(c), c, x_in, self.compress)
        c = self.ln_2(x_in)
        return self._site(self.mlp_delta, X, self.mlp(c), c, x_in, read_next)

    @staticmethod
    def _site(site: DeltaResidual, X: torch.Tensor, h: torch.Tensor, c: torch.Tensor, u: torch.Tensor,
              read: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One delta residual, then the readout of its result by ``read`` (X itself without one)."""
        if read is not None and (folded := site.update_and_read(X, h, c, u, read)) is not None:
            return folded
        X = site(X, h, c, u)
        return X, (read(X) if read is not None else X)


class DDLModel(nn.Module):
    def __init__(self, cfg: DDLConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.expand = make_expander(cfg) if cfg.d_v > 1 else None
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.readout = make_compressor(cfg) if cfg.d_v > 1 else None
        self.ln_f = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        self._init_weights()

    def _init_weights(self) -> None:
        """The official init: every >=2-D tensor ~ N(0, f/sqrt(d)) (compressor convs included),
        output projections also / sqrt(L), embeddings N(0, 0.02); then EC back to identity.
        Norm gains, read vectors and the gate bias keep the values their modules set."""
        cfg = self.cfg
        std = cfg.hidden_init_factor / math.sqrt(cfg.d_model)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name == "wte.weight":
                    nn.init.normal_(p, 0.0, cfg.embed_init_std)
                elif p.dim() >= 2:
                    scale = 1 / math.sqrt(cfg.n_layer) if name.endswith("c_proj.weight") else 1.0
                    nn.init.normal_(p, 0.0, std * scale)
        if isinstance(self.expand, ECExpander):
            self.expand.reset_identity()

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T = idx.shape
        if T > self.cfg.block_size:
            raise ValueError(f"sequence of {T} tokens exceeds block_size={self.cfg.block_size}")
        X, x = self._expand(self.wte(idx))  # X (B, T, d) or (B, T, d, d_v)
        for i, block in enumerate(self.blocks):  # each block hands the next its first readout, the last the model's
            read_next = self.blocks[i + 1].compress if i + 1 < len(self.blocks) else self.readout
            X, x = block(X, x, read_next)  # (B, T, d): the readout of X, or X for d_v = 1
        logits = self.lm_head(self.ln_f(x)).float()  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(B * T, -1), targets.reshape(B * T), ignore_index=-1)
        return logits, loss

    def _expand(self, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The initial state, and block 0's readout of it where one fused op makes both (else None: block 0
        reads it itself)."""
        if self.expand is None:
            return e, None
        if isinstance(self.expand, ECExpander) and (folded := self.expand.expand_and_read(e, self.blocks[0].compress)):
            return folded
        return self.expand(e), None

    def delta_residuals(self) -> list[DeltaResidual]:
        """The model's delta residuals in forward order (attn, mlp per layer); [] if additive."""
        return [m for m in self.modules() if isinstance(m, DeltaResidual)]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
