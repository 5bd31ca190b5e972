"""OPT-m (MPTQ-ViT): data-driven quantization parameters, chosen by the error of each layer's output.

- Linear/Conv weights: per-output-channel clipping minimising d_cᵀ H d_c, H = XᵀX of the layer's
  calibration input, i.e. the squared error of that output channel (not of the weight itself).
- Linear/Conv inputs: the clipping range [a·min, b·max] minimising ‖(Q(X) − X) W‖².
- Post-GELU inputs (fc2): region-wise scales, the small negative region and the positive region
  each with its own scale; the number of negative codes and the ratio m = s_pos / s_neg are
  searched, and plain uniform is kept where it is better.
- Attention MatMuls: each operand's quantizer minimises the error of the product with the other
  operand in float; post-Softmax values choose between uniform, log2 and log√2 by that error, and
  at 6 bits and up log⁴√2 too (4 codes per octave: there log2 and log√2 waste codes on
  probabilities too small to matter, and uniform zeroes them). SULQ (I&S-ViT's shift-uniform-log2)
  is no candidate: it won at no site of deit_tiny_tin or swin_tiny_tin at A4 or A3 (tin_calib),
  its summed relative attn·V error 4.5x / 4.1x the chosen quantizers' (A4 / A3) on deit and
  9.0x / 2.3x on swin: rounding the exponent leaves it one level per octave of its range.
  With `softmax_quantizer="sulq"`, SULQ alone (η searched by that error).
Activation searches use float weights, so the quantizer of each (site, bit-width) is independent
of the others' bit-widths and Greedy MP can cache them.
"""
from __future__ import annotations

import numpy as np

from ..graph import GraphIndex, attr
from ..plan import Context, SitePlan
from ..quantizers import (Quantizer, fake_quant, log2_quantizer, log_name, region_quantizer,
                          search_sulq_scored, search_uniform_scored, search_weight)
from .base import Pass, PassResult
from .sqb import w_in_out
from .uniform import skipped

ROWS = 768
GRID = 10


