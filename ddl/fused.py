"""The delta update as one opaque op: one fused Triton kernel forward, one backward.

Per token, with state X in R^{d x d_v} (d_v = 1: a d-vector), k = h / sqrt(||h||^2 + eps^2)::

    p = k^T X  (d_v)    delta = beta (v - p)    out = X + (k delta^T).to(X.dtype)

The unfused path (``DeltaResidual`` with its ``k_dir`` and ``write`` taps) materialises k, an fp32
(B, T, d) tensor, and reads it again in backward. Here each kernel reads h and X once and keeps k in
registers; backward gets only fp32 scalars a row from forward, rnorm = 1/sqrt(||h||^2 + eps^2) and
p, and recomputes k = rnorm h.

Backward, by hand (g = grad_out, (d, d_v); gk = k^T g, one reduction over d)::

    grad_v    = beta gk
    grad_beta = (v - p).gk
    grad_X    = g - beta k gk^T
    grad_k    = g delta - beta X gk
    grad_h    = rnorm (grad_k - (k.grad_k) k),   k.grad_k = gk.(delta - beta p)

the last from dk/dh = rnorm (I - k k^T) with k = rnorm h, exact for any eps (k is not quite unit).
tests/ddl/test_fused.py checks all four against torch.autograd in float64.

``torch.ops.deltascope.delta_update`` and its ``_backward`` are ``torch.library`` custom ops on the
expanded state (..., d, d_v), with fake kernels, so ``torch.compile(fullgraph=True)`` keeps each as
one node. They run the Triton kernels on CUDA (or on CPU tensors under TRITON_INTERPRET=1) and the
same formulas in PyTorch elsewhere, so the op and its hand-written backward are checked on machines
without triton. Triton is imported on the first launch only: ``import ddl.fused`` works without it.

``delta_update_read`` (d_v > 1; by default under ``torch.compile``: ``FOLD_READOUT``) also returns the next
sublayer's CC readout y = sum_j W[:, j] out[:, j] of its result; its backward takes y's gradient gy and adds
gy W^T to the state's gradient in registers. grad W = sum_t gy_t out_t is a product and a sum beside the op,
which inductor compiles into one reduction.

``expand_read`` (``ECExpander.expand_and_read``, under the same conditions) makes the EC expander's initial state and
block 0's CC readout of it in one kernel, and their gradients in one backward kernel.
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import Tensor

HAS_TRITON = importlib.util.find_spec("triton") is not None
MAX_TILE = 16384
"""Most elements of one token's padded (d, d_v) tile the kernels hold in registers; larger tiles run
the PyTorch formulas."""


def _tile(d: int, d_v: int) -> int:
    return 1 << ((d - 1).bit_length() + (d_v - 1).bit_length())  # next_power_of_2(d) * next_power_of_2(d_v)


def supported(X: Tensor, h: Tensor) -> bool:
    """Whether ``DeltaResidual`` should take the fused op for state X and sublayer output h (..., d):
    CUDA, Triton, and a tile of at most MAX_TILE elements."""
    d_v = X.shape[-1] if X.dim() > h.dim() else 1
    return X.is_cuda and HAS_TRITON and _tile(h.shape[-1], d_v) <= MAX_TILE


def delta_update_reference(X: Tensor, h: Tensor, v: Tensor, beta: Tensor, eps: float) -> Tensor:
    """The unfused PyTorch path, op for op as ``DeltaResidual`` (KDirection, Write) computes it.

    h (..., d); beta (..., 1) fp32; X (..., d) with v (..., 1) for d_v = 1, or X (..., d, d_v) with
    v (..., d_v) -> like X."""
    h = h.float()
    k = h * torch.rsqrt(h.square().sum(-1, keepdim=True) + eps**2)
    if X.dim() == h.dim():
        p = (k * X.float()).sum(-1, keepdim=True)
        return X + (k * (beta * (v - p))).to(X.dtype)
    p = (k.unsqueeze(-1) * X.float()).sum(-2)
    return X + (k.unsqueeze(-1) * (beta * (v - p)).unsqueeze(-2)).to(X.dtype)


def delta_update(X: Tensor, h: Tensor, v: Tensor, beta: Tensor, eps: float,
                 taps: bool = False) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """The fused op; same signature and result as :func:`delta_update_reference`.

    v and beta broadcast to (..., d_v) and (..., 1) and are taken in fp32; inputs need not be contiguous.
    ``taps``: also the kernel's row scalars, for observers: (out, 1/||h|| (..., 1), p = k^T X (..., d_v)),
    fp32 and without gradient."""
    scalar = X.dim() == h.dim()  # d_v = 1: X (..., d)
    Xe = X.unsqueeze(-1) if scalar else X  # (..., d, d_v)
    lead = h.shape[:-1]
    v, beta = v.float().expand(*lead, Xe.shape[-1]), beta.float().expand(*lead, 1)
    out, rnorm, p = torch.ops.deltascope.delta_update(Xe, h, v, beta, eps)
    out = out.squeeze(-1) if scalar else out
    return (out, rnorm, p) if taps else out


def _use_triton(X: Tensor) -> bool:
    return _tile(X.shape[-2], X.shape[-1]) <= MAX_TILE and _on_triton(X)


def _on_triton(X: Tensor) -> bool:
    """Whether the kernels can take X's device: CUDA with triton, or real CPU tensors under its interpreter."""
    if not HAS_TRITON:
        return False
    if X.is_cuda:
        return True
    # CPU tensors under Triton's interpreter, which wrap_triton does not trace: fake ones (shapes only) take the
    # PyTorch formulas
    from torch._subclasses.fake_tensor import is_fake

    return os.environ.get("TRITON_INTERPRET") == "1" and not is_fake(X)


