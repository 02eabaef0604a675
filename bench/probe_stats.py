"""The eager probe's statistics call alone on a GPU: ``_stats.stacked_block`` compiled as the probe compiles it
(``probes._hooks.FUSE_OPTIONS``), on the tensors the hooks of the small model keep in one log step.

Prints the median time of one call (CUDA events between ``--iters`` calls back to back), the kernels it
launches with their time per call (torch.profiler), and the bytes it must read at least: every site's
sampled rows of the state, h, k and k one token later once (h's for k's where k is made from h), the
(B, T, 1..d_v) tensors whole.

    python bench/probe_stats.py [--kernels] [--dv 1] [--sites 24] [--batch 16] [--seq 1024] [--stride 8] [--json FILE]

``--kernels`` times the call as an eager CUDA probe makes it: ``probes._stats_kernels``' two Triton launches for
the reductions over the sampled rows, then the compiled ``_stats.stacked_finish``; without it, the compiled
``_stats.stacked_block`` alone (the same statistics as inductor writes them, as inside a compiled model).

By default k and delta are made in the statistics from h, and from v, p and beta, as the probe does for a
``DDLModel`` (``--kernels`` is then what a compiled model's op ``deltascope::probe_rows`` runs); ``--given-k`` hands
them over, as the hooks do for another k_dir or write.

``--impl MODULE`` times another module's ``stacked_block`` (same signature), for A/B runs.
"""

from __future__ import annotations

import argparse
import importlib
import json
import time
from collections import defaultdict

import torch
from fused_kernels import timed  # bench/ is sys.path[0] when run as a script
from torch.profiler import ProfilerActivity, profile

from probes._hooks import FUSE_OPTIONS, widen_pointwise_cat
from server.thresholds import Thresholds

EPS = 1e-5
"""k_dir's eps where k is made from h (``ddl.DDLConfig.k_eps``'s default)."""


def inputs(sites: int, B: int, T: int, d: int, dv: int, device: str) -> tuple:
    """What the hooks keep for ``sites`` sites: the state (fp32 at d_v = 1, as the embedding; bf16 above, as
    the EC expander leaves it), h in bf16 (autocast), unit k in fp32, and v, p, beta, delta, logit."""
    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g, device=device).to(dtype)

    xs = (B, T, d) if dv == 1 else (B, T, d, dv)
    X = tuple(rnd(*xs, dtype=torch.float32 if dv == 1 else torch.bfloat16) for _ in range(sites))
    h = tuple(rnd(B, T, d, dtype=torch.bfloat16) for _ in range(sites))
    k = tuple(torch.nn.functional.normalize(x.float(), dim=-1) for x in h)
    logit = tuple(rnd(B, T, 1) for _ in range(sites))
    v, p, delta = (tuple(rnd(B, T, dv) for _ in range(sites)) for _ in range(3))
    beta = tuple(torch.sigmoid(x) * 2 for x in logit)
    return X, logit, h, k, v, p, beta, delta


