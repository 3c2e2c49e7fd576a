#!/usr/bin/env python3
"""Static instruction mix of the loops of our CUDA kernels, from their SASS (no GPU needed).

A tensor-core kernel's main loop is issue-bound when it runs many other instructions per
mma.sync: each warp scheduler issues one instruction a cycle, and an HMMA.16816 (m16n8k16, bf16,
f32 accumulate) keeps its tensor core busy for ~8 cycles on an A100 and ~4 on an H100 (mma.sync
reaches about 2/3 of the H100's wgmma peak). So "instructions per HMMA" in a loop is an upper bound
on how close to the tensor cores' peak it can get: above ~4 on sm_90, the issue slots run out
before the tensor cores do.

Usage (the cuobjdump wheel is not one the build needs; any 13.x reads the 13.0 cubins):
    python3 -m venv /tmp/sassvenv && /tmp/sassvenv/bin/pip install nvidia-cuda-cuobjdump==13.2.78
    CUOBJDUMP=$(ls /tmp/sassvenv/lib/python3.*/site-packages/nvidia/cu13/bin/cuobjdump)
    python3 tools/sass_mix.py --cuobjdump $CUOBJDUMP \
        $(ls -t target/release/build/thinkshort-*/out/flash_attention.fatbin | head -1) \
        [--arch sm_90] [--kernel NAME] [--all-loops]
(the newest build's fatbin: each build profile has a folder of its own)

For each kernel it prints every loop (a backward branch and its target) that holds an HMMA
(with --all-loops, every loop):
its instructions, HMMAs, instructions per HMMA, the count of each instruction class, and the
sizes of the loops nested in it that hold no HMMA (tile copies, polls). Loops nest: an outer
loop's counts include its inner loops' bodies once, whatever their trip counts. The counts are static: a
branch inside a loop (a causal mask applied only on the diagonal, a dq write skipped for a
padding row) counts whether or not it runs. A range that crosses a loop with more HMMAs without
nesting in it (a block the compiler laid out inside another loop's range) is left out.
"""

import argparse
import collections
import re
import subprocess
import sys
import tempfile
from pathlib import Path

INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[0-9T]\s+)?([A-Z][A-Z0-9_.]*)\s*(.*?);")
FUNCTION = re.compile(r"Function : (\S+)")

# instruction classes, by the opcode's first part
CLASSES = [
    ("hmma", {"HMMA"}),
    ("ldsm", {"LDSM"}),
    ("shared", {"LDS", "STS"}),
    ("global", {"LDG", "STG", "LDGSTS", "RED", "REDG", "ATOM", "ATOMG", "LD", "ST"}),
    ("async_wait", {"LDGDEPBAR", "DEPBAR"}),
    ("mufu", {"MUFU"}),
    ("float", {"FFMA", "FMUL", "FADD", "FMNMX", "FSEL", "FSETP", "FCHK", "FRND", "F2F", "F2FP",
               "HADD2", "HMUL2", "HFMA2", "FSWZADD"}),
    ("integer", {"IMAD", "IADD3", "LEA", "SHF", "LOP3", "ISETP", "SEL", "IABS", "IMNMX", "VIADD",
                 "VIMNMX", "I2F", "F2I", "PRMT", "MOV", "IADD", "SHL", "SHR", "UIADD3", "UIMAD",
                 "ULEA", "USHF", "ULOP3", "UMOV", "UISETP", "USEL", "R2UR", "S2UR", "S2R", "CS2R",
                 "PLOP3", "P2R", "R2P", "POPC", "FLO", "BREV", "UPRMT", "ULDC", "LDC"}),
    ("control", {"BRA", "BAR", "BSSY", "BSYNC", "WARPSYNC", "EXIT", "NOP", "YIELD", "CALL", "RET",
                 "SHFL", "VOTE", "MEMBAR", "ERRBAR", "CCTL", "NANOSLEEP", "BPT", "VOTEU",
                 "ACQBULK", "ELECT", "BMOV", "UBMSK"}),
]


