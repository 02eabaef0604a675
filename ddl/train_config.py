"""Training configuration: the paper's recipe (AdamW 0.9/0.95, wd 0.1, clip 1.0, warmup then
cosine) scaled down per preset. Torch-free so the CLI validates flags before importing torch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ddl.config import presets


class TrainConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    preset: str = "tiny"
    """Model preset name in ``ddl.presets``: tiny (CPU), small (124M), medium (353M)."""
    overrides: dict[str, Any] = Field(default_factory=dict)
    """DDLConfig fields changed on top of the preset, e.g. {"d_v": 4, "residual": "additive"}."""
    out: Path = Path("runs/tiny")
    """Run directory: checkpoints, TensorBoard events, stats.jsonl."""
    max_steps: int = Field(600, ge=1)
    """Optimizer steps to train (the schedule's length)."""
    batch_size: int | None = Field(None, ge=1)
    """Sequences per micro-batch per process; None takes the preset's."""
    seq_len: int | None = Field(None, ge=8)
    """Tokens per sequence; None takes the preset's block_size."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches per optimizer step."""
    lr: float | None = Field(None, gt=0)
    """Peak learning rate; None takes the preset's."""
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    """Cosine decays to lr * this."""
    warmup: int | None = Field(None, ge=0)
    """Linear warmup steps; None gives 10% of max_steps, at most 2000 (the paper's)."""
    weight_decay: float = Field(0.1, ge=0)
    """AdamW weight decay on >=2-D weights (norm gains, biases and gates' biases excluded)."""
    grad_clip: float = Field(1.0, gt=0)
    """Global gradient-norm clip."""
    log_every: int = Field(10, ge=1)
    """Steps between progress lines (each costs one host sync for the loss)."""
    eval_every: int = Field(200, ge=1)
    """Steps between validation-loss evaluations (and at the end)."""
    eval_batches: int = Field(20, ge=1)
    """Micro-batches averaged for one validation loss."""
    ckpt_every: int = Field(500, ge=1)
    """Steps between checkpoints (and at the end)."""
    seed: int = 1337
    """Seeds init and data order."""
    vocab_size: int = Field(4096, ge=256)
    """BPE vocabulary trained on the default corpus (ignored with --data)."""
    data: str | None = None
    """Directory or glob of uint16 token shards (*.bin); None uses the shipped Shakespeare."""
    device: str = "auto"
    """auto (CUDA when present), cpu or cuda[:N]."""
    compile: bool = False
    """torch.compile the model (after the probes' hooks are registered)."""
    probes: bool = True
    """Attach probes (stats every ``every`` steps) with their sinks."""
    every: int = Field(10, ge=1)
    """Log-step interval of the probes' statistics."""
    token_stride: int = Field(8, ge=1)
    """The probes' d-vector statistics read every Nth token position (1: every token)."""
    mlflow_uri: str | None = None
    """MLflow tracking URI; None gives sqlite:///<out's parent>/mlflow.db."""
    server: str | None = None
    """deltascope server URL to stream stats to (e.g. http://127.0.0.1:8765)."""
    resume: bool = False
    """Continue from <out>/ckpt.pt when it exists."""

    @property
    def tracking_uri(self) -> str:
        """The MLflow URI in force: ``mlflow_uri``, else a sqlite file beside the run directory."""
        return self.mlflow_uri or f"sqlite:///{self.out.resolve().parent / 'mlflow.db'}"

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.preset not in presets:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {', '.join(presets)}")
        return self


PRESET_TRAINING: dict[str, dict[str, float]] = {
    # micro-batch, peak lr: scaled down from the paper's 480 x 1024 tokens per step at lr 1e-3
    "tiny": {"batch_size": 16, "lr": 3e-3},
    "small": {"batch_size": 16, "lr": 1e-3},
    "medium": {"batch_size": 8, "lr": 6e-4},
}
