"""Model wiring: causality of every state path, gradients, compressors against naive loops, init."""

from __future__ import annotations

import math

import pytest
import torch

from ddl import DDLConfig, DDLModel, presets, with_overrides
from ddl.state import CCCompressor, ECExpander, TCCompressor

SMALL = dict(vocab_size=97, block_size=24, n_layer=2, n_head=2, head_dim=8, d_model=16)

STATE_VARIANTS = [
    {},
    {"residual": "additive"},
    {"geometry": "v_map"},
    {"d_v": 4, "compressor": "cc", "expansion": "ec"},
    {"d_v": 4, "compressor": "cc", "expansion": "repeat"},
    {"d_v": 4, "compressor": "tc", "expansion": "ec"},
    {"d_v": 4, "compressor": "tc", "expansion": "repeat"},
    {"d_v": 2, "compressor": "tc", "state_conv_kernel": 3, "embed_conv_kernel": 2},
]
ids = [",".join(f"{k}={v}" for k, v in kw.items()) or "ddl" for kw in STATE_VARIANTS]


def model(**kw) -> DDLModel:
    torch.manual_seed(0)
    m = DDLModel(DDLConfig(**{**SMALL, **kw}))
    if isinstance(m.expand, ECExpander):  # identity init mixes no tokens: make EC non-trivial
        with torch.no_grad():
            m.expand.weight.normal_(0, 0.5)
    return m


@pytest.mark.parametrize("kw", STATE_VARIANTS, ids=ids)
def test_causal(kw):
    """Changing a later token never changes earlier logits (TC and EC pad on the left only)."""
    m = model(**kw).eval()
    idx = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(3))
    t = 11
    other = idx.clone()
    other[:, t:] = (other[:, t:] + 5) % 97
    a, _ = m(idx)
    b, _ = m(other)
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=0)
    assert not torch.allclose(a[:, t:], b[:, t:])


@pytest.mark.parametrize("kw", STATE_VARIANTS, ids=ids)
def test_gradients_reach_every_parameter(kw):
    m = model(**kw)
    idx = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(4))
    _, loss = m(idx, idx.roll(-1, 1))
    loss.backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_cc_compressor_equals_centred_conv_then_read():
    cfg = DDLConfig(**{**SMALL, "d_v": 4})
    cc = CCCompressor(cfg)
    with torch.no_grad():
        cc.weight.normal_()
        cc.read.normal_()
    X = torch.randn(2, 3, 16, 4, dtype=torch.float64)
    w, r, K, pad = cc.weight.double(), cc.read.double(), 4, 1
    want = torch.zeros(2, 3, 16, dtype=torch.float64)
    for i in range(16):
        for o in range(4):
            y = sum(w[i, s] * X[..., i, o + s - pad] for s in range(K) if 0 <= o + s - pad < 4)
            want[..., i] += r[o] * y
    torch.testing.assert_close(cc.double()(X), want)


def test_tc_compressor_equals_causal_loop():
    cfg = DDLConfig(**{**SMALL, "d_v": 3, "compressor": "tc", "state_conv_kernel": 4})
    tc = TCCompressor(cfg).double()
    with torch.no_grad():
        tc.read.normal_()
    X = torch.randn(2, 6, 16, 3, dtype=torch.float64)
    w = tc.weight.view(16, 3, 4)
    want = torch.zeros(2, 6, 16, dtype=torch.float64)
    for t in range(6):
        Xt = sum(w[:, :, 3 - s] * X[:, t - s] for s in range(4) if t - s >= 0)  # (B, d, d_v)
        want[:, t] = (Xt * tc.read).sum(-1)
    torch.testing.assert_close(tc(X), want)


def test_ec_identity_init_equals_repetition():
    m = DDLModel(DDLConfig(**{**SMALL, "d_v": 4}))
    e = torch.randn(2, 5, 16)
    torch.testing.assert_close(m.expand(e), e.unsqueeze(-1).expand(2, 5, 16, 4))


