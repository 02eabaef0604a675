"""Probe overhead: the same model with and without probes (stats every step), interleaved.

Eager: one model; blocks of steps alternate between probe attached and detached (the probe is a
context manager that removes its hooks). Compiled: hooks must exist before torch.compile, so the
one model is compiled with the probe attached, and "off" blocks disarm its hooks (one int the
hooks read and dynamo guards on: the off graph has no statistics in it). Each
block's median step time (CUDA events, or perf_counter on CPU) is one sample; the ratio of the
medians over all blocks is the overhead.

    python bench/probe_overhead.py --preset small --batch 16 --seq 1024 [--compile] [--device cuda]
    python bench/probe_overhead.py --preset tiny --batch 16 --seq 128 --device cpu

``--sync`` says when the host waits for the device: ``step`` (after every step, as a loop that
reads its loss each step: the host's launch of a step sits on the critical path, so every
microsecond of host work the probe adds shows), ``block`` (steps are timed by CUDA events recorded
between them and read once at the end of the block, as ``deltascope train`` runs between its
progress lines: the host runs ahead, and only what the probe adds to the device's timeline or to
a host that falls behind it shows) or ``both`` (default: the two alternate, block by block, in one
process and one compilation).

``--sinks`` picks what the probe writes to: ``jsonl`` (default; a real file, in the probe's worker
process when ``--host`` is process), ``jsonl,tb`` (plus TensorBoard, as ``deltascope train``) or
``memory`` (records pickled back into the training process).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

import probes._hooks
from ddl import DDLModel, presets, with_overrides
from probes import Probe
from probes._hooks import ACCUM, OFF
from probes.sinks import JsonlSink, MemorySink, TensorBoardSink


def make(args, device):
    torch.manual_seed(0)
    cfg = with_overrides(presets[args.preset], block_size=args.seq, **json.loads(args.set))
    model = DDLModel(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    return model, opt


def train_step(net, opt, b, amp):
    """One optimizer step on the (B, T + 1) token batch ``b``; returns the loss."""
    with amp:
        _, loss = net(b[:, :-1], b[:, 1:])
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def run_block(net, opt, probe, batches, start, n, cuda, amp, sync="step"):
    """Steps ``start`` .. ``start + n - 1``: the median step time, s (None for no steps).

    ``sync="step"``: each step is timed alone, with a sync at its end. ``"block"``: CUDA events
    between the steps, one sync at the end of the block (on CPU every step is synchronous anyway)."""
    if n == 0:
        return None
    if not cuda:
        times = []
        for i in range(start, start + n):
            t = time.perf_counter()
            one_step(net, opt, probe, batches, i, amp)
            times.append(time.perf_counter() - t)
        return statistics.median(times)
    events = [torch.cuda.Event(enable_timing=True) for _ in range(n + 1)]
    times = []
    events[0].record()
    for j, i in enumerate(range(start, start + n)):
        one_step(net, opt, probe, batches, i, amp)
        events[j + 1].record()
        if sync == "step":
            events[j + 1].synchronize()
            times.append(events[j].elapsed_time(events[j + 1]) / 1e3)
            if j + 1 < n:
                events[j + 1] = torch.cuda.Event(enable_timing=True)
                events[j + 1].record()  # the next step's clock starts after the host wakes
    if sync == "block":
        events[-1].synchronize()
        times = [a.elapsed_time(b) / 1e3 for a, b in zip(events, events[1:], strict=False)]
    return statistics.median(times)


def one_step(net, opt, probe, batches, i, amp):
    loss = train_step(net, opt, batches[i % len(batches)], amp)
    if probe is not None:
        probe.step(i, scalars={"loss": loss.detach()})


class Sinks:
    """A fresh set of the chosen sinks per probe, under one temporary directory; counts records."""

    def __init__(self, kinds: str) -> None:
        self.kinds = kinds.split(",")
        self.dir = Path(tempfile.mkdtemp(prefix="deltascope-bench-"))
        self.made: list[list] = []

    def __call__(self) -> list:
        n = len(self.made)
        make = {"memory": MemorySink, "jsonl": lambda: JsonlSink(self.dir / f"stats-{n}.jsonl"),
                "tb": lambda: TensorBoardSink(self.dir / f"tb-{n}")}
        sinks = [make[k]() for k in self.kinds]
        self.made.append(sinks)
        return sinks

    def records(self) -> int:
        """Records the first sink of each set wrote (after its probe closed)."""
        return sum(s[0].stats.written for s in self.made)


def probe_for(model, args, sinks, **kw) -> Probe:
    return Probe(model, every=args.every, sinks=sinks(), token_stride=args.token_stride, host=args.host, **kw)


def arm(probe, cond, step, every):
    """Compiled runs: the one probe's hooks armed for an "on" block's log steps, else disarmed."""
    probe._sh.mode = ACCUM if cond == "on" and step % every == 0 else OFF


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="small")
    p.add_argument("--set", default="{}", help="JSON model overrides, e.g. '{\"d_v\": 4}'")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--blocks", type=int, default=8, help="alternating blocks per condition")
    p.add_argument("--steps", type=int, default=15, help="steps per block")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--block-warmup", type=int, default=2,
                   help="untimed steps at the start of every block (eager attaches a new probe per block)")
    p.add_argument("--every", type=int, default=1)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--token-stride", type=int, default=8, help="Probe(token_stride=)")
    p.add_argument("--host", default="auto", choices=("auto", "thread", "process"), help="Probe(host=)")
    p.add_argument("--sinks", default="jsonl", help="comma-separated: jsonl, tb, memory")
    p.add_argument("--no-defer", action="store_true",
                   help="statistics per site where each residual runs, not stacked at the forward's end")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sync", default="both", choices=("step", "block", "both"),
                   help="when the host waits for the device (see the module docstring)")
    p.add_argument("--bare", action="store_true",
                   help="compiled: also time a copy compiled with no probe (the guards on the hooks included)")
    p.add_argument("--json", help="append the result as one JSON line to this file")
    args = p.parse_args()
    probes._hooks.DEFER = not args.no_defer
    cuda = args.device == "cuda"
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    g = torch.Generator(device=args.device).manual_seed(0)
    model, opt = make(args, args.device)
    batches = [torch.randint(0, model.cfg.vocab_size, (args.batch, args.seq + 1), device=args.device, generator=g)
               for _ in range(4)]
    sinks = Sinks(args.sinks)
    conds = ["off", "on"]
    if args.compile:
        if args.bare:  # a copy compiled before any hook exists: what the model costs with no probe
            bare, bare_opt = make(args, args.device)
            nets_bare = (torch.compile(bare), bare_opt, None)
            conds.append("bare")
        # one compiled model with the probe attached; "off" blocks keep its hooks disarmed (the
        # hooks read one int, a dynamo guard: the off graph holds no statistics at all), so both
        # conditions run the same weights in the same memory
        probe = probe_for(model, args, sinks)
        probe.__enter__()
        cnet = torch.compile(model)
        nets = {"off": (cnet, opt, None), "on": (cnet, opt, probe)}
        if args.bare:
            nets["bare"] = nets_bare
    else:
        nets = {"off": (model, opt, None), "on": (model, opt, None)}
    syncs = ["step", "block"] if args.sync == "both" or not cuda else [args.sync]
    if not cuda:
        syncs = ["step"]  # every CPU step is synchronous
    samples: dict[str, list[float]] = {f"{c}/{s}": [] for c in conds for s in syncs}
    step = 0
    host = args.host

    def block(cond: str, n: int, sync: str) -> float | None:
        nonlocal step, host
        net, o, pr = nets[cond]
        if not args.compile and cond == "on":  # eager: a fresh probe attached for the block
            with probe_for(model, args, sinks, start_step=step) as pr:
                run_block(net, o, pr, batches, step, args.block_warmup, cuda, amp)
                step += args.block_warmup
                t = run_block(net, o, pr, batches, step, n, cuda, amp, sync)
                host = pr.host
        else:
            if args.compile and cond != "bare":
                arm(probe, cond, step, args.every)
            run_block(net, o, pr, batches, step, args.block_warmup, cuda, amp)
            step += args.block_warmup
            t = run_block(net, o, pr, batches, step, n, cuda, amp, sync)
        step += n
        return t

    for cond in conds:  # warm-up (and compile) every condition
        block(cond, args.warmup, "step")
    for blk in range(args.blocks):
        for sync in syncs:
            for cond in (conds if blk % 2 == 0 else conds[::-1]):
                samples[f"{cond}/{sync}"].append(block(cond, args.steps, sync))
    if args.compile:
        host = probe.host
        probe.__exit__(None, None, None)
    records = sinks.records()
    device = torch.cuda.get_device_name() if cuda else "cpu"
    med = {k: statistics.median(v) for k, v in samples.items()}
    res = {"preset": args.preset, "set": args.set, "compile": args.compile, "every": args.every,
           "token_stride": args.token_stride, "host": host, "sinks": args.sinks, "defer": not args.no_defer,
           "batch": args.batch, "seq": args.seq, "device": device, "torch": torch.__version__, "records": records}
    head = (f"{device} torch {torch.__version__} {args.preset} {args.set} B={args.batch} T={args.seq} "
            f"compile={args.compile} every={args.every} stride={args.token_stride} host={host} "
            f"sinks={args.sinks} defer={not args.no_defer} ({records} records)")
    print(head)
    for sync in syncs:
        off, on = med[f"off/{sync}"], med[f"on/{sync}"]
        r = res.setdefault("sync", {})[sync] = {
            "off_ms": off * 1e3, "on_ms": on * 1e3, "overhead": on / off - 1,
            **{f"{c}_blocks_ms": [round(x * 1e3, 2) for x in samples[f"{c}/{sync}"]] for c in conds}}
        line = f"  sync={sync}: off {off * 1e3:.2f} ms, on {on * 1e3:.2f} ms, overhead {100 * (on / off - 1):+.2f}%"
        if "bare" in conds:
            bare_ms = med[f"bare/{sync}"]
            r["bare_ms"], r["overhead_vs_bare"] = bare_ms * 1e3, on / bare_ms - 1
            line += f"; no probe at all {bare_ms * 1e3:.2f} ms, on vs that {100 * (on / bare_ms - 1):+.2f}%"
        print(line)
    if len(syncs) == 1:  # the one-mode line keeps the fields earlier lines had
        res.update({k: v for k, v in res["sync"][syncs[0]].items() if not k.endswith("_blocks_ms")})
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(res) + "\n")

if __name__ == "__main__":
    main()