def floor_bytes(args: tuple, stride: int) -> int:
    X, logit, h, k, v, p, beta, delta = args
    ks = h if k is None else k  # k made from h: h's rows stand in for k's
    sampled = sum(t[:, ::stride].numel() * t.element_size() for t in (*X, *h, *ks, *ks))  # k, and k a token on
    whole = (*logit, *v, *p, *beta, *(() if delta is None else delta))
    return sampled + sum(t.numel() * t.element_size() for t in whole)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dv", type=int, default=1)
    ap.add_argument("--sites", type=int, default=24)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--stride", type=int, default=8)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--impl", default="probes._stats", help="module holding stacked_block")
    ap.add_argument("--kernels", action="store_true", help="the Triton reductions (probes._stats_kernels), then "
                    "the compiled stacked_finish, as the probe runs eagerly on CUDA")
    ap.add_argument("--op", action="store_true", help="the op deltascope::probe_rows alone (the reductions a "
                    "compiled model calls), to see its host time")
    ap.add_argument("--given-k", action="store_true", help="the hooks hand over k and delta (a k_dir or write "
                    "other than ddl.delta's); default: made from h, and from v, p and beta, as for a DDLModel")
    ap.add_argument("--launches", help="with --kernels: (ROWS,BLOCK,WARPS[,XBLOCK]) of probes._stats_kernels to "
                    "sweep, ';'-separated, e.g. '4,256,4;2,256,2,1024'")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--json")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        ap.error("needs a CUDA device")
    if a.launches and not a.kernels:
        ap.error("--launches sweeps the kernels' launch: add --kernels")
    widen_pointwise_cat(a.sites)
    impl = importlib.import_module(a.impl)
    args = inputs(a.sites, a.batch, a.seq, a.d, a.dv, "cuda")
    eps = None if a.given_k else EPS
    if not a.given_k:
        X, logit, h, k, v, p, beta, delta = args
        args = (X, logit, h, None, v, p, beta, None)
    t = Thresholds()
    consts = (2.0, t.identity_below, t.projection_band, t.reflection_above, t.logit_saturation)
    if a.kernels:  # as the probe runs it eagerly on CUDA: the Triton reductions, then the compiled rest
        from probes import _stats_kernels

        finish = torch.compile(impl.stacked_finish, fullgraph=True, options=FUSE_OPTIONS)
        X, logit, h, k, v, p, beta, delta = args

        def call():
            with torch.no_grad():
                red = _stats_kernels.stacked_reduce(X, h, k, a.stride, eps)
                return finish(*red, logit, v, p, beta, delta, a.stride, *consts, torch.float64)
    elif a.op:  # the reductions alone, as a compiled model calls them: the op, through the dispatcher
        from probes import _stats_kernels  # noqa: F401  (registers the op)

        X, logit, h, k, v, p, beta, delta = args
        if k is not None:
            ap.error("--op makes k from h: drop --given-k")

        def call():
            with torch.no_grad():
                return torch.ops.deltascope.probe_rows(list(X), list(h), [], list(p), a.stride, eps)
    else:
        fn = torch.compile(impl.stacked_block, fullgraph=True, options=FUSE_OPTIONS)

        def call():
            with torch.no_grad():
                return fn(*args, a.stride, *consts, torch.float64, eps)

    launches = [tuple(int(x) for x in e.split(",")) for e in a.launches.split(";")] if a.launches else [None]
    for launch in launches:
        if launch is not None:
            from probes import _stats_kernels

            _stats_kernels.ROWS, _stats_kernels.BLOCK, _stats_kernels.WARPS = launch[:3]
            _stats_kernels.XBLOCK = launch[3] if len(launch) > 3 else _stats_kernels.BLOCK
        ms, kern = measure(call, a.iters)
        host_us = host_time(call, a.iters)
        floor = floor_bytes(args, a.stride)
        res = {"impl": a.impl, "kernels": a.kernels, "given_k": a.given_k, "launch": launch, "dv": a.dv,
               "sites": a.sites, "batch": a.batch,
               "seq": a.seq, "stride": a.stride, "op": a.op, "median_ms": round(ms, 4), "host_us": round(host_us, 1),
               "launches": sum(n for n, _ in kern.values()), "kernel_ms": round(sum(t for _, t in kern.values()), 4),
               "floor_mb": round(floor / 1e6, 1), "device": torch.cuda.get_device_name(), "torch": torch.__version__}
        print(f"{a.impl}{' (kernels)' if a.kernels else ''}{' (op)' if a.op else ''}{f' {launch}' if launch else ''} "
              f"d_v={a.dv}: {ms:.3f} ms a call, host {host_us:.0f} us a call, {res['launches']} launches, "
              f"kernels {res['kernel_ms']:.3f} ms; reads "
              f"at least {floor / 1e6:.0f} MB ({floor / 3e9:.3f} ms at 3 TB/s)")
        for name, (n, tm) in sorted(kern.items(), key=lambda kv: -kv[1][1])[: a.top]:
            print(f"  {tm:7.3f} ms {n:4d} x {name[:100]}")
        if a.json:
            with open(a.json, "a") as f:
                f.write(json.dumps(res) + "\n")


def host_time(call, iters: int) -> float:
    """Microseconds of host time a call: calls back to back with no sync between them (few enough that the
    launch queue never fills), then one sync."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        call()
    t = time.perf_counter() - t0
    torch.cuda.synchronize()
    return t / iters * 1e6


def measure(call, iters: int, profiled: int = 5) -> tuple[float, dict[str, list]]:
    """(median ms of a call, back to back: ``fused_kernels.timed``; {kernel: [launches, ms] per call} over
    ``profiled`` calls)."""
    ms = timed(call, iters) / 1e3
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(profiled):
            call()
        torch.cuda.synchronize()
    kern: dict[str, list] = defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kern[e.name][0] += 1 / profiled
            kern[e.name][1] += e.device_time / profiled / 1e3
    return ms, {k: [round(n), tm] for k, (n, tm) in kern.items()}


if __name__ == "__main__":
    main()
