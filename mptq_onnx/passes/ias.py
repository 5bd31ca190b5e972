"""I&S-ViT's smooth optimization (SOS, Zhong et al. 2023) as three passes around reconstruction.

1. `IasActQuant`: the inputs of qkv and fc1 (post-LayerNorm) get per-channel asymmetric
   quantizers, other activations per-tensor ones (SULQ on post-Softmax values), weights stay
   float. Reconstruction then trains the float weights through these quantizers
   (`Reconstruct(float_weights=True, quant_inputs=False)`).
2. `IasFold`: each per-channel quantizer (δ_c, z_c) becomes one per-tensor quantizer exactly:
   δ̃ = mean(δ), z̃ = round(mean(z)), r = δ/δ̃, folded into the LayerNorm and the next Linear with
   SQ-b's algebra (γ' = γ/r, β' = (β − μ)/r, W' = diag(r) W, b' = b + μW) for μ = δ(z̃ − z). Then
   round(x'/δ̃) + z̃ = round(x/δ_c) + z_c for x' = (x − μ)/r: the same codes, so the quantized model
   is unchanged too (z̃ is rounded, unlike the reference code, so that this holds and ONNX gets an
   integer zero point).
3. `IasWeights`: per-channel weight quantizers (clipping searched by MSE); reconstruction again,
   weights and activations quantized, inputs from the quantized model, targets from the float one.
"""
from __future__ import annotations

import numpy as np

from ..plan import Context, SitePlan
from ..quantizers import Quantizer, search_per_channel
from .base import Pass, PassResult
from .sqb import fold
from .uniform import act_quantizer, skipped, softmax_sulq, weight_quantizer

CHANNEL_ROLES = ("qkv", "q", "k", "v", "fc1")  # the reference code's channel-wise inputs (timm's qkv and fc1 Linears; HF's query, key, value)


def _channel_groups(ctx: Context) -> dict[str, object]:
    """LayerNorm groups whose every Linear is a qkv or fc1, by input tensor."""
    out = {}
    for g in ctx.info.ln_groups:
        sites = [ctx.info.site(n) for n in g.sites]
        if g.exact and sites and all(s.role in CHANNEL_ROLES and not skipped(ctx, s) for s in sites):
            out[sites[0].inputs[0].tensor] = g
    return out


class IasActQuant(Pass):
    name = "ias-act"

    def __call__(self, ctx: Context) -> PassResult:
        cfg = ctx.config
        groups = _channel_groups(ctx)
        per_channel: dict[str, Quantizer] = {}
        n = 0
        for site in ctx.info.sites:
            if skipped(ctx, site):
                continue
            p = SitePlan(site, None, cfg.site_abits(site))  # weights float until IasWeights
            acts = []
            for i, a in enumerate(site.inputs):
                if a.tensor in groups:
                    if a.tensor not in per_channel:
                        st = ctx.calib.stats[a.tensor]
                        per_channel[a.tensor] = search_per_channel(st.sample, p.a_bits, st.ch_min, st.ch_max)
                    acts.append(per_channel[a.tensor])
                elif a.kind == "post_softmax":
                    acts.append(softmax_sulq(ctx, site, i, p.a_bits))
                else:
                    acts.append(act_quantizer(ctx, a.tensor, p.a_bits))
            p.acts = acts
            p.methods.append("ias")
            ctx.plan[site.name] = p
            n += 1
        return PassResult(ctx, True, f"A{cfg.abits} on {n} sites, per channel on {len(per_channel)} "
                                     "post-LayerNorm inputs; weights float", sites=n)


def fold_per_channel(q: Quantizer) -> tuple[np.ndarray, np.ndarray, Quantizer]:
    """(μ, r, per-tensor quantizer) that stage 2 folds a per-channel quantizer `q` into."""
    d = np.asarray(q.scale, np.float64)
    z = np.asarray(q.zero_point, np.float64)
    d_t = float(d.mean())
    z_t = int(np.clip(np.rint(z.mean()), q.qmin, q.qmax))
    r = d / d_t
    mu = d * (z_t - z)
    layer = Quantizer("uniform", q.bits, np.array(d_t, np.float32), np.array(z_t, np.int32), q.qmin, q.qmax,
                      method="ias-fold")
    return mu.astype(np.float32), r.astype(np.float32), layer


class IasFold(Pass):
    name = "ias-fold"
    preserves_float = True  # checked by PassManager

    def __call__(self, ctx: Context) -> PassResult:
        stats = ctx.calib.stats
        n = 0
        for tensor, g in _channel_groups(ctx).items():
            sites = [ctx.plan[s] for s in g.sites if s in ctx.plan]
            q = sites[0].acts[0] if sites else None
            if q is None or q.axis is None:
                continue
            mu, r, layer = fold_per_channel(q)
            fold(ctx, g, mu, r)
            stats[tensor] = stats[tensor].transformed(mu, r)
            for p in sites:
                p.acts[0] = layer
            n += 1
        ctx.invalidate()
        return PassResult(ctx, bool(n), f"{n} per-channel quantizers folded into LayerNorm and Linear", sites=n)


class IasWeights(Pass):
    name = "ias-weights"

    def __call__(self, ctx: Context) -> PassResult:
        n = 0
        for p in ctx.plan.values():
            if p.site.weight:
                p.w_bits = ctx.config.wbits
                p.weight = weight_quantizer(ctx, p.site, p.w_bits, "mse")
                n += 1
        return PassResult(ctx, bool(n), f"W{ctx.config.wbits} per-channel weight quantizers on {n} sites", sites=n)
