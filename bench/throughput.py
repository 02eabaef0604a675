"""Training throughput and peak memory of DDL variants against the additive baseline.

One full training step (forward, backward, fused AdamW) at bf16 autocast, timed with CUDA events
over many steps after warm-up; median step time -> tokens/s. Variants run one after another in
one process; the table printed last is what docs/PERFORMANCE.md records.

``--sync`` says when the host waits for the device. ``step``: after every step, so each step also pays
the host's launch of its first kernels while the GPU idles (a loop that reads its loss every step).
``block``: events between steps, one sync after all of them, so the host queues step i+1 while the GPU
runs step i (a loop that reads its loss every few steps, as ``deltascope train`` does). ``both`` times
the two in turn and prints both.

    python bench/throughput.py --preset small --batch 16 --seq 1024 --steps 30 [--compile] [--sync both]

``--mode reduce-overhead`` (with ``--compile``) replays each compiled graph as a CUDA graph, every variant alike.

A variant name may carry a suffix that flips a code path for it alone, for an A/B in one process:
``:gemv`` runs ``NarrowLinear`` as a plain ``nn.Linear`` (the gate and value heads as GEMV launches,
as before they were written as reductions); ``:mm`` and ``:nomm`` take the weights' gradients of those heads as one
matmul over the tokens each, or as column sums, whatever the model's size (``NarrowLinear.MM_WEIGHT_GRAD``; by
default d_v > 1 models take the matmul); ``:fold`` and ``:nofold`` set ``ddl.fused.FOLD_READOUT`` to True
and False (each fused update also makes the next CC readout, or none does; by default it does when compiled),
e.g. ``ddl_dv4_fused:nofold``; ``:noec`` runs the EC expander and block 0's readout as modules, not as the fused
``ddl.fused.expand_read`` a compiled fused model takes on CUDA; ``:vmm`` computes the value head's product (d_v > 1) as
one matmul (``NarrowLinear.MM_FORWARD``) instead of inductor's reduction; ``:bwdpf`` gives the fused backward its own
launch, its loops unrolled 3 times and the next row block's X loaded first (``ddl._fused_kernels.CHUNK_BWD_LAUNCH``);
``:wgk`` takes the heads' weight and bias gradients from their Triton kernel, not from cuBLAS and inductor's sums
(``NarrowLinear.WGRAD_KERNEL``); ``:fk`` computes the value head's product with its Triton kernel, not as inductor's
reduction (``NarrowLinear.FWD_KERNEL``). Suffixes join with ``+`` to flip several paths at once, e.g.
``ddl_dv4_fused:vmm+bwdpf``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from ddl import DDLModel, fused, layers, presets, with_overrides

VARIANTS = {
    "additive": {"residual": "additive"},
    "ddl_dv1": {},
    "ddl_dv1_fused": {"fused_delta": True},  # ddl.fused: one Triton kernel each way per site
    "ddl_dv4_cc_ec": {"d_v": 4, "compressor": "cc", "expansion": "ec"},
    "ddl_dv4_fused": {"d_v": 4, "compressor": "cc", "expansion": "ec", "fused_delta": True},  # ddl_dv4_cc_ec, fused
}


SUFFIXES = ("gemv", "mm", "nomm", "fold", "nofold", "noec", "vmm", "bwdpf", "wgk", "fk")
BWDPF_LAUNCH = (512, 4, None, 3, True)  # the sweep's best folded backward (docs/PERFORMANCE.md, twenty-first session)


def variant_names(spec: str) -> list[str]:
    """A comma-separated --variants value, every name checked before the first compile."""
    names = spec.split(",")
    for name in names:
        config_of(name)
    return names


def config_of(name: str) -> dict:
    """The config overrides of a variant name, suffix or not; exits with the choices on a bad name."""
    base = name.partition(":")[0]
    if base not in VARIANTS or not set(suffixes_of(name)) <= set(SUFFIXES):
        sys.exit(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}, optionally with "
                 f"{' or '.join(':' + x for x in SUFFIXES)} (several joined by '+')")
    return VARIANTS[base]


def suffixes_of(name: str) -> list[str]:
    """The suffixes of a variant name: ``a:vmm+bwdpf`` -> ["vmm", "bwdpf"]; none -> []."""
    suffix = name.partition(":")[2]
    return suffix.split("+") if suffix else []


@contextlib.contextmanager
def switched(name: str):
    """The code path a variant's suffix asks for, while the block runs; dynamo reset after it, since it
    does not guard on the swapped forward and would reuse this variant's graphs for the next."""
    suffixes = suffixes_of(name)
    forward, fold, mm = layers.NarrowLinear.forward, fused.FOLD_READOUT, layers.NarrowLinear.MM_WEIGHT_GRAD
    expand, mm_forward = fused.supported_expand, layers.NarrowLinear.MM_FORWARD
    wgrad_kernel, fwd_kernel = layers.NarrowLinear.WGRAD_KERNEL, layers.NarrowLinear.FWD_KERNEL
    kernels = bwd_launch = None
    if "bwdpf" in suffixes:  # needs triton: imported for this suffix only
        from ddl import _fused_kernels as kernels

        bwd_launch, kernels.CHUNK_BWD_LAUNCH = kernels.CHUNK_BWD_LAUNCH, BWDPF_LAUNCH
    layers.NarrowLinear.MM_FORWARD = "vmm" in suffixes or mm_forward
    layers.NarrowLinear.WGRAD_KERNEL = None if "wgk" in suffixes else wgrad_kernel  # None: on CUDA
    layers.NarrowLinear.FWD_KERNEL = None if "fk" in suffixes else fwd_kernel
    if "gemv" in suffixes:
        layers.NarrowLinear.forward = nn.Linear.forward
    if "noec" in suffixes:  # EC and block 0's readout as modules, not fused.expand_read
        fused.supported_expand = lambda e: False
    layers.NarrowLinear.MM_WEIGHT_GRAD = True if "mm" in suffixes else False if "nomm" in suffixes else mm
    fused.FOLD_READOUT = True if "fold" in suffixes else False if "nofold" in suffixes else fold
    try:
        yield
    finally:
        layers.NarrowLinear.forward, fused.FOLD_READOUT, layers.NarrowLinear.MM_WEIGHT_GRAD = forward, fold, mm
        fused.supported_expand, layers.NarrowLinear.MM_FORWARD = expand, mm_forward
        layers.NarrowLinear.WGRAD_KERNEL, layers.NarrowLinear.FWD_KERNEL = wgrad_kernel, fwd_kernel
        if kernels is not None:
            kernels.CHUNK_BWD_LAUNCH = bwd_launch
        torch._dynamo.reset()


