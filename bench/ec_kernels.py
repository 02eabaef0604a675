"""The EC expansion's fused kernels alone (``ddl.fused.expand_read``): time and bandwidth over a sweep of launches.

The forward's launches are ``EC_FWD_LAUNCH``'s (tokens a program, rows of d a program, warps), the backward's
``EC_BWD_LAUNCH``'s (tokens a block, rows of d a program, warps, token blocks a program); each kernel is captured as
a CUDA graph and its replays timed (``fused_kernels.timed``). Bytes: e read and X, y written forward; gX, gy and e read
and grad e written backward (each once). Beside each result, its largest difference from the default launch's,
relative to that result's largest entry (bf16 outputs differ in their last bit where sums run in another order).

    python bench/ec_kernels.py [--tokens 16384] [--seq 1024] [--d 768] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
from fused_kernels import timed  # noqa: E402

FWD_LAUNCHES = [(4, 128, 4), (4, 64, 2), (8, 128, 4), (8, 64, 2), (4, 256, 8), (2, 128, 4), (4, 32, 1), (16, 32, 2)]
BWD_LAUNCHES = [(1, 64, 2, 64), (1, 128, 4, 64), (1, 64, 2, 128), (1, 32, 1, 64), (1, 128, 4, 128), (2, 64, 2, 64),
                (2, 32, 1, 32), (1, 64, 2, 32), (4, 32, 1, 16), (1, 256, 8, 64)]


def _rel_err(got, want) -> float:
    return max((a.float() - b.float()).abs().max().item() / (b.float().abs().max().item() + 1e-30)
               for a, b in zip(got, want, strict=True))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--json")
    args = p.parse_args()
    from ddl import _fused_kernels as fk

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dv, K, dt = 4, 4, torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    B = args.tokens // args.seq
    e = torch.randn(B, args.seq, args.d, device=dev, generator=g).to(dt)
    w = torch.randn(args.d, dv, K, device=dev, generator=g).to(dt)
    W = torch.randn(args.d, dv, device=dev, generator=g).to(dt)
    gX = torch.randn(B, args.seq, args.d, dv, device=dev, generator=g).to(dt)
    gy = torch.randn_like(e)
    eb = e.numel() * 2
    mb = {"fwd": (eb + 4 * eb + eb) / 1e6, "bwd": (4 * eb + eb + eb + eb) / 1e6}
    runs = {"fwd": lambda launch: fk.ec_forward(e, w, W, launch),
            "bwd": lambda launch: fk.ec_backward(gX, gy, e, w, W, launch)}
    want = {kernel: run(None) for kernel, run in runs.items()}  # the default launches'
    device = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    print(f"{'kernel':<8}{'launch':<20}{'us':>9}{'TB/s':>7}  rel.err")
    for kernel, launches in (("fwd", FWD_LAUNCHES), ("bwd", BWD_LAUNCHES)):
        for launch in launches:
            us = timed(lambda launch=launch, kernel=kernel: runs[kernel](launch), args.iters)
            err = _rel_err(runs[kernel](launch), want[kernel])
            print(f"{kernel:<8}{str(launch):<20}{us:>9.1f}{mb[kernel] / us:>7.2f}  {err:.1e}", flush=True)
            if args.json:
                with open(args.json, "a") as fh:
                    fh.write(json.dumps({"kernel": kernel, "launch": launch, "us": us, "mb": mb[kernel],
                                         "rel_err": err, "tokens": args.tokens, "d": args.d, "device": device,
                                         "torch": torch.__version__}) + "\n")


if __name__ == "__main__":
    main()
