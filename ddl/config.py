"""Model configuration: one frozen pydantic model; variants are values, never copied files.

Defaults follow the official DDL code (yifanzhang-pro/deep-delta-learning, GPTConfig) where it
and the paper agree; where they disagree the field says which side it takes and offers the other.
Torch-free, so the CLI can validate flags before importing torch.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class DDLConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    vocab_size: int = Field(50304, ge=2)
    """Token vocabulary; the paper pads GPT-2's to 50304. Training overrides it with the tokenizer's."""
    block_size: int = Field(1024, ge=1)
    """Longest sequence (tokens) the model accepts; RoPE tables are built for this length."""
    n_layer: int = Field(12, ge=1)
    """Transformer blocks; each holds two delta residuals (attention and MLP), 2 * n_layer in all."""
    n_head: int = Field(6, ge=1)
    """Attention heads (multi-head, no GQA)."""
    head_dim: int = Field(128, ge=2)
    """Width of one head; even, for the half-split rotary embedding."""
    d_model: int = Field(768, ge=2)
    """Residual width d."""
    mlp_hidden: int | None = Field(None, ge=1)
    """SwiGLU hidden width; None gives floor(8/3 * d_model) as in the official code."""

    residual: Literal["delta", "additive"] = "delta"
    """'delta': every residual addition becomes X' = X + beta k (v^T - k^T X). 'additive': the
    plain x + F(x) baseline with the same backbone."""
    d_v: int = Field(1, ge=1)
    """Value channels of the state X in R^{d x d_v}; 1 is scalar DDL, the paper's expanded runs use 4."""
    compressor: Literal["cc", "tc"] = "cc"
    """d_v > 1: how a block reads its d-vector from the state. 'cc' mixes along the d_v channels
    per token (the paper's default); 'tc' is a causal depthwise conv along tokens."""
    expansion: Literal["ec", "repeat"] = "ec"
    """d_v > 1: how the embedding becomes the initial state. 'ec': causal grouped conv, identity
    init; 'repeat': the embedding copied into every value channel."""
    state_conv_kernel: int = Field(4, ge=1)
    """TC compressor kernel along tokens. The CC compressor's kernel is always d_v."""
    embed_conv_kernel: int = Field(4, ge=1)
    """EC expander kernel along tokens."""

    geometry: Literal["k_map", "v_map"] = "k_map"
    """Where geometry comes from. 'k_map' (official code, paper v2+): k from the sublayer output,
    v from a small head. 'v_map' (paper v1 era): v from the sublayer output, k from a light
    map of the normalised context."""
    k_eps: float = Field(1e-5, gt=0)
    """eps in k = h / sqrt(||h||^2 + eps^2)."""
    beta_max: float = Field(2.0, gt=0, le=2.0)
    """beta = beta_max * sigmoid(logit). 2.0 allows reflections; 1.0 stops at projection."""
    beta_init: float = Field(1.0, ge=0.0)
    """beta at initialisation, through the gate bias logit(beta_init / beta_max) (official: 1.0)."""
    beta_fixed: float | None = Field(None, ge=0.0)
    """Ablation: beta is this constant for every token and layer (no gate parameters)."""
    beta_hidden: int | None = Field(None, ge=1)
    """None: single linear gate (official default). An int: w2 . tanh(W1 c) with this hidden width."""
    value_head: Literal["code", "paper"] = "code"
    """'code': v = v_scale * sigmoid(W_v u + b) from the unnormalised state u (official code).
    'paper': v = W_v c, linear from the normalised context (paper text)."""
    v_scale: float = Field(4.0, gt=0)
    """Scale of the code-form value head; v lies in (0, v_scale)."""
    fused_delta: bool = False
    """Speed only, the same math up to fp32 rounding order: run the update p = k^T X,
    X' = X + beta k (v - p)^T as one Triton kernel forward and one backward (``ddl.fused``) instead of
    materialising k. Applies where it can: X on CUDA with Triton, geometry 'k_map' (any d_v), and
    only observer hooks on a site's ``k_dir`` or ``write`` (a Probe's are observers: a probed run
    keeps the kernel; any other hook gets its site the unfused path, ``ddl.delta``);
    elsewhere the PyTorch path runs unchanged. Off by default. On an H100 under torch.compile
    (small preset, tokens/s against the additive baseline; docs/PERFORMANCE.md):
    - d_v = 1: slower than inductor's own fusion of the unfused path, 0.91-0.93x against 0.95-0.96x;
    - d_v = 4 CC: faster, 0.82-0.84x against 0.58x, and 4.5 GiB less peak memory. Under torch.compile inductor
      launches the kernels from its own code (the ops are ``torch.library.triton_op``), each CC readout is
      folded into the update before it (``ddl.fused.FOLD_READOUT``; unfolded, 0.74x at 1.1 GiB less), and the
      EC expansion makes block 0's readout in its own kernel (``ECExpander.expand_and_read``; 0.80x without)."""

    qk_norm: bool = True
    """Per-head learnable RMSNorm on q and k, applied after RoPE as in the official code."""
    rope_base: float = Field(10000.0, gt=0)
    """Rotary embedding base."""
    norm_eps: float = Field(1e-5, gt=0)
    """RMSNorm epsilon everywhere."""
    embed_init_std: float = Field(0.02, gt=0)
    """Std of the tied embedding init."""
    hidden_init_factor: float = Field(0.5, gt=0)
    """Other matrices ~ N(0, factor / sqrt(d)); output projections also / sqrt(n_layer)."""

    @model_validator(mode="after")
    def _check(self) -> DDLConfig:
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.residual == "additive" and self.d_v != 1:
            raise ValueError("the additive baseline has no value channels: use d_v=1")
        if self.beta_fixed is not None and self.beta_fixed > self.beta_max:
            raise ValueError(f"beta_fixed={self.beta_fixed} exceeds beta_max={self.beta_max}")
        if self.beta_init > self.beta_max:
            raise ValueError(f"beta_init={self.beta_init} exceeds beta_max={self.beta_max}")
        return self

    @property
    def hidden(self) -> int:
        """SwiGLU hidden width."""
        return self.mlp_hidden if self.mlp_hidden is not None else (8 * self.d_model) // 3

    @property
    def n_sites(self) -> int:
        """Delta residuals in the model: two per block."""
        return 2 * self.n_layer


presets: dict[str, DDLConfig] = {
    # CPU-sized: trains to well below the unigram loss on Shakespeare in minutes on 2 cores.
    "tiny": DDLConfig(
        vocab_size=4096, block_size=128, n_layer=4, n_head=4, head_dim=32, d_model=128
    ),
    # The paper's 124M and 353M (Table 6); vocab is replaced by the tokenizer's when training.
    "small": DDLConfig(n_layer=12, n_head=6, head_dim=128, d_model=768),
    "medium": DDLConfig(n_layer=24, n_head=8, head_dim=128, d_model=1024),
}
"""Preset name -> model config. Variants: ``presets["small"].model_copy(update={"d_v": 4})``
(validated again through :func:`with_overrides`)."""


def with_overrides(cfg: DDLConfig, **overrides: object) -> DDLConfig:
    """A validated copy of ``cfg`` with ``overrides`` (model_copy skips validation)."""
    return DDLConfig.model_validate({**cfg.model_dump(), **overrides})
