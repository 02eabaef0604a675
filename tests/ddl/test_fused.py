"""ddl.fused: the fused delta update against float64 autograd, the unfused path and compile.

Each numerics test runs the op's two implementations: 'torch' (its PyTorch formulas, hand-written
backward included: always) and 'triton' (the real kernels on CPU tensors under Triton's interpreter:
only when triton is importable and TRITON_INTERPRET=1 was set before the run: ``make test-kernels``, part
of ``make test``, runs those, marked ``kernels``). The gpu-marked tests
run the kernels compiled, on CUDA. d_v = 1 (a d-vector state, its own multi-row kernel) and d_v > 1
(a d x d_v state, a tile kernel) throughout; d_v = 3 masks the value lanes.
"""

from __future__ import annotations

import copy
import logging.handlers
import os
import re

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
from pydantic import ValidationError
from torch.utils._python_dispatch import TorchDispatchMode

from ddl import DDLConfig, DDLModel, fused, with_overrides
from ddl.delta import DeltaResidual

EPS = 1e-5
SMALL = dict(vocab_size=97, block_size=24, n_layer=2, n_head=2, head_dim=8, d_model=16)
INTERPRET = fused.HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1"
cuda_kernels = pytest.mark.skipif(not (torch.cuda.is_available() and fused.HAS_TRITON), reason="needs CUDA and triton")

# Error bounds, relative to the largest magnitude in the tensor compared (a row reduction's rounding
# error scales with the row's magnitudes, not with each element, which may cancel to ~0):
# - fp32 results: fp32 dot products over d <= 1000 terms, sqrt and division (approximate on the
#   GPU, a few ulp) err by well under 1e-5 of the scale (2^-24 = 6e-8 per operation).
# - bf16 results: rounding to bf16 costs half an ulp, 2^-8 of the value; the forward rounds twice
#   (the update, then the sum) as X + (k delta).to(bf16) does, so 2^-7 of the scale bounds it.
#   Triton's CPU interpreter (3.9) truncates fp32 -> bf16 where the GPU rounds to nearest even: a
#   whole ulp a rounding, so 2^-6 there.
TOL = {torch.float32: 1e-5, torch.bfloat16: 2**-7}
TOL_INTERPRETED = {**TOL, torch.bfloat16: 2**-6}


@pytest.fixture(params=["torch", pytest.param("triton", marks=pytest.mark.kernels)])
def impl(request, monkeypatch):
    """Which implementation the ops run on CPU tensors: "torch" denies every op the device check they all reach."""
    if request.param == "torch":
        monkeypatch.setattr(fused, "_on_triton", lambda t: False)
    elif not INTERPRET:
        pytest.skip("the Triton kernels on CPU need triton importable and TRITON_INTERPRET=1 (its interpreter)")
    return request.param


def naive64(X, h, v, beta, eps=EPS):
    """X + beta k (v - k^T X)^T, k = h / sqrt(||h||^2 + eps^2), all in float64; X (..., d) or (..., d, d_v)."""
    scalar = X.dim() == h.dim()
    X, h, v, beta = (t.double() for t in (X.unsqueeze(-1) if scalar else X, h, v, beta))
    k = (h / torch.sqrt((h * h).sum(-1, keepdim=True) + eps**2)).unsqueeze(-1)  # (..., d, 1)
    out = X + k * (beta * (v - (k * X).sum(-2))).unsqueeze(-2)
    return out.squeeze(-1) if scalar else out


def inputs(lead, d, d_v=1, x_dtype=torch.float32, h_dtype=torch.float32, beta="uniform", h_size="normal",
           device="cpu", seed=0):
    """X, h, v, beta as leaves that require grad, and an upstream gradient g like X."""
    gen = torch.Generator().manual_seed(seed)
    state = (*lead, d) if d_v == 1 else (*lead, d, d_v)
    X = torch.randn(state, generator=gen)
    h = torch.randn(*lead, d, generator=gen)
    if h_size == "tiny":  # ||h|| ~ 1e-7 sqrt(d) << eps: the eps guard decides k; one row exactly 0
        h = h * 1e-7
        h.view(-1, d)[0] = 0
    v = 4 * torch.rand(*lead, d_v, generator=gen)
    u = torch.rand(*lead, 1, generator=gen)
    b = {"uniform": 2 * u, "near0": 1e-4 * u, "near2": 2 - 1e-4 * u}[beta]
    g = torch.randn(state, generator=gen)
    cast = {"X": x_dtype, "h": h_dtype, "v": torch.float32, "beta": torch.float32}
    leaves = {n: t.to(device, cast[n]).requires_grad_() for n, t in zip(cast, (X, h, v, b), strict=True)}
    return leaves, g.to(device, x_dtype)


def assert_near(got, want, tol, what=""):
    err = (got.double() - want.double()).abs().max().item()
    scale = want.double().abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:g} * scale {scale:.3g}"


def check_against_float64(lead, d, d_v, x_dtype, h_dtype, beta, h_size, device="cpu", interpreted=False):
    tol = TOL_INTERPRETED if interpreted else TOL
    t, g = inputs(lead, d, d_v, x_dtype, h_dtype, beta, h_size, device)
    out = fused.delta_update(t["X"], t["h"], t["v"], t["beta"], EPS)
    got = dict(zip(t, torch.autograd.grad(out, list(t.values()), g), strict=True))
    ref = {n: x.detach().double().requires_grad_() for n, x in t.items()}  # the same, rounded inputs
    want_out = naive64(*ref.values())
    want = dict(zip(ref, torch.autograd.grad(want_out, list(ref.values()), g.double()), strict=True))
    assert out.dtype == x_dtype and out.shape == t["X"].shape
    assert_near(out, want_out, tol[x_dtype], "out")
    for n in t:
        assert got[n].dtype == t[n].dtype and got[n].shape == t[n].shape
        assert_near(got[n], want[n], tol[t[n].dtype], f"grad_{n}")


DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
          (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)]
dtype_ids = ["fp32", "bf16", "X32-h16", "X16-h32"]


# -- the op's numerics, both implementations on CPU ------------------------------------------------
@pytest.mark.parametrize("d_v", [1, 4, 3])
@pytest.mark.parametrize("d", [16, 13, 200])  # 13, 200: masked columns; 200, d_v = 1: several programs, one part-full
@pytest.mark.parametrize(("x_dtype", "h_dtype"), DTYPES, ids=dtype_ids)
def test_forward_and_grads_match_float64(impl, d, d_v, x_dtype, h_dtype):
    check_against_float64((2, 5), d, d_v, x_dtype, h_dtype, "uniform", "normal", interpreted=impl == "triton")


@pytest.mark.parametrize("d_v", [1, 4])
@pytest.mark.parametrize("beta", ["near0", "near2"])
@pytest.mark.parametrize("h_size", ["normal", "tiny"])
@pytest.mark.parametrize(("x_dtype", "h_dtype"), DTYPES[:2], ids=dtype_ids[:2])
def test_edge_regimes_match_float64(impl, d_v, beta, h_size, x_dtype, h_dtype):
    check_against_float64((3, 4), 24, d_v, x_dtype, h_dtype, beta, h_size, interpreted=impl == "triton")


@pytest.mark.parametrize("d_v", [1, 4])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_beta_zero_is_exact_identity(impl, d_v, x_dtype):
    t, g = inputs((2, 3), 20, d_v, x_dtype, x_dtype)
    beta = torch.zeros(2, 3, 1, requires_grad=True)
    out = fused.delta_update(t["X"], t["h"], t["v"], beta, EPS)
    gX, gv = torch.autograd.grad(out, (t["X"], t["v"]), g)
    assert torch.equal(out, t["X"]) and torch.equal(gX, g)
    assert torch.equal(gv, torch.zeros_like(gv))


