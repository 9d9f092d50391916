#!/usr/bin/env python3
"""The side-by-side plot of docs/results.md ("In diffusers"): PSNR against FLOP ratio per family, one panel per model,
from the CSVs bench/python/compare.py wrote (--csv). Settings that failed are left out (the table lists them).

    .venv/bin/python bench/python/plot.py docs/results/python_*_seed2000.csv --out docs/img/python_compare.png
"""
import argparse
import csv
import pathlib
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STYLE = {  # family -> (colour, marker); ours filled, peers hollow
    "specdiff": ("tab:red", "o"),
    "specdiff FBCache": ("darkred", "v"),
    "specdiff TeaCache": ("darkred", "h"),
    "forecast learned": ("tab:red", "s"),
    "forecast taylor": ("tab:orange", "s"),
    "fewer steps": ("black", "x"),
    "diffusers TaylorSeerCache": ("tab:blue", "^"),
    "diffusers TaylorSeerCache lite": ("tab:blue", "1"),
    "diffusers FirstBlockCache": ("tab:cyan", "v"),
    "diffusers PAB": ("tab:purple", "D"),
    "diffusers MagCache": ("tab:green", "P"),
    "diffusers FasterCache": ("tab:olive", "*"),
    "cache-dit DBCache": ("tab:brown", "<"),
    "cache-dit DBCache + TaylorSeer": ("tab:pink", ">"),
}
OURS = ("specdiff", "specdiff FBCache", "specdiff TeaCache", "forecast learned", "forecast taylor")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv", nargs="+")
    ap.add_argument("--out", default="docs/img/python_compare.png")
    a = ap.parse_args()
    models = {}
    for path in a.csv:
        with open(path) as f:
            rows = [r for r in csv.DictReader(f) if r.get("flop_ratio")]
        if rows:
            models[rows[0]["model"]] = rows
    fig, axes = plt.subplots(1, len(models), figsize=(5.6 * len(models), 4.9), squeeze=False)
    for ax, (model, rows) in zip(axes[0], models.items()):
        by = defaultdict(list)
        for r in rows:
            psnr = float(r["psnr_db"])
            family = r["family"] + (" lite" if r["setting"].endswith(" lite") else "")  # lite mode: another curve
            by[family].append((float(r["flop_ratio"]), min(psnr, 70.0)))
        for family, pts in by.items():
            pts.sort()
            colour, marker = STYLE.get(family, ("gray", "."))
            filled = family in OURS
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, linestyle="-" if len(pts) > 1 else "none", color=colour,
                    markerfacecolor=colour if filled else "none", label=family, linewidth=1)
        r0 = rows[0]
        ax.set_title(f"{model} (seed {r0['seed']}, {r0['samples']} samples)")
        ax.set_xlabel("FLOP ratio (full / setting)")
        ax.set_ylabel("PSNR dB vs full compute")
        ax.grid(alpha=0.3)
    handles, labels = {}, []
    for ax in axes[0]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.legend(list(handles.values()), list(handles.keys()), loc="lower center", ncol=min(4, len(handles)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.16, 1, 1))
    pathlib.Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out, dpi=110)
    print(a.out)


if __name__ == "__main__":
    main()
