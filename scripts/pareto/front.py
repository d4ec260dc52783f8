#!/usr/bin/env python3
"""Reads a Pareto CSV (scripts/pareto/common.sh's header) and prints, as
Markdown, the two checks the README makes of it:

1. Dominance: for every llama.cpp row, the kvc rows with no more KV bytes
   per token and no larger perplexity change (each system against its own
   fp16 run); where both changes are within +-0.1% of exact, kvc's may be
   up to 0.1 percentage point larger ("tie"). The dominating kvc row with
   the smallest change is named (fewer bytes breaking a tie), or "not
   dominated" with the best kvc row within the bytes.
2. Byte limits: the kvc row with the smallest change among those at or
   below each limit (fractions of fp16 bytes, --limits), beside the bar
   given for that limit (--bars, percent; optional).

Usage: front.py CSV [--limits 0.531,0.375,0.281,0.15] [--bars 0.1,0.5,2,8]
Exit status 0 (a report, not a test).
"""
import argparse
import csv


def rows_of(path):
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            if r["system"] == "llama.cpp" and "no-rot" in r["config"]:
                continue  # the rotation-off rows are an ablation of llama.cpp's
            yield {
                "system": r["system"],
                "config": r["config"],
                "of_fp16": float(r["of_fp16"]),
                "d": float(r["vs_base_pct"]),
                "kld": r["kld_mean"],
                "top": r["same_top_pct"],
            }


def dominates(k, l):
    if k["of_fp16"] > l["of_fp16"] + 1e-9:
        return None
    if k["d"] <= l["d"]:
        return "yes"
    if abs(k["d"]) <= 0.1 and abs(l["d"]) <= 0.1 and k["d"] <= l["d"] + 0.1:
        return "tie"
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--limits", default="0.531,0.375,0.281,0.15")
    ap.add_argument("--bars", default="")
    a = ap.parse_args()
    rows = list(rows_of(a.csv))
    kvc = [r for r in rows if r["system"] == "kvc" and r["config"] != "full fp16"]
    llama = [r for r in rows if r["system"] == "llama.cpp" and r["config"] != "f16/f16"]

    print("| llama.cpp | of fp16 | vs its f16 | kvc, no more bytes and no larger change"
          " | of fp16 | vs full fp16 |")
    print("|---|---:|---:|---|---:|---:|")
    n_dom = 0
    for l in sorted(llama, key=lambda r: -r["of_fp16"]):
        hits = [(k, dominates(k, l)) for k in kvc]
        hits = [(k, h) for k, h in hits if h]
        if hits:
            n_dom += 1
            k, h = min(hits, key=lambda kh: (kh[0]["d"], kh[0]["of_fp16"]))
            name = k["config"] + (" (within 0.1 pp, both within ±0.1%)" if h == "tie" else "")
        else:
            within = [k for k in kvc if k["of_fp16"] <= l["of_fp16"] + 1e-9]
            k = min(within, key=lambda r: r["d"]) if within else None
            name = ("**not dominated**; best within its bytes: " + k["config"]) if k else \
                "**not dominated**; no kvc row within its bytes"
        print(f"| {l['config']} | {l['of_fp16']:.3f} | {l['d']:+.2f}% | {name} | "
              + (f"{k['of_fp16']:.3f} | {k['d']:+.2f}% |" if k else "- | - |"))
    print(f"\n{n_dom} of {len(llama)} llama.cpp rows dominated by a kvc row.\n")

    limits = [float(x) for x in a.limits.split(",") if x]
    bars = [float(x) for x in a.bars.split(",") if x]
    print("| at most, of fp16 | kvc's best row | of fp16 | vs full fp16 | KLD mean | same top"
          + (" | bar | met |" if bars else " |"))
    print("|---:|---|---:|---:|---:|---:|" + ("---:|---|" if bars else ""))
    for i, lim in enumerate(limits):
        within = [k for k in kvc if k["of_fp16"] <= lim + 1e-9]
        k = min(within, key=lambda r: r["d"]) if within else None
        cells = (f"{k['config']} | {k['of_fp16']:.3f} | {k['d']:+.2f}% | {k['kld'] or '-'} | "
                 f"{(k['top'] + '%') if k['top'] else '-'}") if k else "none | - | - | - | -"
        line = f"| {lim:.3f} | {cells} |"
        if bars and i < len(bars):
            met = "yes" if k and k["d"] <= bars[i] else "**no**"
            line += f" ≤ +{bars[i]:g}% | {met} |"
        print(line)


if __name__ == "__main__":
    main()
