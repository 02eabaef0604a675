"""Which kernels inductor makes of one compiled training step, and the bytes each launch names, without a GPU.

Inductor can generate Triton code for the CPU device. This script does that for the model's whole step
(forward and backward, bf16 autocast) with Triton's driver lookups patched out: the kernels are written,
never compiled or run, so every tensor the step computes is garbage and only the generated code counts.
Per variant and graph it reports the launches (inductor's Triton kernels, extern matmuls, custom ops) and
a byte estimate: for each Triton launch, the size of every buffer it is passed, times the element size
of its pointer in the kernel's signature.

Read it as a census, not a profile:
- The CPU path is not the CUDA path: RMSNorm decomposes (no fused ATen kernel), attention is the CPU
  flash kernel, and reduction heuristics see a CPU. Fusion decisions are mostly shared, so the census
  shows which passes a code change adds or removes; the profiled kernel times come from the GPU
  (``bench/throughput_profile.py``).
- A buffer counts once per launch: a kernel that rereads it, or reads a few rows of a large table (the
  embedding), is not counted as such; an in-place buffer counts once for its read and write.
- Extern kernels (matmuls, attention) and custom ops count as launches with no bytes. ``ddl.fused``'s kernels
  are Triton launches inductor makes itself (its ops are ``torch.library.triton_op``), named ``_fwd_chunk_kernel``
  and so on; the worker points Triton at an H100 target so that inductor can read which buffers they write.

    python bench/kernel_census.py --variants additive,ddl_dv4_fused,ddl_dv4_fused:nofold [--batch 1] [--probe]

Needs ``triton`` importable (any build: nothing is compiled). Each variant runs in its own process.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # bench/throughput.py and the repository's ddl, installed or not
ITEMSIZE = {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8, "i64": 8, "i32": 4, "i16": 2, "i8": 1, "u8": 1, "i1": 1}
LOG_PREFIX = re.compile(r"^[VIWE]\d{4} [\d:.]+ \d+ \S+:\d+\] \[[\d/]+\] \[__output_code\] ?", re.M)


def generate(variant: str, preset: str, batch: int, seq: int, probe: bool = False) -> None:
    """Worker: one compiled step of ``variant``, inductor's output code logged to stderr. ``probe``: with
    a probe attached, collecting (a log step), so its statistics are in the graphs."""
    import torch
    import torch._inductor.async_compile as async_compile
    import torch._inductor.config as inductor_config
    import torch._inductor.select_algorithm as select_algorithm
    import torch.utils._triton as torch_triton

    inductor_config.cpu_backend = "triton"
    inductor_config.compile_threads = 1
    inductor_config.force_disable_caches = True  # a cached graph may predate a change to the ops it calls
    torch_triton.triton_backend = lambda: None  # no GPU driver: the hash and target are never used
    import triton
    from triton.backends.compiler import GPUTarget

    class H100:  # the driver inductor asks for a target when it reads which tensors a ddl.fused kernel writes
        @staticmethod
        def get_current_target():
            return GPUTarget("cuda", 90, 32)

    triton.runtime.driver.set_active(H100())
    torch_triton.triton_hash_with_backend = lambda: "census"

    class Unrun:  # stands for a compiled kernel; its launches do nothing
        def __getattr__(self, _name):
            return lambda *args, **kwargs: None

    async_compile.AsyncCompile.triton = lambda self, *args, **kwargs: Unrun()
    for name in ("mm", "bmm", "addmm"):  # bf16 matmuls are slow on a CPU, and their inputs are garbage anyway
        setattr(select_algorithm.extern_kernels, name, lambda *args, out=None, **kwargs: out)
    torch._logging.set_logs(output_code=True)

    import throughput

    from ddl import fused
    from ddl.config import presets, with_overrides
    from ddl.model import DDLModel

    fused.supported = fused.supported_expand = lambda *t: True  # take the fused ops where the variant asks
    fused._use_triton = lambda X: True  # and trace its kernels, as on CUDA (they are written, never run)
    torch.manual_seed(0)
    cfg = with_overrides(presets[preset], **throughput.config_of(variant), block_size=seq)
    model = DDLModel(cfg)
    if probe:
        import probes._hooks
        from probes import MemorySink, Probe

        probes._hooks.KERNEL_DEVICES = ("cuda", "cpu")  # the op that reduces the sites' rows, as on CUDA
        Probe(model, every=1, sinks=[MemorySink()], host="thread")
    model = torch.compile(model)
    idx = torch.randint(0, cfg.vocab_size, (batch, seq + 1))
    with throughput.switched(variant):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()


def split_args(text: str) -> list[str]:
    """Top-level comma split of a call's argument list."""
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
            continue
        depth += (ch in "([") - (ch in ")]")
        cur += ch
    return [*out, cur.strip()] if cur.strip() else out


def numel(shape: str) -> int:
    return math.prod(int(n) for n in re.findall(r"\d+", shape))


