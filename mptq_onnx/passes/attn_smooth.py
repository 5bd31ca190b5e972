"""Attention smoothing: exact per-channel rescalings inside self-attention, folded into weights.

Two equalities of timm's attention, with Q, K, V the column blocks of the qkv Linear:
- Q·Kᵀ = (Q / s)(K · s)ᵀ for any per-channel s > 0. With s = sqrt(max|Q_c| / max|K_c|) both
  operands of channel c get the same range, which takes the outlier channels out of the
  per-tensor quantizers of the Q·Kᵀ MatMul.
- softmax rows sum to 1, so attn·(V − μ)/s = (attn·V − μ)/s: the input of the output projection
  can be shifted and smoothed like SQ-b's LayerNorm outputs, folded into V's columns and bias
  (V' = (V − μ)/s) and into proj (W' = diag(s) W, b' = b + μW). α and the shift are searched on
  proj's quantized output error, as SQ-b does.
These are SmoothQuant's idea applied inside attention; MPTQ-ViT's paper smooths only LayerNorm
outputs, so `mptq-paper` leaves this pass out. `mptq` runs it: with GPTQ rounding after OPT-m it
lowered the KL to float and raised agreement and top-1 on tin_calib on both models (without the
rounding it lowered the KL but cost agreement, see the README). Each block keeps
a rescaling only where it lowers the quantized error on calibration data, and the float model is
checked to be unchanged (else everything is reverted).

Layout assumed (timm's Attention and WindowAttention, Hugging Face's separate query/key/value):
Q, K and V are one fused qkv Linear's output channels [3, heads, head_dim] or three Linears'
[heads, head_dim]; Q enters Q·Kᵀ as [.., heads, tokens, head_dim], Kᵀ as [.., heads, head_dim,
tokens], V enters attn·V as [.., heads, tokens, head_dim], and proj's input channels are (head,
head_dim). Any other layout changes the float outputs, and the float check reverts the pass.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from ..calibrate import TensorStats
from ..plan import Context
from ..quantizers import fake_quant, search_uniform
from .base import Pass, PassResult, float_drift
from .sqb import w_in_out, sample_rows, search_smoothing, set_w_in_out
from .uniform import search_sample, skipped

MAX_IMAGES = 8  # attention tensors of this many calibration images score the Q/K choice
S_RANGE = (1e-2, 1e2)


def _quant_product_err(q: np.ndarray, k: np.ndarray, bits: int, ref: np.ndarray) -> float:
    qq = fake_quant(q, search_uniform(search_sample(q), bits, grid=10, rounds=1))
    kq = fake_quant(k, search_uniform(search_sample(k), bits, grid=10, rounds=1))
    d = qq @ kq - ref
    return float((d * d).sum())


def _rescaled(st: TensorStats, sample: np.ndarray) -> TensorStats:
    """Stats of a whole-tensor sample after a per-channel map: the sample is recomputed; the global
    range keeps its old margin over the sample (the images beyond the sample are not stored)."""
    s_lo, s_hi = float(st.sample.min()), float(st.sample.max())
    lo_r = st.min / s_lo if s_lo < 0 else 1.0
    hi_r = st.max / s_hi if s_hi > 0 else 1.0
    return TensorStats(st.name, float(sample.min()) * max(lo_r, 1.0), float(sample.max()) * max(hi_r, 1.0),
                       rows=st.rows, numel=st.numel, sample=sample)


def _w_io(ctx: Context, site) -> np.ndarray:
    return w_in_out(ctx.weight(site.weight), site)


class _Part:
    """Q, K or V: `c` output columns of a Linear from column `lo` (a fused qkv's third, or all of
    a separate query/key/value Linear)."""

    def __init__(self, site, lo: int, c: int):
        self.site, self.lo, self.c = site, lo, c

    def ok(self, ctx) -> bool:
        return self.site.weight is not None and _w_io(ctx, self.site).shape[1] >= self.lo + self.c

    def rescale(self, ctx, save, mul: np.ndarray | None = None, div: np.ndarray | None = None,
                mu: np.ndarray | None = None) -> None:
        """W' = W·mul (or W / div) and b' = b·mul (or (b − μ) / div) on this part's columns."""
        s, sl = self.site, slice(self.lo, self.lo + self.c)
        save(s.weight)
        w = _w_io(ctx, s).copy()
        w[:, sl] = w[:, sl] * mul[None, :] if div is None else w[:, sl] / div[None, :]
        set_w_in_out(ctx, s, w)
        if s.bias:
            save(s.bias)
            b = ctx.weight(s.bias).copy()
            b[sl] = b[sl] * mul if div is None else (b[sl] - (0 if mu is None else mu)) / div
            ctx.set_initializer(s.bias, b.astype(np.float32))


def attention_parts(roles: dict, c: int) -> tuple | None:
    """(Q, K, V) parts of one block's attention, `c` = heads·head_dim, or None."""
    if "qkv" in roles:
        lin = roles["qkv"]
        return _Part(lin, 0, c), _Part(lin, c, c), _Part(lin, 2 * c, c)
    if all(r in roles for r in ("q", "k", "v")):
        return _Part(roles["q"], 0, c), _Part(roles["k"], 0, c), _Part(roles["v"], 0, c)
    return None


