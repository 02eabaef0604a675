"""Finding the delta residuals a Probe hooks, by the hook contract or by user-given names.

The contract (``ddl.delta``): a delta residual has child modules ``beta_gate``, ``k_dir`` and
``write`` and attributes ``site`` ('attn' or 'mlp') and ``layer``. Wrappers are looked through:
DDP / DataParallel (``.module``) and an already compiled model (``._orig_mod``, with a warning:
hooks added after ``torch.compile`` are ignored by the compiled graph).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

from server.catalogue import SITES

log = logging.getLogger("deltascope.probes")

_NAME = re.compile(r"^(?P<site>attn|mlp)/L?(?P<layer>\d+)$")
CHILDREN = ("beta_gate", "k_dir", "write")


@dataclass(frozen=True)
class Site:
    site: str
    layer: int
    module: nn.Module
    path: str


def unwrap(model: nn.Module) -> nn.Module:
    """The module whose forward the user's wrapper calls: DDP's ``.module``, compile's
    ``._orig_mod``; the model itself otherwise."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            log.warning("Probe attached to an already compiled model: register probes before "
                        "torch.compile, or the compiled graph will not run the hooks")
            model = model._orig_mod
        else:
            return model


def _check(path: str, m: nn.Module) -> None:
    missing = [c for c in CHILDREN if not isinstance(getattr(m, c, None), nn.Module)]
    if missing:
        raise ValueError(f"module {path!r} lacks the hook-contract children {missing} "
                         f"(a delta residual has {', '.join(CHILDREN)})")


def find_sites(root: nn.Module, modules: Mapping[str, str] | None = None) -> list[Site]:
    """The delta residuals of ``root`` in forward order (layer, then attn before mlp), or those
    named in ``modules`` (``{"attn/0": "blocks.0.attn_delta", ...}``) in the mapping's order, which
    must be the forward order (``k_cos_layer`` compares each site with the one before it)."""
    sites: list[Site] = []
    if modules is not None:
        for name, path in modules.items():
            m = _NAME.match(name)
            if m is None:
                raise ValueError(f"site name {name!r} must look like 'attn/0' or 'mlp/L03'")
            mod = root.get_submodule(path)
            _check(path, mod)
            sites.append(Site(m["site"], int(m["layer"]), mod, path))
    else:
        for path, mod in root.named_modules():
            if all(isinstance(getattr(mod, c, None), nn.Module) for c in CHILDREN) and hasattr(
                mod, "site"
            ):
                site, layer = mod.site, int(mod.layer)
                if site not in SITES:
                    raise ValueError(f"module {path!r} has site={site!r}, expected one of {SITES}")
                sites.append(Site(site, layer, mod, path))
        sites.sort(key=lambda s: (s.layer, SITES.index(s.site)))
    seen = [(s.site, s.layer) for s in sites]
    dup = {x for x in seen if seen.count(x) > 1}
    if dup:
        raise ValueError(f"two delta residuals claim the same (site, layer): {sorted(dup)}")
    return sites
