"""Accuracy/time table: float, onnxruntime's quantize_static, and mptq-onnx recipes, in one run.

    python tools/benchmark.py --card deit_tiny_tin --configs float ort:8:MinMax ort:4:MinMax \
        uniform:8 uniform:4 mptq:4 mptq-mp:5 --out runs/deit.json

Calibrates on ../shared/data/tin_calib (128 images unless --calib-size), evaluates on
../shared/data/tin_val_dev (all 5,050 images unless --limit). Config syntax:
  float | ort:BITS:MinMax|Percentile | RECIPE:BITS (W=A=BITS) | RECIPE-mp:TARGET (Greedy MP),
  then optional modifiers (:img=abits, :skip=head, :mp_images=32; see tools/specs.py)
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

from mptq_onnx.calibrate import map_large_allocations  # noqa: E402
from mptq_onnx.convert import convert  # noqa: E402
from mptq_onnx.data import load_calibration  # noqa: E402
from mptq_onnx.evaluator import evaluate  # noqa: E402
from mptq_onnx.modelio import get_preprocess, load_model, save_model  # noqa: E402
from tools.specs import float_model, quant_config  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--card", required=True, help="model card name in ../shared/models")
    ap.add_argument("--shared", default=str(REPO.parent / "shared"))
    ap.add_argument("--configs", nargs="+", required=True)
    ap.add_argument("--calib-size", type=int, default=128)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--val", default=None, help="evaluation folder (default ../shared/data/tin_val_dev); "
                    "use tin_calib to compare settings without looking at the reported images")
    ap.add_argument("--work", default=str(REPO / "runs"))
    ap.add_argument("--out", required=True, help="JSON results (appended per config as they finish)")
    a = ap.parse_args(argv)
    map_large_allocations()  # as the CLI's process does
    configs = {}  # parsed before any work, so a typo fails at once and not after an hour
    for c in a.configs:
        if c.split(":")[0] not in ("float", "ort"):
            configs[c], rest = quant_config(c)
            if rest:
                raise SystemExit(f"{c}: unknown modifier {rest[0][0]!r}")
    shared = Path(a.shared)
    calib, val = shared / "data" / "tin_calib", Path(a.val or shared / "data" / "tin_val_dev")
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    float_path = float_model(a.card, shared, work)
    model = load_model(float_path)
    images = load_calibration(calib, get_preprocess(model), a.calib_size, progress=False)
    out = Path(a.out)
    results = json.loads(out.read_text()) if out.exists() else []
    for cfg_s in a.configs:
        parts = cfg_s.split(":")
        row = {"card": a.card, "config": cfg_s, "calib_images": len(images), "limit": a.limit, "val": val.name}
        qpath = work / f"{a.card}.{cfg_s.replace(':', '_')}.onnx"
        t = time.perf_counter()
        if parts[0] == "float":
            qpath, secs = float_path, 0.0
        elif parts[0] == "ort":
            from tools.ort_baseline import ort_quantize_static
            bits, method = int(parts[1]), parts[2]
            secs = ort_quantize_static(float_path, images, qpath, bits, bits, method)
        else:
            cfg = configs[cfg_s]
            recon = (load_calibration(calib, get_preprocess(model), cfg.recon_images, progress=False)
                     if cfg.recon_images and (cfg.reconstruct or cfg.recipe == "ias") else None)
            ctx = convert(load_model(float_path), images, cfg, verbose=True, recon_images=recon)
            save_model(ctx.model, qpath, force=True)
            secs = time.perf_counter() - t
            row["passes"] = {p["pass"]: p["seconds"] for p in ctx.report["passes"]}
            if "gbops" in ctx.report:
                row["gbops"] = ctx.report["gbops"]
            if "patchwise" in ctx.report:
                row["attention_gbops_saved"] = ctx.report["patchwise"]["attention_gbops_saved"]
            if "pareto_mp" in ctx.report:
                row["pmq_metric_seconds"] = ctx.report["pareto_mp"]["metric_seconds"]
            row["avg_w_bits"], row["avg_a_bits"] = ctx.report["avg_w_bits"], ctx.report["avg_a_bits"]
        row["convert_seconds"] = round(secs, 2)
        r = evaluate(qpath, val, limit=a.limit, progress=False)
        row.update(top1=round(r.top1, 4), top5=round(r.top5, 4), images=r.images,
                   images_per_s=round(r.images_per_s, 1), size_mb=round(qpath.stat().st_size / 1e6, 2))
        print(json.dumps(row), flush=True)
        row["hits"] = np.packbits(r.hits).tobytes().hex()  # per-image top-1, for tools/paired.py
        results.append(row)
        out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
