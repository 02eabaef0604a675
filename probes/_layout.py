"""Where every accumulator of a log step sits in the probe's one flat device buffer.

One float64 buffer (float32 where the device has no float64, e.g. MPS) holds, in order:

    [ site 0 sums | site 1 sums | ... | device scalars (capacity C) | site 0 maxima | ... ]
      <-------------- merged with SUM ---------------------->        <-- merged with MAX -->

so a DDP log step costs one all-gather of the buffer and two reductions, each over a contiguous
slice. A site's sum block is
filled by one in-place add per forward pass (``_stats.site_block`` returns it whole, in this
order); it ends with the sum of k (d values), so only its tail depends on d. Maxima keep ``-min``
for minima so one MAX reduces both.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.catalogue import BETA_BINS, H_NORM_BINS

BETA_SLOTS = ("n_beta", "beta_sum", "beta_sumsq", "occ_identity", "occ_projection",
              "occ_reflection", "occ_negative", "nonfinite_beta")
"""beta_gate's output: token counts and sums in beta units; the beta histogram follows."""
LOGIT_SLOTS = ("n_logit", "logit_sat")
"""The beta_gate.logit hook."""
LAYER_SLOTS = ("n_layer_pair", "k_cos_layer_sum")
"""The k_dir hook of every site but the first in forward order."""
WRITE_SLOTS = ("write_num", "write_den", "n_update", "update_sum", "nonfinite_delta")
"""The write hook."""
PROBE_SLOTS = ("n_probe", "k_cos_probe_sum")
"""The k_dir hook during the fixed probe batch run."""
K_SLOTS = ("n_h", "h_norm_sum", "k_abs_sum", "n_token_pair", "k_cos_token_sum", "nonfinite_h")
"""k_dir's input h and output k; then the log10 ||h|| histogram, then the sum of k (d values)."""

_ORDER = (
    *BETA_SLOTS, *(f"beta_hist{i}" for i in range(BETA_BINS)), *LOGIT_SLOTS, *LAYER_SLOTS,
    *WRITE_SLOTS, *PROBE_SLOTS, *K_SLOTS, *(f"h_hist{i}" for i in range(H_NORM_BINS)),
)
SLOT: dict[str, int] = {name: i for i, name in enumerate(_ORDER)}
"""Offset of every named slot inside a site's sum block."""
BETA_HIST = SLOT["beta_hist0"]
H_HIST = SLOT["h_hist0"]
K_SUM = len(_ORDER)
TINY = 1e-30
"""Floor for norms we divide by or take the log of (representable in fp32)."""
MAX_SLOTS = ("h_norm_max", "h_norm_negmin", "k_unit_err")
"""Per site, reduced with MAX: largest ||h||, minus the smallest ||h||, max | ||k|| - 1 |."""


@dataclass(frozen=True)
class Layout:
    """Offsets into the flat buffer for ``n_sites`` sites of width ``d`` and ``n_scalars`` slots."""

    n_sites: int
    d: int
    n_scalars: int = 8

    @property
    def width(self) -> int:
        """Sum slots of one site."""
        return K_SUM + self.d

    @property
    def scalars(self) -> int:
        """Offset of the device-scalar slots."""
        return self.n_sites * self.width

    @property
    def sum_end(self) -> int:
        """End of the SUM-reduced slice (sites' sums and the device scalars)."""
        return self.scalars + self.n_scalars

    @property
    def size(self) -> int:
        return self.sum_end + self.n_sites * len(MAX_SLOTS)

    def site(self, i: int) -> int:
        """Offset of site ``i``'s sum block."""
        return i * self.width

    def max_(self, i: int) -> int:
        """Offset of site ``i``'s maxima."""
        return self.sum_end + i * len(MAX_SLOTS)
