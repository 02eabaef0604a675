"""What a probe adds to dynamo's guard evaluation, paid by every compiled step, armed or not.

Compiles the model's forward (backend "eager": guards do not depend on the backend) with no
probe, with a probe armed, and with it disarmed, each in a fresh process, and times the guard
check of the cached graph on the same inputs. CPU is enough: guards run on the host.

    python bench/probe_guards.py --preset small
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch


def measure(preset: str, cond: str, seq: int) -> dict:
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    import probes._hooks as hooks
    from ddl import DDLModel, presets, with_overrides
    from probes import MemorySink, Probe

    torch.manual_seed(0)
    cfg = with_overrides(presets[preset], block_size=seq)
    model = DDLModel(cfg)
    probe = None if cond == "none" else Probe(model, every=1, sinks=[MemorySink()], host="thread")
    net = torch.compile(model, backend="eager")
    x = torch.randint(0, cfg.vocab_size, (2, seq + 1))
    for _ in range(2):
        if probe is not None:
            probe._sh.mode = hooks.ACCUM if cond == "armed" else hooks.OFF
        _, loss = net(x[:, :-1], x[:, 1:])
        loss.backward()
    entries = _debug_get_cache_entry_list(type(model).forward)
    gm = entries[0].guard_manager  # the most recent graph: this condition's
    frame = {"self": model, "idx": x[:, :-1], "targets": x[:, 1:]}
    assert gm.check(frame), "the guards must pass on the inputs they were built for"
    times = []
    for _ in range(50):
        t = time.perf_counter()
        for _ in range(20):
            gm.check(frame)
        times.append((time.perf_counter() - t) / 20)
    if probe is not None:
        probe.close()
    return {"cond": cond, "graphs": len(entries), "guard_us": statistics.median(times) * 1e6}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="small")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--cond", help=argparse.SUPPRESS)  # one condition, in a child process
    args = p.parse_args()
    if args.cond:
        print(json.dumps(measure(args.preset, args.cond, args.seq)))
        return
    rows = {}
    for cond in ("none", "disarmed", "armed"):
        out = subprocess.run([sys.executable, __file__, "--preset", args.preset, "--seq", str(args.seq),
                              "--cond", cond], capture_output=True, text=True, check=True).stdout
        rows[cond] = json.loads(out.strip().splitlines()[-1])
    base = rows["none"]["guard_us"]
    print(f"torch {torch.__version__} {args.preset}: guard check per compiled call")
    for cond, r in rows.items():
        print(f"  {cond:9s} {r['guard_us']:7.1f} us  ({r['guard_us'] - base:+.1f} us)")


if __name__ == "__main__":
    main()