@pytest.mark.parametrize("d_v", [1, 4])
def test_beta_one_overwrites_readout_and_beta_two_reflects(impl, d_v):
    t, _ = inputs((2, 3), 20, d_v)
    X, h, v = t["X"].detach(), t["h"].detach(), t["v"].detach()
    k = h.double() / h.double().norm(dim=-1, keepdim=True)
    beta = torch.ones(2, 3, 1)
    out = fused.delta_update(X, h, v, beta, EPS).reshape(2, 3, 20, d_v)
    torch.testing.assert_close(torch.einsum("btd,btdj->btj", k, out.double()), v.double(), rtol=1e-5, atol=1e-5)
    out = fused.delta_update(X, h, torch.zeros_like(v), 2 * beta, EPS)  # I - 2kk^T on each value lane
    lanes = (2, 3, 20, d_v)
    torch.testing.assert_close(out.reshape(lanes).norm(dim=-2), X.reshape(lanes).norm(dim=-2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("d_v", [1, 4])
def test_noncontiguous_broadcast_and_empty(impl, d_v):
    gen = torch.Generator().manual_seed(3)
    h = torch.randn(2, 5, 3, 26, generator=gen)[..., ::2].requires_grad_()  # (2, 5, 3, 13), last dim stride 2
    if d_v == 1:
        X = torch.randn(5, 2, 3, 13, generator=gen).transpose(0, 1)  # (2, 5, 3, 13), strided
    else:
        X = torch.randn(2, 5, 3, d_v, 13, generator=gen).transpose(-1, -2)  # (2, 5, 3, 13, d_v), d_v not innermost
    X.requires_grad_()
    v = torch.rand(2, 5, 3, d_v, generator=gen).requires_grad_()
    beta = torch.tensor([[[[1.3]]]], requires_grad=True)  # (1, 1, 1, 1), broadcast to every token
    out = fused.delta_update(X, h, v, beta, EPS)
    grads = torch.autograd.grad(out.square().sum(), (X, h, v, beta))
    ref = [x.detach().double().requires_grad_() for x in (X, h, v, beta)]
    want_out = naive64(*ref)
    want = torch.autograd.grad(want_out.square().sum(), ref)
    assert_near(out, want_out, 1e-5, "out")
    for n, a, b in zip(["X", "h", "v", "beta"], grads, want, strict=True):
        assert a.shape == b.shape
        assert_near(a, b, 1e-5, f"grad_{n}")
    e = torch.zeros(0, 7, *((d_v,) if d_v > 1 else ()), requires_grad=True)
    out = fused.delta_update(e, torch.zeros(0, 7), torch.zeros(0, d_v), torch.zeros(0, 1), EPS)
    assert out.shape == e.shape and torch.autograd.grad(out.sum(), e)[0].shape == e.shape


@pytest.mark.parametrize("d_v", [1, 4])
@pytest.mark.parametrize(("x_dtype", "h_dtype"), DTYPES[:3], ids=dtype_ids[:3])
def test_opcheck(impl, d_v, x_dtype, h_dtype):
    """Schema, fake kernel against the real one, autograd registration, and AOT dispatch.

    Under Triton's interpreter the traced op is the PyTorch formulas (wrap_triton does not trace interpreted
    kernels), so AOT dispatch sets them against the kernels: equal in fp32, a bf16 rounding apart otherwise.
    On CUDA (tests/ddl/test_fused.py's gpu tests) the traced op is the kernels themselves."""
    t, _ = inputs((3, 4), 13, d_v, x_dtype, h_dtype)
    X = t["X"] if d_v > 1 else t["X"].detach().unsqueeze(-1).requires_grad_()  # the op's state is (..., d, d_v)
    torch.library.opcheck(torch.ops.deltascope.delta_update.default, (X, t["h"], t["v"], t["beta"], EPS),
                          test_utils=opcheck_utils(impl, x_dtype, h_dtype))


def opcheck_utils(impl: str, *dtypes: torch.dtype) -> tuple[str, ...]:
    """opcheck's checks for an op on CPU: all four, less AOT dispatch for the interpreted kernels below fp32
    (test_opcheck says why)."""
    utils = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    return utils[:3] if impl == "triton" and set(dtypes) != {torch.float32} else utils


# -- the op inside DeltaResidual and the model ------------------------------------------------------
@pytest.mark.parametrize("d_v", [1, 4])
def test_reference_is_the_unfused_path_bit_for_bit(d_v):
    """delta_update_reference is DeltaResidual's unfused path, op for op."""
    for value_head, dtype in [("code", torch.float32), ("paper", torch.float32), ("code", torch.bfloat16)]:
        cfg = DDLConfig(**SMALL, value_head=value_head, d_v=d_v)
        torch.manual_seed(0)
        m = DeltaResidual(cfg, "attn", 0)
        gen = torch.Generator().manual_seed(1)
        X = torch.randn(2, 5, 16, *((d_v,) if d_v > 1 else ()), generator=gen).to(dtype)
        h, c, u = (torch.randn(2, 5, 16, generator=gen) for _ in range(3))
        u = X if d_v == 1 else u.to(dtype)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            got = m(X, h, c, u)
            want = fused.delta_update_reference(X, h, m._value(c, u), m.beta_gate(c), cfg.k_eps)
        assert got.dtype == dtype and torch.equal(got, want)


@pytest.mark.parametrize("d_v", [1, 4])
def test_torch_formulas_forward_is_the_reference_bit_for_bit(monkeypatch, d_v):
    monkeypatch.setattr(fused, "_use_triton", lambda t: False)
    t, _ = inputs((2, 5), 13, d_v, torch.bfloat16, torch.float32)
    args = [x.detach() for x in t.values()]
    assert torch.equal(fused.delta_update(*args, EPS), fused.delta_update_reference(*args, EPS))


def test_config_flag():
    assert DDLConfig().fused_delta is False
    assert with_overrides(DDLConfig(**SMALL), fused_delta=True).fused_delta is True
    with pytest.raises(ValidationError, match="fused_delta"):
        with_overrides(DDLConfig(**SMALL), fused_delta="sometimes")


def models(**kw) -> tuple[DDLModel, DDLModel]:
    """An unfused model and its fused_delta twin with the same weights."""
    torch.manual_seed(0)
    plain = DDLModel(DDLConfig(**{**SMALL, **kw}))
    twin = DDLModel(DDLConfig(**{**SMALL, **kw, "fused_delta": True}))
    twin.load_state_dict(plain.state_dict())
    return plain, twin


def train_step(model: DDLModel, seed: int = 4):
    idx = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _, loss = model(idx, idx.roll(-1, 1))
    loss.backward()
    named = [(n.removeprefix("_orig_mod."), p) for n, p in model.named_parameters()]  # compiled: same keys
    grads = {n: p.grad.clone() for n, p in named}
    opt.step()
    return loss.detach(), grads, {n: p.detach().clone() for n, p in named}


def test_flag_on_cpu_trains_bit_for_bit_as_off():
    """On CPU the flag falls back to the unfused path: the same step, bit for bit."""
    plain, twin = models()
    assert not fused.supported(torch.zeros(1, 16), torch.zeros(1, 16))
    for a, b in zip(train_step(plain), train_step(twin), strict=True):
        if isinstance(a, dict):
            assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
        else:
            assert torch.equal(a, b)


class OpCalls(TorchDispatchMode):
    """Counts the fused forward ops' calls: ``n`` both, ``folded`` the update with the readout folded in."""

    def __init__(self):
        super().__init__()
        self.n = self.folded = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.folded += func is torch.ops.deltascope.delta_update_read.default
        self.n += func in (torch.ops.deltascope.delta_update.default, torch.ops.deltascope.delta_update_read.default)
        return func(*args, **(kwargs or {}))


MODEL_VARIANTS = [{}, {"value_head": "paper", "beta_fixed": 0.7}, {"d_v": 4}, {"d_v": 3, "compressor": "tc"}]
model_ids = [",".join(f"{k}={v}" for k, v in kw.items()) or "dv1" for kw in MODEL_VARIANTS]


@pytest.mark.parametrize("kw", MODEL_VARIANTS, ids=model_ids)
def test_fused_model_step_matches_unfused(impl, monkeypatch, kw):
    """With the op taken on CPU, a training step matches the unfused model's within fp32 rounding."""
    monkeypatch.setattr(fused, "supported", lambda X, h: True)
    plain, twin = models(**kw)
    idx = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(4))
    with OpCalls() as calls:
        twin(idx)
    assert calls.n == 2 * SMALL["n_layer"]
    assert calls.folded == 0  # the fold is off by default: test_folded_model_step_matches_unfused
    # grads, not the stepped weights: Adam's first step is lr * g / |g|, ill-conditioned where g ~ 0
    (la, ga, _), (lb, gb, _) = train_step(plain), train_step(twin)
    torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-6)
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("tap", ["k_dir", "write"])
@pytest.mark.parametrize("kind", ["forward_hook", "forward_pre_hook"])
def test_hooked_taps_keep_the_unfused_path(monkeypatch, tap, kind):
    """The hook contract: a hook on k_dir or write sees its site's forward, so the site is unfused."""
    monkeypatch.setattr(fused, "supported", lambda X, h: True)
    plain, twin = models()
    seen = []
    hooked = twin.delta_residuals()[1]
    getattr(getattr(hooked, tap), f"register_{kind}")(lambda mod, *a: seen.append(mod))
    idx = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(4))
    with OpCalls() as calls:
        twin(idx)
    assert len(seen) == 1 and calls.n == 2 * SMALL["n_layer"] - 1


