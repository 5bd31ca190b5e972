"""How far quantized models are from float on one image folder: KL of logits, top-1 agreement, top-1.

For comparing settings on calibration data (tin_calib), not on the images a README reports:

    python tools/fidelity.py --card deit_tiny_tin --configs mptq:4 mptq-attn:4 \
        mptq:4:a8=patch_embed mptq:4:skip=qk

Config syntax: tools/specs.py (RECIPE:BITS[:skip=..][:img=..][:FIELD=VALUE]), plus
  w8=ROLE / a8=ROLE   after the recipe ran, put that role's weights / activations back to 8 bits
                      (OPT-m's own 8-bit quantizers; recipes that ran opt-m only)
Calibrates on the config's calib_size images of ../shared/data/tin_calib (128 unless
:calib_size=N); evaluates on all of --data (default tin_calib), or with --holdout on the tin_calib
images that no config of the run calibrated on (the same images for every config), so that
calibration sets of different sizes are compared on images none of them saw.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mptq_onnx.calibrate import session  # noqa: E402
from mptq_onnx.convert import recipe_passes  # noqa: E402
from mptq_onnx.data import ImageFolder, iter_batches, load_calibration, spread_indices  # noqa: E402
from mptq_onnx.modelio import get_preprocess, load_model  # noqa: E402
from mptq_onnx.passes.base import PassManager  # noqa: E402
from mptq_onnx.passes.qdq import write_plan  # noqa: E402
from mptq_onnx.plan import Context  # noqa: E402
from mptq_onnx.simulate import kl_divergence  # noqa: E402
from tools.specs import float_model, quant_config  # noqa: E402


def _base_spec(spec: str) -> str:
    return ":".join(m for m in spec.split(":") if not m.startswith(("w8=", "a8=")))


def quantized(float_path: Path, images: np.ndarray, spec: str, cache: dict):
    """The QDQ model of a spec; runs of the same spec that differ only in w8=/a8= share one conversion."""
    cfg, opts = quant_config(spec)
    for k, _ in opts:
        if k not in ("w8", "a8"):
            raise SystemExit(f"{spec}: {k!r} is neither a modifier nor a QuantConfig field")
    base = _base_spec(spec)
    if base not in cache:
        cache.clear()  # one conversion kept: they hold the calibration data
        ctx = Context(load_model(float_path), cfg, images)
        PassManager(recipe_passes(cfg)[:-1], verbose=False)(ctx)  # all but the QDQ writer
        cache[base] = (ctx, {n: (p.weight, list(p.acts)) for n, p in ctx.plan.items()})
    ctx, saved = cache[base]
    for n, p in ctx.plan.items():
        p.weight, p.acts = saved[n][0], list(saved[n][1])
    if opts and any(p.weight is not None and "gptq" in p.methods for p in ctx.plan.values()):
        raise SystemExit(f"{spec}: w8=/a8= need nearest rounding (add :weight_rounding=nearest): "
                         "the weights were already rounded onto the low-bit grid")
    for k, role in opts:
        if ctx.site_optimizer is None:
            raise SystemExit(f"{spec}: {k}= needs a recipe that runs opt-m")
        for p in ctx.plan.values():
            if p.site.role == role or p.site.name == role:
                if k == "w8" and p.site.weight:
                    p.weight = ctx.site_optimizer.weight(p.site, 8)
                elif k == "a8":
                    p.acts = ctx.site_optimizer.acts(p.site, 8)
    model, _ = write_plan(ctx.model, ctx.plan, "qdq")
    return model


def holdout_indices(n_total: int, calib_sizes) -> list[int]:
    """Indices of an image folder that none of the calibration sets of these sizes uses
    (`load_calibration` takes `spread_indices(n_total, n)`)."""
    used = set().union(*(spread_indices(n_total, n) for n in calib_sizes))
    return [i for i in range(n_total) if i not in used]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--card", required=True)
    ap.add_argument("--shared", default=str(REPO.parent / "shared"))
    ap.add_argument("--configs", nargs="+", required=True)
    ap.add_argument("--data", default=None, help="image folder (default ../shared/data/tin_calib)")
    ap.add_argument("--work", default=str(REPO / "runs"))
    ap.add_argument("--holdout", action="store_true",
                    help="evaluate on the tin_calib images outside every config's calibration set")
    a = ap.parse_args(argv)
    shared = Path(a.shared)
    calib_dir = shared / "data" / "tin_calib"
    if a.holdout and a.data is not None and Path(a.data).resolve() != calib_dir.resolve():
        raise SystemExit("--holdout evaluates on tin_calib; leave out --data")
    float_path = float_model(a.card, shared, Path(a.work))
    pp = get_preprocess(load_model(float_path))
    calib_size = {spec: quant_config(spec)[0].calib_size for spec in a.configs}
    sizes = set(calib_size.values())
    ds = ImageFolder(a.data or calib_dir, pp)
    keep = None
    if a.holdout:
        keep = holdout_indices(len(ds), sizes)
        if not keep:
            raise SystemExit("--holdout: the calibration sets cover all of tin_calib")
    xs, ys = zip(*iter_batches(ds, 64, keep))
    x, y = np.concatenate(xs), np.concatenate(ys)
    calibs = {n: load_calibration(calib_dir, pp, n, progress=False) for n in sorted(sizes)}

    def logits(model):
        s = session(model)
        name = s.get_inputs()[0].name
        return np.concatenate([s.run(None, {name: x[i:i + 64]})[0] for i in range(0, len(x), 64)])

    ref = logits(load_model(float_path))
    held = f" (held out from calibration sets of {', '.join(map(str, sorted(sizes)))})" if a.holdout else ""
    print(f"{a.card} on {len(x)} images of {ds.root.name}{held}: float top-1 {(ref.argmax(1) == y).mean():.4f}")
    cache: dict = {}
    for spec in a.configs:
        z = logits(quantized(float_path, calibs[calib_size[spec]], spec, cache))
        print(f"{spec:32s} KL {kl_divergence(ref, z):.4f}  agree {(z.argmax(1) == ref.argmax(1)).mean():.4f}  "
              f"top-1 {(z.argmax(1) == y).mean():.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
