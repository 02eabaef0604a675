"""The eager probe's Triton reductions (``probes._stats_kernels``) equal ``_stats.stacked_reduce``, the torch
reference, on fresh random inputs: under Triton's CPU interpreter (triton importable and TRITON_INTERPRET=1 set
before the run) and on CUDA (``-m gpu``). Without either they skip."""

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


def check(device, S, B, T, d, dv, stride, x_dtype=torch.float32, h_dtype=torch.bfloat16, poison=False):
    from probes import _stats_kernels

    X, h, k = sites(S, B, T, d, dv, x_dtype, h_dtype, device, poison=poison)
    assert _stats_kernels.supported(X, h, k)
    xn, kred = _stats_kernels.stacked_reduce(X, h, k, stride)
    xn_ref, kred_ref = _stats.stacked_reduce(tuple(t.cpu() for t in X), tuple(t.cpu() for t in h),
                                             tuple(t.cpu() for t in k), stride)
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


@pytest.mark.skipif(not INTERPRET, reason="needs triton importable and TRITON_INTERPRET=1 (its CPU interpreter)")
@pytest.mark.parametrize("S,B,T,d,dv,stride", CASES)
def test_kernels_equal_the_torch_reductions_interpreted(S, B, T, d, dv, stride):
    check("cpu", S, B, T, d, dv, stride, x_dtype=torch.float32 if dv == 1 else torch.bfloat16)


@pytest.mark.skipif(not INTERPRET, reason="needs triton importable and TRITON_INTERPRET=1 (its CPU interpreter)")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, on the NaN the test plants
def test_kernels_count_non_finite_h_and_carry_nan_interpreted():
    check("cpu", 3, 2, 9, 40, 1, 2, poison=True)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA and triton")
@pytest.mark.parametrize("S,B,T,d,dv,stride", [*CASES, (24, 4, 256, 768, 1, 8), (24, 2, 256, 768, 4, 8)])
def test_kernels_equal_the_torch_reductions_cuda(S, B, T, d, dv, stride):
    check("cuda", S, B, T, d, dv, stride, x_dtype=torch.float32 if dv == 1 else torch.bfloat16)
    check("cuda", 3, 2, 9, 40, 1, 2, poison=True)


def test_unsupported_sites_are_refused():
    """Mixed dtypes or a non-contiguous tensor take the compiled torch path instead (no kernel launch)."""
    if not HAS_TRITON:
        pytest.skip("needs triton importable")
    from probes import _stats_kernels

    X, h, k = sites(2, 1, 4, 8, 1, torch.float32, torch.bfloat16, "cpu")
    assert _stats_kernels.supported(X, h, k)
    assert not _stats_kernels.supported(X, (h[0], h[1].float()), k)
    assert not _stats_kernels.supported(X, h, (k[0], k[1].transpose(0, 1)))