def _rows(t: Tensor, *shape: int) -> Tensor:
    return t.contiguous().view(-1, *shape)  # tokens are rows


def _op_def(name: str):
    """The decorator of the four ops: ``torch.library.triton_op`` where triton imports, so that inductor sees
    the kernels through ``wrap_triton`` and launches them from its own generated code, with no custom op
    dispatch on the host (the custom op's Python layers cost about 0.3 ms a call under torch 2.11: a third of a
    d_v = 4 step's host time on the small preset, docs/PERFORMANCE.md). Without triton, a plain custom op whose
    fake kernel is its own body: the PyTorch formulas, which run on any tensors."""
    def define(fn):
        if HAS_TRITON:
            return torch.library.triton_op(name, fn, mutates_args=())
        op = torch.library.custom_op(name, fn, mutates_args=())
        op.register_fake(fn)
        return op
    return define


@_op_def("deltascope::delta_update")
def _op(X: Tensor, h: Tensor, v: Tensor, beta: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """X (..., d, d_v), h (..., d), v (..., d_v) and beta (..., 1) fp32 -> (out like X, rnorm (..., 1),
    p (..., d_v)); the last two fp32, kept for backward."""
    d, dv = X.shape[-2:]
    if X.numel() == 0 or not _use_triton(X):
        h32 = h.float()
        rnorm = torch.rsqrt(h32.square().sum(-1, keepdim=True) + eps**2)
        k = (h32 * rnorm).unsqueeze(-1)  # (..., d, 1)
        p = (k * X.float()).sum(-2)
        return (X + (k * (beta * (v - p)).unsqueeze(-2)).to(X.dtype)).contiguous(), rnorm, p
    from ddl import _fused_kernels

    out, rnorm, p = _fused_kernels.forward(_rows(X, d, dv), _rows(h, d), _rows(v, dv), _rows(beta, 1), eps)
    return out.view(X.shape), rnorm.view(beta.shape), p.view(v.shape)



@_op_def("deltascope::delta_update_backward")
def _op_backward(g: Tensor, X: Tensor, h: Tensor, v: Tensor, beta: Tensor, rnorm: Tensor,
                 p: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (grad_X, grad_h, grad_v, grad_beta) in the dtypes of X, h, v, beta (the last two fp32)."""
    d, dv = X.shape[-2:]
    if X.numel() == 0 or not _use_triton(X):
        return _backward_torch(g.float(), X, h, v, beta, rnorm, p)
    from ddl import _fused_kernels

    gX, gh, gv, gbeta = _fused_kernels.backward(_rows(g, d, dv), _rows(X, d, dv), _rows(h, d), _rows(v, dv),
                                                _rows(beta, 1), _rows(rnorm, 1), _rows(p, dv))
    return gX.view(X.shape), gh.view(h.shape), gv.view(v.shape), gbeta.view(beta.shape)


def _backward_torch(g32: Tensor, X: Tensor, h: Tensor, v: Tensor, beta: Tensor, rnorm: Tensor,
                    p: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The backward formulas in PyTorch, from an fp32 upstream gradient g32 like X."""
    x32 = X.float()
    k = h.float() * rnorm  # (..., d)
    gk = (g32 * k.unsqueeze(-1)).sum(-2)  # (..., d_v)
    delta = beta * (v - p)
    a = beta * gk
    grad_k = (g32 * delta.unsqueeze(-2) - x32 * a.unsqueeze(-2)).sum(-1)
    grad_h = rnorm * (grad_k - (gk * (delta - beta * p)).sum(-1, keepdim=True) * k)
    grad_X = g32 - k.unsqueeze(-1) * a.unsqueeze(-2)
    return (grad_X.to(X.dtype).contiguous(), grad_h.to(h.dtype).contiguous(), a,
            ((v - p) * gk).sum(-1, keepdim=True))



def _setup_context(ctx, inputs, output):
    X, h, v, beta, eps = inputs
    _, rnorm, p = output
    ctx.mark_non_differentiable(rnorm, p)  # saved row scalars, not results: no gradient flows into them
    ctx.save_for_backward(X, h, v, beta, rnorm, p)


def _backward(ctx, grad_out, _grad_rnorm, _grad_p):
    X, h, v, beta, rnorm, p = ctx.saved_tensors
    gX, gh, gv, gbeta = torch.ops.deltascope.delta_update_backward(grad_out, X, h, v, beta, rnorm, p)
    return gX, gh, gv, gbeta, None


_op.register_autograd(_backward, setup_context=_setup_context)


# -- the update with the next readout folded in (d_v > 1, a CC compressor next) ----------------------
FOLD_READOUT: bool | None = None
"""Whether, with ``fused_delta`` and a CC compressor, each update also computes the next sublayer's readout
(``DeltaResidual.update_and_read``): True always, False never, None (the default) inside ``torch.compile``
only. The fold's backward leaves grad W = sum_t gy_t out_t to a product and a sum, one inductor reduction
kernel a site; eagerly that product would be a state-sized fp32 temporary. On an H100 (small
preset, d_v = 4, docs/PERFORMANCE.md, the twelfth GPU session) the folded step ran 0.795x the additive baseline's
tokens/s against the unfolded op's 0.736x, at 1.1 GiB more peak memory (the update's result is kept for grad W).
``bench/throughput.py`` sets it with the variant suffixes ``:fold`` and ``:nofold``."""


def fold_readout() -> bool:
    """FOLD_READOUT resolved for the code now running (None: whether it is being compiled)."""
    return torch.compiler.is_compiling() if FOLD_READOUT is None else FOLD_READOUT


def delta_update_read_reference(X: Tensor, h: Tensor, v: Tensor, beta: Tensor, W: Tensor,
                                eps: float) -> tuple[Tensor, Tensor]:
    """The unfused path: the update, then ``CCCompressor``'s readout of its result by W_eff (d, d_v)."""
    out = delta_update_reference(X, h, v, beta, eps)
    return out, (out * W.to(X.dtype)).sum(-1)


def delta_update_read(X: Tensor, h: Tensor, v: Tensor, beta: Tensor, W: Tensor, eps: float,
                      taps: bool = False) -> tuple[Tensor, ...]:
    """The fused op on a (..., d, d_v) state, and the next sublayer's readout of its result in the same
    kernel: (out, y) with y[..., i] = sum_j W[i, j] out[..., i, j] in X's dtype, as
    :func:`delta_update_read_reference`. The readout then reads no state of its own, forward or backward:
    the backward kernel adds y's gradient to the state's; W's gradient is :func:`read_weight_grad`, beside it.
    ``taps``: (out, y, 1/||h||, p), as :func:`delta_update`'s."""
    lead = h.shape[:-1]
    v, beta = v.float().expand(*lead, X.shape[-1]), beta.float().expand(*lead, 1)
    out, y, rnorm, p = torch.ops.deltascope.delta_update_read(X, h, v, beta, W.to(X.dtype), eps)
    return (out, y, rnorm, p) if taps else (out, y)


@_op_def("deltascope::delta_update_read")
def _op_read(X: Tensor, h: Tensor, v: Tensor, beta: Tensor, W: Tensor,
             eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """X (..., d, d_v), h (..., d), v (..., d_v), beta (..., 1) fp32, W (d, d_v) like X -> (out like X,
    y (..., d) like X, rnorm (..., 1), p (..., d_v)); the last two fp32, kept for backward."""
    d, dv = X.shape[-2:]
    if X.numel() == 0 or not _use_triton(X):
        out, rnorm, p = _op(X, h, v, beta, eps)
        return out, (out.float() * W.float()).sum(-1).to(X.dtype), rnorm, p
    from ddl import _fused_kernels

    out, y, rnorm, p = _fused_kernels.forward_read(_rows(X, d, dv), _rows(h, d), _rows(v, dv), _rows(beta, 1),
                                                   W.contiguous(), eps)
    return out.view(X.shape), y.view(h.shape), rnorm.view(beta.shape), p.view(v.shape)



@_op_def("deltascope::delta_update_read_backward")
def _op_read_backward(g: Tensor, gy: Tensor, X: Tensor, h: Tensor, v: Tensor, beta: Tensor, W: Tensor,
                      rnorm: Tensor, p: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (grad_X, grad_h, grad_v, grad_beta), each in its input's dtype (v, beta fp32), the readout's gradient gy
    joined to the state's as g + gy W^T. grad W is not here: see :func:`_backward_read`."""
    d, dv = X.shape[-2:]
    if X.numel() == 0 or not _use_triton(X):
        return _backward_torch(g.float() + gy.float().unsqueeze(-1) * W.float(), X, h, v, beta, rnorm, p)
    from ddl import _fused_kernels

    gX, gh, gv, gbeta = _fused_kernels.backward_read(
        _rows(g, d, dv), _rows(gy, d), _rows(X, d, dv), _rows(h, d), _rows(v, dv), _rows(beta, 1), W.contiguous(),
        _rows(rnorm, 1), _rows(p, dv))
    return gX.view(X.shape), gh.view(h.shape), gv.view(v.shape), gbeta.view(beta.shape)



def _setup_read(ctx, inputs, output):
    X, h, v, beta, W, eps = inputs
    out, _, rnorm, p = output
    ctx.mark_non_differentiable(rnorm, p)
    ctx.save_for_backward(X, out, h, v, beta, W, rnorm, p)


def read_weight_grad(gy: Tensor, out: Tensor) -> Tensor:
    """grad W = sum_t gy_t out_t, (d, d_v) fp32, of the readout y = sum_j W[:, j] out[:, j]: gy (..., d), out
    (..., d, d_v), the update's result."""
    return (gy.float().unsqueeze(-1) * out.float()).sum(tuple(range(out.dim() - 2)))


def _backward_read(ctx, grad_out, grad_y, _grad_rnorm, _grad_p):
    """grad W = sum_t gy_t out_t is a product and a sum outside the op: compiled, one inductor reduction that
    reads the update's result and gy (56 us a site on an H100). Summed in the kernels, it cost more than it
    saved (``ddl._fused_kernels.CHUNK_LAUNCH``). Keeping ``out``, the forward's result, for it costs 1.1 GiB
    of peak memory on the small preset."""
    X, out, h, v, beta, W, rnorm, p = ctx.saved_tensors
    grad_out = torch.zeros_like(X) if grad_out is None else grad_out
    grad_y = torch.zeros_like(h, dtype=X.dtype) if grad_y is None else grad_y
    gX, gh, gv, gbeta = torch.ops.deltascope.delta_update_read_backward(grad_out, grad_y, X, h, v, beta, W, rnorm, p)
    return gX, gh, gv, gbeta, read_weight_grad(grad_y, out).to(W.dtype), None


_op_read.register_autograd(_backward_read, setup_context=_setup_read)


# -- EC expansion with the first CC readout folded in ------------------------------------------------------------
def supported_expand(e: Tensor) -> bool:
    """Whether ``ECExpander`` should take the fused expansion for an embedding e (B, T, d): CUDA and Triton."""
    return e.is_cuda and HAS_TRITON


def shifted_sum(e: Tensor, w: Tensor) -> Tensor:
    """``ECExpander``'s causal conv as K shifted products in fp32, rounded to e's dtype: e (B, T, d), w (d, d_v, K)
    with w[..., K - 1] the current token's tap -> X (B, T, d, d_v)."""
    T, K = e.shape[1], w.shape[2]
    ep = torch.nn.functional.pad(e.float(), (0, 0, K - 1, 0))  # zeros before each sequence's start
    return sum(ep[:, q:q + T, :, None] * w.float()[:, :, q] for q in range(K)).to(e.dtype)


def expand_read_reference(e: Tensor, w: Tensor, W: Tensor) -> tuple[Tensor, Tensor]:
    """The unfused path: :func:`shifted_sum`, then ``CCCompressor``'s readout of the result by W (d, d_v), as
    compiled (one rounding) -> (X (B, T, d, d_v), y (B, T, d))."""
    X = shifted_sum(e, w)
    return X, (X.float() * W.float()).sum(-1).to(e.dtype)


def expand_read(e: Tensor, w: Tensor, W: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`expand_read_reference` as one op: one Triton kernel forward, one backward. The state is written once
    and block 0's readout of it comes from the same kernel; the backward joins the readout's gradient to the
    state's in registers and sums the gradients of w and W over the tokens there. Dtypes as given (the caller
    casts under autocast); grads in the inputs' dtypes."""
    return torch.ops.deltascope.expand_read(e, w, W)


@_op_def("deltascope::expand_read")
def _op_expand(e: Tensor, w: Tensor, W: Tensor) -> tuple[Tensor, Tensor]:
    """e (B, T, d), w (d, d_v, K), W (d, d_v) -> (X (B, T, d, d_v), y (B, T, d)), both in e's dtype."""
    if e.numel() == 0 or not _use_triton(e.unsqueeze(-1)):  # a (d, 1) tile: the check is the device's
        X, y = expand_read_reference(e, w, W)
        return X.contiguous(), y.contiguous()
    from ddl import _fused_kernels

    return _fused_kernels.ec_forward(e.contiguous(), w.contiguous(), W.contiguous())


@_op_def("deltascope::expand_read_backward")
def _op_expand_backward(gX: Tensor, gy: Tensor, e: Tensor, w: Tensor, W: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """-> (grad e, grad w, grad W) in the dtypes of e, w and W."""
    if e.numel() == 0 or not _use_triton(e.unsqueeze(-1)):
        ge, gw, gW = _expand_backward_torch(gX.float(), gy.float(), e, w, W)
    else:
        from ddl import _fused_kernels

        ge, gw, gW = _fused_kernels.ec_backward(gX.contiguous(), gy.contiguous(), e.contiguous(), w.contiguous(),
                                                W.contiguous())
    return ge.to(e.dtype), gw.to(w.dtype), gW.to(W.dtype)


def _expand_backward_torch(g32: Tensor, gy32: Tensor, e: Tensor, w: Tensor, W: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The backward in PyTorch, fp32: g = gX + gy W^T; with s = K - 1 - q the tap's lag, grad e[t] = sum_q g[t + s]
    w[..., q], grad w[..., q] = sum_t g[t + s] e[t], grad W = sum_q w[..., q] sum_t gy[t + s] e[t]."""
    T, K = e.shape[1], w.shape[2]
    w32, e32 = w.float(), e.float()
    g = g32 + gy32.unsqueeze(-1) * W.float()
    gp = torch.nn.functional.pad(g, (0, 0, 0, 0, 0, K - 1))  # zeros past each sequence's end
    gyp = torch.nn.functional.pad(gy32, (0, 0, 0, K - 1))
    ge = sum((gp[:, K - 1 - q:K - 1 - q + T] * w32[:, :, q]).sum(-1) for q in range(K))
    gw = torch.stack([(gp[:, K - 1 - q:K - 1 - q + T] * e32.unsqueeze(-1)).sum((0, 1)) for q in range(K)], -1)
    c = torch.stack([(gyp[:, K - 1 - q:K - 1 - q + T] * e32).sum((0, 1)) for q in range(K)], -1)  # (d, K)
    return ge, gw, (w32 * c.unsqueeze(1)).sum(-1)


def _setup_expand(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward_expand(ctx, grad_X, grad_y):
    e, w, W = ctx.saved_tensors
    grad_X = torch.zeros(*e.shape, w.shape[1], dtype=e.dtype, device=e.device) if grad_X is None else grad_X
    grad_y = torch.zeros_like(e) if grad_y is None else grad_y
    return torch.ops.deltascope.expand_read_backward(grad_X, grad_y, e, w, W)


_op_expand.register_autograd(_backward_expand, setup_context=_setup_expand)


# -- a narrow head's weight and bias gradients (ddl.layers.NarrowLinear) -------------------------------------------
def narrow_weight_grad(g: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """The weight and bias gradients of ``y = x W^T + b`` with o <= 8 outputs: g (..., o), x (..., n) -> (g^T x
    (o, n), sum_t g_t (o,)), fp32, g taken in x's dtype for the weight's, as autocast's Linear does. On CUDA (or
    under Triton's interpreter) with x in bf16 or fp16, one Triton kernel reads x once for both and a small sum
    finishes them: it replaces a transposing copy of g, a cuBLAS matmul whose one-to-four-row shape picks a slow
    kernel (a 1 x 16384 by 16384 x 768 gate took 21 us on an H100, for 25 MB), the bias's two-launch sum and a
    cast (``ddl.layers._NarrowProduct``)."""
    n = x.shape[-1]
    both = torch.ops.deltascope.narrow_weight_grad(g.reshape(-1, g.shape[-1]), x.reshape(-1, n))
    return both[:, :n], both[:, n]


@_op_def("deltascope::narrow_weight_grad")
def _op_narrow_wgrad(g: Tensor, x: Tensor) -> Tensor:
    """g (N, o), x (N, n) -> (o, n + 1) fp32: gW in the first n columns, gb in the last (one output: two would be
    views of one buffer, which a custom op may not return)."""
    if x.numel() == 0 or x.dtype not in (torch.bfloat16, torch.float16) or not _on_triton(x):
        g32 = g.float()
        return torch.cat((torch.mm(g32.t().to(x.dtype).float(), x.float()), g32.sum(0)[:, None]), 1)
    from ddl import _fused_kernels

    return _fused_kernels.narrow_weight_grad(g.float().contiguous(), x.contiguous())


def narrow_product(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """``y = x W^T + b`` for a narrow head, fp32: x (..., n), w (o, n), b (o,) or None -> (..., o). On CUDA (or under
    Triton's interpreter) with x in bf16 or fp16, one Triton kernel reads each token's row once and multiplies it
    on the tensor cores by W rounded to x's dtype (as autocast's Linear rounds it); inductor's reduction over the
    (..., o, n) product read the row once per output (24 us a d_v = 4 value head on an H100, for a 9 us read)."""
    y = torch.ops.deltascope.narrow_product(x.reshape(-1, x.shape[-1]), w, b)
    return y.view(*x.shape[:-1], w.shape[0])


@_op_def("deltascope::narrow_product")
def _op_narrow_product(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """x (N, n), w (o, n), b (o,) or None -> (N, o) fp32."""
    if x.numel() == 0 or x.dtype not in (torch.bfloat16, torch.float16) or not _on_triton(x):
        y = x.float() @ w.to(x.dtype).float().t()
        return y if b is None else y + b.float()
    from ddl import _fused_kernels

    return _fused_kernels.narrow_product(x.contiguous(), w.contiguous(), None if b is None else b.contiguous())
