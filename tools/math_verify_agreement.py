#!/usr/bin/env python3
"""Agreement between `thinkshort verify` and HF math-verify on the same response/gold pairs.

For each of the five benchmarks (gold answers read as `thinkshort eval` reads them) the script
builds responses `<think>..</think> <answer>X</answer>` where X is the gold itself, a rewritten
equivalent (thousands separators, `.0`, a decimal as a fraction, `\\frac{a}{b}` as `(a)/(b)`), a
perturbed answer (a digit changed) and another item's gold. Both verifiers judge every pair:
ours through `thinkshort verify`, math-verify as `verify(parse("$gold$"), parse("$X$"))` on the
text of the answer span (math-verify does not read `<answer>` tags). It prints the share of pairs
on which the two verdicts agree, per set and overall, and a few disagreements.

Requirements: Python 3.9+, `pip install math-verify` (tested with math-verify 0.9.0), and a built
binary (`cargo build --release`).

    python tools/math_verify_agreement.py [--data-dir ../shared/data] [--per-set 200]
        [--binary target/release/thinkshort] [--show 10]
"""

import argparse
import json
import random
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from math_verify import parse, verify


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def number_text(x):
    return str(int(x)) if float(x).is_integer() else str(x)


def golds(data_dir):
    d = Path(data_dir)
    sets = {
        "gsm8k": [r["answer"].rsplit("####", 1)[1].strip().replace(",", "") for r in read_jsonl(d / "gsm8k/test.jsonl")],
        "math500": [r["answer"] for r in read_jsonl(d / "math500/test.jsonl")],
        "svamp": [number_text(r["Answer"]) for r in read_jsonl(d / "svamp/test.jsonl")],
        "college_math": [re.sub(r"(?<!\\)\$", "", r["answer"]).strip() for r in read_jsonl(d / "college_math/test.jsonl")],
        "gsm_plus": [r["answer"].strip() for r in read_jsonl(d / "gsm_plus/testmini.jsonl") if r["answer"].strip() != "None"],
    }
    return sets


def rewrite(gold):
    if re.fullmatch(r"-?\d+", gold):
        n = int(gold)
        return f"{n:,}" if abs(n) >= 1000 else f"{n}.0"
    if re.fullmatch(r"-?\d*\.\d+", gold):
        sign = "-" if gold.startswith("-") else ""
        whole, frac = gold.lstrip("-").split(".")
        return f"{sign}\\frac{{{whole}{frac}}}{{1{'0' * len(frac)}}}"
    m = re.search(r"\\frac\{([^{}]*)\}\{([^{}]*)\}", gold)
    if m:
        return gold[: m.start()] + f"({m.group(1)})/({m.group(2)})" + gold[m.end():]
    return None


def perturb(gold):
    digits = [m.start() for m in re.finditer(r"\d", gold) if not re.search(r"[_^]\{?$", gold[: m.start()])]
    if not digits:
        return f"-({gold})"
    at = digits[-1]
    return gold[:at] + str((int(gold[at]) + 1) % 10) + gold[at + 1:]


def mv_verdict(gold, answer):
    try:
        return bool(verify(parse(f"${gold}$"), parse(f"${answer}$")))
    except Exception:
        return False


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--per-set", type=int, default=200, help="gold answers sampled per set")
    ap.add_argument("--binary", default="target/release/thinkshort")
    ap.add_argument("--show", type=int, default=10, help="disagreements to print")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    rng = random.Random(args.seed)
    pairs = []
    for name, gs in golds(args.data_dir).items():
        picked = rng.sample(range(len(gs)), min(args.per_set, len(gs)))
        for i in picked:
            g = gs[i]
            cands = [("self", g), ("perturbed", perturb(g)), ("other", gs[(i + 1) % len(gs)])]
            r = rewrite(g)
            if r is not None:
                cands.append(("rewritten", r))
            for kind, answer in cands:
                pairs.append({"set": name, "kind": kind, "gold": g, "answer": answer})

    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        for i, p in enumerate(pairs):
            response = f"<think>working</think> <answer>{p['answer']}</answer>"
            f.write(json.dumps({"id": i, "response": response, "gold": p["gold"]}) + "\n")
        path = f.name
    out = subprocess.run([args.binary, "verify", "--input", path], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{args.binary} verify failed: {out.stderr}")
    ours = {}
    for line in out.stdout.splitlines():
        row = json.loads(line)
        ours[row["id"]] = row["correct"]

    per_set = {}
    disagreements = []
    for i, p in enumerate(pairs):
        theirs = mv_verdict(p["gold"], p["answer"])
        agree = ours[i] == theirs
        total, same = per_set.get(p["set"], (0, 0))
        per_set[p["set"]] = (total + 1, same + agree)
        if not agree:
            disagreements.append((p, ours[i], theirs))

    for name, (total, same) in per_set.items():
        print(f"{name:14s} {same:5d}/{total:5d} agree ({100 * same / total:.2f}%)")
    total = sum(t for t, _ in per_set.values())
    same = sum(s for _, s in per_set.values())
    print(f"{'all':14s} {same:5d}/{total:5d} agree ({100 * same / total:.2f}%)")
    for p, o, t in disagreements[: args.show]:
        print(f"  [{p['set']}/{p['kind']}] ours={o} math-verify={t} gold={p['gold']!r} answer={p['answer']!r}")


if __name__ == "__main__":
    main()
