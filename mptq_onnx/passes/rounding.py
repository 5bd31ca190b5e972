"""Weight rounding with error compensation (GPTQ, Frantar et al. 2022), our addition to OPT-m.

OPT-m fixes each weight quantizer's per-channel scales; rounding every weight to the nearest
code then leaves an output error d_cᵀ H d_c per channel (H = XᵀX of the layer's calibration
input). Rounding the input channels one at a time and moving each one's error onto the channels
not yet rounded, through H⁻¹, lowers that error without changing any scale, zero point or bit-width.
The rounded weights are written back on the quantizer's grid, so the QDQ writer stores exactly
these codes. It runs after Greedy MP, once the bit-widths are final.

H comes from the calibration rows passed through the layer's own activation quantizer (the layers
before it stay float), so the compensation aims at inputs as quantized as the layer will see them.
Where compensation does not lower the error on (a sample of) those rows, nearest rounding is kept.
"""
from __future__ import annotations

import dataclasses
import tempfile

import numpy as np

from ..modelio import Spill
from ..plan import Context
from ..quantizers import Quantizer, fake_quant, gptq_round
from .base import Pass, PassResult

ERR_ROWS = 1024  # rows the kept-or-not check compares the two roundings on


def gptq_weight(ctx: Context, site, wq: Quantizer, aq: Quantizer | None) -> tuple[np.ndarray, float] | None:
    """Site's weight rounded onto `wq`'s grid with error compensation, in the graph's layout, for
    inputs quantized by `aq`, and its output error relative to nearest rounding; None where it
    does not beat nearest rounding (or cannot run)."""
    d = ctx.site_optimizer.data(site) if ctx.site_optimizer is not None else None
    if wq.kind != "uniform" or np.ndim(wq.scale) != 1 or d is None or not d.ok:
        return None
    x = fake_quant(d.x_all, aq) if aq is not None else d.x_all
    x = np.ascontiguousarray(x, np.float32)
    h = (x.T @ x).astype(np.float64)
    w_io = d.w.astype(np.float32)
    wq_io = fake_quant(w_io, dataclasses.replace(wq, axis=1))  # nearest, over [in, out]
    new = gptq_round(w_io, wq, h)
    xs = x[:ERR_ROWS] if len(x) <= ERR_ROWS else x[np.linspace(0, len(x) - 1, ERR_ROWS).astype(int)]
    e0, e1 = _err(xs, w_io, wq_io), _err(xs, w_io, new)
    if not e1 < e0:  # keep nearest rounding where compensation does not help
        return None
    if site.op == "conv":  # [in, out] rows are patches: back to [out, C, k, k]
        new = new.T.reshape(ctx.weight(site.weight).shape)
    elif site.w_in_axis != 0:
        new = new.T
    return np.ascontiguousarray(new, np.float32), e1 / max(e0, 1e-30)


class GPTQRounding(Pass):
    name = "rounding"

    def __call__(self, ctx: Context) -> PassResult:
        if ctx.site_optimizer is None:
            return PassResult(ctx, False, "no OPT-m data; skipped")
        gain = []
        with tempfile.TemporaryFile(prefix="mptq_weights_") as f:
            new = Spill(f)  # written at the end: each site reads only its own weight
            for p in ctx.plan.values():
                if p.weight is None:
                    continue
                r = gptq_weight(ctx, p.site, p.weight, p.acts[0] if p.acts else None)
                if r is None:
                    continue
                new.put(p.site.weight, r[0])
                gain.append(r[1])
                p.methods.append("gptq")
            if len(new):
                ctx.set_initializers(new)
        msg = f"{len(gain)} weights rounded with error compensation"
        if gain:
            msg += f"; output error x{np.median(gain):.2f} (median)"
        return PassResult(ctx, bool(gain), msg, sites=len(gain))


def _err(x: np.ndarray, w: np.ndarray, wq: np.ndarray) -> float:
    d = x @ (wq - w)
    return float((d * d).sum(dtype=np.float64))