def step_fn(model, opt, amp_dtype):
    def step(x, y):
        torch.compiler.cudagraph_mark_step_begin()  # under mode="reduce-overhead": a new step, last step's outputs dead
        with torch.autocast("cuda", dtype=amp_dtype):
            _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def built(name: str, args, mode: str | None) -> tuple:
    """Variant ``name`` (inside ``switched(name)``) on CUDA with fused AdamW, its step compiled in ``mode``
    (None: eager) -> (cfg, model, opt, step). Exits where the variant asks for ddl.fused and it cannot run."""
    torch.manual_seed(0)
    cfg = with_overrides(presets[args.preset], **config_of(name), block_size=args.seq)
    state = (1, cfg.d_model) if cfg.d_v == 1 else (1, cfg.d_model, cfg.d_v)
    if cfg.fused_delta and not fused.supported(torch.empty(state, device="cuda"), torch.empty(1, cfg.d_model)):
        sys.exit(f"{name}: ddl.fused cannot run here (needs triton, a d x d_v tile <= {fused.MAX_TILE}); "
                 "it would time the unfused path")
    model = DDLModel(cfg).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    probe = probed(model) if getattr(args, "probe", False) else None
    step = step_fn(model if mode is None else torch.compile(model, mode=mode), opt, torch.bfloat16)
    if probe is not None:
        step = probe_every_step(step, probe)
    return cfg, model, opt, step


def probed(model):
    """A Probe with statistics every step, attached before the compile, writing JSONL under a temporary
    directory (the profilers' ``--probe``)."""
    import tempfile

    from probes import JsonlSink, Probe

    return Probe(model, every=1, sinks=[JsonlSink(Path(tempfile.mkdtemp(prefix="deltascope-bench-")) / "s.jsonl")])


def probe_every_step(step, probe):
    """``step`` followed by ``probe.step``, as a training loop with a probe calls them."""
    n = itertools.count()

    def probed_step(x, y):
        loss = step(x, y)
        probe.step(next(n), scalars={"loss": loss.detach()})
        return loss

    return probed_step


def warmed(name: str, args, mode: str | None) -> tuple:
    """For the profilers: :func:`built`, and one batch (x, y), after ``args.warmup`` steps -> (model, opt, step,
    x, y)."""
    cfg, model, opt, step = built(name, args, mode)
    batch = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), device="cuda")
    x, y = batch[:, :-1], batch[:, 1:]
    for _ in range(args.warmup):
        step(x, y)
    torch.cuda.synchronize()
    return model, opt, step, x, y


