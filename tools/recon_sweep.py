"""Reconstruction settings compared on one conversion: the passes before the first reconstruction
run once, then each variant reconstructs (and writes QDQ) from a copy of that state.

    python tools/recon_sweep.py --card deit_tiny_tin --spec mptq:4 \
        --variants iters=0 recon_lr=4e-5 recon_lr=1e-4 recon_lr=3e-4,recon_iters=200

A variant is comma-separated QuantConfig fields (recon_lr, recon_iters, recon_batch, seed, ...;
`iters` is short for recon_iters). Calibrates on the spec's calib_size images of tin_calib (128
unless :calib_size=N; reconstruction on :recon_images=N if given) and evaluates on the tin_calib
images outside those sets (as
tools/fidelity.py --holdout): for choosing settings, not for reporting. Prints KL to float, top-1
agreement, top-1 and the reconstruction's seconds per variant; --out appends JSON lines.

    python tools/recon_sweep.py --table docs/runs/recon/sweep_*.jsonl --spec mptq:3:recon_images=512 \
        mptq:4:recon_images=512 --variants recon_loss=mse recon_loss=fisher_abs

prints a markdown table of those rows (the last row of each card, spec and variant) with each
variant's KL as a ratio to the first variant's, and per variant how many KLs it lowered and the
geometric mean of its ratios (the rule of docs/journal.md, session 16).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mptq_onnx.calibrate import session  # noqa: E402
from mptq_onnx.convert import recipe_passes  # noqa: E402
from mptq_onnx.data import ImageFolder, iter_batches, load_calibration  # noqa: E402
from mptq_onnx.modelio import get_preprocess, load_model  # noqa: E402
from mptq_onnx.passes.base import PassManager  # noqa: E402
from mptq_onnx.passes.reconstruct import Reconstruct  # noqa: E402
from mptq_onnx.plan import Context  # noqa: E402
from mptq_onnx.simulate import kl_divergence  # noqa: E402
from tools.fidelity import holdout_indices  # noqa: E402
from tools.specs import float_model, quant_config, _parse_like  # noqa: E402


def parse_variant(v: str, cfg) -> dict:
    out = {}
    for kv in v.split(","):
        k, val = kv.split("=", 1)
        k = {"iters": "recon_iters", "lr": "recon_lr", "batch": "recon_batch", "slr": "recon_scale_lr",
             "drop": "recon_drop"}.get(k, k)
        if not hasattr(cfg, k):
            raise SystemExit(f"{v}: {k!r} is not a QuantConfig field")
        out[k] = _parse_like(getattr(cfg, k), val)
    return out


def table(files: list[str], specs: list[str], variants: list[str]) -> str:
    rows = {}
    for f in files:
        for line in open(f):
            r = json.loads(line)
            rows[r["card"], r["spec"], r["variant"]] = r
    keys = sorted({(c, s) for c, s, _ in rows if s in specs}, key=lambda k: (k[0], specs.index(k[1])))
    out = ["| model | spec | " + " | ".join(f"KL, `{v}`" for v in variants) + " |",
           "|---|---|" + "---|" * len(variants)]
    ratios: dict[str, list[float]] = {v: [] for v in variants[1:]}
    for card, spec in keys:
        ref = rows.get((card, spec, variants[0]))
        if ref is None:
            raise SystemExit(f"{card} {spec}: no row for the reference {variants[0]}")
        cells = [f"{ref['kl']:.4f}"]
        for v in variants[1:]:
            r = rows.get((card, spec, v))
            if r is None:
                raise SystemExit(f"{card} {spec}: no row for {v}")
            ratios[v].append(r["kl"] / ref["kl"])
            cells.append(f"{r['kl']:.4f} (x{ratios[v][-1]:.3f})")
        out.append(f"| {card} | `{spec}` | " + " | ".join(cells) + " |")
    out.append("")
    for v, rs in ratios.items():
        gm = float(np.exp(np.mean(np.log(rs))))
        out.append(f"- `{v}`: lower KL than `{variants[0]}` in {sum(r < 1 for r in rs)} of {len(rs)}, "
                   f"geometric mean of ratios {gm:.4f}")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--card")
    ap.add_argument("--spec", nargs="+", help="RECIPE:BITS[:FIELD=VALUE...] (tools/specs.py); "
                    "reconstruction is switched on (one spec, several with --table)")
    ap.add_argument("--variants", nargs="+", required=True)
    ap.add_argument("--shared", default=str(REPO.parent / "shared"))
    ap.add_argument("--work", default=str(REPO / "runs"))
    ap.add_argument("--out", default=None, help="append one JSON line per variant")
    ap.add_argument("--table", nargs="+", metavar="JSONL", help="print a table of these sweep files instead")
    a = ap.parse_args(argv)
    if not a.spec:
        ap.error("--spec is required")
    if a.table:
        print(table(a.table, a.spec, a.variants))
        return 0
    if not a.card or len(a.spec) != 1:
        ap.error("a sweep takes --card and one --spec")
    a.spec = a.spec[0]
    cfg, rest = quant_config(a.spec)
    if rest:
        raise SystemExit(f"{a.spec}: unknown modifiers {rest}")
    cfg.reconstruct, cfg.progress = True, False
    variants = [(v, parse_variant(v, cfg)) for v in a.variants]  # typos fail before any work
    for v, fields in variants:  # the passes before reconstruction run once, with the spec's config
        if dataclasses.replace(cfg, **fields).rounding() != cfg.rounding():
            raise SystemExit(f"{v}: changes the weight rounding before reconstruction; put it in --spec")
    shared = Path(a.shared)
    calib_dir = shared / "data" / "tin_calib"
    float_path = float_model(a.card, shared, Path(a.work))
    pp = get_preprocess(load_model(float_path))
    ds = ImageFolder(calib_dir, pp)
    xs, ys = zip(*iter_batches(ds, 64, holdout_indices(len(ds), [n for n in (cfg.calib_size, cfg.recon_images) if n])))
    x, y = np.concatenate(xs), np.concatenate(ys)

    def logits(model):
        s = session(model)
        name = s.get_inputs()[0].name
        return np.concatenate([s.run(None, {name: x[i:i + 64]})[0] for i in range(0, len(x), 64)])

    ref = logits(load_model(float_path))
    print(f"{a.card} on {len(x)} held-out images of tin_calib: float top-1 {(ref.argmax(1) == y).mean():.4f}")
    passes = recipe_passes(cfg)
    first = next(i for i, p in enumerate(passes) if isinstance(p, Reconstruct))
    recon = load_calibration(calib_dir, pp, cfg.recon_images, progress=False) if cfg.recon_images else None
    ctx = Context(load_model(float_path), cfg, load_calibration(calib_dir, pp, cfg.calib_size, progress=False), recon)
    t = time.perf_counter()
    PassManager(passes[:first], verbose=False)(ctx)
    print(f"{a.spec}: passes before reconstruction {time.perf_counter() - t:.0f}s", flush=True)
    for name, fields in variants:
        c = copy.deepcopy(ctx)
        c.config = dataclasses.replace(cfg, **fields)
        t = time.perf_counter()
        PassManager(passes[first:], verbose=False)(c)
        dt = time.perf_counter() - t
        z = logits(c.model)
        row = {"card": a.card, "spec": a.spec, "variant": name, "kl": round(kl_divergence(ref, z), 5),
               "agree": round(float((z.argmax(1) == ref.argmax(1)).mean()), 4),
               "top1": round(float((z.argmax(1) == y).mean()), 4), "seconds": round(dt, 1),
               "blocks": c.report.get("reconstruct", {})}
        ratios = [r["loss_after"] / max(r["loss_before"], 1e-30) for rows in row["blocks"].values()
                  for r in rows if "loss_after" in r]
        loss = f"  block loss x{np.median(ratios):.3f} (median)" if ratios else ""
        print(f"{name:40s} KL {row['kl']:.4f}  agree {row['agree']:.4f}  top-1 {row['top1']:.4f}  {dt:.0f}s{loss}",
              flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