def _recorders(model: DDLModel, observer: bool) -> dict[str, list]:
    """Hooks on every site's k_dir, write and the site itself that record what they are given."""
    from ddl.delta import observes

    seen: dict[str, list] = {"k_dir": [], "write": [], "site": []}

    def record(name):
        def hook(mod, args, out):
            seen[name].append([t.detach().clone() for t in (*args[:3], out)])

        return observes(hook) if observer else hook

    for site in model.delta_residuals():
        site.k_dir.register_forward_hook(record("k_dir"))
        site.write.register_forward_hook(record("write"))
        site.register_forward_hook(record("site"))
    return seen


@pytest.mark.parametrize(("d_v", "fold"), [(1, False), (4, False), (4, True)], ids=["dv1", "dv4", "dv4-fold"])
def test_observers_keep_the_fused_path_and_see_the_unfused_values(impl, monkeypatch, d_v, fold):
    """Observer hooks (the probes') on k_dir, write and the site leave every site fused, folded too, and
    are called once a site with what the unfused modules take and return: k rebuilt from the kernel's
    1/||h||, p from its readout, the site's input state and result."""
    monkeypatch.setattr(fused, "supported", lambda X, h: True)
    monkeypatch.setattr(fused, "FOLD_READOUT", fold)
    plain, twin = models(d_v=d_v)
    want, got = _recorders(plain, observer=False), _recorders(twin, observer=True)
    idx = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(4))
    plain(idx)
    with OpCalls() as calls:
        twin(idx)
    assert calls.n == 2 * SMALL["n_layer"] and calls.folded == (calls.n if fold else 0)
    for name in want:
        assert len(got[name]) == len(want[name]) == 2 * SMALL["n_layer"], name
        for i, (a, b) in enumerate(zip(got[name], want[name], strict=True)):
            assert len(a) == len(b)
            for x, y in zip(a, b, strict=True):
                assert x.shape == y.shape and x.dtype == y.dtype, (name, i)
                torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5, msg=lambda m, n=name, i=i: f"{n} {i}: {m}")


def test_an_observer_beside_another_hook_unfuses_its_site(monkeypatch):
    """One hook that may change an output is enough: that site runs its modules, the others stay fused."""
    from ddl.delta import observes

    monkeypatch.setattr(fused, "supported", lambda X, h: True)
    _, twin = models()
    site = twin.delta_residuals()[2]
    site.k_dir.register_forward_hook(observes(lambda m, a, o: None))
    site.k_dir.register_forward_hook(lambda m, a, o: o * 2)  # a fault injection: replaces k
    idx = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(4))
    with OpCalls() as calls:
        twin(idx)
    assert calls.n == 2 * SMALL["n_layer"] - 1


def test_observers_not_listening_are_not_called(monkeypatch):
    """An observer whose predicate says no (a probe between log steps) is skipped, and so is building k."""
    from ddl.delta import observes

    monkeypatch.setattr(fused, "supported", lambda X, h: True)
    _, twin = models()
    heard, deaf = [], []
    for site in twin.delta_residuals():
        site.k_dir.register_forward_hook(observes(lambda m, a, o: deaf.append(o), listening=lambda m: False))
    idx = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(4))
    with OpCalls() as calls:
        twin(idx)
    assert deaf == [] and calls.n == 2 * SMALL["n_layer"]
    # beside one that listens, it is still not called
    twin.delta_residuals()[0].k_dir.register_forward_hook(observes(lambda m, a, o: heard.append(o)))
    twin(idx)
    assert deaf == [] and len(heard) == 1


@pytest.mark.slow
def test_compiled_fused_model_with_observers_is_one_graph(impl, monkeypatch):
    """Dynamo inlines the observers' calls: one graph, every site's op in it."""
    monkeypatch.setattr(fused, "supported", lambda X, h: True)
    torch._dynamo.reset()
    plain, twin = models(d_v=4)
    want, got = _recorders(plain, observer=False), _recorders(twin, observer=True)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(twin, fullgraph=True, backend=counter)
    idx = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(4))
    plain(idx)
    compiled(idx)
    assert counter.frame_count == 1 and len(op_nodes(counter.graphs[0])) == 2 * SMALL["n_layer"]
    for name in want:
        for a, b in zip(got[name], want[name], strict=True):
            for x, y in zip(a, b, strict=True):
                torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def op_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    names = ("deltascope.delta_update", "deltascope.delta_update.default", "deltascope.delta_update_read",
             "deltascope.delta_update_read.default")
    return [n for n in gm.graph.nodes if str(n.target) in names]


@pytest.mark.slow
@pytest.mark.parametrize("d_v", [1, 4])
def test_compiled_fullgraph_keeps_the_op_and_matches_eager(impl, monkeypatch, d_v):
    """One graph, the op in it once per site, and eager's unfused loss and grads (aot_eager on CPU). By
    default (FOLD_READOUT None) a compiled d_v > 1 model folds every CC readout into the update before it,
    and the same model run eagerly folds none."""
    monkeypatch.setattr(fused, "supported", lambda X, h: True)
    assert fused.FOLD_READOUT is None
    torch._dynamo.reset()
    plain, twin = models(d_v=d_v)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(twin, fullgraph=True, backend=counter)  # a graph break raises
    (la, ga, _), (lb, gb, _) = train_step(plain), train_step(compiled)
    assert counter.frame_count == 1
    nodes = op_nodes(counter.graphs[0])
    assert len(nodes) == 2 * SMALL["n_layer"]
    assert sum("read" in str(n.target) for n in nodes) == (len(nodes) if d_v > 1 else 0)
    with OpCalls() as calls:
        twin(torch.randint(0, 97, (2, 16)))
    assert calls.n == 2 * SMALL["n_layer"] and calls.folded == 0
    torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-6)
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], rtol=1e-4, atol=1e-6)


# -- CUDA: the kernels compiled by Triton ---------------------------------------------------------
@pytest.mark.gpu
@cuda_kernels
@pytest.mark.parametrize("d_v", [1, 4, 3])
@pytest.mark.parametrize("d", [768, 1000, 13])
@pytest.mark.parametrize(("x_dtype", "h_dtype"), DTYPES[:3], ids=dtype_ids[:3])
def test_cuda_forward_and_grads_match_float64(d, d_v, x_dtype, h_dtype):
    check_against_float64((4, 64), d, d_v, x_dtype, h_dtype, "uniform", "normal", device="cuda")


@pytest.mark.gpu
@cuda_kernels
@pytest.mark.parametrize("d_v", [1, 4])
@pytest.mark.parametrize("beta", ["near0", "near2"])
@pytest.mark.parametrize("h_size", ["normal", "tiny"])
def test_cuda_edge_regimes_match_float64(d_v, beta, h_size):
    check_against_float64((4, 64), 768, d_v, torch.bfloat16, torch.bfloat16, beta, h_size, device="cuda")


@pytest.mark.gpu
@cuda_kernels
@pytest.mark.parametrize("d_v", [1, 4])
@pytest.mark.parametrize(("x_dtype", "h_dtype"), DTYPES[:3], ids=dtype_ids[:3])
def test_cuda_opcheck(d_v, x_dtype, h_dtype):
    t, _ = inputs((3, 40), 768, d_v, x_dtype, h_dtype, device="cuda")
    X = t["X"] if d_v > 1 else t["X"].detach().unsqueeze(-1).requires_grad_()
    torch.library.opcheck(torch.ops.deltascope.delta_update.default, (X, t["h"], t["v"], t["beta"], EPS))


