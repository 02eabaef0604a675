"""Where a compiled training step's host time goes: Python's cProfile over steps the GPU cannot be the bottleneck of.

At B = 1 the GPU gets a sixteenth of the small preset's work, so a step takes about as long as its host needs to
issue it (bench/gpu_suite.sh host). This script runs such steps under cProfile after the compile's warm-up and
prints, per step, the functions with the most time of their own and the most in all they call: the Python of
inductor's generated wrappers, Triton's launchers, the ``ddl.fused`` custom ops, autograd and the optimizer.

    python bench/host_profile.py --variants additive,ddl_dv1,ddl_dv4_fused [--batch 1] [--steps 20] [--top 25]

cProfile slows what it watches (a few microseconds a call), so its milliseconds overstate the host's; compare
variants with each other, and take the step time printed first (without the profiler) as the real one.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch
from throughput import switched, variant_names, warmed  # bench/ is sys.path[0] when run as a script


def where(func: tuple[str, int, str]) -> str:
    """A pstats function key as short text: the last two parts of its file, its line and name."""
    file, line, name = func
    parts = Path(file).parts
    return f"{'/'.join(parts[-2:]) if len(parts) > 1 else file}:{line}({name})"


def measure(name: str, args) -> dict:
    with switched(name):
        model, opt, step, x, y = warmed(name, args, args.mode)
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            step(x, y)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        for _ in range(args.steps):
            step(x, y)
        torch.cuda.synchronize()
        prof.disable()
        profiled = (time.perf_counter() - t0) / args.steps
        stats = pstats.Stats(prof)
        n = args.steps
        rows = [(tt / n * 1e3, ct / n * 1e3, nc / n, where(f)) for f, (_, nc, tt, ct, _) in stats.stats.items()]
        res = {"variant": name, "batch": args.batch, "mode": args.mode, "probe": args.probe,
               "step_ms": statistics.median(times) * 1e3,
               "profiled_step_ms": profiled * 1e3,
               "calls_per_step": sum(r[2] for r in rows),
               "own": [{"own_ms": a, "all_ms": b, "calls": c, "func": f}
                       for a, b, c, f in sorted(rows, reverse=True)[: args.top]],
               "cumulative": [{"own_ms": a, "all_ms": b, "calls": c, "func": f}
                              for a, b, c, f in sorted(rows, key=lambda r: -r[1])[: args.top]]}
        del model, opt, step
    torch.cuda.empty_cache()
    return res


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--mode", default="default", choices=("default", "reduce-overhead", "max-autotune-no-cudagraphs"),
                   help="torch.compile's mode")
    p.add_argument("--variants", default="additive,ddl_dv1,ddl_dv4_fused")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--probe", action="store_true", help="a Probe attached before the compile, stats every step")
    p.add_argument("--json", help="append results as JSON lines to this file")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/host_profile.py needs a CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = True
    for name in variant_names(args.variants):
        r = measure(name, args)
        print(f"\n== {name}{' probed' if args.probe else ''} B={args.batch}: step {r['step_ms']:.2f} ms, "
              f"under cProfile {r['profiled_step_ms']:.2f} ms, {r['calls_per_step']:.0f} Python calls a step")
        for title, key in (("own time", "own"), ("with callees", "cumulative")):
            print(f"  -- by {title} (ms a step: own, with callees; calls a step)")
            for e in r[key]:
                print(f"  {e['own_ms']:8.3f} {e['all_ms']:8.3f} {e['calls']:7.1f}  {e['func'][:110]}")
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps({**r, "device": torch.cuda.get_device_name(), "torch": torch.__version__}) + "\n")


if __name__ == "__main__":
    main()
