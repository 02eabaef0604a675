"""The delta update against a naive float64 formula, and its exact cases."""

from __future__ import annotations

import math

import pytest
import torch

from ddl import DDLConfig
from ddl.delta import DeltaResidual

D = 16


def make(d_v: int = 1, **kw) -> tuple[DeltaResidual, DDLConfig]:
    cfg = DDLConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, head_dim=8, d_model=D, d_v=d_v, **kw)
    torch.manual_seed(0)
    m = DeltaResidual(cfg, "attn", 0)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m, cfg


def naive(m: DeltaResidual, cfg: DDLConfig, X, h, c, u):
    """X' = X + beta k (v^T - k^T X), everything in float64, token by token."""
    X, h, c, u = (t.double() for t in (X, h, c, u))
    P = {n: p.detach().double() for n, p in m.named_parameters()}
    out = torch.empty_like(X)
    B, T = X.shape[:2]
    for b in range(B):
        for t in range(T):
            if cfg.geometry == "v_map":
                hid = P["k_source.0.weight"] @ c[b, t]
                hid = hid * torch.sigmoid(hid)
                k_raw = P["k_source.2.weight"] @ hid
                v = P["v_proj.weight"] @ h[b, t] + P["v_proj.bias"]
            else:
                k_raw = h[b, t]
                if cfg.value_head == "code":
                    v = cfg.v_scale * torch.sigmoid(P["v_proj.weight"] @ u[b, t] + P["v_proj.bias"])
                else:
                    v = P["v_proj.weight"] @ c[b, t] + P["v_proj.bias"]
            k = k_raw / math.sqrt(float(k_raw @ k_raw) + cfg.k_eps**2)
            if cfg.beta_fixed is not None:
                beta = cfg.beta_fixed
            elif cfg.beta_hidden is None:
                beta = cfg.beta_max * torch.sigmoid(P["beta_gate.logit.weight"] @ c[b, t] + P["beta_gate.logit.bias"])
            else:
                z = torch.tanh(P["beta_gate.logit.0.weight"] @ c[b, t])
                beta = cfg.beta_max * torch.sigmoid(P["beta_gate.logit.2.weight"] @ z + P["beta_gate.logit.2.bias"])
            Xt = X[b, t].reshape(D, -1)  # (d, d_v)
            Xn = Xt + beta * torch.outer(k, v.reshape(-1) - k @ Xt)
            out[b, t] = Xn.reshape(X[b, t].shape)
    return out


VARIANTS = [
    {},
    {"value_head": "paper"},
    {"geometry": "v_map"},
    {"beta_max": 1.0, "beta_init": 0.5},
    {"beta_fixed": 0.7},
    {"beta_hidden": 8},
]


@pytest.mark.parametrize("d_v", [1, 3, 4])
@pytest.mark.parametrize("kw", VARIANTS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default")
def test_matches_naive_float64(d_v, kw):
    m, cfg = make(d_v, **kw)
    g = torch.Generator().manual_seed(1)
    shape = (2, 5, D) if d_v == 1 else (2, 5, D, d_v)
    X = torch.randn(shape, generator=g)
    h, c, u = (torch.randn(2, 5, D, generator=g) for _ in range(3))
    if d_v == 1:
        u = X
    got = m(X, h, c, u)
    want = naive(m, cfg, X, h, c, u)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def _inputs(d_v, seed=2):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn((3, 4, D) if d_v == 1 else (3, 4, D, d_v), generator=g)
    h, c = torch.randn(3, 4, D, generator=g), torch.randn(3, 4, D, generator=g)
    return X, h, c, (X if d_v == 1 else torch.randn(3, 4, D, generator=g))


@pytest.mark.parametrize("d_v", [1, 4])
def test_beta_zero_is_identity(d_v):
    m, _ = make(d_v, beta_fixed=0.0)
    X, h, c, u = _inputs(d_v)
    assert torch.equal(m(X, h, c, u), X)


@pytest.mark.parametrize("d_v", [1, 4])
def test_beta_one_overwrites_readout_with_v(d_v):
    m, cfg = make(d_v, beta_fixed=1.0)
    X, h, c, u = _inputs(d_v)
    Xn = m(X, h, c, u)
    k = m.k_dir(h)
    v = cfg.v_scale * torch.sigmoid(m.v_proj(u))
    readout = torch.einsum("btd,btdj->btj", k, Xn.reshape(3, 4, D, d_v))
    torch.testing.assert_close(readout, v, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("d_v", [1, 4])
def test_beta_two_with_zero_value_preserves_norm(d_v):
    m, _ = make(d_v, beta_fixed=2.0, value_head="paper")
    with torch.no_grad():
        m.v_proj.weight.zero_()
        m.v_proj.bias.zero_()
    X, h, c, u = _inputs(d_v)
    Xn = m(X, h, c, u)
    flat = (3, 4, -1)
    torch.testing.assert_close(Xn.reshape(flat).norm(dim=-1), X.reshape(flat).norm(dim=-1))
    # a reflection is an involution: applying it twice gives X back
    torch.testing.assert_close(m(Xn, h, c, u), X, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0, 1.7, 2.0])
def test_operator_eigenvalues(beta):
    """With v = 0 and X = I (d_v = d) the update returns A = I - beta k k^T: spectrum {1, 1 - beta}."""
    cfg = DDLConfig(vocab_size=64, block_size=4, n_layer=1, n_head=2, head_dim=8, d_model=D, d_v=D,
                    beta_fixed=beta, value_head="paper")
    m = DeltaResidual(cfg, "mlp", 0).double()
    with torch.no_grad():
        m.v_proj.weight.zero_()
        m.v_proj.bias.zero_()
    h = torch.randn(1, 1, D, dtype=torch.float64)
    A = m(torch.eye(D, dtype=torch.float64).expand(1, 1, D, D), h, h, h)[0, 0]
    eig = torch.linalg.eigvalsh((A + A.T) / 2)
    want = torch.tensor(sorted([1.0] * (D - 1) + [1 - beta]), dtype=torch.float64)
    torch.testing.assert_close(eig, want, atol=1e-6, rtol=0)


def test_k_is_unit_and_eps_guarded():
    m, cfg = make()
    h = torch.randn(4, 7, D)
    torch.testing.assert_close(m.k_dir(h).norm(dim=-1), torch.ones(4, 7))
    tiny = torch.full((1, 1, D), 1e-9)
    k = m.k_dir(tiny)
    assert torch.isfinite(k).all() and k.norm() < 1e-3  # ||h|| << eps: k shrinks instead of blowing up


def test_beta_init_sets_gate_bias():
    for beta_max, beta_init in [(2.0, 1.0), (2.0, 0.2), (1.0, 0.5)]:
        cfg = DDLConfig(d_model=D, n_head=2, head_dim=8, beta_max=beta_max, beta_init=beta_init)
        m = DeltaResidual(cfg, "attn", 0)
        beta = m.beta_gate(torch.zeros(1, 1, D))
        assert beta.dtype == torch.float32
        torch.testing.assert_close(beta, torch.full((1, 1, 1), beta_init))
