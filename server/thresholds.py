"""Every detection threshold and regime edge, in one model with units and meaning.

Read from the environment with the ``DELTASCOPE_THRESHOLDS__`` prefix (e.g.
``DELTASCOPE_THRESHOLDS__COLLAPSE_BETA=0.02``); served by the API; the probes, the rules, the
Grafana/Prometheus files and the dashboards all read them from here. Torch-free.
"""

from __future__ import annotations

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Thresholds(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="DELTASCOPE_THRESHOLDS__", frozen=True, extra="forbid"
    )

    # -- regime edges (beta units); occupancy stats count tokens on each side -------------------
    identity_below: float = Field(0.1, gt=0)
    """beta below this is the identity regime (the layer mostly skips)."""
    projection_band: float = Field(0.1, gt=0)
    """|beta - 1| below this is the projection regime (readout overwritten with v)."""
    reflection_above: float = Field(1.9, gt=0)
    """beta above this is the reflection regime (Householder-like)."""
    logit_saturation: float = Field(6.0, gt=0)
    """|pre-sigmoid logit| above this counts as saturated (sigmoid slope < 0.0025)."""

    # -- rules: fire at the first value, clear at the second (hysteresis) -----------------------
    collapse_beta: float = Field(0.05, gt=0)
    """beta_collapse fires when beta_p90 < this (beta units): 90% of tokens skip the layer."""
    collapse_clear_beta: float = Field(0.1, gt=0)
    """beta_collapse clears when beta_p90 >= this (beta units)."""
    saturation_margin: float = Field(0.05, gt=0)
    """beta_saturation fires when beta_p10 > beta_max - this (beta units)."""
    saturation_clear_margin: float = Field(0.1, gt=0)
    """beta_saturation clears when beta_p10 <= beta_max - this (beta units)."""
    logit_saturated_fraction: float = Field(0.5, gt=0, le=1)
    """gate_logit_saturation fires when gate_logit_sat > this (fraction of tokens)."""
    logit_saturated_clear_fraction: float = Field(0.3, ge=0, le=1)
    """gate_logit_saturation clears when gate_logit_sat <= this (fraction of tokens)."""
    k_norm_min: float = Field(1e-4, gt=0)
    """k_norm_collapse fires when h_norm_mean < this (L2 norm): eps starts to shrink k."""
    k_norm_clear: float = Field(1e-3, gt=0)
    """k_norm_collapse clears when h_norm_mean >= this (L2 norm)."""
    k_norm_drift_factor: float = Field(100.0, gt=1)
    """k_norm_drift fires when h_norm_drift > this or < 1/this (ratio to the first log step)."""
    k_norm_drift_clear_factor: float = Field(30.0, gt=1)
    """k_norm_drift clears when h_norm_drift is back within [1/this, this] (ratio)."""
    k_direction_concentration: float = Field(0.98, gt=0, le=1)
    """k_direction_collapse fires when k_abs_concentration > this: all tokens share one line."""
    k_direction_clear_concentration: float = Field(0.9, gt=0, le=1)
    """k_direction_collapse clears when k_abs_concentration <= this."""
    k_instability_cos: float = Field(0.3, ge=0, le=1)
    """k_direction_instability fires when k_cos_probe (else k_cos_step) < this (|cosine|)."""
    k_instability_clear_cos: float = Field(0.5, ge=0, le=1)
    """k_direction_instability clears when that cosine >= this (|cosine|)."""
    k_instability_min_concentration: float = Field(0.2, ge=0, le=1)
    """k_cos_step is judged only where k_concentration >= this: a mean of scattered k is noise."""

    # -- timing ---------------------------------------------------------------------------------
    for_evals: int = Field(3, ge=1)
    """Consecutive log steps a condition must hold before pending becomes firing."""
    clear_evals: int = Field(2, ge=1)
    """Consecutive log steps past the clear threshold before firing becomes resolved."""
    nonfinite_for_evals: int = Field(1, ge=1)
    """nonfinite fires after this many log steps with any non-finite value (count > 0)."""

    @model_validator(mode="after")
    def _hysteresis(self) -> Thresholds:
        pairs = [
            ("collapse_beta", "collapse_clear_beta", self.collapse_beta <= self.collapse_clear_beta),
            ("saturation_margin", "saturation_clear_margin",
             self.saturation_margin <= self.saturation_clear_margin),
            ("logit_saturated_fraction", "logit_saturated_clear_fraction",
             self.logit_saturated_clear_fraction <= self.logit_saturated_fraction),
            ("k_norm_min", "k_norm_clear", self.k_norm_min <= self.k_norm_clear),
            ("k_norm_drift_factor", "k_norm_drift_clear_factor",
             self.k_norm_drift_clear_factor <= self.k_norm_drift_factor),
            ("k_direction_concentration", "k_direction_clear_concentration",
             self.k_direction_clear_concentration <= self.k_direction_concentration),
            ("k_instability_cos", "k_instability_clear_cos",
             self.k_instability_cos <= self.k_instability_clear_cos),
        ]
        for fire, clear, ok in pairs:
            if not ok:
                raise ValueError(f"{clear} must sit on the healthy side of {fire} (hysteresis)")
        if not self.identity_below < 1 - self.projection_band:
            raise ValueError("identity_below must lie below the projection band")
        return self