class AttnSmooth(Pass):
    name = "attn-smooth"
    preserves_float = True

    def __call__(self, ctx: Context) -> PassResult:
        info, stats, cfg = ctx.info, ctx.calib.stats, ctx.config
        by_block: dict[str, dict[str, object]] = {}
        for s in info.sites:
            if s.block and s.role in ("qkv", "q", "k", "v", "qk", "av", "proj"):
                by_block.setdefault(s.block, {})[s.role] = s
        if not any(("qkv" in r or "q" in r) and "qk" in r for r in by_block.values()):
            return PassResult(ctx, False, "skipped: no attention block with its Q/K/V Linears found", sites=0)
        backup: dict[str, np.ndarray] = {}
        # the rescaled samples are made after the float check, one at a time: made here, all of
        # them and the ones they replace were alive at once (~0.5 GB more on vit_base, from its shapes)
        new_stats: dict[str, Callable[[], TensorStats]] = {}
        rng = np.random.default_rng(cfg.seed)
        n_qk = n_v = 0
        report: dict[str, dict] = {}

        def save(name):
            if name not in backup:
                backup[name] = ctx.weight(name)

        n_blocks = 0
        for block, roles in by_block.items():
            qk, av, proj = (roles.get(r) for r in ("qk", "av", "proj"))
            lins = [roles[r] for r in ("qkv", "q", "k", "v") if r in roles]
            if not lins or any(s.weight is None or skipped(ctx, s) for s in lins):
                continue
            n_blocks += 1
            if qk is not None and not skipped(ctx, qk):
                r = self._qk(ctx, roles, qk, new_stats, save)
                if r:
                    report[qk.name] = r
                    n_qk += 1
            if av is not None and proj is not None and proj.weight is not None and proj.bias \
                    and not skipped(ctx, proj):
                r = self._v_proj(ctx, roles, av, proj, rng, new_stats, save)
                if r:
                    report[proj.name] = r
                    n_v += 1
        if not report:
            return PassResult(ctx, False, f"no attention block of {n_blocks} improved", sites=0)
        drift, tol = float_drift(ctx)
        if not drift <= tol:
            for name, v in backup.items():
                ctx.set_initializer(name, v)
            return PassResult(ctx, False, f"skipped and reverted: the rescaling changed the float outputs by up to "
                                          f"{drift:.3g}; the attention layout is not timm's", sites=0)
        for name in list(new_stats):
            stats[name] = new_stats.pop(name)()
        ctx.report["attn_smooth"] = report
        return PassResult(ctx, True, f"Q/K smoothed in {n_qk} blocks, V/proj shifted and smoothed in {n_v}",
                          float_drift=(drift, tol), sites=len(report))

    def _qk(self, ctx, roles, qk, new_stats, save) -> dict | None:
        sq, sk = (ctx.calib.stats[i.tensor] for i in qk.inputs)
        q, k = sq.sample, sk.sample
        if q is None or k is None or q.ndim != 4 or k.ndim != 4 or q.shape[1] != k.shape[1] \
                or q.shape[3] != k.shape[2]:
            return None
        heads, d = q.shape[1], q.shape[3]
        parts = attention_parts(roles, heads * d)
        if parts is None or not all(p.ok(ctx) for p in parts[:2]):
            return None
        qmax, kmax = np.abs(q).max(axis=(0, 2)), np.abs(k).max(axis=(0, 3))  # [heads, d]
        s = np.clip(np.sqrt(np.maximum(qmax, 1e-6) / np.maximum(kmax, 1e-6)), *S_RANGE).astype(np.float32)
        n = max(q.shape[0] * MAX_IMAGES // max(ctx.calib.full_images, 1), 1)
        qs, ks = q[:n], k[:n]
        ref = qs @ ks
        e0 = _quant_product_err(qs, ks, ctx.config.abits, ref)
        e1 = _quant_product_err(qs / s[None, :, None, :], ks * s[None, :, :, None], ctx.config.abits, ref)
        if not e1 < e0:
            return None
        parts[0].rescale(ctx, save, mul=(1.0 / s.reshape(-1)).astype(np.float32))
        parts[1].rescale(ctx, save, mul=s.reshape(-1))
        new_stats[sq.name] = lambda: _rescaled(sq, q / s[None, :, None, :])
        new_stats[sk.name] = lambda: _rescaled(sk, k * s[None, :, :, None])
        return {"kind": "qk", "err_before": round(e0, 5), "err_after": round(e1, 5)}

    def _v_proj(self, ctx, roles, av, proj, rng, new_stats, save) -> dict | None:
        cfg = ctx.config
        sx = ctx.calib.stats[proj.inputs[0].tensor]
        sv = ctx.calib.stats[av.inputs[1].tensor]
        x, v = sx.sample, sv.sample
        wp = _w_io(ctx, proj)
        c = wp.shape[0]
        parts = attention_parts(roles, c)
        if x is None or sx.ch_min is None or v is None or v.ndim != 4 or v.shape[1] * v.shape[3] != c \
                or parts is None or not parts[2].ok(ctx) or not parts[2].site.bias:
            return None
        err0, best = search_smoothing(sx, sample_rows(x, rng), [wp], cfg.sqb_alphas, ("mean", "midrange"),
                                      cfg.wbits, cfg.abits, cfg.smoothing_scores_weights())
        if best[1] is None:
            return None
        e, mu, s, shift, a = best
        heads, d = v.shape[1], v.shape[3]
        parts[2].rescale(ctx, save, div=s, mu=mu)
        save(proj.weight)
        save(proj.bias)
        ctx.set_initializer(proj.bias, (ctx.weight(proj.bias) + mu @ wp).astype(np.float32))
        set_w_in_out(ctx, proj, wp * s[:, None])
        new_stats[sx.name] = lambda: sx.transformed(mu, s)
        new_stats[sv.name] = lambda: _rescaled(sv, (v - mu.reshape(1, heads, 1, d)) / s.reshape(1, heads, 1, d))
        return {"kind": "v-proj", "alpha": a, "shift": shift, "err_before": round(err0, 5), "err_after": round(e, 5)}
