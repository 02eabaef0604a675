"""Where a probe's step time goes: torch.profiler over a few training steps, probe off and on.

Prints per condition the step time (CUDA events), the GPU busy time per step (sum of kernel
durations) and the host time, then the kernels and host ops the probe adds, largest first. It
answers "is this step bound by the host or the GPU, and what does the probe add to each".

    python bench/probe_profile.py --preset small --batch 16 --seq 1024 [--compile] [--set JSON] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch
from probe_overhead import Sinks, train_step  # bench/ is sys.path[0] when run as a script
from torch._inductor import metrics
from torch.profiler import ProfilerActivity, profile

from ddl import DDLModel, presets, with_overrides
from probes import Probe


def measure(model, opt, batch, amp, probe, start, n):
    for i in range(start, start + 3):  # warm-up (and compile) outside the trace
        loss = train_step(model, opt, batch, amp)
        if probe is not None:
            probe.step(i, scalars={"loss": loss.detach()})
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for i in range(start + 3, start + 3 + n):
            loss = train_step(model, opt, batch, amp)
            if probe is not None:
                probe.step(i, scalars={"loss": loss.detach()})
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / n
    kern: dict[str, float] = defaultdict(float)
    host: dict[str, float] = defaultdict(float)
    for e in prof.key_averages():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kern[e.key] += e.self_device_time_total / n / 1e3
        else:
            host[e.key] += e.self_cpu_time_total / n / 1e3
    return wall * 1e3, dict(kern), dict(host)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="small")
    p.add_argument("--set", default="{}", help="JSON model overrides, e.g. '{\"d_v\": 4, \"fused_delta\": true}'")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--token-stride", type=int, default=8, help="Probe(token_stride=)")
    p.add_argument("--host", default="auto", choices=("auto", "thread", "process"), help="Probe(host=)")
    p.add_argument("--sinks", default="jsonl", help="comma-separated: jsonl, tb, memory")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    try:
        overrides = json.loads(args.set)
        cfg = with_overrides(presets[args.preset], block_size=args.seq, **overrides)
    except (ValueError, TypeError, KeyError) as e:  # bad JSON, an unknown preset or field, a bad value
        p.error(f"--set: {e}")
    amp = torch.autocast("cuda", dtype=torch.bfloat16)
    torch.manual_seed(0)
    batch = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), device="cuda")
    res, kernels = {}, {}
    sinks = Sinks(args.sinks)
    for cond in ("off", "on"):
        torch.manual_seed(0)
        model = DDLModel(cfg).cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        probe = (Probe(model, every=1, sinks=sinks(), token_stride=args.token_stride, host=args.host)
                 if cond == "on" else None)
        net = torch.compile(model) if args.compile else model
        metrics.reset()
        res[cond] = measure(net, opt, batch, amp, probe, 0, args.steps)
        kernels[cond] = metrics.generated_kernel_count  # compiled: Triton kernels of the step's graphs
        if probe is not None:
            probe.close()
        del model, opt, net
    mode = "compiled" if args.compile else "eager"
    lines = []
    for cond, (wall, kern, host) in res.items():
        lines.append(f"{mode} probe {cond}: step {wall:.2f} ms, GPU kernels {sum(kern.values()):.2f} ms, "
                     f"host ops (self) {sum(host.values()):.2f} ms, generated kernels {kernels[cond]}")
    for name, idx in (("kernels", 1), ("host ops", 2)):
        a, b = res["off"][idx], res["on"][idx]
        diff = sorted(((b.get(k, 0) - a.get(k, 0), k) for k in set(a) | set(b)), reverse=True)
        lines.append(f"-- {name} the probe adds (ms per step):")
        lines += [f"  {d:+8.3f}  {k[:110]}" for d, k in diff[: args.top]]
    print("\n".join(lines))
    if args.out is not None:
        (args.out / f"profile-{mode}.txt").write_text("\n".join(lines) + "\n")
        (args.out / f"profile-{mode}.json").write_text(json.dumps({c: r[0] for c, r in res.items()}))


if __name__ == "__main__":
    main()
