"""The EC expansion's fused kernels alone (``ddl.fused.expand_read``): time and bandwidth over a sweep of launches.

Each launch is ``EC_LAUNCH``'s (tokens a block, rows of d a block, warps, token blocks a backward program); the
forward and the backward are captured as CUDA graphs and their replays timed (``fused_kernels.timed``). Bytes: e
read and X, y written forward; gX, gy and e read and grad e written backward (each once).

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

LAUNCHES = [(16, 64, 4, 16), (16, 64, 4, 4), (16, 64, 4, 1), (8, 64, 4, 4), (32, 32, 4, 2), (16, 128, 8, 2),
            (4, 128, 4, 4), (8, 128, 4, 2), (32, 64, 8, 1), (16, 32, 2, 4)]


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
    fwd_mb, bwd_mb = (eb + 4 * eb + eb) / 1e6, (4 * eb + eb + eb + eb) / 1e6
    print(f"{'launch':<18}{'fwd us':>9}{'TB/s':>7}{'bwd us':>9}{'TB/s':>7}")
    for launch in LAUNCHES:
        f = timed(lambda launch=launch: fk.ec_forward(e, w, W, launch), args.iters)
        b = timed(lambda launch=launch: fk.ec_backward(gX, gy, e, w, W, launch), args.iters)
        print(f"{str(launch):<18}{f:>9.1f}{fwd_mb / f:>7.2f}{b:>9.1f}{bwd_mb / b:>7.2f}", flush=True)
        if args.json:
            with open(args.json, "a") as fh:
                fh.write(json.dumps({"launch": launch, "fwd_us": f, "bwd_us": b, "fwd_mb": fwd_mb, "bwd_mb": bwd_mb,
                                     "tokens": args.tokens, "d": args.d, "device": torch.cuda.get_device_name()
                                     if dev == "cuda" else "cpu", "torch": torch.__version__}) + "\n")


if __name__ == "__main__":
    main()
