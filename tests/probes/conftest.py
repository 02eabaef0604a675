"""Shared helpers for the probe tests: the tiny model, a tensor capture on a twin model, and the
naive float64 recomputation of every statistic straight from the definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ddl import DDLModel, presets, with_overrides
from server.catalogue import BETA_BINS, H_NORM_BINS, H_NORM_LOG10_RANGE, key
from server.thresholds import Thresholds


def tiny(seed: int = 0, **over: object) -> DDLModel:
    torch.manual_seed(seed)
    over = {"n_layer": 2, "block_size": 32, "vocab_size": 512, **over}
    return DDLModel(with_overrides(presets["tiny"], **over))


def batch(model: DDLModel, B: int, T: int = 32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.cfg.vocab_size, (B, T), generator=g)


class Capture:
    """Every tensor the probe reduces, recorded per forward and per site by hooks of our own."""

    def __init__(self, model: DDLModel) -> None:
        self.sites = model.delta_residuals()
        self.forwards: list[dict[int, dict[str, torch.Tensor]]] = []
        self.handles = []
        for i, m in enumerate(self.sites):
            self.handles += [
                m.register_forward_pre_hook(self._pre(i)),
                m.beta_gate.register_forward_hook(self._put(i, "beta", lambda a, o: o)),
                m.k_dir.register_forward_hook(self._put(i, "hk", lambda a, o: (a[0], o))),
                m.write.register_forward_hook(self._put(i, "write", lambda a, o: (*a, o))),
            ]
            if m.beta_gate.logit is not None:
                self.handles.append(
                    m.beta_gate.logit.register_forward_hook(self._put(i, "logit", lambda a, o: o))
                )

    def _pre(self, i: int):
        def hook(mod, args):
            if i == 0:
                self.forwards.append({})
            self.forwards[-1].setdefault(i, {})["X"] = args[0].detach().clone()

        return hook

    def _put(self, i: int, name: str, pick):
        def hook(mod, args, out):
            v = pick(args, out)
            v = tuple(t.detach().clone() for t in v) if isinstance(v, tuple) else v.detach().clone()
            self.forwards[-1][i][name] = v

        return hook

    def take(self) -> list[dict[int, dict[str, torch.Tensor]]]:
        out, self.forwards = self.forwards, []
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def naive_quantile(counts: np.ndarray, lo: float, hi: float, q: float) -> float:
    """Linear interpolation inside the bin where the cumulative count reaches q * total."""
    total = float(sum(counts))
    width = (hi - lo) / len(counts)
    target, below = q * total, 0.0
    for i, c in enumerate(counts):
        if c > 0 and below + c >= target:
            return lo + (i + (target - below) / c) * width
        below += c
    return hi


def fixed_hist(x: np.ndarray, lo: float, hi: float, n: int) -> np.ndarray:
    x = x[np.isfinite(x)]
    idx = np.clip(np.floor((x - lo) * (n / (hi - lo))), 0, n - 1).astype(int)
    return np.bincount(idx, minlength=n).astype(np.float64)


def naive_stats(
    forwards: list[dict[int, dict[str, torch.Tensor]]],
    sites: list[tuple[str, int]],
    beta_max: float,
    prev_dir: dict[int, np.ndarray] | None = None,
    first_h: dict[int, float] | None = None,
    probe_k: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None,
    thr: Thresholds | None = None,
    stride: int = 1,
) -> tuple[dict[str, float], dict[str, np.ndarray], dict[int, np.ndarray]]:
    """Every statistic in float64 from the captured tensors: (scalars, hists, mean directions);
    the d-vector statistics from token positions 0, stride, 2 stride, ... (the probe's
    ``token_stride``)."""
    thr = thr or Thresholds()
    out: dict[str, float] = {}
    hists: dict[str, np.ndarray] = {}
    dirs: dict[int, np.ndarray] = {}
    f64 = lambda t: t.detach().double().numpy()  # noqa: E731
    for i, (site, layer) in enumerate(sites):
        K = lambda s: key(s, site, layer)  # noqa: E731, B023
        per = [f[i] for f in forwards]
        b = np.concatenate([f64(p["beta"]).reshape(-1) for p in per])
        n = b.size
        out[K("beta_mean")] = b.mean()
        out[K("beta_std")] = b.std()
        hb = fixed_hist(b, 0.0, beta_max, BETA_BINS)
        hists[K("beta_hist")] = hb
        for name, q in (("p01", .01), ("p10", .1), ("p50", .5), ("p90", .9), ("p99", .99)):
            out[K(f"beta_{name}")] = naive_quantile(hb, 0.0, beta_max, q)
        out[K("occ_identity")] = np.mean(b < thr.identity_below)
        out[K("occ_projection")] = np.mean(np.abs(b - 1) < thr.projection_band)
        out[K("occ_reflection")] = np.mean(b > thr.reflection_above)
        out[K("occ_negative")] = np.mean(b > 1)
        if "logit" in per[0]:
            lg = np.concatenate([f64(p["logit"]).reshape(-1) for p in per])
            out[K("gate_logit_sat")] = np.mean(np.abs(lg) > thr.logit_saturation)
        hs = [f64(p["hk"][0])[:, ::stride] for p in per]
        ks = [f64(p["hk"][1])[:, ::stride] for p in per]
        kfull = [f64(p["hk"][1]) for p in per]
        n = sum(k.shape[0] * k.shape[1] for k in ks)
        hn = np.concatenate([np.linalg.norm(h, axis=-1).reshape(-1) for h in hs])
        out[K("h_norm_mean")] = hn.mean()
        hh = fixed_hist(np.log10(np.maximum(hn, 1e-30)), *H_NORM_LOG10_RANGE, H_NORM_BINS)
        hists[K("h_norm_hist")] = hh
        out[K("h_norm_p01")] = 10 ** naive_quantile(hh, *H_NORM_LOG10_RANGE, 0.01)
        out[K("h_norm_min")], out[K("h_norm_max")] = hn.min(), hn.max()
        if first_h is not None:
            first_h.setdefault(i, hn.mean())
            out[K("h_norm_drift")] = hn.mean() / first_h[i]
        out[K("k_unit_err")] = max(np.abs(np.linalg.norm(k, axis=-1) - 1).max() for k in ks)
        ksum = sum(k.sum(axis=(0, 1)) for k in ks)
        out[K("k_concentration")] = np.linalg.norm(ksum) / n
        m = ksum / np.linalg.norm(ksum)
        dirs[i] = m
        if prev_dir is not None and i in prev_dir:
            out[K("k_cos_step")] = abs(m @ prev_dir[i])
        # m of each forward pass (micro-batch, rank): see the catalogue note on k_abs_concentration
        out[K("k_abs_concentration")] = sum(
            np.abs(k @ (k.sum((0, 1)) / np.linalg.norm(k.sum((0, 1))))).sum() for k in ks
        ) / n
        T = kfull[0].shape[1]
        pairs = sum(k.shape[0] * len(range(0, T - 1, stride)) for k in kfull)
        out[K("k_cos_token")] = sum(
            np.abs((k[:, 0 : T - 1 : stride] * k[:, 1::stride]).sum(-1)).sum() for k in kfull
        ) / pairs
        if i > 0:
            prev = [f64(f[i - 1]["hk"][1])[:, ::stride] for f in forwards]
            out[K("k_cos_layer")] = sum(
                np.abs((k * kp).sum(-1)).sum() for k, kp in zip(ks, prev, strict=True)
            ) / n
        if probe_k is not None:
            a, c = f64(probe_k[0][i]), f64(probe_k[1][i])
            cos = (a * c).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(c, axis=-1))
            out[K("k_cos_probe")] = np.abs(cos).mean()
        num = den = upd = 0.0
        nonfinite = np.sum(~np.isfinite(b)) + sum(np.sum(~np.isfinite(h)) for h in hs)
        upd_n = 0
        for p in per:
            v, pp, bw, delta = (f64(t) for t in p["write"])
            X = f64(p["X"])[:, ::stride]
            num += (bw[..., 0] * np.linalg.norm(v, axis=-1)).sum()
            den += (bw[..., 0] * np.linalg.norm(pp, axis=-1)).sum()
            xn = np.linalg.norm(X.reshape(*X.shape[:2], -1), axis=-1)
            upd += (np.linalg.norm(delta[:, ::stride], axis=-1) / xn).sum()
            upd_n += xn.size
            nonfinite += np.sum(~np.isfinite(delta))
        out[K("write_erase")] = num / den
        out[K("update_ratio")] = upd / upd_n
        out[K("nonfinite")] = float(nonfinite)
    return out, hists, dirs


def assert_stats_close(got: dict[str, float], want: dict[str, float], skip: tuple[str, ...] = (),
                       rtol: float = 2e-5, atol: float = 1e-6) -> None:
    """Per-site keys (those with a '/') of ``got`` against ``want``: same set, close values."""
    got = {k: v for k, v in got.items() if "/" in k and not k.startswith(skip)}
    want = {k: v for k, v in want.items() if "/" in k and not k.startswith(skip)}
    assert set(got) == set(want), (sorted(set(got) - set(want)), sorted(set(want) - set(got)))
    bad = {
        k: (got[k], want[k]) for k in want
        if not math.isclose(got[k], want[k], rel_tol=rtol, abs_tol=atol)
    }
    assert not bad, bad


@pytest.fixture
def thresholds() -> Thresholds:
    return Thresholds()