def test_ec_compiled_shifted_sum_equals_the_conv():
    """Under torch.compile EC is K shifted products written token-major: the conv's values, dtype
    under autocast and gradients (to bf16 rounding), and a contiguous state."""
    torch.manual_seed(0)
    ec = ECExpander(DDLConfig(**{**SMALL, "d_v": 4}))
    with torch.no_grad():
        ec.weight.normal_(0, 0.5)
    e = torch.randn(2, 9, 16, requires_grad=True)
    compiled = torch.compile(ec, backend="aot_eager", fullgraph=True)
    for amp, tol in ((False, 1e-6), (True, 1e-2)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            want, got = ec(e), compiled(e)
        assert got.dtype == want.dtype == (torch.bfloat16 if amp else torch.float32)
        assert got.shape == (2, 9, 16, 4) and got.is_contiguous()
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
        gw = torch.autograd.grad(want.float().square().sum(), (e, ec.weight))
        gc = torch.autograd.grad(got.float().square().sum(), (e, ec.weight))
        for a, b in zip(gc, gw, strict=True):
            assert ((a - b).abs().max() / b.abs().max()).item() < tol


def test_official_init():
    cfg = with_overrides(presets["small"], n_layer=12)
    m = DDLModel(with_overrides(cfg, n_layer=2, vocab_size=512, d_v=4))
    std = 0.5 / math.sqrt(768)
    assert abs(m.blocks[0].attn.c_q.weight.std().item() - std) < 0.05 * std
    assert abs(m.blocks[0].mlp.c_proj.weight.std().item() - std / math.sqrt(2)) < 0.05 * std
    assert abs(m.wte.weight.std().item() - 0.02) < 0.001
    assert m.lm_head.weight is m.wte.weight
    # compressor convs are overwritten by the global init, as in the official code (read stays 1/d_v)
    assert abs(m.blocks[0].compress.weight.std().item() - std) < 0.1 * std
    torch.testing.assert_close(m.readout.read.detach(), torch.full((4,), 0.25))
    assert m.blocks[1].mlp_delta.beta_gate.logit.bias.item() == 0.0  # beta_init 1 -> logit 0


def test_small_preset_parameter_count():
    """123,590,400 for the official small backbone at vocab 50304, plus 24 x (769 + 769) gate and value heads."""
    with torch.device("meta"):
        m = DDLModel(presets["small"])
        base = DDLModel(with_overrides(presets["small"], residual="additive"))
    assert base.num_params() == 123_590_400
    assert m.num_params() == 123_590_400 + 24 * (769 + 769)
    assert len(m.delta_residuals()) == 24
    assert [(r.site, r.layer) for r in m.delta_residuals()[:3]] == [("attn", 0), ("mlp", 0), ("attn", 1)]


def test_bad_config_is_rejected_with_the_field_named():
    with pytest.raises(ValueError, match="additive"):
        DDLConfig(residual="additive", d_v=4)
    with pytest.raises(ValueError, match="beta_fixed"):
        DDLConfig(beta_fixed=1.5, beta_max=1.0)
    with pytest.raises(ValueError, match="extra"):
        DDLConfig(nonsense=1)
    with pytest.raises(ValueError, match="block_size"):
        DDLModel(DDLConfig(**SMALL))(torch.zeros(1, 30, dtype=torch.long))


@pytest.mark.parametrize("mm", [False, True], ids=["colsum", "mmgrad"])
@pytest.mark.parametrize("out", [1, 4, 16])
def test_narrow_linear_compiled_equals_linear(out, mm):
    """Under torch.compile NarrowLinear is a product and a sum in fp32; it must give nn.Linear's
    result and gradients (to bf16 rounding under autocast) and keep its parameters' names, with its
    weight's gradient as autograd's column sums or as one matmul (``mm_grad``)."""
    from ddl.layers import NarrowLinear

    torch.manual_seed(0)
    ref, nl = torch.nn.Linear(48, out), NarrowLinear(48, out)
    nl.mm_grad = mm
    nl.load_state_dict(ref.state_dict())
    assert list(nl.state_dict()) == ["weight", "bias"]
    x = torch.randn(3, 5, 48)
    compiled = torch.compile(nl, backend="eager", fullgraph=True)  # dynamo traces the compiled branch
    for amp in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            want, got = ref(x), compiled(x)
        assert got.shape == want.shape == (3, 5, out)
        assert got.dtype == torch.float32  # the compiled form keeps fp32; callers take .float() anyway
        tol = 2e-2 if amp else 1e-5
        torch.testing.assert_close(got, want.float(), atol=tol, rtol=tol)
    xr, xn = x.clone().requires_grad_(), x.clone().requires_grad_()
    want = torch.autograd.grad(ref(xr).square().sum(), (xr, ref.weight, ref.bias))
    for backend in ("eager", "aot_eager"):  # aot_eager: the backward as AOTAutograd traces it for inductor
        got = torch.autograd.grad(torch.compile(nl, backend=backend, fullgraph=True)(xn).square().sum(),
                                  (xn, nl.weight, nl.bias))
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
        torch._dynamo.reset()
    assert nl(x).dtype == torch.float32 and torch.equal(nl(x), ref(x))  # eager: F.linear itself


@pytest.mark.parametrize("out", [1, 4])
def test_narrow_linear_matmul_forward_equals_linear(monkeypatch, out):
    """``NarrowLinear.MM_FORWARD`` (bench/throughput.py's ``:vmm``): a layer of several outputs computes its product as
    one matmul under compile, with nn.Linear's result and gradients; a single output keeps the reduction."""
    from ddl import layers

    monkeypatch.setattr(layers.NarrowLinear, "MM_FORWARD", True)
    torch.manual_seed(0)
    ref, nl = torch.nn.Linear(48, out), layers.NarrowLinear(48, out)
    nl.mm_grad = True
    nl.load_state_dict(ref.state_dict())
    x = torch.randn(3, 5, 48)
    xr = x.clone().requires_grad_()
    want_y = ref(xr)
    want = torch.autograd.grad(want_y.square().sum(), (xr, ref.weight, ref.bias))
    calls = []
    for backend in ("aot_eager", None):  # None: the compiled branch run eagerly, to see which Function it takes
        xn = x.clone().requires_grad_()
        if backend is None:
            monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
            for fn in (layers._NarrowMatmul, layers._NarrowProduct):
                monkeypatch.setattr(fn, "apply", lambda *a, f=fn.apply, n=fn.__name__: calls.append(n) or f(*a))
        got_y = (nl if backend is None else torch.compile(nl, backend=backend, fullgraph=True))(xn)
        got = torch.autograd.grad(got_y.square().sum(), (xn, nl.weight, nl.bias))
        torch._dynamo.reset()
        if backend is None:
            assert calls == ["_NarrowMatmul" if out > 1 else "_NarrowProduct"]
        assert got_y.dtype == torch.float32
        torch.testing.assert_close(got_y, want_y, atol=1e-5, rtol=1e-5)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_narrow_linear_matmul_forward_keeps_fp32_logits_on_cuda(monkeypatch):
    """On CUDA under bf16 autocast, ``MM_FORWARD``'s matmul (cuBLAS, ``out_dtype=float32``) gives the value head's
    fp32 output to within the reduction's own error, compiled by inductor, not rounded to bf16 on the way."""
    from ddl import layers

    torch.manual_seed(0)
    nl = layers.NarrowLinear(768, 4).cuda()
    nl.mm_grad = True
    x = torch.randn(4, 256, 768, device="cuda", dtype=torch.bfloat16)
    got = {}
    for mm_forward in (False, True):
        monkeypatch.setattr(layers.NarrowLinear, "MM_FORWARD", mm_forward)
        xg = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = torch.compile(nl, fullgraph=True)(xg)
        got[mm_forward] = (y, *torch.autograd.grad(y.square().sum(), (xg, nl.weight)))
        torch._dynamo.reset()
    want = (x.double() @ nl.weight.to(torch.bfloat16).double().t()) + nl.bias.double()
    assert got[True][0].dtype == torch.float32
    err = (got[True][0].double() - want).abs().max().item()
    assert err < 1e-4, err  # bf16-rounded logits (|y| ~ 1) would be off by up to 4e-3
    for a, b in zip(got[True], got[False], strict=True):  # the weight's reduction rounds it to bf16, the matmul not
        torch.testing.assert_close(a, b, atol=1e-2 * b.abs().max().item(), rtol=0)


def test_heads_take_matmul_weight_grads_at_dv_above_one():
    """The gate's and value head's weight gradients are matmuls in d_v > 1 models only (faster there, slower at
    d_v = 1 on an H100); the bench's override beats each layer's choice."""
    from ddl.layers import NarrowLinear

    for d_v, want in ((1, False), (4, True)):
        site = DDLModel(DDLConfig(**{**SMALL, "d_v": d_v})).delta_residuals()[0]
        assert site.v_proj.mm_grad is want and site.beta_gate.logit.mm_grad is want
    assert NarrowLinear.MM_WEIGHT_GRAD is None
