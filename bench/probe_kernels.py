"""What an armed probe adds to a compiled forward: kernel launches and buffer allocations in the
code inductor generates, probe off against on (stacked or per-site statistics).

In a step bound by the host, every launch the probe adds is host time on the critical path (the
inductor wrapper spends ~10-20 us of Python per launch), so this count is the compiled probe's cost
model. Caches are bypassed so each variant is generated afresh.

    TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 python bench/probe_kernels.py --preset small --seq 1024
"""

from __future__ import annotations

import argparse
import re

import torch
import torch._dynamo
from torch._inductor.utils import run_and_get_code

import probes._hooks
from ddl import DDLModel, presets, with_overrides
from probes import MemorySink, Probe


def launches(code: list[str]) -> dict[str, int]:
    src = "\n".join(code)
    return {
        "launches": sum(len(re.findall(r, src)) for r in (r"\.run\(", r"extern_kernels\.\w+\(", r"\bcpp_fused_\w+\(")),
        "triton": len(re.findall(r"\.run\(", src)),
        "cpp": len(re.findall(r"\bcpp_fused_\w+\(", src)),
        "extern": len(re.findall(r"extern_kernels\.\w+\(", src)),
        "allocs": len(re.findall(r"empty_strided_\w+\(", src)),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--show", action="store_true", help="print the launch lines the probe adds")
    args = p.parse_args()
    torch.manual_seed(0)
    cfg = with_overrides(presets[args.preset], block_size=args.seq)
    model = DDLModel(cfg).to(args.device)
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=args.device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if args.device == "cuda" else torch.autocast("cpu")

    def forward_backward():
        torch._dynamo.reset()
        net = torch.compile(model, fullgraph=True)

        def run():
            with amp:
                loss = net(x, x)[1]
            loss.backward()

        _, code = run_and_get_code(run)
        model.zero_grad(set_to_none=True)
        return code

    rows = {"no probe": forward_backward()}
    for name, defer in (("probe, stacked", True), ("probe, per site", False)):
        probes._hooks.DEFER = defer
        with Probe(model, every=1, sinks=[MemorySink()], host="thread"):
            rows[name] = forward_backward()
    base = launches(rows["no probe"])
    for name, code in rows.items():
        c = launches(code)
        print(f"{name:16s} " + "  ".join(f"{k} {v} ({v - base[k]:+d})" for k, v in c.items()))
    if args.show:
        before = set("\n".join(rows["no probe"]).splitlines())
        for line in "\n".join(rows["probe, stacked"]).splitlines():
            if line not in before and re.search(r"\.run\(|extern_kernels\.|\bcpp_fused_\w+\(", line):
                print("  +", line.strip()[:150])


if __name__ == "__main__":
    main()
