"""Result tables and plot from tools/benchmark.py run files, written into the docs between markers.

    python tools/report.py                 # docs/runs/*.json -> docs/results.md, README.md, docs/results.png
    python tools/report.py --check         # exit 1 if the tables in docs/results.md or README.md are stale
    python tools/report.py --no-plot       # tables only (the plot needs the [plot] extra: matplotlib)

docs/results.md gets one full table per model card (every config of its run file) and issue 15's
ablation (ABLATION's steps per card and width, each paired against the row above it, tools/paired.py),
README.md one summary table (SUMMARY's configs, the cards side by side). Rows are in tools/table.py's order.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tools.table import label, order  # noqa: E402

RUNS = REPO / "docs" / "runs"
RESULTS_MD, README, PLOT = REPO / "docs" / "results.md", REPO / "README.md", REPO / "docs" / "results.png"
RECON = "recon_images=512:recon_scale_lr=3e-3"  # the CLI's reconstruction defaults but the loss (before session 16: mse), as the run files spell them
SUMMARY = ["float", "ort:8:MinMax", "ort:4:MinMax", "uniform:8", "mptq:6", "mptq-mp:5:allocator=greedy",
           "mptq-mp:5:allocator=pareto", "mptq-mp:4:allocator=pareto", "uniform:4", "mptq:4",
           f"mptq:4:recon:{RECON}:recon_loss=fisher_abs", f"ias:4:{RECON}"]
MARK = {"results": ("<!-- results:begin (tools/report.py) -->", "<!-- results:end -->"),
        "summary": ("<!-- summary:begin (tools/report.py) -->", "<!-- summary:end -->"),
        "ablation": ("<!-- ablation:begin (tools/report.py) -->", "<!-- ablation:end -->"),
        "pmq": ("<!-- pmq:begin (tools/report.py) -->", "<!-- pmq:end -->")}
# issue 22's comparisons: (what, config, the config it is paired against)
PMQ_PAIRS = [("PMQ's Pareto allocation against Greedy MP, target 5", "mptq-mp:5:allocator=pareto",
              "mptq-mp:5:allocator=greedy"),
             ("Greedy MP, target 4 (widths 3-8), against fixed W4A4", "mptq-mp:4:allocator=greedy", "mptq:4"),
             ("PMQ's Pareto allocation, target 4 (widths 3-8), against fixed W4A4", "mptq-mp:4:allocator=pareto", "mptq:4"),
             ("PMQ's Pareto allocation against Greedy MP, target 4", "mptq-mp:4:allocator=pareto",
              "mptq-mp:4:allocator=greedy"),
             ("patch-wise, half the tokens at 2 bits in attention·V, against W4A4", "mptq:4:patchwise=1", "mptq:4"),
             ("patch-wise, half the tokens at 2 bits, ranked by the class token's attention, against W4A4",
              "mptq:4:patchwise=1:patch_score=cls", "mptq:4"),
             ("patch-wise, 60% of the tokens at 2 bits, against W4A4", "mptq:4:patchwise=1:patch_keep=0.4", "mptq:4"),
             ("patch-wise, 60% of the tokens at 2 bits (class token's attention), against W4A4",
              "mptq:4:patchwise=1:patch_keep=0.4:patch_score=cls", "mptq:4"),
             ("patch-wise, half the tokens at 3 bits, against W4A4", "mptq:4:patchwise=1:patch_bits=3", "mptq:4"),
             ("every token at 3 bits in attention·V, against W4A4", "mptq:4:patchwise=1:patch_bits=3:patch_keep=0.0",
              "mptq:4"),
             ("patch-wise (half at 2 bits) against every token at 3 bits", "mptq:4:patchwise=1",
              "mptq:4:patchwise=1:patch_bits=3:patch_keep=0.0")]
_IAS = "ias:{b}:" + RECON
ABLATION_ONLY = ("ias_stages=", "softmax_quantizer=", "recon_loss=", "recon_float_first=")  # rows the plot leaves out
# issue 15's ablation, each step against the row above it (a missing row is skipped)
ABLATION = [("uniform (MSE clipping)", "uniform:{b}"),
            ("+ SULQ on post-Softmax inputs", "uniform:{b}:softmax_quantizer=sulq"),
            ("+ stage 1: channel-wise activations, float weights reconstructed (weights still float)", _IAS + ":ias_stages=1"),
            ("+ stage 2: channel-wise scales folded to layer-wise (weights still float)", _IAS + ":ias_stages=2"),
            ("+ stage 3: weights quantized, reconstructed (= `ias`)", _IAS),
            ("`mptq`", "mptq:{b}"),
            ("`mptq` + reconstruction", "mptq:{b}:recon:" + RECON),
            ("`mptq` + reconstruction, Fisher-weighted block loss (`--recon-loss fisher`)",
             "mptq:{b}:recon:" + RECON + ":recon_loss=fisher")]


def load(paths) -> dict[str, list[dict]]:
    """card -> rows in table order; a config run twice for a card keeps its later row."""
    cards: dict[str, dict[str, dict]] = {}
    for p in paths:
        for r in json.loads(Path(p).read_text()):
            cards.setdefault(r["card"], {})[r["config"]] = r
    return {c: sorted(rows.values(), key=order) for c, rows in sorted(cards.items())}


def _bits(r: dict) -> str:
    return f"{r['avg_w_bits']:.2f}/{r['avg_a_bits']:.2f}" if "avg_w_bits" in r else "-"


def _float_top1(rows):
    return next((r["top1"] for r in rows if r["config"] == "float"), None)


def _setup(rows) -> str:
    r = rows[0]
    subset = f" (evenly spread subset, --limit {r['limit']})" if r.get("limit") else ""
    return (f"{r['images']} images of {r.get('val', 'tin_val_dev')}{subset}, {r['calib_images']} calibration "
            f"images from tin_calib")


def card_table(card: str, rows: list[dict]) -> str:
    f = _float_top1(rows)
    out = [f"**{card}**: {_setup(rows)}\n",
           "| model | config | avg W/A bits | top-1 | % of float | top-5 | size MB | convert s | images/s |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pct = f"{100 * r['top1'] / f:.1f}" if f else "-"
        out.append(f"| {label(r['config'])} | `{r['config']}` | {_bits(r)} | {r['top1']:.4f} | {pct} | "
                   f"{r['top5']:.4f} | {r['size_mb']:.1f} | {r['convert_seconds']:.1f} | {r['images_per_s']:.0f} |")
    return "\n".join(out) + "\n"


def summary_table(cards: dict[str, list[dict]]) -> str:
    names = list(cards)
    by = {c: {r["config"]: r for r in rows} for c, rows in cards.items()}
    head = "| model | " + " | ".join(f"{c} top-1 (% of float) | MB | images/s" for c in names) + " |"
    out = [head, "|---|" + "---|---|---|" * len(names)]
    for cfg in SUMMARY:
        if not any(cfg in by[c] for c in names):
            continue
        cells = []
        for c in names:
            r, f = by[c].get(cfg), _float_top1(cards[c])
            if r is None:
                cells += ["-", "-", "-"]
                continue
            pct = f" ({100 * r['top1'] / f:.1f}%)" if f and cfg != "float" else ""
            cells += [f"{r['top1']:.4f}{pct}", f"{r['size_mb']:.1f}", f"{r['images_per_s']:.0f}"]
        out.append(f"| {label(cfg)} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def ablation_table(cards: dict[str, list[dict]]) -> str:
    from tools.paired import compare, hits
    out = []
    for card, rows in cards.items():
        by, f = {r["config"]: r for r in rows}, _float_top1(rows)
        for b in (4, 3):
            present = [(name, by[cfg.format(b=b)]) for name, cfg in ABLATION if cfg.format(b=b) in by]
            if len(present) < 2:
                continue
            out += [f"**{card} W{b}A{b}** (float {f:.4f})\n" if f else f"**{card} W{b}A{b}**\n",
                    "| step | config | top-1 | % of float | vs the row above: points (95% interval), p | convert s |",
                    "|---|---|---|---|---|---|"]
            prev = None
            for name, r in present:
                pct = f"{100 * r['top1'] / f:.1f}" if f else "-"
                vs = "-"
                if prev is not None and "hits" in r and "hits" in prev and r["images"] == prev["images"]:
                    c = compare(hits(prev), hits(r))
                    lo, hi = c["ci95"]
                    vs = f"{100 * c['diff']:+.2f} ({100 * lo:+.2f} to {100 * hi:+.2f}), p = {c['p']:.2g}"
                out.append(f"| {name} | `{r['config']}` | {r['top1']:.4f} | {pct} | {vs} | {r['convert_seconds']:.0f} |")
                prev = r
            out.append("")
    return "\n".join(out)


def pmq_tables(cards: dict[str, list[dict]]) -> str:
    """Issue 22's paired comparisons from the run files, and the metric's rank runs (docs/runs/pmq)."""
    from tools.paired import compare, hits
    out = ["| model | comparison | top-1 | vs | points (95% interval), p | attention GBOPs saved |",
           "|---|---|---|---|---|---|"]
    for card, rows in cards.items():
        by = {r["config"]: r for r in rows}
        for what, a, b in PMQ_PAIRS:
            if a not in by or b not in by or "hits" not in by[a] or "hits" not in by[b]:
                continue
            c = compare(hits(by[b]), hits(by[a]))
            lo, hi = c["ci95"]
            saved = by[a].get("attention_gbops_saved")
            out.append(f"| {card} | {what} (`{a}` vs `{b}`) | {by[a]['top1']:.4f} | {by[b]['top1']:.4f} | "
                       f"{100 * c['diff']:+.2f} ({100 * lo:+.2f} to {100 * hi:+.2f}), p = {c['p']:.2g} | "
                       f"{'-' if saved is None else f'{100 * saved:.1f}%'} |")
    out += ["", "The metric against Greedy MP's measurements (`tools/pmq_rank.py`, same images and quantizers, "
            "one run each; Spearman over all quantizers at the two widths Greedy MP measures):", "",
            "| model | quantizers | PMQ metric s (runs) | Greedy MP sensitivity + allocation s | ratio | "
            "Spearman at 4 bits (weights / inputs) | at 5 bits | Greedy's own 4 vs 5 |",
            "|---|---|---|---|---|---|---|---|"]
    for f in sorted((RUNS / "pmq").glob("rank_*.json")):
        r = json.loads(f.read_text())
        v = r["variants"][0]
        out.append(f"| {r['model']} | {r['quantizers']} | {v['seconds']:.1f} ({v['runs']}) | {r['greedy_seconds']:.1f} | "
                   f"{v['seconds'] / r['greedy_seconds']:.2f} | {v['spearman_all_4']:.2f} ({v['spearman_w_4']:.2f} / "
                   f"{v['spearman_a_4']:.2f}) | {v['spearman_all_5']:.2f} | {r.get('greedy_self_spearman', float('nan')):.2f} |")
    return "\n".join(out) + "\n"


def results_block(cards) -> str:
    return "\n".join(card_table(c, rows) for c, rows in cards.items())


def splice(text: str, which: str, block: str) -> str:
    begin, end = MARK[which]
    if begin not in text or end not in text:
        raise SystemExit(f"no {begin} ... {end} block to write into")
    head, rest = text.split(begin, 1)
    return f"{head}{begin}\n{block}{end}{rest.split(end, 1)[1]}"


def plot(cards, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    matplotlib.rcParams["svg.hashsalt"] = "mptq"  # deterministic output
    styles = {"float": ("black", "*"), "ort": ("tab:gray", "x"), "uniform": ("tab:blue", "o"),
              "sqb": ("tab:cyan", "v"), "optm": ("tab:purple", "^"), "mptq-paper": ("tab:orange", "s"),
              "mptq": ("tab:red", "D"), "mptq-mp": ("tab:green", "P")}
    fig, axes = plt.subplots(1, len(cards), figsize=(6.2 * len(cards), 4.8), squeeze=False)
    for ax, (card, rows) in zip(axes[0], cards.items()):
        seen = set()
        for r in rows:
            parts = r["config"].split(":")
            if any(m.startswith(ABLATION_ONLY) for m in parts[2:]):
                continue  # ablation steps (float weights, SULQ alone): in the ablation table
            key = "ort" if parts[0] == "ort" else parts[0]
            color, marker = styles.get(key, ("tab:olive", "h"))
            name = {"float": "float32", "ort": "onnxruntime quantize_static",
                    "mptq-mp": "mptq + mixed precision (average bits)"}.get(key, key)
            if "recon" in parts[2:]:  # + reconstruction: hollow marker, its own legend entry
                key, name = key + "+recon", key + " + reconstruction"
                color, marker = styles.get(parts[0], ("tab:olive", "h"))
            hollow = key.endswith("+recon")
            face = dict(facecolors="none", edgecolors=color) if hollow else dict(color=color)
            ax.scatter(r["size_mb"], r["top1"], marker=marker, s=55, zorder=3,
                       label=None if key in seen else name, **face)
            seen.add(key)
            if key != "float":
                tag = f"{parts[1]} bits avg" if parts[0].endswith("-mp") else f"W{parts[1]}A{parts[1]}"
                ax.annotate(tag + (" + recon" if hollow else ""), (r["size_mb"], r["top1"]),
                            textcoords="offset points", xytext=(6, 4 if hollow else -7), fontsize=7, color=color)
        ax.set_xscale("log")
        ax.set_xlabel("model file size, MB (log scale; 3, 5 and 6 bits are stored in 8-bit containers)")
        ax.set_ylabel("top-1 on tin_val_dev")
        ax.set_title(f"{card}: top-1 on {rows[0]['images']} tin_val_dev images", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="*", help="benchmark JSON files (default docs/runs/*.json)")
    ap.add_argument("--check", action="store_true", help="exit 1 if the generated tables are out of date")
    ap.add_argument("--no-plot", action="store_true", help="skip docs/results.png")
    a = ap.parse_args(argv)
    cards = load(a.runs or sorted(RUNS.glob("*.json")))
    if not cards:
        raise SystemExit("no run files")
    stale = []
    blocks = {RESULTS_MD: [("results", results_block(cards)), ("ablation", ablation_table(cards)),
                           ("pmq", pmq_tables(cards))],
              README: [("summary", summary_table(cards))]}
    for path, parts in blocks.items():
        old = new = path.read_text()
        for which, block in parts:
            new = splice(new, which, block)
        if new != old:
            stale.append(path)
            if not a.check:
                path.write_text(new)
    if a.check:
        for p in stale:
            print(f"{p} is out of date: run python tools/report.py", file=sys.stderr)
        return 1 if stale else 0
    if not a.no_plot:
        plot(cards, PLOT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
