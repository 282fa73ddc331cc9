"""Compile the fused decode kernel for sm_90 without a GPU and measure its main loop in SASS.

The fused KIVI decode kernel (kvpatch/kernels/triton_decode.py, `_decode_partial`) is
instruction-bound on the H100, so the number that predicts its speed is how many SASS
instructions each thread issues per K/V element in the KIVI tile loop. This tool compiles the
kernel with Triton's offline API (`triton.compile(ASTSource(...), target=GPUTarget("cuda", 90,
32))`, no device needed), disassembles the cubin with the `cuobjdump` shipped with Triton, and
reports:

- registers per thread and stack/spill traffic (`LDL`/`STL` count, ptxas stack size);
- every loop (a backward branch and its target) with its size; the KIVI loop is by default the
  largest one (the dense sinks/residual loops are smaller), or pick one with `--loop`;
- a histogram of the KIVI loop's instructions by opcode, normalised to instructions per K/V
  element per thread: elements per tile = 2 * BN * D (keys and values), per thread
  = that / (32 * num_warps).

The default shape is the benchmark that matters: Llama-3-8B heads (8 kv heads, GQA 4, Tq 1 ->
BM 16, D 128), bf16 queries, KIVI group 32, 4 bits, BN 128, 4 warps, 2 stages, FAST_CVT (the
H100 sweep's best for v4). It also estimates resident programs per SM (registers, warps, shared
memory) and accepts a register cap (`--maxnreg`, Triton's launch option; decode_attention uses 168
at 4 warps). Any constexpr of
`_decode_partial` (including tuning knobs that are added later) can be set with `--const
NAME=VALUE`.

    python tools/kernel_sass.py                       # default point, int4
    python tools/kernel_sass.py --maxnreg 128         # register cap (spills show as LDL/STL)
    python tools/kernel_sass.py --bits 2 --block-n 128 --warps 8
    python tools/kernel_sass.py --sass /tmp/k.sass    # also write the full SASS
    python tools/kernel_sass.py --sweep               # a table over bits x BN x warps

Compiled with whichever Triton the interpreter imports (the H100 runs triton 3.6: use a venv with
`pip install --no-deps triton==3.6.0` to match its codegen). Only a proxy of speed: it says
nothing of memory latency hiding, bank conflicts or the dot's real cost.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Argument types of `_decode_partial` by name (pointers: element type; scalars: int/float).
POINTERS = {
    "Q": "*{qdtype}", "SK": "*{qdtype}", "SV": "*{qdtype}", "RK": "*{qdtype}", "RV": "*{qdtype}",
    "KP": "*u8", "VP": "*u8", "KS": "*fp16", "KZ": "*fp16", "VS": "*fp16", "VZ": "*fp16",
    "MASK": "*u8", "LENGTHS": "*i32", "O_PART": "*fp32", "M_PART": "*fp32", "L_PART": "*fp32",
}
FLOATS = {"qk_scale"}
# Integer arguments that are multiples of 16 at the benchmark point (Triton's JIT specializes
# those as `tt.divisibility = 16`): the q strides of a [B, Hq, 1, 128]
# query (contiguous).
DIV16_INTS = {"sq_b", "sq_h", "sq_t"}


def _kernel():
    os.environ.pop("TRITON_INTERPRET", None)
    from kvpatch.kernels import triton_decode

    return triton_decode._decode_partial


def compile_sass(consts: dict, num_warps: int, num_stages: int, qdtype: str = "bf16",
                 maxnreg: int | None = None) -> tuple[str, str, str, str, int]:
    """(SASS text, `cuobjdump -res-usage` text, PTX, TTGIR, shared bytes incl. dynamic) of
    `_decode_partial` for sm_90."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _kernel()
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            signature[name] = "constexpr"
            constexprs[name] = consts[name]
        elif name in POINTERS:
            signature[name] = POINTERS[name].format(qdtype=qdtype)
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in FLOATS:
            signature[name] = "fp32"
        elif name[:1].islower() or name.isupper():
            signature[name] = "i32"
            if name in DIV16_INTS:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            raise SystemExit(f"kernel_sass: unknown argument {name!r}: add it to POINTERS/FLOATS or --const")
    missing = set(consts) - set(fn.arg_names)
    if missing:
        raise SystemExit(f"kernel_sass: {sorted(missing)} are not arguments of {fn.__name__}")
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    if maxnreg:
        options["maxnreg"] = maxnreg
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    cubin = kernel.asm["cubin"]
    bindir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([str(bindir / "cuobjdump"), "-sass", f.name], capture_output=True, text=True, check=True).stdout
        res = subprocess.run([str(bindir / "cuobjdump"), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    return sass, res, kernel.asm.get("ptx", ""), kernel.asm.get("ttgir", ""), int(kernel.metadata.shared)


def programs_per_sm(regs: int, num_warps: int, shared: int) -> int:
    """Resident programs per H100 SM: registers are allocated per warp in units of 256 (64K per
    SM), at most 64 warps and 32 blocks per SM, 227 KB of shared memory per SM (1 KB reserved
    per block)."""
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = (65536 // per_warp) // num_warps
    by_warps = 64 // num_warps
    by_smem = (227 * 1024) // (shared + 1024)
    return max(0, min(by_regs, by_warps, by_smem, 32))


INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")


def parse(sass: str) -> list[tuple[int, str]]:
    """[(address, instruction text without predicate)] in order."""
    out = []
    for m in INSTR.finditer(sass):
        out.append((int(m.group(1), 16), m.group(2).strip()))
    return out


def opcode(text: str) -> str:
    """Mnemonic without predicate: '@!P0 LDG.E.128 R4, ...' -> 'LDG.E.128'."""
    parts = text.split()
    if parts and parts[0].startswith("@"):
        parts = parts[1:]
    return parts[0] if parts else ""


def loops(instrs: list[tuple[int, str]]) -> list[tuple[int, int]]:
    """(target, branch address) of every backward branch, outermost first, largest first."""
    found = []
    for addr, text in instrs:
        op = opcode(text)
        if op.startswith("BRA"):
            m = re.search(r"0x([0-9a-f]+)", text.split(op, 1)[1])
            if m and int(m.group(1), 16) <= addr:
                found.append((int(m.group(1), 16), addr))
    found.sort(key=lambda lp: lp[0] - lp[1])
    return found


def base_op(op: str) -> str:
    """Histogram key: the mnemonic, with the width suffix kept for loads/stores ('LDG.E.128')."""
    head = op.split(".")[0]
    if head in ("LDG", "LDS", "STS", "LDSM", "LDL", "STL", "LDGSTS"):
        width = [p for p in op.split(".")[1:] if p in ("U8", "S8", "U16", "S16", "64", "128")]
        return head + ("." + width[0] if width else ".32")
    return head


def analyse(consts: dict, num_warps: int, num_stages: int, loop: int | None = None, qdtype: str = "bf16",
            sass_out: str | None = None, maxnreg: int | None = None) -> dict:
    sass, res, ptx, ttgir, shared_total = compile_sass(consts, num_warps, num_stages, qdtype, maxnreg)
    if sass_out:
        Path(sass_out).write_text(sass)
        Path(sass_out).with_suffix(".ptx").write_text(ptx)
        Path(sass_out).with_suffix(".ttgir").write_text(ttgir)
    instrs = parse(sass)
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)", res)
    regs, stack, shared = (int(x) for x in m.groups()) if m else (-1, -1, -1)
    all_loops = loops(instrs)
    stats = {"regs": regs, "stack": stack, "shared": shared_total, "total_instrs": len(instrs),
             "programs_per_sm": programs_per_sm(regs, num_warps, shared_total),
             "spill_ldl_stl": sum(opcode(t).startswith(("LDL", "STL")) for _, t in instrs),
             "loops": [{"start": hex(a), "end": hex(b), "instrs": sum(a <= x <= b for x, _ in instrs)} for a, b in all_loops]}
    if not all_loops:
        stats["loop"] = None
        return stats
    lo, hi = all_loops[loop or 0]
    body = [opcode(t) for a, t in instrs if lo <= a <= hi]
    elems = 2 * consts["BN"] * consts["D"] / (32 * num_warps)
    hist = collections.Counter(base_op(op) for op in body)
    stats["loop"] = {"start": hex(lo), "end": hex(hi), "instrs": len(body), "elements_per_thread": elems,
                     "instr_per_element": round(len(body) / elems, 2),
                     "spill_in_loop": sum(op.startswith(("LDL", "STL")) for op in body),
                     "histogram": dict(hist.most_common())}
    return stats


def defaults(args) -> dict:
    consts = {"HKV": 8, "GQA": 4, "TQ": 1, "D": 128, "BM": 16, "BN": args.block_n, "G": args.group,
              "BITS": args.bits, "HAS_CODES": True, "HAS_MASK": False, "HAS_LENGTHS": False, "HAS_COUNTS": False, "DOT_FP32": False,
              "FAST_CVT": True, "SCORE_JOIN": False, "DENSE_BN": 64, "FIBQUANT": False, "BD": 1}
    for item in args.const:
        name, value = item.split("=", 1)
        consts[name] = int(value) if value.lstrip("-").isdigit() else {"True": True, "False": False}.get(value, value)
    return consts


def report(stats: dict, consts: dict, warps: int, stages: int, top: int) -> str:
    lp = stats["loop"]
    lines = [f"BITS={consts['BITS']} BN={consts['BN']} warps={warps} stages={stages} "
             f"regs={stats['regs']} stack={stats['stack']} LDL/STL={stats['spill_ldl_stl']} "
             f"shared={stats['shared']} programs/SM={stats['programs_per_sm']} total={stats['total_instrs']}"]
    lines.append("loops: " + ", ".join(f"{x['start']}-{x['end']} ({x['instrs']})" for x in stats["loops"]))
    if lp:
        lines.append(f"main loop {lp['start']}-{lp['end']}: {lp['instrs']} instrs/thread/tile, "
                     f"{lp['elements_per_thread']:.0f} elements/thread -> {lp['instr_per_element']} instr/element "
                     f"(spills in loop {lp['spill_in_loop']})")
        hist = list(lp["histogram"].items())[:top]
        lines.append("  " + "  ".join(f"{k}:{v}" for k, v in hist))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group", type=int, default=32)
    p.add_argument("--block-n", type=int, default=128)
    p.add_argument("--warps", type=int, default=4)
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--maxnreg", type=int, default=None, help="register cap (Triton's `maxnreg` option)")
    p.add_argument("--qdtype", default="bf16", help="query / dense-part element type (bf16, fp16, fp32)")
    p.add_argument("--const", action="append", default=[], metavar="NAME=VALUE",
                   help="set / override a constexpr of _decode_partial (repeatable)")
    p.add_argument("--loop", type=int, default=None, help="analyse this loop (index in the list, largest first)")
    p.add_argument("--sass", help="write the full SASS here (and the PTX and TTGIR next to it)")
    p.add_argument("--top", type=int, default=24, help="histogram entries to print")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.add_argument("--sweep", action="store_true", help="table over bits 4/2 x BN 64/128/256 x warps 2/4/8")
    args = p.parse_args()
    import triton

    print(f"triton {triton.__version__}", file=sys.stderr)
    if args.sweep:
        print("| bits | BN | warps | regs | LDL/STL | programs/SM | instr/tile/thread | instr/element |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for bits in (4, 2):
            for bn in (64, 128, 256):
                for w in (2, 4, 8):
                    args.bits, args.block_n = bits, bn
                    consts = defaults(args)
                    try:
                        st = analyse(consts, w, args.stages, args.loop, args.qdtype, maxnreg=args.maxnreg)
                    except Exception as e:  # a variant that does not compile is a row too
                        print(f"| {bits} | {bn} | {w} | error: {type(e).__name__}: {str(e)[:80]} |||||")
                        continue
                    lp = st["loop"] or {}
                    print(f"| {bits} | {bn} | {w} | {st['regs']} | {st['spill_ldl_stl']} | {st['programs_per_sm']} | {lp.get('instrs')} | "
                          f"{lp.get('instr_per_element')} |", flush=True)
        return
    consts = defaults(args)
    stats = analyse(consts, args.warps, args.stages, args.loop, args.qdtype, args.sass, args.maxnreg)
    if args.json:
        print(json.dumps({"consts": consts, "warps": args.warps, "stages": args.stages, **stats}, indent=1))
    else:
        print(report(stats, consts, args.warps, args.stages, args.top))


if __name__ == "__main__":
    main()