def classify(opcode: str) -> str:
    base = opcode.split(".")[0]
    for name, members in CLASSES:
        if base in members:
            return name
    return "other:" + base


def disassemble(cuobjdump: str, fatbin: Path, arch: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([cuobjdump, "-xelf", "all", str(fatbin.resolve())], cwd=tmp, check=True,
                       capture_output=True)
        cubins = [p for p in Path(tmp).glob("*.cubin") if p.name.endswith(f".{arch}.cubin")]
        if not cubins:
            sys.exit(f"error: {fatbin} holds no {arch} cubin")
        return subprocess.run([cuobjdump, "-sass", str(cubins[0])], check=True,
                              capture_output=True, text=True).stdout


def functions(sass: str):
    """{kernel: [(address, opcode, operands)]} in address order."""
    out, current = {}, None
    for line in sass.splitlines():
        f = FUNCTION.search(line)
        if f:
            current = out.setdefault(f.group(1), [])
            continue
        m = INSTRUCTION.search(line)
        if m and current is not None:
            current.append((int(m.group(1), 16), m.group(3), m.group(4)))
    return out


def loops(code):
    """(first index, last index) of every loop: a BRA to an earlier address closes one."""
    index = {addr: i for i, (addr, _, _) in enumerate(code)}
    found = set()
    for i, (addr, op, args) in enumerate(code):
        if op.split(".")[0] != "BRA":
            continue
        target = re.search(r"0x([0-9a-f]+)", args)
        if target and int(target.group(1), 16) <= addr and int(target.group(1), 16) in index:
            found.add((index[int(target.group(1), 16)], i))
    return sorted(found)


def crosses(a, b):
    """Whether two loops overlap without one holding the other (the layout put a block of one
    inside the range of the other: not a loop nest)."""
    return a[0] < b[0] <= a[1] < b[1] or b[0] < a[0] <= b[1] < a[1]


def report(name, code, out, all_loops=False):
    rows = []
    found = loops(code)
    hmmas = {lp: sum(op.startswith("HMMA") for _, op, _ in code[lp[0]:lp[1] + 1]) for lp in found}
    for first, last in found:
        # a range that crosses a loop with more HMMAs is a layout artefact, not a loop of the math
        if any(crosses((first, last), o) and hmmas[o] > hmmas[(first, last)] for o in found):
            continue
        body = code[first:last + 1]
        counts = collections.Counter(classify(op) for _, op, _ in body)
        if counts["hmma"] == 0 and not all_loops:
            continue
        # loops nested in this one that hold no HMMA (tile copies, polls): counted once above
        plain = [b - a + 1 for a, b in found
                 if first <= a and b <= last and (a, b) != (first, last) and hmmas[(a, b)] == 0]
        rows.append((first, last, len(body), counts, plain))
    total = collections.Counter(classify(op) for _, op, _ in code)
    out.write(f"{name}: {len(code)} instructions, {total['hmma']} HMMA\n")
    for first, last, n, counts, plain in rows:
        mix = ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
        inner = f"; inner loops without HMMA: {', '.join(map(str, plain))}" if plain else ""
        per = f", {n / counts['hmma']:.2f} per HMMA" if counts["hmma"] else ""
        out.write(f"  loop {code[first][0]:#06x}..{code[last][0]:#06x}: {n} instructions, "
                  f"{counts['hmma']} HMMA{per} ({mix}){inner}\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("fatbin", type=Path)
    ap.add_argument("--cuobjdump", default="cuobjdump")
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--kernel", help="only kernels whose name contains this")
    ap.add_argument("--all-loops", action="store_true",
                    help="also the loops without HMMA (the memory-bound kernels' element loops)")
    args = ap.parse_args()
    funcs = functions(disassemble(args.cuobjdump, args.fatbin, args.arch))
    for name in sorted(funcs):
        if args.kernel and args.kernel not in name:
            continue
        report(name, funcs[name], sys.stdout, args.all_loops)


if __name__ == "__main__":
    main()