def measure(name: str, args) -> dict:
    cfg, model, opt, step = built(name, args, args.mode if args.compile else None)
    g = torch.Generator(device="cuda").manual_seed(0)
    batches = [torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), device="cuda", generator=g)
               for _ in range(4)]
    t0 = time.perf_counter()
    for i in range(args.warmup):
        b = batches[i % 4]
        step(b[:, :-1], b[:, 1:])
    torch.cuda.synchronize()
    warm_s = time.perf_counter() - t0
    if args.gc_freeze:  # what long training loops do: the compile's objects out of the collector's way
        gc.collect()
        gc.freeze()
    torch.cuda.reset_peak_memory_stats()
    res = {"variant": name, "compile": args.compile, "mode": args.mode, "params": model.num_params(),
           "warmup_s": warm_s, "gc_freeze": args.gc_freeze}
    for sync in ("step", "block") if args.sync == "both" else (args.sync,):
        times = timed_steps(step, batches, args.steps, sync)
        med = statistics.median(times)
        key = "" if sync == "step" else "_block"  # step-synced keeps the keys of earlier JSON lines
        res.update({f"step_ms{key}": med * 1e3, f"tokens_per_s{key}": args.batch * args.seq / med,
                    f"spread_ms{key}": (max(times) - min(times)) * 1e3,
                    f"steps_ms{key}": [round(t * 1e3, 2) for t in times]})
    res["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del model, opt, step
    if args.gc_freeze:
        gc.unfreeze()
    torch.cuda.empty_cache()
    return res


def timed_steps(step, batches, n: int, sync: str) -> list[float]:
    """Seconds per step, each between two CUDA events. ``sync="step"``: a sync after every step, so the
    next step's first event is recorded on an idle GPU; ``"block"``: one sync after all n steps."""
    if sync == "step":
        times = []
        for i in range(n):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step(batches[i % 4][:, :-1], batches[i % 4][:, 1:])
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        return times
    events = [torch.cuda.Event(enable_timing=True) for _ in range(n + 1)]
    torch.cuda.synchronize()
    events[0].record()
    for i in range(n):
        step(batches[i % 4][:, :-1], batches[i % 4][:, 1:])
        events[i + 1].record()
    torch.cuda.synchronize()
    return [a.elapsed_time(b) / 1e3 for a, b in zip(events[:-1], events[1:], strict=True)]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--mode", default="default", choices=("default", "reduce-overhead", "max-autotune-no-cudagraphs"),
                   help="torch.compile's mode, with --compile (reduce-overhead: each compiled graph replayed as a "
                        "CUDA graph, so that the host issues a few launches a step instead of a thousand)")
    p.add_argument("--sync", default="both", choices=("step", "block", "both"))
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--json", help="append results as JSON lines to this file")
    p.add_argument("--gc-freeze", action="store_true",
                   help="gc.collect() and gc.freeze() after the warm-up, so that Python's collector skips "
                        "everything compiling made")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/throughput.py needs a CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = True
    rows = []
    for name in variant_names(args.variants):
        with switched(name):
            rows.append(measure(name, args))
        r = rows[-1]  # written and printed as each variant ends, so that a run cut short keeps what it measured
        print(f"{name}: " + ", ".join(f"{k} {r[k]:.2f}" for k in ("step_ms", "step_ms_block") if k in r), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps({**r, "device": torch.cuda.get_device_name(), "torch": torch.__version__}) + "\n")
    mode = "" if args.mode == "default" else f" mode={args.mode}"
    print(f"\n{torch.cuda.get_device_name()} torch {torch.__version__} preset={args.preset} "
          f"B={args.batch} T={args.seq} bf16 compile={args.compile}{mode}")
    print(f"{'variant':<16}{'sync':>6}{'step ms':>9}{'tok/s':>12}{'vs add':>8}{'peak GiB':>10}")
    for key, sync in (("", "step"), ("_block", "block")):
        base = next((r[f"tokens_per_s{key}"] for r in rows if r["variant"] == "additive"), None)
        for r in rows:
            if f"step_ms{key}" not in r:
                continue
            ratio = f"{r[f'tokens_per_s{key}'] / base:.3f}" if base else "-"
            print(f"{r['variant']:<16}{sync:>6}{r[f'step_ms{key}']:>9.2f}{r[f'tokens_per_s{key}']:>12,.0f}"
                  f"{ratio:>8}{r['peak_mem_gib']:>10.2f}")


if __name__ == "__main__":
    main()
