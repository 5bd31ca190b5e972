"""Render tools/benchmark.py JSON results as a Markdown table: python tools/table.py runs/deit_tiny_tin.json"""
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mptq_onnx.cli import RECON_IMAGES_DEFAULT  # noqa: E402
from mptq_onnx.plan import QuantConfig  # noqa: E402

NAMES = {"float": "float32", "ort:8:MinMax": "onnxruntime quantize_static W8A8 MinMax",
         "ort:4:MinMax": "onnxruntime quantize_static W4A4 MinMax",
         "ort:4:Percentile": "onnxruntime quantize_static W4A4 Percentile"}
# reconstruction settings at the CLI's defaults are not repeated in labels
RECON_DEFAULTS = {"recon_images": RECON_IMAGES_DEFAULT, "recon_scale_lr": QuantConfig.recon_scale_lr}


def _is_default(mod: str) -> bool:
    k, _, v = mod.partition("=")
    if k not in RECON_DEFAULTS:
        return False
    try:
        return float(v) == RECON_DEFAULTS[k]
    except ValueError:
        return False


def label(c: str) -> str:
    if c in NAMES:
        return NAMES[c]
    recipe, b, *mods = c.split(":")
    pareto = "allocator=greedy" not in mods  # PMQ's allocator is the default
    extra = [m for m in mods if m not in ("img=abits", "recon", "allocator=pareto", "allocator=greedy")
             and not _is_default(m)]
    suffix = ((" + reconstruction" if "recon" in mods else "") + (f" (image input at A{b})" if "img=abits" in mods else "")
              + (f" ({', '.join(extra)})" if extra else ""))
    if recipe.endswith("-mp"):
        alloc = "PMQ's Pareto allocation" if pareto else "Greedy MP"
        return f"mptq-onnx {recipe[:-3]} + {alloc}, target {b} bits{suffix}"
    return f"mptq-onnx {recipe} W{b}A{b}{suffix}"


def order(r: dict):
    """float, then onnxruntime, then ours; higher bit-widths first, uniform before mptq."""
    c = r["config"]
    if c == "float":
        return (0, 0, "")
    parts = c.split(":")
    if parts[0] == "ort":
        return (1, -int(parts[1]), parts[2])
    rank = {"uniform": 0, "sqb": 1, "optm": 2, "mptq-paper": 3, "mptq": 4}
    return (2, -float(parts[1]), f"{int(parts[0].endswith('-mp'))}{rank.get(parts[0], 5)}{parts[0]}",
            ":".join(parts[2:]))


def main(paths):
    for p in paths:
        rows = sorted(json.load(open(p)), key=order)
        f = next((r["top1"] for r in rows if r["config"] == "float"), None)
        print(f"\n{rows[0]['card']}: {rows[0]['images']} images of {rows[0].get('val', 'tin_val_dev')}, "
              f"{rows[0]['calib_images']} "
              "calibration images from tin_calib\n")
        print("| model | avg W/A bits | top-1 | % of float | top-5 | convert s | size MB |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            bits = f"{r['avg_w_bits']:.2f}/{r['avg_a_bits']:.2f}" if "avg_w_bits" in r else "-"
            pct = f"{100 * r['top1'] / f:.1f}" if f else "-"
            print(f"| {label(r['config'])} | {bits} | {r['top1']:.4f} | {pct} | {r['top5']:.4f} | "
                  f"{r['convert_seconds']:.1f} | {r['size_mb']:.1f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