@pytest.mark.gpu
@pytest.mark.slow
@cuda_kernels
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:TensorFloat32 tensor cores:UserWarning")
@pytest.mark.parametrize(("d_v", "fold"), [(1, False), (4, False), (4, True)], ids=["dv1", "dv4", "dv4-fold"])
@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16-autocast"])
def test_cuda_compiled_fused_model_matches_eager(monkeypatch, amp, d_v, fold):
    """Inductor keeps the op, one graph; loss and grads match the unfused model.

    fp32 (TF32 off): against the eager model; the two differ only by fp32 rounding orders, 1e-4
    relative on the grads. bf16 autocast: the loss within 2e-2 of the unfused model compiled the same way
    (inductor and eager round the bf16 matmuls differently); each grad within twice the unfused bf16
    model's distance from the fp32 model's grad, plus 2e-2 of its norm. Small grads that sum many cancelling
    terms (the gate and value biases, the compressors' read vectors) sit 5-12% from fp32 in every bf16
    model, and two rounding orders differ by up to 2x there: on an H100 the final readout's read vector was
    0.058 from fp32 unfused, 0.062 fused and 0.102 fused with the fold; a wrong gradient is O(1) off."""
    # not monkeypatch.setattr: its undo fails on torch's cuBLASModule (AttributeError at teardown, torch 2.11-2.13)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        _compiled_fused_model_matches_eager(monkeypatch, amp, d_v, fold)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def _compiled_fused_model_matches_eager(monkeypatch, amp, d_v, fold):
    monkeypatch.setattr(fused, "FOLD_READOUT", fold)
    torch._dynamo.reset()
    plain, twin = (m.cuda() for m in models(block_size=64, d_v=d_v))
    exact = copy.deepcopy(plain)
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(twin, fullgraph=True, backend=counter)
    idx = torch.randint(0, 97, (4, 64), generator=torch.Generator().manual_seed(5)).cuda()
    reference = torch.compile(plain, fullgraph=True) if amp else plain
    losses = []
    for net in (reference, compiled):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            _, loss = net(idx, idx.roll(-1, 1))
        loss.backward()
        losses.append(loss.detach())
    assert counter.frame_count == 1
    assert len(op_nodes(counter.graphs[0])) == 2 * SMALL["n_layer"]
    if not amp:
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
        for (n, a), b in zip(plain.named_parameters(), twin.parameters(), strict=True):
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
        return
    torch.testing.assert_close(losses[1], losses[0], rtol=2e-2, atol=0)
    exact(idx, idx.roll(-1, 1))[1].backward()
    for (n, e), a, b in zip(exact.named_parameters(), plain.parameters(), twin.parameters(), strict=True):
        unfused, fused_ = ((x.grad - e.grad).norm().item() / e.grad.norm().item() for x in (a, b))
        assert fused_ <= 2 * unfused + 2e-2, f"{n}: {fused_:.3g} from fp32, the unfused model {unfused:.3g}"


@pytest.mark.gpu
@cuda_kernels
@pytest.mark.parametrize("d_v", [1, 4])
def test_cuda_model_takes_the_fused_op(d_v):
    _, twin = models(d_v=d_v)
    twin = twin.cuda()
    with OpCalls() as calls:
        twin(torch.randint(0, 97, (2, 16), device="cuda"))
    assert calls.n == 2 * SMALL["n_layer"] and calls.folded == 0


@pytest.mark.gpu
@cuda_kernels
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:TensorFloat32 tensor cores:UserWarning")
@pytest.mark.parametrize("d_v", [1, 4])
def test_cuda_inductor_launches_the_kernels_itself(d_v):
    """Compiled, the ops are traced through wrap_triton: inductor's generated code launches the fused kernels,
    once a site each way, and no custom op is left for the host to dispatch (0.3 ms a call, ddl.fused._op_def).
    Inductor reads from each kernel which tensors it writes; where it cannot, it copies every input first."""
    from torch._inductor.utils import run_and_get_code

    _, twin = models(block_size=64, d_v=d_v)
    torch._dynamo.reset()
    compiled = torch.compile(twin.cuda(), fullgraph=True)
    idx = torch.randint(0, 97, (4, 64), device="cuda")

    def step():
        compiled(idx, idx.roll(-1, 1))[1].backward()

    warned = logging.handlers.BufferingHandler(1000)
    wrap_log = logging.getLogger("torch._higher_order_ops.triton_kernel_wrap")
    wrap_log.addHandler(warned)
    try:
        _, codes = run_and_get_code(step)
    finally:
        wrap_log.removeHandler(warned)
    assert not [r for r in warned.buffer if "every input is mutated" in r.getMessage()]
    code = "\n".join(codes)
    assert "deltascope" not in code, "a custom op call is left in inductor's code"
    kind = "_chunk_kernel" if d_v > 1 else "_kernel"
    for way in ("_fwd", "_bwd"):
        launches = re.findall(rf"\b{way}{kind}\w*\.run\(", code)
        seen = [line.strip()[:120] for line in code.splitlines() if way in line][:6]
        assert len(launches) == 2 * SMALL["n_layer"], (way, len(launches), seen)


@pytest.mark.gpu
@cuda_kernels
@pytest.mark.parametrize("launch", [None, ("chunk", 64, 4), ("chunk", 128, 4, None, 3, True), (16, 8), (1, 16)])
@pytest.mark.parametrize(("x_dtype", "h_dtype"), DTYPES[:3], ids=dtype_ids[:3])
def test_cuda_folded_readout_matches_float64(x_dtype, h_dtype, launch):
    """The small model's shape, d = 768 and d_v = 4: the op (its default launch), and the kernels under other
    launches: two passes over 64 rows, over 128 rows unrolled three times with the backward's X prefetched, the
    one-tile kernels as a loop and one token a program."""
    t, g = inputs((3, 50), 768, 4, x_dtype, h_dtype, device="cuda")
    W = torch.randn(768, 4, device="cuda").requires_grad_()
    gy = torch.randn(3, 50, 768, device="cuda").to(x_dtype)
    if launch is None:
        out, y = fused.delta_update_read(t["X"], t["h"], t["v"], t["beta"], W, EPS)
        grads = torch.autograd.grad((out, y), [*t.values(), W], (g, gy))
    else:
        out, y, grads = folded_by_kernels(t, W, g, gy, launch)
    ref = [x.detach().double().requires_grad_() for x in (*t.values(), W)]
    Wr = ref[-1].to(x_dtype).double()
    want_out = naive64(*ref[:4])
    want = torch.autograd.grad((want_out, (want_out * Wr).sum(-1)), ref, (g.double(), gy.double()))
    assert_near(out, want_out, TOL[x_dtype], "out")
    assert_near(y, (out.double() * Wr).sum(-1), TOL[x_dtype], "y")
    for n, a, b, leaf in zip(["X", "h", "v", "beta", "W"], grads, want, [*t.values(), W], strict=True):
        assert_near(a, b, TOL[x_dtype if n == "W" else leaf.dtype], f"grad_{n}")


@pytest.mark.kernels
@pytest.mark.skipif(not INTERPRET, reason="the Triton kernels on CPU need triton importable and TRITON_INTERPRET=1")
@pytest.mark.parametrize(("d_v", "launch"), [(1, (1, 1)), (1, (4, 2)), (1, (8, 4)), (4, (1, 1)), (4, (3, 8)),
                                             (4, ("chunk", 4, 1)), (4, ("chunk", 16, 2)), (4, ("chunk", 4, 1, None, 2)),
                                             (4, ("chunk", 4, 1, None, 4)), (4, ("chunk", 4, 1, None, 1, True)),
                                             (4, ("chunk", 4, 1, None, 2, True)), (3, (1, 4))])
def test_launch_shapes_give_the_default_result(d_v, launch):
    """bench/fused_kernels.py sweeps (rows a program, warps), and for d_v > 1 the two-pass kernels' rows a
    pass (the default; unrolled 2 and 4 times: d = 13 is 4 blocks of 4, one masked) against the one-tile kernels;
    every shape must compute the same."""
    from ddl import _fused_kernels as fk

    n, d = 11, 13  # rows not a multiple of any ROWS, d not a power of two: the masks work
    g = torch.Generator().manual_seed(0)
    X, h = torch.randn(n, d, d_v, generator=g), torch.randn(n, d, generator=g)
    v, beta = torch.rand(n, d_v, generator=g), torch.rand(n, 1, generator=g) * 2
    gout = torch.randn(n, d, d_v, generator=g)
    want = fk.forward(X, h, v, beta, EPS)
    got = fk.forward(X, h, v, beta, EPS, launch)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    wb = fk.backward(gout, X, h, v, beta, want[1], want[2])
    gb = fk.backward(gout, X, h, v, beta, want[1], want[2], launch)
    for a, b in zip(gb, wb, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.kernels
@pytest.mark.skipif(not INTERPRET, reason="the Triton kernels on CPU need triton importable and TRITON_INTERPRET=1")
def test_backward_launch_of_its_own_gives_the_default_result(monkeypatch):
    """``CHUNK_BWD_LAUNCH`` (bench/throughput.py's ``:bwdpf``) gives the backward its own default launch, unrolled and
    prefetching, and computes what ``CHUNK_LAUNCH`` does; the switch sets it and puts it back."""
    import sys
    from pathlib import Path

    from ddl import _fused_kernels as fk

    n, d, d_v = 11, 13, 4
    g = torch.Generator().manual_seed(2)
    X, h, W = torch.randn(n, d, d_v, generator=g), torch.randn(n, d, generator=g), torch.randn(d, d_v, generator=g)
    v, beta = torch.rand(n, d_v, generator=g), torch.rand(n, 1, generator=g) * 2
    gout, gy = torch.randn(n, d, d_v, generator=g), torch.randn(n, d, generator=g)
    monkeypatch.setattr(fk, "CHUNK_LAUNCH", (16, 1))  # 4 rows a pass: d = 13 is 4 blocks, one masked
    _, _, rnorm, p = fk.forward_read(X, h, v, beta, W, EPS)
    want = fk.backward_read(gout, gy, X, h, v, beta, W, rnorm, p)
    monkeypatch.setattr(fk, "CHUNK_BWD_LAUNCH", (16, 1, None, 3, True))
    seen = []
    monkeypatch.setattr(fk, "_options", lambda *a, f=fk._options: seen.append(a) or f(*a))
    got = fk.backward_read(gout, gy, X, h, v, beta, W, rnorm, p)
    assert seen == [(1, None, 3, True)]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "bench"))
    monkeypatch.delitem(sys.modules, "throughput", raising=False)
    import throughput

    monkeypatch.setattr(fk, "CHUNK_BWD_LAUNCH", None)
    with throughput.switched("ddl_dv4_fused:bwdpf"):
        assert fk.CHUNK_BWD_LAUNCH == throughput.BWDPF_LAUNCH
    assert fk.CHUNK_BWD_LAUNCH is None


