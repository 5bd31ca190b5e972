"""Uniform parameters: per-output-channel symmetric weights, per-tensor asymmetric activations.

MinMax takes the observed range; MSE searches the clipping range that minimises the squared
error of the tensor itself (the baseline every method is compared with). With
`softmax_quantizer="sulq"`, post-Softmax inputs get SULQ instead (see `softmax_sulq`).
"""
from __future__ import annotations

import functools

import numpy as np

from ..plan import Context, SitePlan
from ..quantizers import (Quantizer, search_sulq, search_uniform, search_weight, symmetric_per_channel,
                          uniform_from_range)
from .base import Pass, PassResult

MAX_SEARCH_VALUES = 1 << 17


def search_sample(x: np.ndarray, seed: int = 0, limit: int = MAX_SEARCH_VALUES) -> np.ndarray:
    """A bounded, deterministic subsample of a tensor's values for the clipping searches."""
    flat = x.reshape(-1)
    if flat.size <= limit:
        return flat
    return flat[_sample_index(flat.size, seed, limit)]


@functools.lru_cache(maxsize=64)
def _sample_index(size: int, seed: int, limit: int) -> np.ndarray:
    # memoised: SQ-b samples tensors of one shape for every α it tries, and drawing is the slow part
    idx = np.random.default_rng(seed).choice(size, limit, replace=False)
    idx.flags.writeable = False
    return idx


def skipped(ctx: Context, site) -> bool:
    return site.name in ctx.config.skip_sites or site.role in ctx.config.skip_sites


def weight_quantizer(ctx: Context, site, bits: int, method: str | None = None) -> Quantizer:
    w = ctx.weight(site.weight)
    method = method or ctx.config.weight_method
    if method == "minmax":
        return symmetric_per_channel(w, site.w_out_axis, bits)
    return search_weight(w, site.w_out_axis, bits)


def act_quantizer(ctx: Context, tensor: str, bits: int, method: str | None = None) -> Quantizer:
    st = ctx.calib.stats[tensor]
    method = method or ctx.config.act_method
    if method == "minmax":
        return uniform_from_range(st.min, st.max, bits)
    return search_uniform(search_sample(st.sample, ctx.config.seed), bits, lo=st.min, hi=st.max)


def site_act_quantizers(ctx: Context, site, bits: int) -> list[Quantizer]:
    """The uniform recipe's quantizers of a site's inputs (SULQ on post-Softmax ones if configured)."""
    return [softmax_sulq(ctx, site, i, bits) if uses_sulq(ctx, a) else act_quantizer(ctx, a.tensor, bits)
            for i, a in enumerate(site.inputs)]


def uses_sulq(ctx: Context, inp) -> bool:
    return inp.kind == "post_softmax" and ctx.config.softmax_quantizer == "sulq"


def softmax_sulq(ctx: Context, site, i: int, bits: int) -> Quantizer:
    """SULQ for input i of an attention MatMul, η by the error of the product with the other
    operand in float, as OPT-m scores it: on deit_tiny_tin's tin_calib it gave a lower KL than η
    by the tensor's MSE (I&S-ViT's choice), 0.2106 vs 0.2241 at W4A4, 0.6429 vs 0.6794 at W3A3."""
    st = ctx.calib.stats[site.inputs[i].tensor]
    if site.op != "act_matmul":
        return search_sulq(search_sample(st.sample, ctx.config.seed), bits, lo=st.min, hi=st.max)
    a, b = (ctx.calib.stats[t.tensor].sample for t in site.inputs)
    ref = a @ b
    err = (lambda aq: float(np.square(aq @ b - ref).sum())) if i == 0 else \
        (lambda bq: float(np.square(a @ bq - ref).sum()))
    return search_sulq(st.sample, bits, err, lo=st.min, hi=st.max)


class UniformParams(Pass):
    name = "uniform"

    def __call__(self, ctx: Context) -> PassResult:
        cfg = ctx.config
        n = 0
        for site in ctx.info.sites:
            if skipped(ctx, site):
                continue
            p = SitePlan(site, cfg.wbits if site.weight else None, cfg.site_abits(site))
            if site.weight:
                p.weight = weight_quantizer(ctx, site, p.w_bits)
            p.acts = site_act_quantizers(ctx, site, p.a_bits)
            p.methods.append(f"uniform-{cfg.act_method}")
            ctx.plan[site.name] = p
            n += 1
        return PassResult(ctx, False, f"W{cfg.wbits}A{cfg.abits} {cfg.weight_method}/{cfg.act_method} on {n} sites",
                          sites=n)