def patchify(x: np.ndarray, k: int) -> np.ndarray:
    """[n, C, H, W] -> [n·(H/k)·(W/k), C·k·k], the rows a stride-k, k×k convolution multiplies."""
    n, c, h, w = x.shape
    x = x[:, :, : h - h % k, : w - w % k].reshape(n, c, h // k, k, w // k, k)
    return x.transpose(0, 2, 4, 1, 3, 5).reshape(-1, c * k * k)


class SiteData:
    """Calibration rows X [n, in] and the float weight as [in, out] for a Linear or patch Conv."""

    def __init__(self, ctx: Context, site, rng: np.random.Generator):
        st = ctx.calib.stats[site.inputs[0].tensor]
        w = ctx.weight(site.weight)
        self._ctx, self._site = ctx, site
        self.x_tensor = st.sample
        self.conv_k = None
        if site.op == "conv":
            node = GraphIndex(ctx.model).nodes[site.node]
            k = attr(node, "kernel_shape", list(w.shape[2:]))
            ok = (list(attr(node, "strides", [1, 1])) == list(k) and not any(attr(node, "pads", [0]) or [0])
                  and attr(node, "group", 1) == 1 and k[0] == k[1])
            if not ok:
                self.x = None
                self.ok = False
                return
            self.conv_k = k[0]
            rows = patchify(st.sample, k[0])
        else:
            rows = st.sample
        w = self.w
        self.x_all = rows
        idx = np.sort(rng.choice(len(rows), min(ROWS, len(rows)), replace=False))
        self.x = rows[idx]
        # ‖D W‖² = ‖D P‖² for any P with P Pᵀ = W Wᵀ: the thinner of W and U·sqrt(Λ) (W Wᵀ = U Λ Uᵀ)
        if w.shape[1] <= w.shape[0]:
            self.proj = np.ascontiguousarray(w, np.float32)
        else:
            lam, u = np.linalg.eigh(w.astype(np.float64) @ w.T.astype(np.float64))
            self.proj = (u * np.sqrt(np.maximum(lam, 0.0))).astype(np.float32)
        self._h = None
        self.ok = True  # searchable (and GPTQ-roundable): a Linear or a patch Conv

    @property
    def w(self) -> np.ndarray:
        """The float weight as [in, out], read from the graph each time (no pass changes it after
        OPT-m's): a copy of every weight per site held vit_base's weights twice."""
        w = self._ctx.weight(self._site.weight)
        return w.reshape(w.shape[0], -1).T if self.conv_k is not None else w_in_out(w, self._site)

    def drop_hessian(self) -> None:
        self._h = None

    def release(self) -> None:
        """Free what only the searches read, once no search follows (no Greedy MP): GPTQ
        rounding reads x_all and w. Held for every site, these were 0.4 GB on vit_base."""
        self._h = self.proj = self.x = None

    @property
    def hessian(self) -> np.ndarray:
        if self._h is None:
            self._h = self.x_all.T @ self.x_all  # float32 is plenty to rank clipping candidates
        return self._h

    def out_err(self, xq_minus_x: np.ndarray) -> float:
        d = xq_minus_x @ self.proj
        return float(np.square(d, out=d).sum())


def opt_weight(ctx: Context, site, data: SiteData | None, bits: int) -> Quantizer:
    if data is None or data.x is None:
        return search_weight(ctx.weight(site.weight), site.w_out_axis, bits, method="opt-m")
    w_io = data.w  # read from the graph once
    if len(data.x_all) < w_io.shape[0]:  # fewer tokens than input channels: X is the thinner factor
        q = search_weight(w_io, 1, bits, rows=data.x_all, method="opt-m")  # over [in, out]
    elif len(data.x) < w_io.shape[0]:
        # wider than the search sample (vit_base's fc2: 3072 inputs): its ROWS tokens score each
        # candidate in a quarter of H's products, as they score the activation candidates
        q = search_weight(w_io, 1, bits, rows=data.x, method="opt-m")
    else:
        q = search_weight(w_io, 1, bits, hessian=data.hessian, method="opt-m")
    q.axis = site.w_out_axis  # per output channel: same vector whichever way the weight is stored
    return q


def opt_linear_act(ctx: Context, site, data: SiteData, bits: int) -> Quantizer:
    st = ctx.calib.stats[site.inputs[0].tensor]
    if data.conv_k is not None:
        # the image tensor is quantized before patching; score on patch rows
        xt = data.x_tensor  # whole images of the first calibration batch
        rows = patchify(xt, data.conv_k)
        err = lambda xq: data.out_err(patchify(xq, data.conv_k) - rows)  # noqa: E731
        x = xt
    else:
        x = data.x
        err = lambda xq: data.out_err(np.subtract(xq, x, out=xq))  # noqa: E731  (xq is a fresh array)
    best_err, best = search_uniform_scored(x, bits, err, lo=st.min, hi=st.max, grid=GRID, method="opt-m")
    if site.inputs[0].kind != "post_gelu":
        return best
    neg_min, pos_max = min(st.min, 0.0), st.max
    hi_best = float(best.scale) * (best.qmax - int(best.zero_point))
    ratios = np.linspace(1.0, 0.3, 8)
    cand_hi = [min(hi_best * r, pos_max) for r in (1.3, 1.15, 1.0, 0.9, 0.8, 0.7)]  # around the uniform optimum
    memo: dict[tuple[float, float, int], float] = {}  # the two scans share points (ratio 1, clipped highs)

    def region_err(neg: float, hi: float, k: int) -> float:
        if (neg, hi, k) not in memo:
            memo[neg, hi, k] = err(fake_quant(x, region_quantizer(neg, hi, bits, k)))
        return memo[neg, hi, k]

    for k in (1, 2):  # GELU's negative tail is short: a code or two below zero
        if k >= (1 << bits) // 2:
            continue
        ph = min(cand_hi, key=lambda h: region_err(neg_min, h, k))
        rn = min(ratios, key=lambda r: region_err(neg_min * r, ph, k))
        e = region_err(neg_min * rn, ph, k)
        if e < best_err:
            best, best_err = region_quantizer(neg_min * rn, ph, bits, k, method="opt-m-region"), e
    return best


def _product_err(a: np.ndarray, b: np.ndarray, which: int):
    ref = a @ b

    def err(xq: np.ndarray) -> float:
        d = xq @ b if which == 0 else a @ xq
        d -= ref  # in place: the temporaries took half the time of each of thousands of calls
        return float(np.square(d, out=d).sum())
    return err


def opt_matmul_acts(ctx: Context, site, bits: int) -> list[Quantizer]:
    sa, sb = (ctx.calib.stats[i.tensor] for i in site.inputs)
    a, b = sa.sample, sb.sample
    qs = []
    for which, (x, st, inp) in enumerate(((a, sa, site.inputs[0]), (b, sb, site.inputs[1]))):
        err = _product_err(a, b, which)
        if inp.kind == "post_softmax" and ctx.config.softmax_quantizer == "sulq":
            qs.append(search_sulq_scored(x, bits, err, lo=st.min, hi=st.max, method="opt-m-sulq")[1])
            continue
        be, best = search_uniform_scored(x, bits, err, lo=st.min, hi=st.max, grid=GRID, method="opt-m")
        if inp.kind == "post_softmax":
            for k in (1, 2, 4) if bits >= 6 else (1, 2):  # log2, log√2, log⁴√2
                for r in (1.0, 0.75, 0.5, 0.35, 0.25):
                    q = log2_quantizer(st.max * r, bits, method=f"opt-m-{log_name(k)}", steps_per_octave=k)
                    e = err(fake_quant(x, q))
                    if e < be:
                        best, be = q, e
        qs.append(best)
    return qs


class SiteOptimizer:
    """Caches per-site calibration matrices so each (site, bits) search is done once."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.rng = np.random.default_rng(ctx.config.seed)
        self._data: dict[str, SiteData] = {}
        self._w: dict[tuple[str, int], Quantizer] = {}
        self._a: dict[tuple[str, int], list[Quantizer]] = {}

    def data(self, site) -> SiteData | None:
        if site.weight is None:
            return None
        if site.name not in self._data:
            self._data[site.name] = SiteData(self.ctx, site, self.rng)
        return self._data[site.name]

    def weight(self, site, bits: int) -> Quantizer:
        key = (site.name, bits)
        if key not in self._w:
            self._w[key] = opt_weight(self.ctx, site, self.data(site), bits)
        return self._w[key]

    def act_kinds(self, site, i: int) -> list[str]:
        """Every kind `acts` may return for input i at any bit-width (region covers uniform)."""
        kind, d = site.inputs[i].kind, self.data(site)
        if kind == "post_gelu" and site.op != "act_matmul" and d is not None and d.ok:
            return ["region"]
        if kind == "post_softmax" and site.op == "act_matmul":
            return ["sulq"] if self.ctx.config.softmax_quantizer == "sulq" else ["log2", "uniform"]
        return ["uniform"]

    def acts(self, site, bits: int) -> list[Quantizer]:
        key = (site.name, bits)
        if key not in self._a:
            if site.op == "act_matmul":
                self._a[key] = opt_matmul_acts(self.ctx, site, bits)
            else:
                d = self.data(site)
                if d is None or d.x is None:
                    from .uniform import act_quantizer
                    self._a[key] = [act_quantizer(self.ctx, site.inputs[0].tensor, bits, "mse")]
                else:
                    self._a[key] = [opt_linear_act(self.ctx, site, d, bits)]
        return self._a[key]


class OptM(Pass):
    name = "opt-m"

    def __call__(self, ctx: Context) -> PassResult:
        cfg = ctx.config
        opt = SiteOptimizer(ctx)
        ctx.site_optimizer = opt
        kinds: dict[str, int] = {}
        for site in ctx.info.sites:
            if skipped(ctx, site):
                continue
            p = SitePlan(site, cfg.wbits if site.weight else None, cfg.site_abits(site))
            if site.weight:
                p.weight = opt.weight(site, p.w_bits)
                if not cfg.mixed() and opt.data(site) is not None:
                    opt.data(site).drop_hessian()  # only Greedy MP searches weights again; GPTQ forms its own H
            p.acts = opt.acts(site, p.a_bits)
            if not cfg.mixed() and opt.data(site) is not None:
                opt.data(site).release()
            for q in p.acts:
                kinds[q.kind] = kinds.get(q.kind, 0) + 1
            p.methods += ["sq-b"] if site.name in ctx.report.get("sqb", {}) else []
            p.methods.append("opt-m")
            ctx.plan[site.name] = p
        return PassResult(ctx, False, f"W{cfg.wbits}A{cfg.abits} on {len(ctx.plan)} sites; activation quantizers: "
                          + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())), sites=len(ctx.plan))
