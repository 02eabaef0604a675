"""The eager probe's Triton reductions (``probes._stats_kernels``) equal ``_stats.stacked_reduce``, the torch
reference, on fresh random inputs: under Triton's CPU interpreter (triton importable and TRITON_INTERPRET=1 set
before the run: ``make test-kernels``, part of ``make test``, runs the ``kernels``-marked ones) and on CUDA
(``-m gpu``). Without either they skip."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from probes import _stats

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1"
CUDA = HAS_TRITON and torch.cuda.is_available()


def sites(S, B, T, d, dv, x_dtype, h_dtype, device, seed=0, poison=False):
    g = torch.Generator().manual_seed(seed)
    xs = (B, T, d) if dv == 1 else (B, T, d, dv)
    X = tuple((torch.randn(xs, generator=g) * (i + 1)).to(x_dtype).to(device) for i in range(S))
    h = [(torch.randn(B, T, d, generator=g) * 3).to(h_dtype) for _ in range(S)]
    k = [torch.nn.functional.normalize(x.float(), dim=-1) for x in h]
    for i in range(1, S):  # neighbours that share a direction: cosines far from 0
        k[i] = torch.nn.functional.normalize(k[i] + 2 * k[i - 1], dim=-1)
    if poison:  # a NaN and an inf in h at sampled tokens, and a NaN in k
        h[1][0, 0, 3], h[-1][B - 1, 0, d - 1], k[0][0, 0, 1] = float("nan"), float("inf"), float("nan")
    return X, tuple(t.to(device) for t in h), tuple(t.to(device) for t in k)


def check(device, S, B, T, d, dv, stride, x_dtype=torch.float32, h_dtype=torch.bfloat16, poison=False, eps=None):
    """``eps`` given: no k; both sides make it from h as ``ddl.delta.KDirection(eps)`` does."""
    from probes import _stats_kernels

    X, h, k = sites(S, B, T, d, dv, x_dtype, h_dtype, device, poison=poison)
    if eps is not None:
        k = None
    assert _stats_kernels.supported(X, h, k)
    xn, kred = _stats_kernels.stacked_reduce(X, h, k, stride, eps)
    cpu = lambda ts: None if ts is None else tuple(t.cpu() for t in ts)  # noqa: E731
    xn_ref, kred_ref = _stats.stacked_reduce(cpu(X), cpu(h), cpu(k), stride, eps)
    names = ("hn", "kn", "nxt", "ksum", "conc", "nonfinite_h", "cos")
    for name, a, b in zip(("xn", *names), (xn, *kred), (xn_ref, *kred_ref), strict=True):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a.cpu(), b.float(), rtol=2e-5, atol=1e-4, equal_nan=True, msg=name)
    if poison:
        assert kred[5].tolist()[:2] == [0.0, 1.0] and kred[5][-1].item() == 1.0


CASES = [  # sites, B, T, d, d_v, token stride
    (3, 2, 9, 40, 1, 1),
    (3, 2, 9, 40, 1, 2),  # T - 1 a multiple of the stride: the last sampled token has no next one
    (2, 3, 10, 24, 3, 3),
    (2, 1, 7, 1030, 4, 2),  # rows wider than one 1024 chunk
]


@pytest.mark.kernels
@pytest.mark.skipif(not INTERPRET, reason="needs triton importable and TRITON_INTERPRET=1 (its CPU interpreter)")
@pytest.mark.parametrize("S,B,T,d,dv,stride", CASES)
def test_kernels_equal_the_torch_reductions_interpreted(S, B, T, d, dv, stride):
    check("cpu", S, B, T, d, dv, stride, x_dtype=torch.float32 if dv == 1 else torch.bfloat16)


@pytest.mark.kernels
@pytest.mark.skipif(not INTERPRET, reason="needs triton importable and TRITON_INTERPRET=1 (its CPU interpreter)")
@pytest.mark.parametrize("S,B,T,d,dv,stride", CASES)
@pytest.mark.parametrize("eps", [1e-5, 0.7])
def test_kernels_making_k_from_h_equal_the_torch_reductions_interpreted(S, B, T, d, dv, stride, eps):
    check("cpu", S, B, T, d, dv, stride, x_dtype=torch.float32 if dv == 1 else torch.bfloat16, eps=eps)


@pytest.mark.kernels
@pytest.mark.skipif(not INTERPRET, reason="needs triton importable and TRITON_INTERPRET=1 (its CPU interpreter)")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, on the NaN the test plants
def test_kernels_count_non_finite_h_and_carry_nan_interpreted():
    check("cpu", 3, 2, 9, 40, 1, 2, poison=True)
    check("cpu", 3, 2, 9, 40, 1, 2, poison=True, eps=1e-5)


@pytest.mark.parametrize("stride", [1, 3])
def test_k_made_from_h_is_k_dir_s_k(stride):
    """The torch reference that makes k from h gives what it gives for ``ddl.delta.KDirection``'s own k."""
    from ddl.delta import KDirection

    X, h, _ = sites(3, 2, 10, 16, 2, torch.float32, torch.bfloat16, "cpu")
    kdir = KDirection(0.3)
    xn, red = _stats.stacked_reduce(X, h, None, stride, 0.3)
    xn_k, red_k = _stats.stacked_reduce(X, h, tuple(kdir(t) for t in h), stride)
    torch.testing.assert_close(xn, xn_k)
    for a, b in zip(red, red_k, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA and triton")
@pytest.mark.parametrize("S,B,T,d,dv,stride", [*CASES, (24, 4, 256, 768, 1, 8), (24, 2, 256, 768, 4, 8)])
def test_kernels_equal_the_torch_reductions_cuda(S, B, T, d, dv, stride):
    for eps in (None, 1e-5):
        check("cuda", S, B, T, d, dv, stride, x_dtype=torch.float32 if dv == 1 else torch.bfloat16, eps=eps)
        check("cuda", 3, 2, 9, 40, 1, 2, poison=True, eps=eps)


@pytest.mark.kernels
def test_unsupported_sites_are_refused():
    """Mixed dtypes or a non-contiguous tensor take the compiled torch path instead (no kernel launch)."""
    if not HAS_TRITON:
        pytest.skip("needs triton importable")
    from probes import _stats_kernels

    X, h, k = sites(2, 1, 4, 8, 1, torch.float32, torch.bfloat16, "cpu")
    assert _stats_kernels.supported(X, h, k)
    assert not _stats_kernels.supported(X, (h[0], h[1].float()), k)
    assert not _stats_kernels.supported(X, h, (k[0], k[1].transpose(0, 1)))
    assert _stats_kernels.supported(X, h, None)
    assert not _stats_kernels.supported(X, (h[0], h[1].transpose(0, 1)), None)


@pytest.mark.kernels
@pytest.mark.skipif(not INTERPRET, reason="needs triton importable and TRITON_INTERPRET=1 (its CPU interpreter)")
@pytest.mark.parametrize("stride", [1, 3])
def test_the_op_of_a_compiled_model_is_the_kernels_interpreted(stride):
    """``deltascope::probe_rows`` passes torch.library's checks (its fake, under AOT dispatch) and gives the torch
    reductions, k made from h, and the sites' readouts p stacked."""
    import probes._stats_kernels  # noqa: F401  (registers the op)

    X, h, _ = sites(3, 2, 9, 40, 2, torch.bfloat16, torch.bfloat16, "cpu")
    p = [torch.randn(2, 9, 2) for _ in X]
    args = (list(X), list(h), [], p, stride, 1e-5)
    torch.library.opcheck(torch.ops.deltascope.probe_rows.default, args)
    got = torch.ops.deltascope.probe_rows(*args)
    xn, red = _stats.stacked_reduce(X, h, None, stride, 1e-5)
    assert len(got) == 9 and got[-1].shape == (3, 2, 9, 2)
    for a, b in zip(got, (xn, *red, torch.stack(p)), strict=True):
        torch.testing.assert_close(a, b.float(), rtol=2e-5, atol=1e-4)


@pytest.mark.kernels
@pytest.mark.skipif(not INTERPRET, reason="needs triton importable and TRITON_INTERPRET=1 (its CPU interpreter)")
@pytest.mark.parametrize("d_v", [1, 4])
def test_a_compiled_model_reduces_its_sites_in_one_op_interpreted(monkeypatch, d_v):
    """In a model the user compiles (fullgraph), the log-step graph calls the op once for all sites, whose rows
    the kernels read in place, and the statistics equal the eager probe's (torch ops there)."""
    import torch._dynamo.testing

    import probes._hooks
    from probes import MemorySink, Probe
    from tests.probes.conftest import assert_stats_close, batch, tiny

    monkeypatch.setattr(probes._hooks, "KERNEL_DEVICES", ("cuda", "cpu"))
    torch._dynamo.reset()
    eager, twin = tiny(n_layer=2, block_size=16, d_v=d_v), tiny(n_layer=2, block_size=16, d_v=d_v)
    twin.load_state_dict(eager.state_dict())
    se, sc = MemorySink(), MemorySink()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    kw = {"every": 2, "token_stride": 3}
    with Probe(eager, sinks=[se], **kw) as pe, Probe(twin, sinks=[sc], **kw) as pc:
        compiled = torch.compile(twin, fullgraph=True, backend=counter)
        for step in range(3):  # log, idle, log
            x = batch(eager, 2, T=16, seed=step)
            eager(x, x)[1].backward()
            compiled(x, x)[1].backward()
            pe.step(step)
            pc.step(step)
    calls = [sum(str(n.target).startswith("deltascope.probe_rows") for n in gm.graph.nodes) for gm in counter.graphs]
    assert sorted(calls) == [0, 1]  # the idle graph and the log-step one
    assert [r.step for r in sc.records] == [r.step for r in se.records] == [0, 2]
    for a, b in zip(sc.records, se.records, strict=True):
        assert_stats_close(a.scalars, b.scalars, rtol=1e-4, atol=1e-5)
        assert {k: v.counts for k, v in a.hists.items()} == {k: v.counts for k, v in b.hists.items()}
