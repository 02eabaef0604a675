"""The fused delta update's Triton kernels alone: time, bandwidth, and a sweep of their launch shape.

For each state shape (d_v = 1: fp32 state, as a compiled d_v = 1 model carries it; d_v = 4: bf16, as EC
makes it) and each launch (rows a program, warps), the median of CUDA-event timed replays of the forward
and the backward kernel, each captured as a CUDA graph; the bytes each must move (inputs read once, outputs
written once) and the bandwidth that implies. The bytes over the device's bandwidth are the kernels' floor.
With the readout folded in (``read``), also the backward with grad W, which inductor sums beside it.

    python bench/fused_kernels.py [--tokens 16384] [--d 768] [--only plain1|plain4|read ...] [--json FILE]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time

import torch


def timed(fn, n: int) -> float:
    """The median us of fn. On CUDA fn is captured once as a CUDA graph and replayed: the kernels' time alone.
    Called eagerly, a kernel's wrapper (allocations, ``wrap_triton``, Triton's launcher) took about 200 us of host
    time a call under torch 2.11 on an H100 machine, more than most of these kernels take, and the events timed
    the host (the seventeenth session)."""
    for _ in range(3):
        fn()
    if not torch.cuda.is_available():  # the Triton interpreter on CPU: a smoke run, not a timing
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t0) / n * 1e6
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        fn()
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(n + 1)]
    ev[0].record()
    for i in range(n):
        graph.replay()
        ev[i + 1].record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in zip(ev[:-1], ev[1:], strict=True)) * 1e3  # us


def sweep(dv: int, xdt: torch.dtype, n: int, d: int, iters: int, read: bool = False) -> list[dict]:
    """read: the folded kernels (forward_read / backward_read), which also make the next readout y and
    join its gradient gy to the state's (grad W is summed beside them, by inductor in a compiled model)."""
    from ddl import _fused_kernels as fk

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=dev).manual_seed(0)
    X = torch.randn(n, d, dv, device=dev, generator=g).to(xdt)
    h = torch.randn(n, d, device=dev, generator=g).to(torch.bfloat16)
    v = torch.rand(n, dv, device=dev, generator=g) * 4
    beta = torch.rand(n, 1, device=dev, generator=g) * 2
    gout = torch.randn_like(X)
    W, gy = torch.randn(d, dv, device=dev, generator=g).to(xdt), torch.randn_like(h)
    res, rnorm, pp = fk.forward(X, h, v, beta, 1e-5)
    xb, hb = X.numel() * X.element_size(), h.numel() * h.element_size()
    small = n * (2 * dv + 2) * 4  # v, beta in; rnorm, p out (fp32)
    fwd_bytes, bwd_bytes = 2 * xb + hb + small, 3 * xb + 2 * hb + 2 * small
    if read:  # y written; gy read
        fwd_bytes, bwd_bytes = fwd_bytes + hb, bwd_bytes + hb

    def fwd(launch):
        return fk.forward_read(X, h, v, beta, W, 1e-5, launch) if read else fk.forward(X, h, v, beta, 1e-5, launch)

    def bwd(launch):
        if read:
            return fk.backward_read(gout, gy, X, h, v, beta, W, rnorm, pp, launch)
        return fk.backward(gout, X, h, v, beta, rnorm, pp, launch)
    block_d = 1 << (d - 1).bit_length()
    if dv == 1:
        launches = [(r, w) for r in (1, 2, 4, 8) for w in (1, 2, 4, 8, 16) if r * block_d // w >= 32]
    elif read:  # the one-tile kernels' best two (as references), then the two-pass ones
        launches = [(1, 16), (16, 8)] + [("chunk", c, w) for c in (64, 128, 256) for w in (2, 4) if c * 4 >= 32 * w]
        launches += [("chunk", c, w, st) for c, w in ((128, 4), (256, 2), (256, 4)) for st in (1, 2, 4)]
        # the passes' loops unrolled (Triton's loop_unroll_factor): more of a token's rows in flight at once
        launches += [("chunk", 128, 4, None, u) for u in (2, 3, 6)]
        launches += [("chunk", 256, 4, None, 3), ("chunk", 64, 2, None, 6), ("chunk", 64, 4, None, 6)]
        # the backward's second pass loading the next row block's X ahead of this one's stores
        launches += [("chunk", 128, 4, None, u, True) for u in (1, 3, 6)]
    else:
        launches = [(r, w) for r in (1, 2, 4, 8) for w in (2, 4, 8, 16)]
        if torch.cuda.is_available():  # one token under 16 warps, capped at 64 registers: two programs an SM
            launches.append((1, 16, 64))
        launches += [("chunk", c, w) for c in (64, 128, 256, 512) for w in (2, 4, 8) if c * 4 >= 32 * w]
    gw_us = 0.0
    if read:  # grad W = sum_t gy_t out_t, which the backward leaves to the caller: as inductor compiles it
        from ddl import fused

        res_out = fk.forward_read(X, h, v, beta, W, 1e-5)[0]
        gw = torch.compile(fused.read_weight_grad) if torch.cuda.is_available() else fused.read_weight_grad
        gw_us = timed(functools.partial(gw, gy, res_out), iters)
    out = []
    for launch in [None, *launches]:
        try:
            f_us, b_us = timed(functools.partial(fwd, launch), iters), timed(functools.partial(bwd, launch), iters)
        except Exception as e:  # a launch the compiler refuses (too many registers): say so, go on
            print(f"d_v={dv} launch {launch}: {type(e).__name__}: {str(e)[:80]}")
            continue
        if launch is None:
            name = "default"
        elif launch[0] == "chunk":
            stages, unroll, prefetch = (*launch[3:], None, None, None)[:3]
            name = (f"chunk={launch[1]} warps={launch[2]}" + (f" stages={stages}" if stages else "")
                    + (f" unroll={unroll}" if unroll else "") + (" prefetch" if prefetch else ""))
        else:
            name = f"rows={launch[0]} warps={launch[1]}" + (f" regs={launch[2]}" if len(launch) > 2 else "")
        out.append({"d_v": dv, "read": read, "launch": name,
                    "fwd_us": f_us, "bwd_us": b_us, "fwd_tbs": fwd_bytes / f_us / 1e6,
                    "bwd_tbs": bwd_bytes / b_us / 1e6, "fwd_mb": fwd_bytes / 1e6, "bwd_mb": bwd_bytes / 1e6,
                    # the folded backward with grad W, which a compiled reduction sums beside it
                    "bwd_gw_us": b_us + gw_us if read else None})
    return out


SWEEPS = {"plain1": (1, torch.float32, False), "plain4": (4, torch.bfloat16, False), "read": (4, torch.bfloat16, True)}
"""``--only``'s choices: (d_v, the state's dtype, the readout folded in) of each sweep, in the order they run."""


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--json")
    p.add_argument("--only", choices=list(SWEEPS), action="append",
                   help="sweep these kernels only (repeatable): d_v = 1, d_v = 4, d_v = 4 with the readout folded in")
    args = p.parse_args()
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("bench/fused_kernels.py needs a CUDA device (or TRITON_INTERPRET=1 for a smoke run on CPU)")
    n, d = args.tokens, args.d
    only = set(args.only or SWEEPS)
    rows_out = [r for kind, (dv, xdt, read) in SWEEPS.items() if kind in only
                for r in sweep(dv, xdt, n, d, args.iters, read)]
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (Triton interpreter)"
    if args.json:
        with open(args.json, "a") as f:
            for r in rows_out:
                f.write(json.dumps({**r, "tokens": n, "d": d, "device": name,
                                    "torch": torch.__version__}) + "\n")
    print(f"\n{name} torch {torch.__version__}, {n} tokens, d = {d}")
    print("read: bwd+gW is the backward and grad W, summed by a compiled reduction beside it")
    print(f"{'d_v':>3}  {'kernels':<8}{'launch':<30}{'fwd us':>9}{'TB/s':>7}{'bwd us':>9}{'TB/s':>7}{'bwd+gW':>10}")
    for r in rows_out:
        kind = "read" if r["read"] else "plain"
        gw = f"{r['bwd_gw_us']:>10.1f}" if r["read"] else ""
        print(f"{r['d_v']:>3}  {kind:<8}{r['launch']:<30}{r['fwd_us']:>9.1f}{r['fwd_tbs']:>7.2f}"
              f"{r['bwd_us']:>9.1f}{r['bwd_tbs']:>7.2f}{gw}")


if __name__ == "__main__":
    main()
