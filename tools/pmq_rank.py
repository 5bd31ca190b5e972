"""How well PMQ's one-shot metric ranks quantizers, and what it costs, against Greedy MP's
measurements of each quantizer lowered alone (the issue's check of the metric).

    python tools/pmq_rank.py --card deit_tiny_tin --target 5 --out docs/runs/pmq/rank_deit_tiny_tin.json
    python tools/pmq_rank.py --embedded --target 5          # the embedded model, no ../shared

Runs the recipe's passes up to the allocator once, then the PMQ metric (each --variant), then
Greedy MP (which records its measured costs), all on the same calibration images. Prints and
stores, per variant: seconds, onnxruntime runs, the fit's R², and the Spearman correlation of
Ω at the lowest measured width with Greedy MP's measured cost there (weights and activations
together, and each alone). Variants: masks=N, probe=B, norm=image|none (comma-separated KEY=VALUE).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mptq_onnx.convert import recipe_passes  # noqa: E402
from mptq_onnx.data import load_calibration  # noqa: E402
from mptq_onnx.modelio import get_preprocess, load_model  # noqa: E402
from mptq_onnx.passes.base import PassManager  # noqa: E402
from mptq_onnx.passes.greedy_mp import GreedyMP, UniformProvider  # noqa: E402
from mptq_onnx.passes.pareto import allocation_items  # noqa: E402
from mptq_onnx.plan import Context, QuantConfig  # noqa: E402
from mptq_onnx.sensitivity import global_sensitivity  # noqa: E402


def _ranks(a) -> np.ndarray:
    a = np.asarray(a, np.float64)
    r = np.empty(len(a))
    r[np.argsort(a, kind="stable")] = np.arange(len(a), dtype=np.float64)
    _, inv, counts = np.unique(a, return_inverse=True, return_counts=True)
    for i in np.flatnonzero(counts > 1):
        r[inv == i] = r[inv == i].mean()  # ties share their mean rank
    return r


def spearman(a, b) -> float:
    """Spearman's rank correlation (ties at their mean rank)."""
    return float(np.corrcoef(_ranks(a), _ranks(b))[0, 1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--card", help="model card name in ../shared/models")
    ap.add_argument("--embedded", action="store_true", help="the embedded deit_tiny_tin and its images")
    ap.add_argument("--shared", default=str(REPO.parent / "shared"))
    ap.add_argument("--recipe", default="mptq")
    ap.add_argument("--target", type=float, default=5.0)
    ap.add_argument("--calib-size", type=int, default=128)
    ap.add_argument("--variant", nargs="+", default=["default"])
    ap.add_argument("--work", default=str(REPO / "runs"))
    ap.add_argument("--out", help="JSON file to write")
    a = ap.parse_args(argv)
    if a.embedded:
        from mptq_onnx.embedded import embedded_calib_dir, load_embedded_model
        model, calib, name = load_embedded_model(), embedded_calib_dir(), "embedded"
    else:
        from tools.specs import float_model
        model = load_model(float_model(a.card, Path(a.shared), Path(a.work)))
        calib, name = Path(a.shared) / "data" / "tin_calib", a.card
    images = load_calibration(calib, get_preprocess(model), a.calib_size, progress=False)
    cfg = QuantConfig(recipe=a.recipe, target_bits=a.target, calib_size=a.calib_size, progress=False)
    ctx = Context(model, cfg, images)
    passes = recipe_passes(cfg)
    body = [p for p in passes if p.name not in ("greedy-mp", "pareto-mp", "rounding", "qdq")]
    PassManager(body, verbose=False)(ctx)
    prov = ctx.site_optimizer or UniformProvider(ctx)
    items, _, _ = allocation_items(ctx)
    cands = sorted(set(cfg.candidates()), reverse=True)
    imgs, ref = ctx.calib_images[:cfg.mp_images], ctx.calib.logits[:cfg.mp_images]
    prov_warm = time.perf_counter()
    for it in items:  # the quantizers at the two lowest widths, which both allocators need
        for b in cands[-2:]:
            prov.weight(it.site, b) if it.key[1] == "w" else prov.acts(it.site, b)
    prov_warm = time.perf_counter() - prov_warm
    results = {"model": name, "recipe": a.recipe, "target": a.target, "candidates": cands,
               "quantizers": len(items), "mp_images": cfg.mp_images, "quantizer_search_seconds": round(prov_warm, 2),
               "variants": []}
    sens = {}
    for v in a.variant:
        kw = dict(x.split("=") for x in v.split(",") if "=" in x)
        masks = int(kw.get("masks", cfg.pmq_masks))
        probe = int(kw.get("probe", min(cands)))
        s = global_sensitivity(ctx, prov, items, cands, probe, imgs, ref, masks,
                               per_image=kw.get("norm", "image") == "image")
        sens[v] = (s, probe)
        print(f"{v}: {s.seconds:.1f}s, {s.runs} runs, {s.rows} rows, R2 {s.fit_r2:.3f}", file=sys.stderr)
    t = time.perf_counter()
    GreedyMP()(ctx)
    greedy_s = time.perf_counter() - t
    measured = ctx.report["greedy_mp"]["measured"]
    results["greedy_seconds"] = round(greedy_s, 2)
    lo2 = [str(b) for b in cands[-2:]]
    both = [k for k, m in measured.items() if all(b in m for b in lo2)]
    if len(both) > 2:  # how steady the reference itself is: its two widths' ranks
        results["greedy_self_spearman"] = round(spearman([measured[k][lo2[0]] for k in both],
                                                         [measured[k][lo2[1]] for k in both]), 4)
        print(f"greedy's own measurements at {lo2}: Spearman {results['greedy_self_spearman']}", file=sys.stderr)
    results["greedy_evaluations"] = ctx.report["greedy_mp"]["evaluations"]
    for v, (s, probe) in sens.items():
        row = {"variant": v, "probe_bits": probe, "seconds": round(s.seconds, 2), "runs": s.runs, "rows": s.rows,
               "fit_r2": round(s.fit_r2, 4)}
        for b in cands[-2:]:
            for typ in ("all", "w", "a"):
                ks = [k for k in s.omega if (typ == "all" or k[1] == typ) and str(b) in measured.get(f"{k[0]}:{k[1]}", {})]
                if len(ks) > 2:
                    row[f"spearman_{typ}_{b}"] = round(spearman([s.omega[k][b] for k in ks],
                                                                [measured[f"{k[0]}:{k[1]}"][str(b)] for k in ks]), 4)
        results["variants"].append(row)
        print(json.dumps(row))
    print(f"greedy sensitivity + allocation {greedy_s:.1f}s, quantizer searches {prov_warm:.1f}s", file=sys.stderr)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