@pytest.mark.kernels
@pytest.mark.skipif(not INTERPRET, reason="the Triton kernels on CPU need triton importable and TRITON_INTERPRET=1")
@pytest.mark.parametrize("launch", [(1, 2), (3, 4), (16, 8), ("chunk", 4, 1), ("chunk", 16, 2),
                                    ("chunk", 4, 1, None, 3), ("chunk", 4, 1, None, 3, True)])
def test_folded_launch_shapes_give_the_default_result(launch):
    """The folded kernels under other launches compute what their default launch (two passes) does: the
    one-tile kernels one token a program (straight-line) or several (a loop), the two-pass ones with other
    rows a pass."""
    from ddl import _fused_kernels as fk

    n, d, d_v = 11, 13, 4
    g = torch.Generator().manual_seed(1)
    X, h, W = torch.randn(n, d, d_v, generator=g), torch.randn(n, d, generator=g), torch.randn(d, d_v, generator=g)
    v, beta = torch.rand(n, d_v, generator=g), torch.rand(n, 1, generator=g) * 2
    gout, gy = torch.randn(n, d, d_v, generator=g), torch.randn(n, d, generator=g)
    want = fk.forward_read(X, h, v, beta, W, EPS)
    got = fk.forward_read(X, h, v, beta, W, EPS, launch)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    wb = fk.backward_read(gout, gy, X, h, v, beta, W, want[2], want[3])
    gb = fk.backward_read(gout, gy, X, h, v, beta, W, want[2], want[3], launch)
    for a, b in zip(gb, wb, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def run_bench(tmp_path, script: str, *args: str):
    """bench/<script> run as a newcomer would, its JSON lines written under tmp_path -> (the run, its rows)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "bench.jsonl"
    res = subprocess.run([sys.executable, str(root / "bench" / script), *args, "--iters", "1", "--json", str(out)],
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root),
                                                                                        os.environ.get("PYTHONPATH")]))})
    assert res.returncode == 0, res.stderr[-2000:]
    return res, [json.loads(line) for line in out.read_text().splitlines()]


@pytest.mark.kernels
@pytest.mark.skipif(not INTERPRET, reason="the Triton kernels on CPU need triton importable and TRITON_INTERPRET=1")
def test_kernel_benchmark_runs_under_the_interpreter(tmp_path):
    """bench/fused_kernels.py end to end on a tiny shape: every launch it sweeps runs and is recorded."""
    res, rows = run_bench(tmp_path, "fused_kernels.py", "--tokens", "8", "--d", "16")
    assert {(r["d_v"], r["read"]) for r in rows} == {(1, False), (4, False), (4, True)}
    assert all(r["fwd_us"] > 0 and r["bwd_us"] > 0 and r["fwd_mb"] > 0 for r in rows)
    assert "d_v  kernels launch" in res.stdout


# -- the update with the next CC readout folded in (d_v > 1) ----------------------------------------
@pytest.mark.parametrize("d_v", [4, 3])
@pytest.mark.parametrize("d", [16, 13])
@pytest.mark.parametrize(("x_dtype", "h_dtype"), DTYPES[:3], ids=dtype_ids[:3])
def test_folded_readout_matches_float64(impl, d, d_v, x_dtype, h_dtype):
    """out, y = W-readout of out, and the grads of X, h, v, beta and W, against float64 autograd."""
    tol = TOL_INTERPRETED if impl == "triton" else TOL
    t, g = inputs((2, 5), d, d_v, x_dtype, h_dtype)
    gen = torch.Generator().manual_seed(7)
    t["W"] = torch.randn(d, d_v, generator=gen).requires_grad_()
    gy = torch.randn(2, 5, d, generator=gen).to(x_dtype)
    out, y = fused.delta_update_read(t["X"], t["h"], t["v"], t["beta"], t["W"], EPS)
    got = dict(zip(t, torch.autograd.grad((out, y), list(t.values()), (g, gy)), strict=True))
    ref = {n: x.detach().double().requires_grad_() for n, x in t.items()}
    Wr = ref["W"].to(x_dtype).double()  # the op reads W in X's dtype, as CCCompressor does
    want_out = naive64(ref["X"], ref["h"], ref["v"], ref["beta"])
    want = dict(zip(ref, torch.autograd.grad((want_out, (want_out * Wr).sum(-1)), list(ref.values()),
                                             (g.double(), gy.double())), strict=True))
    assert out.dtype == y.dtype == x_dtype and y.shape == t["h"].shape
    assert_near(out, want_out, tol[x_dtype], "out")
    assert_near(y, (out.double() * Wr).sum(-1), tol[x_dtype], "y")  # y reads the rounded out
    for n in t:
        assert got[n].dtype == t[n].dtype and got[n].shape == t[n].shape
        assert_near(got[n], want[n], tol[x_dtype if n == "W" else t[n].dtype], f"grad_{n}")


def test_folded_readout_opcheck(impl):
    t, _ = inputs((3, 4), 13, 4, torch.bfloat16, torch.float32)
    W = torch.randn(13, 4).to(torch.bfloat16).requires_grad_()
    torch.library.opcheck(torch.ops.deltascope.delta_update_read.default,
                          (t["X"], t["h"], t["v"], t["beta"], W, EPS),
                          test_utils=opcheck_utils(impl, torch.bfloat16, torch.float32))


@pytest.mark.parametrize("hooked", ["compress", "readout", "mlp_delta"])
def test_a_hooked_reader_or_site_keeps_its_fold_off(monkeypatch, hooked):
    """A hook on a compressor sees every readout it makes; a hook on a site sees its forward."""
    monkeypatch.setattr(fused, "supported", lambda X, h: True)
    monkeypatch.setattr(fused, "FOLD_READOUT", True)
    plain, twin = models(d_v=4)
    mod = {"compress": twin.blocks[1].compress, "readout": twin.readout, "mlp_delta": twin.blocks[0].mlp_delta}[hooked]
    seen_twin, seen_plain = [], []
    mod.register_forward_hook(lambda m, a, o: seen_twin.append(o.detach()))
    ref = {"compress": plain.blocks[1].compress, "readout": plain.readout, "mlp_delta": plain.blocks[0].mlp_delta}
    ref[hooked].register_forward_hook(lambda m, a, o: seen_plain.append(o.detach()))
    idx = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(4))
    with OpCalls() as calls:
        twin(idx)
    plain(idx)
    assert len(seen_twin) == len(seen_plain) >= 1
    for a, b in zip(seen_twin, seen_plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # the sites that write what a hooked reader reads unfold: block 1's compress reads block 0's mlp
    # site and block 1's attn site; the readout reads the last site; a hooked site unfolds alone
    unfolded = 2 if hooked == "compress" else 1
    assert calls.n == 2 * SMALL["n_layer"] and calls.folded == 2 * SMALL["n_layer"] - unfolded


def folded_by_kernels(t: dict, W: torch.Tensor, g: torch.Tensor, gy: torch.Tensor, launch):
    """(out, y, [grad X, h, v, beta, W]) of delta_update_read's kernels under ``launch``."""
    from ddl import _fused_kernels as fk

    X, h, v, beta = (x.detach() for x in t.values())
    d, dv = X.shape[-2:]
    rows = (X.reshape(-1, d, dv), h.reshape(-1, d), v.reshape(-1, dv), beta.reshape(-1, 1))
    out, y, rnorm, p = fk.forward_read(*rows, W.detach().to(X.dtype), EPS, launch)
    grads = fk.backward_read(g.reshape(-1, d, dv), gy.reshape(-1, d), *rows, W.detach().to(X.dtype), rnorm, p, launch)
    gW = fused.read_weight_grad(gy.reshape(-1, d), out)  # as the op's autograd sums grad W, beside the kernels
    return (out.view(X.shape), y.view(h.shape),
            [a.view(x.shape) for a, x in zip(grads, t.values(), strict=True)] + [gW])


@pytest.mark.parametrize("launch", [None, ("chunk", 4, 1), ("chunk", 16, 2), (3, 4), (1, 4)])
def test_folded_launches_match_float64(impl, launch):
    """The folded kernels under each kind of launch: two passes over row blocks (the default, and other rows a
    pass), and the one-tile kernels as a loop over tokens (3, 4) or one token a program (1, 4)."""
    if impl == "torch" and launch is not None:
        pytest.skip("launch shapes exist only for the Triton kernels")
    t, g = inputs((2, 7), 13, 4)
    W = torch.randn(13, 4, generator=torch.Generator().manual_seed(3)).requires_grad_()
    gy = torch.ones(2, 7, 13)
    if launch is None:
        out, y = fused.delta_update_read(t["X"], t["h"], t["v"], t["beta"], W, EPS)
        got = torch.autograd.grad((out, y), [*t.values(), W], (g, gy))
    else:
        got = folded_by_kernels(t, W, g, gy, launch)[2]
    ref = [x.detach().double().requires_grad_() for x in (*t.values(), W)]
    want_out = naive64(*ref[:4])
    want = torch.autograd.grad((want_out, (want_out * ref[-1]).sum(-1)), ref, (g.double(), gy.double()))
    for n, a, b in zip(["X", "h", "v", "beta", "W"], got, want, strict=True):
        assert_near(a, b, 1e-5, f"grad_{n}")


@pytest.mark.parametrize("kw", MODEL_VARIANTS, ids=model_ids)
def test_folded_model_step_matches_unfused(impl, monkeypatch, kw):
    """With FOLD_READOUT, every site whose reader is a CC compressor folds, and the step still matches."""
    monkeypatch.setattr(fused, "supported", lambda X, h: True)
    monkeypatch.setattr(fused, "FOLD_READOUT", True)
    plain, twin = models(**kw)
    idx = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(4))
    with OpCalls() as calls:
        twin(idx)
    assert calls.n == 2 * SMALL["n_layer"]
    assert calls.folded == (calls.n if kw.get("d_v", 1) > 1 and kw.get("compressor", "cc") == "cc" else 0)
    (la, ga, _), (lb, gb, _) = train_step(plain), train_step(twin)
    torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-6)
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")


