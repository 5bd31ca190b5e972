"""Run another tool with a trial change patched in: the "tried, not kept" rows of the README.

    python tools/trials.py TRIAL [TRIAL ...] -- tools/fidelity.py --card deit_tiny_tin --configs mptq:6

TRIAL is a module attribute set to a Python literal (MODULE.ATTR=VALUE, e.g.
mptq_onnx.passes.sqb.ROWS=4096) or a named trial:
  shift-margin=M   SQ-b keeps the paper's mean shift unless the mid-range's best error is lower
                   by more than the fraction M (each shift's α searched as usual)
  shift-gptq       SQ-b picks α per shift as usual, then the shift (none, mean, mid-range) by the
                   group's error with GPTQ-rounded weights (grid: per-channel MinMax) and quantized inputs
  shift-only       α < 0 in the grid (e.g. :sqb_alphas=-1,0.3,...,0.8) means the shift alone (s = 1)
Each named trial replaces `search_smoothing` / `smoothing_scale` in SQ-b and attention smoothing.
"""
from __future__ import annotations

import ast
import importlib
import runpy
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mptq_onnx.passes import attn_smooth, sqb  # noqa: E402
from mptq_onnx.quantizers import gptq_round, symmetric_per_channel  # noqa: E402


def _per_shift(orig, st, xs, ws, alphas, shifts, wbits, abits, weights):
    """(error without rescaling, {shift: its best (error, μ, s, shift, α) or None})."""
    out = {}
    for sh in shifts:
        err0, best = orig(st, xs, ws, alphas, (sh,), wbits, abits, weights)
        out[sh] = best if best[1] is not None else None
    return err0, out


def _gptq_error(xs, ws, ys, mu, s, wbits, abits) -> float:
    xq = sqb._quick_act((xs - mu) / s, abits)
    h = (xq.T @ xq).astype(np.float64)
    err = 0.0
    for w, y in zip(ws, ys):
        w2 = (w * s[:, None]).astype(np.float32)
        d = xq @ gptq_round(w2, symmetric_per_channel(w2, 1, wbits), h) + mu @ w - y
        err += float((d * d).sum() / max(float((y * y).sum()), 1e-12))
    return err


def _install_search(make):
    fn = make(sqb.search_smoothing)
    sqb.search_smoothing = fn
    attn_smooth.search_smoothing = fn


def shift_margin(m: float):
    def make(orig):
        def search(st, xs, ws, alphas, shifts, wbits, abits, weights=True):
            err0, per = _per_shift(orig, st, xs, ws, alphas, shifts, wbits, abits, weights)
            best, mid = per.get("mean"), per.get("midrange")
            if mid is not None and (best is None or mid[0] < (1 - m) * best[0]):
                best = mid
            return err0, best or (err0, None, None, "none", 0.0)
        return search
    _install_search(make)


def shift_gptq():
    def make(orig):
        def search(st, xs, ws, alphas, shifts, wbits, abits, weights=True):
            err0, per = _per_shift(orig, st, xs, ws, alphas, shifts, wbits, abits, weights)
            one, ys = np.ones_like(st.ch_mean), [xs @ w for w in ws]
            fin = [(_gptq_error(xs, ws, ys, 0 * one, one, wbits, abits), None, None, "none", 0.0)]
            fin += [(_gptq_error(xs, ws, ys, b[1], b[2], wbits, abits),) + b[1:] for b in per.values() if b]
            return err0, min(fin, key=lambda t: t[0])
        return search
    _install_search(make)


def shift_only():
    orig = sqb.smoothing_scale

    def scale(y_absmax, w_absmax, alpha):
        return np.ones_like(y_absmax, np.float32) if alpha < 0 else orig(y_absmax, w_absmax, alpha)
    sqb.smoothing_scale = scale


def apply(trial: str) -> None:
    name, _, value = trial.partition("=")
    if name == "shift-margin":
        shift_margin(float(value))
    elif name == "shift-gptq":
        shift_gptq()
    elif name == "shift-only":
        shift_only()
    elif "." in name and value:
        mod, attr = name.rsplit(".", 1)
        m = importlib.import_module(mod)
        if not hasattr(m, attr):
            raise SystemExit(f"{mod} has no attribute {attr!r}")
        setattr(m, attr, ast.literal_eval(value))
    else:
        raise SystemExit(f"unknown trial {trial!r} (see --help)")
    print(f"trial: {trial}", file=sys.stderr)


def main(argv: list[str]) -> int:
    if "--" not in argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    i = argv.index("--")
    for t in argv[:i]:
        apply(t)
    tool, rest = argv[i + 1], argv[i + 2:]
    sys.argv = [tool] + rest
    sys.path.insert(0, str(REPO / "tools"))
    runpy.run_path(tool, run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
