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

import numpy as np

from ..plan import Context
from ..quantizers import fake_quant, gptq_round
from .base import Pass, PassResult
from .sqb import set_w_in_out

ERR_ROWS = 1024  # rows the kept-or-not check compares the two roundings on


class GPTQRounding(Pass):
    name = "rounding"

    def __call__(self, ctx: Context) -> PassResult:
        opt = ctx.site_optimizer
        if opt is None:
            return PassResult(ctx, False, "no OPT-m data; skipped")
        done, gain = 0, []
        for p in ctx.plan.values():
            site = p.site
            if p.weight is None or p.weight.kind != "uniform" or np.ndim(p.weight.scale) != 1:
                continue
            d = opt.data(site)
            if d is None or d.x is None:
                continue
            aq = p.acts[0] if p.acts else None
            x = fake_quant(d.x_all, aq) if aq is not None else d.x_all
            x = np.ascontiguousarray(x, np.float32)
            h = (x.T @ x).astype(np.float64)
            w_io = d.w.astype(np.float32)
            wq_io = fake_quant(w_io, dataclasses.replace(p.weight, axis=1))  # nearest, over [in, out]
            new = gptq_round(w_io, p.weight, h)
            xs = x[:ERR_ROWS] if len(x) <= ERR_ROWS else x[np.linspace(0, len(x) - 1, ERR_ROWS).astype(int)]
            e0, e1 = _err(xs, w_io, wq_io), _err(xs, w_io, new)
            if not e1 < e0:  # keep nearest rounding where compensation does not help
                continue
            gain.append(e1 / max(e0, 1e-30))
            if site.op == "conv":  # [in, out] rows are patches: back to [out, C, k, k]
                shape = ctx.weight(site.weight).shape
                ctx.set_initializer(site.weight, np.ascontiguousarray(new.T).reshape(shape))
            else:
                set_w_in_out(ctx, site, new)
            p.methods.append("gptq")
            done += 1
        msg = f"{done} weights rounded with error compensation"
        if gain:
            msg += f"; output error x{np.median(gain):.2f} (median)"
        return PassResult(ctx, done > 0, msg)


def _err(x: np.ndarray, w: np.ndarray, wq: np.ndarray) -> float:
    d = x @ (wq - w)
    return float((d * d).sum(dtype=np.float64))