def test_benchmark_variant_switches_flip_the_code_path_and_restore_it(monkeypatch):
    """bench/throughput.py's suffixes, alone and joined by '+': the switch holds inside the block only."""
    import sys
    from pathlib import Path

    from ddl import layers

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "bench"))
    monkeypatch.delitem(sys.modules, "throughput", raising=False)
    import throughput

    assert throughput.config_of("ddl_dv4_fused:fold") == throughput.VARIANTS["ddl_dv4_fused"]
    for suffix, want in (("fold", True), ("nofold", False), ("", None)):
        with throughput.switched(f"ddl_dv4_fused:{suffix}" if suffix else "ddl_dv4_fused"):
            assert fused.FOLD_READOUT is want
        assert fused.FOLD_READOUT is None
    with throughput.switched("ddl_dv1:gemv"):
        assert layers.NarrowLinear.forward is torch.nn.Linear.forward
    for suffix, want in (("mm", True), ("nomm", False)):
        with throughput.switched(f"ddl_dv1:{suffix}"):
            assert layers.NarrowLinear.MM_WEIGHT_GRAD is want
    assert layers.NarrowLinear.MM_WEIGHT_GRAD is None
    with throughput.switched("ddl_dv4_fused:vmm"):
        assert layers.NarrowLinear.MM_FORWARD is True
    assert layers.NarrowLinear.MM_FORWARD is False
    with throughput.switched("ddl_dv4_fused:wgk+fk"):
        assert layers.NarrowLinear.WGRAD_KERNEL is None and layers.NarrowLinear.FWD_KERNEL is None
    assert layers.NarrowLinear.WGRAD_KERNEL is False and layers.NarrowLinear.FWD_KERNEL is False
    with throughput.switched("ddl_dv4_fused:vmm+nofold"):  # suffixes joined by '+' flip both paths
        assert layers.NarrowLinear.MM_FORWARD is True and fused.FOLD_READOUT is False
    assert layers.NarrowLinear.MM_FORWARD is False and fused.FOLD_READOUT is None
    with pytest.raises(SystemExit, match="unknown variant 'ddl_dv4_fused:vmm\\+fast'"):
        throughput.config_of("ddl_dv4_fused:vmm+fast")
    assert layers.NarrowLinear.forward is not torch.nn.Linear.forward
    with pytest.raises(SystemExit, match="unknown variant 'ddl_dv4_fused:fast'"):
        throughput.config_of("ddl_dv4_fused:fast")
    with pytest.raises(SystemExit, match="choose from additive"):
        throughput.config_of("ddl_dv9")
    assert throughput.variant_names("additive,ddl_dv4_fused:fold") == ["additive", "ddl_dv4_fused:fold"]
    with pytest.raises(SystemExit, match="unknown variant 'ddl_dv9'"):
        throughput.variant_names("additive,ddl_dv9")


# -- EC expansion with block 0's CC readout folded in (d_v > 1) -------------------------------------------------
def ec_inputs(B, T, d, d_v, K, dtype, seed=5):
    gen = torch.Generator().manual_seed(seed)
    leaves = [torch.randn(*shape, generator=gen).to(dtype).requires_grad_()
              for shape in ((B, T, d), (d, d_v, K), (d, d_v))]
    grads = torch.randn(B, T, d, d_v, generator=gen).to(dtype), torch.randn(B, T, d, generator=gen).to(dtype)
    return leaves, grads


def expand_read64(e, w, W):
    """The causal conv of each channel over its sequence's tokens and the W readout, float64: X[t, i, j] =
    sum_s w[i, j, K - 1 - s] e[t - s, i] over the taps s <= t, and y = sum_j W[:, j] X[..., j]."""
    T, K = e.shape[1], w.shape[2]
    X = torch.zeros(*e.shape, w.shape[1], dtype=torch.float64)
    for t in range(T):
        for s in range(min(K, t + 1)):
            X[:, t] = X[:, t] + e[:, t - s, :, None] * w[:, :, K - 1 - s]
    return X, (X * W).sum(-1)