def launches(graph: str) -> list[tuple[str, int | None]]:
    """(kernel, bytes or None) for each launch in one graph's ``call``, in order."""
    kernels = {}
    for m in re.finditer(r"triton_meta=\{'signature': \{(.*?)\}.*?\n@triton\.jit\ndef (\w+)\((.*?)\):", graph, re.S):
        params = [p.split(":")[0].strip() for p in m.group(3).split(",")]
        kernels[m.group(2)] = (params, dict(re.findall(r"'(\w+)': '([^']+)'", m.group(1))))
    sizes: dict[str, int] = {}
    out: list[tuple[str, int | None]] = []
    for line in graph[graph.find("def call("):].splitlines():
        line = line.strip()
        if m := (re.match(r"assert_size_stride\((\w+), \(([^)]*)\)", line)
                 or re.match(r"(\w+) = empty_strided_\w+\(\(([^)]*)\)", line)):
            sizes[m.group(1)] = numel(m.group(2))
        elif m := re.match(r"(\w+) = reinterpret_tensor\((\w+), \(([^)]*)\)", line):
            sizes[m.group(1)] = numel(m.group(3))
        elif m := re.match(r"(\w+) = (\w+); del", line):
            sizes[m.group(1)] = sizes.get(m.group(2), 0)
        elif m := re.match(r"(\w+)\.run\((.*)\)$", line):  # inductor's kernels, and ddl.fused's as _fwd_..._0
            params, signature = kernels.get(m.group(1)) or kernels.get(re.sub(r"_\d+$", "", m.group(1)), ([], {}))
            params = [q for q in params if signature.get(q) != "constexpr"]  # not passed at launch
            nbytes = 0
            for param, arg in zip(params, split_args(m.group(2)), strict=False):  # trailing numels, stream
                kind = signature.get(param, "")
                if kind.startswith("*"):
                    view = re.match(r"reinterpret_tensor\((\w+), \(([^)]*)\)", arg)
                    nbytes += (numel(view.group(2)) if view else sizes.get(arg, 0)) * ITEMSIZE.get(kind[1:], 4)
            out.append((m.group(1), nbytes))
        elif m := re.search(r"(extern_kernels\.\w+|torch\.ops\.\w+\.\w+\.\w+)\(", line):
            out.append((m.group(1), None))
    return out


def summarise(variant: str, log: str, args) -> dict:
    graphs = LOG_PREFIX.sub("", log).split("Output code: \n")[1:]
    if len(graphs) != 2:
        sys.exit(f"{variant}: expected a forward and a backward graph, got {len(graphs)} (a graph break?)")
    res = {"variant": variant, "preset": args.preset, "batch": args.batch, "seq": args.seq}
    for part, graph in zip(("forward", "backward"), graphs, strict=True):
        found = launches(graph)
        groups: dict[str, list] = collections.defaultdict(lambda: [0, 0])
        for kernel, nbytes in found:
            key = re.sub(r"_\d+$", "", kernel)
            groups[key][0] += 1
            groups[key][1] += nbytes or 0
        res[part] = {
            "launches": len(found),
            "triton_launches": sum(b is not None for _, b in found),
            "triton_mb": sum(b or 0 for _, b in found) / 1e6,
            "kernels": sorted(([k, n, b / 1e6] for k, (n, b) in groups.items()), key=lambda r: (-r[2], -r[1])),
        }
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="additive,ddl_dv1,ddl_dv4_fused,ddl_dv4_fused:nofold")
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=1, help="bytes scale with tokens; 1 keeps the CPU step short")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--top", type=int, default=12, help="kernel groups listed per graph")
    p.add_argument("--json", help="append one JSON line per variant to this file")
    p.add_argument("--probe", action="store_true", help="a probe attached and collecting (stats every step)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        generate(args.worker, args.preset, args.batch, args.seq, args.probe)
        return
    try:
        import triton  # noqa: F401
    except ImportError:
        sys.exit("kernel_census needs triton importable (pip install triton; nothing is compiled)")
    import throughput

    names = throughput.variant_names(args.variants)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TORCH_LOGS")}
    rows = []
    for name in names:
        with tempfile.TemporaryFile("w+") as err:
            cmd = [sys.executable, __file__, "--worker", name, "--preset", args.preset,
                   "--batch", str(args.batch), "--seq", str(args.seq), *(["--probe"] if args.probe else [])]
            rc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env).returncode
            err.seek(0)
            log = err.read()
        if rc != 0:
            sys.exit(f"{name}: the compiled step failed (exit {rc}):\n{log[-3000:]}")
        res = {**summarise(name, log, args), "probe": args.probe}
        rows.append(res)
        for part in ("forward", "backward"):
            r = res[part]
            print(f"{name} {part}: {r['launches']} launches ({r['triton_launches']} Triton), {r['triton_mb']:.0f} MB")
            for kernel, n, mb in r["kernels"][: args.top]:
                print(f"  {n:4d} x {mb:8.1f} MB  {kernel[:110]}")
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(res) + "\n")
    print(f"\n{'variant':<22} {'fwd launches':>12} {'fwd MB':>8} {'bwd launches':>12} {'bwd MB':>8}")
    for r in rows:
        f, b = r["forward"], r["backward"]
        print(f"{r['variant']:<22} {f['launches']:>12} {f['triton_mb']:>8.0f} "
              f"{b['launches']:>12} {b['triton_mb']:>8.0f}")


if __name__ == "__main__":
    main()
