"""A narrow head's product and its weight and bias gradients alone: the Triton kernels (``ddl.fused.narrow_product``,
``ddl.fused.narrow_weight_grad``) against the paths they replace, over a sweep of their launches.

The heads are the DDL gate (1 output) and the d_v = 4 value head (4 outputs) over d = 768, as a compiled small-preset
step runs them: g (tokens, o) fp32 and x (tokens, d) bf16. ``cublas`` is what the compiled step ran before the kernel:
g transposed and rounded to bf16, a cuBLAS matmul, its result cast to fp32, and the bias's sum over the tokens (four
launches). ``kernel`` rows are ``NARROW_WGRAD_LAUNCH``'s (tokens a program, tokens a step, columns a program, warps),
the kernel and the sum that finishes its partials. Each is captured as a CUDA graph and its replays timed
(``fused_kernels.timed``). Bytes: x and g read once. Beside each result, its largest difference from the cuBLAS
path's, relative to its largest entry (the kernel sums in another order).

The product (``fwd`` rows, heads of more than one output): ``inductor`` is the reduction over the (tokens, o, d) product
that a compiled step runs without the kernel, compiled alone; ``kernel`` rows are ``NARROW_FWD_LAUNCH``'s (tokens a
program, columns a step, warps). Bytes: x read once, y written.

    python bench/narrow_wgrad.py [--tokens 16384] [--d 768] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
from fused_kernels import timed  # noqa: E402

FWD_LAUNCHES = [None, (32, 128, 4), (128, 128, 4), (64, 64, 4), (64, 256, 8), (32, 64, 2), (128, 64, 8)]
LAUNCHES = [None, (128, 64, 128, 4), (512, 64, 128, 4), (256, 32, 128, 4), (256, 64, 256, 8), (256, 64, 64, 4),
            (256, 128, 128, 8), (1024, 64, 128, 4), (128, 32, 64, 2)]


def cublas(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The path before the kernel, as (o, d + 1): gW beside gb."""
    rows = g.t().to(x.dtype).contiguous()
    return torch.cat((torch.mm(rows, x).float(), g.sum(0)[:, None]), 1)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--outputs", default="1,4", help="the heads' output counts")
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--json")
    args = p.parse_args()
    from ddl import _fused_kernels as fk

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(args.tokens, args.d, device=dev, generator=gen).to(torch.bfloat16)
    kernels = dev == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    print(f"{'o':>2} {'part':<6}{'path':<9}{'launch':<22}{'us':>9}{'TB/s':>7}  rel.err")
    for o in (int(n) for n in args.outputs.split(",")):
        g = torch.randn(args.tokens, o, device=dev, generator=gen)
        w = torch.randn(o, args.d, device=dev, generator=gen) / args.d**0.5
        b = torch.randn(o, device=dev, generator=gen)
        parts = [("wgrad", (x.numel() * 2 + g.numel() * 4) / 1e6, cublas(g, x),
                  [("cublas", None, lambda g=g: cublas(g, x))]
                  + [("kernel", launch, lambda launch=launch, g=g: fk.narrow_weight_grad(g, x, launch))
                     for launch in (LAUNCHES if kernels else [])])]
        if o > 1:
            reduction = torch.compile(lambda x, w, b: (x.float().unsqueeze(-2) * w.float()).sum(-1) + b)
            parts.append(("fwd", (x.numel() * 2 + g.numel() * 4) / 1e6, reduction(x, w.to(x.dtype).float(), b),
                          [("inductor", None, lambda w=w, b=b, f=reduction: f(x, w, b))]
                          + [("kernel", launch, lambda launch=launch, w=w, b=b: fk.narrow_product(x, w, b, launch))
                             for launch in (FWD_LAUNCHES if kernels else [])]))
        for part, mb, want, runs in parts:
            for path, launch, run in runs:
                us = timed(run, args.iters)
                got = run()
                err = ((got - want).abs().max() / want.abs().max()).item()
                print(f"{o:>2} {part:<6}{path:<9}{str(launch or 'default'):<22}{us:>9.1f}{mb / us:>7.2f}  {err:.1e}",
                      flush=True)
                if args.json:
                    with open(args.json, "a") as fh:
                        fh.write(json.dumps({"outputs": o, "part": part, "path": path, "launch": launch, "us": us,
                                             "mb": mb, "rel_err": err, "tokens": args.tokens, "d": args.d,
                                             "device": device, "torch": torch.__version__}) + "\n")


if __name__ == "__main__":
    main()
