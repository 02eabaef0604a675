"""Registers and spills of the fused delta kernels on an H100, read without a GPU.

Triton compiles each kernel of ``ddl._fused_kernels`` for sm_90a and its bundled ``ptxas -v`` reports
what a thread of it needs: registers, and bytes spilled to local memory. Nothing runs. That is enough to
see what a launch sweep on the GPU will find expensive: past 64 registers a thread, a 16-warp program no
longer fits twice on a multiprocessor, and a kernel that spills reads and writes memory it does not need.

    python bench/kernel_registers.py [--d 768] [--warps 4,8,16] [--json FILE]

Needs ``triton`` importable (any recent build with its CUDA backend; on the CPU machines:
``/work/tritonenv``). The dtypes are the small model's under bf16 autocast: a d_v = 4 state, h and W in
bf16, a d_v = 1 state in fp32 (see bench/fused_kernels.py).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

KERNELS = {  # name: (kernel, d_v, constexpr settings swept besides BLOCK_D / BLOCK_V / warps)
    "forward": ("_fwd_tile_kernel", 4, {"READ": False}),
    "backward": ("_bwd_tile_kernel", 4, {"READ": False}),
    "forward_read": ("_fwd_tile_kernel", 4, {"READ": True}),
    "backward_read": ("_bwd_tile_kernel", 4, {"READ": True}),
    "forward_chunk": ("_fwd_chunk_kernel", 4, {"READ": False, "UNROLL": 1}),
    "backward_chunk": ("_bwd_chunk_kernel", 4, {"READ": False, "UNROLL": 1, "PREFETCH": False}),
    "forward_chunk_read": ("_fwd_chunk_kernel", 4, {"READ": True, "UNROLL": 1}),
    "backward_chunk_read": ("_bwd_chunk_kernel", 4, {"READ": True, "UNROLL": 1, "PREFETCH": False}),
    "forward_dv1": ("_fwd_kernel", 1, {}),
    "backward_dv1": ("_bwd_kernel", 1, {}),
}
FP32 = {"V", "BETA", "RNORM", "P", "GV", "GBETA"}  # always fp32; the rest follows the state or h


def signature(fn, dv: int, constexprs: dict) -> dict:
    state = "*bf16" if dv > 1 else "*fp32"
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name == "eps2":
            sig[name] = "fp32"
        elif not name.isupper():
            sig[name] = "i32"  # n, n_rows, d, dv
        elif name in FP32:
            sig[name] = "*fp32"
        elif name in ("H", "GH"):
            sig[name] = "*bf16"
        else:
            sig[name] = state  # X, OUT, G, GX, GY, Y, W: the state's dtype
    return sig


def ptxas_path() -> str:
    import triton

    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(90).path
    except (ImportError, AttributeError):
        return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def report(fn, dv: int, constexprs: dict, warps: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn, signature(fn, dv, constexprs), constexprs=constexprs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(k.asm["ptx"])
        res = subprocess.run([ptxas_path(), "-v", "--gpu-name", "sm_90a", ptx, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True)
    regs = re.search(r"Used (\d+) registers", res.stderr)
    spill = re.search(r"(\d+) bytes spill stores", res.stderr)
    if res.returncode or not regs:
        raise RuntimeError(f"ptxas failed: {res.stderr.strip()[-300:]}")
    n = int(regs.group(1))
    per_warp = -(-n * 32 // 256) * 256  # a warp's registers are allocated 256 at a time
    return {"registers": n, "spill_bytes": int(spill.group(1)) if spill else 0,
            "blocks_per_sm": min(65536 // (per_warp * warps), 64 // warps, 32)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--warps", default="4,8,16")
    p.add_argument("--kernels", default=",".join(KERNELS))
    p.add_argument("--json", help="append one JSON line a kernel and launch to this file")
    args = p.parse_args()
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except ImportError:
        sys.exit("bench/kernel_registers.py needs triton importable (pip install triton into a virtual "
                 "environment beside torch); it compiles the kernels for an H100 and runs nothing")
    from ddl import _fused_kernels as fk

    names = [k for k in args.kernels.split(",") if k]
    if unknown := [k for k in names if k not in KERNELS]:
        sys.exit(f"--kernels: unknown {', '.join(unknown)}; choose from {', '.join(KERNELS)}")
    warps = [int(w) for w in args.warps.split(",")]
    rows = []
    for name in names:
        kernel, dv, fixed = KERNELS[name]
        fn = getattr(fk, kernel)
        block_d = 1 << (args.d - 1).bit_length()
        if "BLOCK_C" in fn.arg_names:  # two passes over rows of d
            shapes = [{"BLOCK_C": c, "BLOCK_V": 4} for c in (128, 256)]
        elif dv > 1:  # one token a program as straight-line code, or a loop over tokens
            shapes = [{"STRIDED": s, "BLOCK_D": block_d, "BLOCK_V": 4} for s in (False, True)]
        else:
            shapes = [{"ROWS": r, "BLOCK_D": block_d} for r in (1, 2, 4, 8)]
        for shape in shapes:
            for w in warps:
                c = {**fixed, **shape}
                rows.append({"kernel": name, "d": args.d, "warps": w,
                             **{k.lower(): v for k, v in c.items()}, **report(fn, dv, c, w)})
    if args.json:
        with open(args.json, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    print(f"sm_90a, d = {args.d}; registers a thread, bytes spilled, programs a multiprocessor holds")
    print(f"{'kernel':<20}{'launch':<18}{'warps':>6}{'regs':>6}{'spill':>7}{'per SM':>8}")
    for r in rows:
        if "block_c" in r:
            launch = f"{r['block_c']} rows a pass"
        else:
            launch = ("loop" if r["strided"] else "one token") if "strided" in r else f"{r['rows']} rows"
        print(f"{r['kernel']:<20}{launch:<18}{r['warps']:>6}{r['registers']:>6}{r['spill_bytes']:>7}"
              f"{r['blocks_per_sm']:>8}")


if __name__ == "__main__":
    main()
