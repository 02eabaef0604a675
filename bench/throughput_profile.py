"""Where a DDL variant's step time goes against the additive baseline: kernels by kind, and the largest.

For each variant: the step time (CUDA events, median), then under torch.profiler the GPU kernel time per
step in groups (matmuls, GEMVs, attention, inductor's Triton kernels, ddl.fused's kernels, the optimizer,
copies) and its largest kernels. The last table sets each variant's groups beside the baseline's: what
DDL costs, and in what.

    python bench/throughput_profile.py --compile --variants additive,ddl_dv1,ddl_dv4_fused [--out DIR]
    python bench/throughput_profile.py --compile --variants ddl_dv4_fused --who reduce_kernel   # who launches it

``--who REGEX`` profiles one more step with host ops recorded and lists, for the kernels whose names match,
the chain of host ops (innermost first) that launched them, with calls and kernel time a step.

Variant names take bench/throughput.py's suffixes (``:gemv``, ``:fold``, ``:nofold``) for an A/B in one process.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch
from throughput import switched, variant_names, warmed  # bench/ is sys.path[0] when run as a script
from torch.profiler import ProfilerActivity, profile

GROUPS = (  # first match wins; lower-case substrings of the kernel name
    ("ddl.fused", ("_fwd_kernel", "_bwd_kernel", "_fwd_tile", "_bwd_tile", "_fwd_chunk", "_bwd_chunk")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn")),
    ("gemv", ("gemv", "gemvx", "dot_kernel", "splitkreduce")),
    ("matmul", ("gemm", "cutlass", "nvjet", "xmma", "sm90", "sm80", "ampere", "hopper")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("inductor", ("triton_",)),  # before copy/fill: its kernels' names hold "_to_copy"
    ("copy/fill", ("memcpy", "memset", "copy", "fill")),
)


def group(name: str) -> str:
    low = name.lower()
    return next((g for g, keys in GROUPS if any(k in low for k in keys)), "other")


def measure(name: str, args) -> dict:
    with switched(name):
        model, opt, step, x, y = warmed(name, args, "default" if args.compile else None)
        times = []
        for _ in range(args.steps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step(x, y)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        n = args.profile_steps
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(n):
                step(x, y)
            torch.cuda.synchronize()
        kern: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        for e in prof.key_averages():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                kern[e.key][0] += e.self_device_time_total / n / 1e3
                kern[e.key][1] += e.count / n
        groups: dict[str, float] = defaultdict(float)
        for k, (ms, _) in kern.items():
            groups[group(k)] += ms
        top = sorted(((ms, calls, k) for k, (ms, calls) in kern.items()), reverse=True)
        who = launchers(step, x, y, args.who) if args.who else None
        res = {"variant": name, "step_ms": statistics.median(times), "kernel_ms": sum(groups.values()),
               "launches": sum(c for _, c in kern.values()), "groups": dict(groups),
               "top": [{"ms": ms, "calls": c, "kernel": k[:160]} for ms, c, k in top],
               "peak_gib": torch.cuda.max_memory_allocated() / 2**30, **({"who": who} if who else {})}
        del model, opt, step
    torch.cuda.empty_cache()
    return res


def launchers(step, x, y, pattern: str) -> list[dict]:
    """One profiled step with host ops recorded: for kernels matching ``pattern`` (a regex), the host op chain
    (innermost first, 6 deep) that launched them, with calls and kernel ms, largest first."""
    rx = re.compile(pattern)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step(x, y)
        torch.cuda.synchronize()
    found: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA or not e.kernels:
            continue
        for k in e.kernels:
            if rx.search(k.name):
                chain, op = [], e
                while op is not None and len(chain) < 6:
                    chain.append(op.name[:60])
                    op = op.cpu_parent
                entry = found[" < ".join(chain)]
                entry[0] += 1
                entry[1] += k.duration / 1e3
    return [{"ops": c, "calls": n, "ms": ms} for c, (n, ms) in sorted(found.items(), key=lambda kv: -kv[1][1])]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=20, help="timed steps (CUDA events)")
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--variants", default="additive,ddl_dv1")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out", type=Path)
    p.add_argument("--who", help="regex: list the host ops that launch the kernels it matches")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/throughput_profile.py needs a CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = True
    rows = []
    for name in variant_names(args.variants):
        r = measure(name, args)
        rows.append(r)
        lines = [f"== {name}: step {r['step_ms']:.2f} ms, kernels {r['kernel_ms']:.2f} ms/step, "
                 f"{r['launches']:.0f} launches/step, peak {r['peak_gib']:.2f} GiB"]
        lines += [f"  {t['ms']:7.3f} ms {t['calls']:5.0f}x  {group(t['kernel']):<10} {t['kernel'][:100]}"
                  for t in r["top"][: args.top]]
        for w in r.get("who", [])[:15]:
            lines.append(f"  who: {w['calls']:4d}x {w['ms']:7.3f} ms  {w['ops']}")
        print("\n".join(lines), flush=True)
        if args.out is not None:
            with open(args.out / "throughput-profile.jsonl", "a") as f:
                f.write(json.dumps({**r, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                    "compile": args.compile}) + "\n")
    names = [g for g, _ in GROUPS] + ["other"]
    print(f"\n{torch.cuda.get_device_name()} torch {torch.__version__} compile={args.compile} "
          f"(kernel ms per step; the step's own time first)")
    print(f"{'variant':<20}{'step':>7}{'kern':>7}" + "".join(f"{g[:9]:>10}" for g in names))
    for r in rows:
        print(f"{r['variant']:<20}{r['step_ms']:>7.2f}{r['kernel_ms']:>7.2f}"
              + "".join(f"{r['groups'].get(g, 0.0):>10.2f}" for g in names))


if __name__ == "__main__":
    main()