@pytest.mark.parametrize(("T", "d", "d_v", "K"), [(9, 13, 4, 4), (5, 16, 3, 2), (3, 8, 4, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expand_read_matches_float64(impl, T, d, d_v, K, dtype):
    """X, y and the grads of e, w and W against float64 autograd of the conv written out tap by tap; (3, 8, 4, 5)
    has a kernel longer than the sequence."""
    tol = TOL_INTERPRETED if impl == "triton" else TOL
    (e, w, W), (gX, gy) = ec_inputs(2, T, d, d_v, K, dtype)
    X, y = fused.expand_read(e, w, W)
    got = torch.autograd.grad((X, y), (e, w, W), (gX, gy))
    ref = [t.detach().double().requires_grad_() for t in (e, w, W)]
    X64, y64 = expand_read64(*ref)
    want = torch.autograd.grad((X64, y64), ref, (gX.double(), gy.double()))
    assert X.dtype == y.dtype == dtype and X.shape == (2, T, d, d_v) and y.shape == (2, T, d)
    assert_near(X, X64, tol[dtype], "X")
    assert_near(y, (X.double() * W.double()).sum(-1), tol[dtype], "y")  # y reads the rounded X
    for n, a, b, leaf in zip(["e", "w", "W"], got, want, (e, w, W), strict=True):
        assert a.dtype == leaf.dtype and a.shape == leaf.shape
        assert_near(a, b, tol[dtype], f"grad_{n}")


def test_expand_read_reference_is_the_expander_and_compressor(monkeypatch):
    """The op's reference is what ECExpander (compiled form) and CCCompressor compute, bit for bit in fp32."""
    from ddl.state import CCCompressor, ECExpander

    cfg = DDLConfig(**{**SMALL, "d_v": 4})
    torch.manual_seed(0)
    ec, cc = ECExpander(cfg), CCCompressor(cfg)
    with torch.no_grad():
        ec.weight.normal_()
    e = torch.randn(2, 7, 16)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # the shifted sum, as compiled
    X = ec(e)
    got_X, got_y = fused.expand_read_reference(e, ec.weight.view(16, 4, cfg.embed_conv_kernel), cc.w_eff())
    assert torch.equal(got_X, X)
    torch.testing.assert_close(got_y, cc(X), rtol=1e-6, atol=1e-6)


def test_expand_read_opcheck(impl):
    (e, w, W), _ = ec_inputs(2, 6, 13, 4, 4, torch.float32)
    torch.library.opcheck(torch.ops.deltascope.expand_read.default, (e, w, W),
                          test_utils=opcheck_utils(impl, torch.float32, torch.float32))


@pytest.mark.kernels
@pytest.mark.skipif(not INTERPRET, reason="the Triton kernels on CPU need triton importable and TRITON_INTERPRET=1")
@pytest.mark.parametrize("launch", [(4, 8, 1, 2), (16, 32, 2, 4), (2, 4, 2, 3), (1, 16, 1, 5)])
@pytest.mark.parametrize("K", [4, 3])
def test_expand_read_launches_match_the_torch_formulas(launch, K):
    """Any (tokens a block, rows a block, warps[, blocks a backward program]); tails of tokens, rows and taps (K = 3
    pads the tap dimension to 4) masked."""
    from ddl import _fused_kernels as fk

    (e, w, W), (gX, gy) = ec_inputs(3, 7, 13, 4, K, torch.float32)
    e, w, W = e.detach(), w.detach(), W.detach()
    X, y = fk.ec_forward(e, w, W, launch[:3])
    want_X, want_y = fused.expand_read_reference(e, w, W)
    torch.testing.assert_close(X, want_X, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y, want_y, rtol=1e-6, atol=1e-6)
    for a, b in zip(fk.ec_backward(gX, gy, e, w, W, launch), fused._expand_backward_torch(gX, gy, e, w, W),
                    strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


class ExpandCalls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += func is torch.ops.deltascope.expand_read.default
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("hooked", [None, "expand", "compress"])
def test_folded_expansion_model_step_matches_unfused(impl, monkeypatch, hooked):
    """With the fold on, an EC + CC model makes its state and block 0's readout in one op, and a training step
    matches the unfused model's; a hook on the expander or on block 0's compressor keeps them modules."""
    monkeypatch.setattr(fused, "supported", lambda X, h: True)
    monkeypatch.setattr(fused, "supported_expand", lambda e: True)
    monkeypatch.setattr(fused, "FOLD_READOUT", True)
    plain, twin = models(d_v=4)
    with torch.no_grad():  # identity init mixes no tokens: make EC non-trivial
        plain.expand.weight.normal_(0, 0.5)
        twin.expand.weight.copy_(plain.expand.weight)
    seen = []
    if hooked:
        mod = twin.expand if hooked == "expand" else twin.blocks[0].compress
        mod.register_forward_hook(lambda m, a, o: seen.append(o))
    idx = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(4))
    with ExpandCalls() as calls:
        twin(idx)
    assert calls.n == (0 if hooked else 1) and bool(seen) == bool(hooked)  # block 0's compress reads twice
    (la, ga, _), (lb, gb, _) = train_step(plain), train_step(twin)
    torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-6)
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")


def test_expansion_fold_needs_its_conditions(monkeypatch):
    """Off outside compile (by default), on CPU, without fused_delta and for a TC compressor: the modules run."""
    from ddl.state import ECExpander

    monkeypatch.setattr(fused, "supported_expand", lambda e: True)
    e = torch.randn(2, 5, 16)
    for kw, fold, want in (({}, None, False), ({}, True, True), ({"fused_delta": False}, True, False),
                           ({"compressor": "tc"}, True, False)):
        monkeypatch.setattr(fused, "FOLD_READOUT", fold)
        m = DDLModel(DDLConfig(**{**SMALL, "d_v": 4, "fused_delta": True, **kw}))
        assert isinstance(m.expand, ECExpander)
        assert (m.expand.expand_and_read(e, m.blocks[0].compress) is not None) is want, (kw, fold)
    monkeypatch.undo()
    monkeypatch.setattr(fused, "FOLD_READOUT", True)
    m = DDLModel(DDLConfig(**{**SMALL, "d_v": 4, "fused_delta": True}))
    assert m.expand.expand_and_read(e, m.blocks[0].compress) is None  # a CPU tensor


@pytest.mark.gpu
@cuda_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("T", "d"), [(50, 768), (7, 1000)])
def test_cuda_expand_read_matches_float64(dtype, T, d):
    """The small model's width and a masked one, K = 4, d_v = 4, on CUDA."""
    (e, w, W), (gX, gy) = ec_inputs(3, T, d, 4, 4, dtype)
    e, w, W = (t.detach().cuda().requires_grad_() for t in (e, w, W))
    X, y = fused.expand_read(e, w, W)
    got = torch.autograd.grad((X, y), (e, w, W), (gX.cuda(), gy.cuda()))
    ref = [t.detach().cpu().double().requires_grad_() for t in (e, w, W)]
    X64, y64 = expand_read64(*ref)
    want = torch.autograd.grad((X64, y64), ref, (gX.double(), gy.double()))
    assert_near(X.cpu(), X64, TOL[dtype], "X")
    assert_near(y.cpu(), (X.cpu().double() * W.detach().cpu().double()).sum(-1), TOL[dtype], "y")
    for n, a, b in zip(["e", "w", "W"], got, want, strict=True):
        assert_near(a.cpu(), b, TOL[dtype], f"grad_{n}")


@pytest.mark.gpu
@cuda_kernels
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:TensorFloat32 tensor cores:UserWarning")
def test_cuda_compiled_model_launches_the_expansion_kernels():
    """Compiled on CUDA (the fold on by default there), an EC + CC model launches the expansion's kernels once each
    way and its step matches the eager model's."""
    from torch._inductor.utils import run_and_get_code

    _, twin = models(block_size=64, d_v=4)
    twin = twin.cuda()
    with torch.no_grad():
        twin.expand.weight.normal_(0, 0.5)
    eager = copy.deepcopy(twin)
    torch._dynamo.reset()
    compiled = torch.compile(twin, fullgraph=True)
    idx = torch.randint(0, 97, (4, 64), device="cuda")
    _, codes = run_and_get_code(lambda: compiled(idx, idx.roll(-1, 1))[1].backward())
    code = "\n".join(codes)
    assert len(re.findall(r"\b_ec_fwd_kernel\w*\.run\(", code)) == 1
    assert len(re.findall(r"\b_ec_bwd_kernel\w*\.run\(", code)) == 1
    eager(idx, idx.roll(-1, 1))[1].backward()
    for (n, a), b in zip(twin.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.kernels
@pytest.mark.skipif(not INTERPRET, reason="the Triton kernels on CPU need triton importable and TRITON_INTERPRET=1")
def test_expansion_kernel_benchmark_runs_under_the_interpreter(tmp_path):
    """bench/ec_kernels.py end to end on a tiny shape: every launch it sweeps, forward and backward, runs, agrees
    with the default launch and is recorded."""
    res, rows = run_bench(tmp_path, "ec_kernels.py", "--tokens", "32", "--seq", "16", "--d", "16")
    assert {r["kernel"] for r in rows} == {"fwd", "bwd"} and len(rows) >= 16
    assert all(r["us"] > 0 and r["mb"] > 0 and r["rel_err"] < 1e-5 for r in rows)
    assert "TB/s" in res.stdout


# -- a narrow head's weight and bias gradients (NarrowLinear, d_v > 1) ---------------------------------------------
@pytest.mark.parametrize(("N", "n", "o"), [(300, 100, 4), (37, 768, 1), (513, 130, 3), (64, 16, 8)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_narrow_weight_grad_matches_float64(impl, N, n, o, dtype):
    """g^T x and sum_t g_t against float64, over token chunks and column blocks that end part-way (masked). g is
    drawn in x's dtype, so rounding it for the product (as autocast's Linear does) loses nothing and the only
    error left is the fp32 sums'."""
    torch.manual_seed(N + n + o)
    g = torch.randn(2, N, o).to(dtype).float()
    x = torch.randn(2, N, n).to(dtype)
    gw, gb = fused.narrow_weight_grad(g, x)
    assert gw.shape == (o, n) and gb.shape == (o,) and gw.dtype == gb.dtype == torch.float32
    want_w = g.reshape(-1, o).double().t() @ x.reshape(-1, n).double()
    torch.testing.assert_close(gw.double(), want_w, rtol=0, atol=1e-5 * want_w.abs().max().item())
    torch.testing.assert_close(gb.double(), g.double().sum((0, 1)), rtol=0, atol=1e-5 * N)


@pytest.mark.kernels
@pytest.mark.skipif(not INTERPRET, reason="the Triton kernels on CPU need triton importable and TRITON_INTERPRET=1")
@pytest.mark.parametrize("launch", [(64, 32, 64, 4), (32, 32, 32, 2), (128, 16, 128, 4)])
def test_narrow_weight_grad_launches_agree(launch):
    """Every launch shape gives the default's gradients (chunks and column blocks that end part-way, a ragged last
    chunk); a chunk that is not a whole number of steps is refused."""
    from ddl import _fused_kernels

    torch.manual_seed(1)
    g, x = torch.randn(211, 4).to(torch.bfloat16).float(), torch.randn(211, 100).to(torch.bfloat16)
    want = _fused_kernels.narrow_weight_grad(g, x)
    torch.testing.assert_close(_fused_kernels.narrow_weight_grad(g, x, launch), want, rtol=1e-6, atol=1e-4)
    with pytest.raises(ValueError, match="multiple of a step"):
        _fused_kernels.narrow_weight_grad(g, x, (48, 32, 64, 4))


def test_narrow_weight_grad_takes_fp32_inputs_in_pytorch(monkeypatch):
    """An fp32 x (no autocast) never reaches the kernel, whose product is in x's dtype on the tensor cores: the op's
    PyTorch formulas give the fp32 gradients."""
    monkeypatch.setattr(fused, "_on_triton", lambda t: pytest.fail("an fp32 x went to the kernel"))
    g, x = torch.randn(50, 4), torch.randn(50, 24)
    gw, gb = fused.narrow_weight_grad(g, x)
    torch.testing.assert_close(gw, g.t() @ x)
    torch.testing.assert_close(gb, g.sum(0))


def test_narrow_weight_grad_opcheck(impl):
    """opcheck's checks for the op on CPU: schema, fake tensor, autograd registration (none: it is a gradient)."""
    g, x = torch.randn(40, 4), torch.randn(40, 24).to(torch.bfloat16)
    tests = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(torch.ops.deltascope.narrow_weight_grad.default, (g, x), test_utils=tests)


@pytest.mark.parametrize("out", [1, 4])
def test_narrow_linear_kernel_grads_equal_linear(impl, monkeypatch, out):
    """Compiled (aot_eager), a NarrowLinear with matmul gradients and ``WGRAD_KERNEL`` takes its weight's and bias's
    gradients from the op, and with ``FWD_KERNEL`` (more than one output) its product, equal to nn.Linear's under
    bf16 autocast within its rounding; without them, cuBLAS, autograd's sum and inductor's reduction as before."""
    from ddl import layers

    torch.manual_seed(0)
    ref, nl = torch.nn.Linear(48, out), layers.NarrowLinear(48, out)
    nl.mm_grad = True
    nl.load_state_dict(ref.state_dict())
    x = torch.randn(3, 40, 48).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = torch.autograd.grad(ref(x).float().square().sum(), (ref.weight, ref.bias))
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def keep(codes):  # an aot_eager whose backward graph's code is kept
        return lambda gm, _: codes.append(gm.code) or make_boxed_func(gm.forward)

    for kernel in (True, False):
        monkeypatch.setattr(layers.NarrowLinear, "WGRAD_KERNEL", kernel)
        monkeypatch.setattr(layers.NarrowLinear, "FWD_KERNEL", kernel)
        forward, backward = [], []
        backend = aot_autograd(fw_compiler=keep(forward), bw_compiler=keep(backward))
        y = torch.compile(nl, backend=backend, fullgraph=True)(x)
        got = torch.autograd.grad(y.square().sum(), (nl.weight, nl.bias))
        torch._dynamo.reset()
        # the op, or where triton imports (a triton_op, traced through) its PyTorch formulas, which join gW and gb
        assert ("deltascope.narrow_weight_grad" in backward[0] or "aten.cat" in backward[0]) is kernel
        # the forward's op for more than one output only (its formulas: a matmul where the reduction has none)
        assert ("deltascope.narrow_product" in forward[0] or "aten.mm" in forward[0]) is (kernel and out > 1)
        torch.testing.assert_close(y, ref(x.float()), atol=2e-2 * y.abs().max().item(), rtol=0)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, atol=2e-2 * w.abs().max().item(), rtol=0)


@pytest.mark.gpu
@cuda_kernels
@pytest.mark.parametrize("out", [1, 4])
def test_cuda_narrow_linear_kernel_grads(monkeypatch, out):
    """On CUDA, compiled by inductor: the head's weight and bias gradients come from ``_narrow_wgrad_kernel`` and,
    for more than one output, its product from ``_narrow_fwd_kernel`` (one launch each), equal to the cuBLAS and
    reduction path's within bf16's rounding of g and W."""
    from torch._inductor.utils import run_and_get_code

    from ddl import layers

    torch.manual_seed(0)
    nl = layers.NarrowLinear(768, out).cuda()
    nl.mm_grad = True
    x = torch.randn(8, 1024, 768, device="cuda", dtype=torch.bfloat16)
    got = {}
    for kernel in (None, False):
        monkeypatch.setattr(layers.NarrowLinear, "WGRAD_KERNEL", kernel)
        monkeypatch.setattr(layers.NarrowLinear, "FWD_KERNEL", kernel)

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = torch.compile(nl, fullgraph=True)(x)
            return (y, *torch.autograd.grad(y.square().sum(), (nl.weight, nl.bias)))

        got[kernel], codes = run_and_get_code(step)
        torch._dynamo.reset()
        code = "\n".join(codes)
        assert len(re.findall(r"\b_narrow_wgrad_kernel\w*\.run\(", code)) == (1 if kernel is None else 0)
        assert len(re.findall(r"\b_narrow_fwd_kernel\w*\.run\(", code)) == (1 if kernel is None and out > 1 else 0)
    for a, b in zip(got[None], got[False], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-2 * b.abs().max().item())


@pytest.mark.kernels
@pytest.mark.skipif(not INTERPRET, reason="the Triton kernels on CPU need triton importable and TRITON_INTERPRET=1")
def test_narrow_wgrad_benchmark_runs_under_the_interpreter(tmp_path):
    """bench/narrow_wgrad.py end to end on a tiny shape: the paths before the kernels and every launch of them run,
    agree within bf16's rounding and are recorded."""
    res, rows = run_bench(tmp_path, "narrow_wgrad.py", "--tokens", "96", "--d", "40")
    seen = {(r["outputs"], r["part"], r["path"]) for r in rows}
    assert seen == {(1, "wgrad", "cublas"), (1, "wgrad", "kernel"), (4, "wgrad", "cublas"), (4, "wgrad", "kernel"),
                    (4, "fwd", "inductor"), (4, "fwd", "kernel")}
    assert len(rows) == 2 * 10 + 8  # per head: the path before and nine launches; the value head's product: 1 + 7
    assert all(r["us"] > 0 and r["mb"] > 0 and r["rel_err"] < 2e-2 for r in rows)
    assert "TB/s" in res.stdout


@pytest.mark.parametrize(("N", "n", "o", "bias"), [(300, 100, 4, True), (37, 768, 1, False), (513, 130, 3, True)])
def test_narrow_product_matches_float64(impl, N, n, o, bias):
    """x W^T + b against float64 over token blocks and column steps that end part-way. W is drawn in x's dtype, so
    rounding it for the product (as autocast's Linear does) loses nothing and only the fp32 sums err."""
    torch.manual_seed(N + o)
    x = torch.randn(2, N, n).to(torch.bfloat16)
    w = torch.randn(o, n).to(torch.bfloat16).float()
    b = torch.randn(o) if bias else None
    y = fused.narrow_product(x, w, b)
    want = x.double() @ w.double().t() + (b.double() if bias else 0)
    assert y.shape == (2, N, o) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), want, rtol=0, atol=1e-5 * want.abs().max().item())


@pytest.mark.kernels
@pytest.mark.skipif(not INTERPRET, reason="the Triton kernels on CPU need triton importable and TRITON_INTERPRET=1")
def test_narrow_product_launches_agree():
    """Other launch shapes give the default's product."""
    from ddl import _fused_kernels

    torch.manual_seed(2)
    x, w, b = torch.randn(211, 100).to(torch.bfloat16), torch.randn(4, 100), torch.randn(4)
    want = _fused_kernels.narrow_product(x, w, b)
    for launch in ((32, 64, 2), (128, 32, 4), (16, 128, 4)):
        torch.testing.assert_close(_fused_kernels.narrow_product(x, w, b, launch), want, rtol=1e-6, atol=1e-5)


def test_narrow_product_opcheck(impl):
    """opcheck's checks for the op on CPU, with and without a bias."""
    x, w = torch.randn(40, 24).to(torch.bfloat16), torch.randn(4, 24)
    tests = ("test_schema", "test_faketensor", "test_autograd_registration")
    for b in (torch.randn(4), None):
        torch.library.opcheck(torch.ops.deltascope.narrow_product.default, (x, w, b), test_utils=tests)
