"""Probe overhead: the same model with and without probes (stats every step), interleaved.

Eager: one model; blocks of steps alternate between probe attached and detached (the probe is a
context manager that removes its hooks). Compiled: hooks must exist before torch.compile, so the
one model is compiled with the probe attached, and "off" blocks disarm its hooks (one int the
hooks read and dynamo guards on: the off graph has no statistics in it). Each
block's median step time (CUDA events, or perf_counter on CPU) is one sample; the ratio of the
medians over all blocks is the overhead.

    python bench/probe_overhead.py --preset small --batch 16 --seq 1024 [--compile] [--device cuda]
    python bench/probe_overhead.py --preset tiny --batch 16 --seq 128 --device cpu

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


class Timer:
    def __init__(self, cuda: bool):
        self.cuda = cuda

    def __enter__(self):
        if self.cuda:
            self.a, self.b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.a.record()
        else:
            self.t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.b.record()
            self.b.synchronize()
            self.s = self.a.elapsed_time(self.b) / 1e3
        else:
            self.s = time.perf_counter() - self.t


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


def run_block(net, opt, probe, batches, start, n, cuda, amp):
    """Steps ``start`` .. ``start + n - 1``, each timed with a sync at its end: the median, s
    (None for no steps)."""
    times = []
    for i in range(start, start + n):
        with Timer(cuda) as t:
            loss = train_step(net, opt, batches[i % len(batches)], amp)
            if probe is not None:
                probe.step(i, scalars={"loss": loss.detach()})
        times.append(t.s)
    return statistics.median(times) if times else None


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
    if args.compile:
        # one compiled model with the probe attached; "off" blocks keep its hooks disarmed (the
        # hooks read one int, a dynamo guard: the off graph holds no statistics at all), so both
        # conditions run the same weights in the same memory
        probe = probe_for(model, args, sinks)
        probe.__enter__()
        cnet = torch.compile(model)
        nets = {"off": (cnet, opt, None), "on": (cnet, opt, probe)}
    else:
        nets = {"off": (model, opt, None), "on": (model, opt, None)}
    samples: dict[str, list[float]] = {"off": [], "on": []}
    step = 0
    for cond in ("off", "on"):  # warm-up (and compile) both
        net, o, pr = nets[cond]
        if not args.compile and cond == "on":
            with probe_for(model, args, sinks) as pr:
                run_block(net, o, pr, batches, step, args.warmup, cuda, amp)
        else:
            if args.compile:
                arm(probe, cond, step, args.every)
            run_block(net, o, pr, batches, step, args.warmup, cuda, amp)
        step += args.warmup
    for blk in range(args.blocks):
        for cond in (("off", "on") if blk % 2 == 0 else ("on", "off")):
            net, o, pr = nets[cond]
            if not args.compile and cond == "on":
                with probe_for(model, args, sinks, start_step=step) as pr:
                    run_block(net, o, pr, batches, step, args.block_warmup, cuda, amp)
                    step += args.block_warmup
                    samples[cond].append(run_block(net, o, pr, batches, step, args.steps, cuda, amp))
                    host = pr.host
            else:
                if args.compile:
                    arm(probe, cond, step, args.every)
                run_block(net, o, pr, batches, step, args.block_warmup, cuda, amp)
                step += args.block_warmup
                samples[cond].append(run_block(net, o, pr, batches, step, args.steps, cuda, amp))
            step += args.steps
    if args.compile:
        host = probe.host
        probe.__exit__(None, None, None)
    records = sinks.records()
    off, on = statistics.median(samples["off"]), statistics.median(samples["on"])
    device = torch.cuda.get_device_name() if cuda else "cpu"
    res = {"preset": args.preset, "set": args.set, "compile": args.compile, "every": args.every,
           "token_stride": args.token_stride, "host": host, "sinks": args.sinks, "defer": not args.no_defer,
           "batch": args.batch, "seq": args.seq, "device": device, "torch": torch.__version__,
           "off_ms": off * 1e3, "on_ms": on * 1e3, "overhead": on / off - 1, "records": records,
           "off_blocks_ms": [round(x * 1e3, 2) for x in samples["off"]],
           "on_blocks_ms": [round(x * 1e3, 2) for x in samples["on"]]}
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(res) + "\n")
    print(f"{device} torch {torch.__version__} {args.preset} {args.set} B={args.batch} T={args.seq} "
          f"compile={args.compile} every={args.every} stride={args.token_stride} host={host} sinks={args.sinks} "
          f"defer={not args.no_defer}: off {off * 1e3:.2f} ms, on {on * 1e3:.2f} ms, "
          f"overhead {100 * (on / off - 1):+.2f}% ({records} records)")


if __name__ == "__main__":
    main()
