"""PMQ's patch-wise bits inside self-attention (Xiao et al., 2023; the paper's module is not
public, this is ours).

In attention·V, key token j meets the other operand only through column j of the attention
probabilities and row j of V, so the bits of both can follow the token: the tokens the queries
attend to least (smallest attention mass, mean over heads and queries, per image and per window
in Swin; or, `--patch-score cls`, the class token's attention) take `--patch-bits`, the others keep the site's width. The choice is made in the graph
at inference, from the float attention probabilities, with standard ops only:

    mass = ReduceMean(attn, axes=[1, 2]); thr = ReduceMax(TopK(mass, k_low, smallest));
    low = mass <= thr;  attn' = Where(low, Qlow(attn), Q(attn));  V' = Where(low, Qlow(V), Q(V))

Bit operations of attention·V: MACs x (keep·b² + (1 − keep)·b_low²); the report gives the
attention GBOPs (Q·Kᵀ and attention·V) with and without it.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from ..emit import Editor
from ..plan import Context, PatchSpec
from ..quantizers import Quantizer
from .base import Pass, PassResult


def token_count(ctx: Context, site) -> int | None:
    """Key tokens of an attention·V site (the V operand's token axis), from its calibration sample."""
    st = ctx.calib.stats.get(site.inputs[1].tensor) if len(site.inputs) > 1 else None
    if st is None or st.sample is None or st.sample.ndim < 2:
        return None
    return int(st.sample.shape[-2])


def opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 21)


def _reduce(ed: Editor, at: str, op: str, x: str, axes: list[int], keepdims: int, base: str, ver: int) -> str:
    if ver >= 18:
        return ed.node(at, op, [x, ed.const(base + "_axes", np.array(axes, np.int64))], base, keepdims=keepdims)
    return ed.node(at, op, [x], base, axes=axes, keepdims=keepdims)


def _unsqueeze(ed: Editor, at: str, x: str, axes: list[int], base: str, ver: int) -> str:
    if ver >= 13:
        return ed.node(at, "Unsqueeze", [x, ed.const(base + "_axes", np.array(axes, np.int64))], base)
    return ed.node(at, "Unsqueeze", [x], base, axes=axes)


def emit_patchwise(ed: Editor, at: str, attn: str, v: str, high: list[Quantizer], spec: PatchSpec, base: str,
                   ver: int, feed: bool = False) -> tuple[str, str]:
    """The two quantized operands of attention·V with per-token widths (see the module doc)."""
    if spec.score == "cls":  # the class token's attention to each token, mean over heads
        row = ed.node(at, "Gather", [attn, ed.const(base + "_cls", np.array(0, np.int64))], base + "_cls_row", axis=2)
        mass = _reduce(ed, at, "ReduceMean", row, [1], 0, base + "_mass", ver)        # [B, T]
    else:
        mass = _reduce(ed, at, "ReduceMean", attn, [1, 2], 0, base + "_mass", ver)    # [B, T]
    k = ed.const(base + "_k", np.array([spec.low_tokens], np.int64))
    vals, idx = ed.name(base + "_lowest"), ed.name(base + "_lowest_idx")
    ed.before.setdefault(at, []).append(helper.make_node("TopK", [mass, k], [vals, idx], name=ed.name(base + "_TopK"),
                                                         axis=-1, largest=0, sorted=1))
    thr = _reduce(ed, at, "ReduceMax", vals, [-1], 1, base + "_thr", ver)             # [B, 1]
    low = ed.node(at, "LessOrEqual", [mass, thr], base + "_low")                      # [B, T]
    low_a = _unsqueeze(ed, at, low, [1, 2], base + "_low_cols", ver)                  # [B, 1, 1, T]
    low_v = _unsqueeze(ed, at, low, [1, 3], base + "_low_rows", ver)                  # [B, 1, T, 1]
    outs = []
    for i, (x, m) in enumerate(((attn, low_a), (v, low_v))):
        hi, _ = ed.act(at, x, high[i], f"{base}_in{i}", feed)
        lo, _ = ed.act(at, x, spec.low[i], f"{base}_in{i}_low", feed)
        outs.append(ed.node(at, "Where", [m, lo, hi], f"{base}_in{i}_patch"))
    return outs[0], outs[1]


def patch_gbops(spec: PatchSpec | None, macs: float, bits: int) -> float:
    """Bit operations (x 1e9) of one attention·V site, per image."""
    if spec is None:
        return macs * bits * bits / 1e9
    keep = 1.0 - spec.low_tokens / spec.tokens
    return macs * (keep * bits * bits + (1.0 - keep) * spec.low_bits ** 2) / 1e9


class PatchWise(Pass):
    name = "patchwise"

    def __call__(self, ctx: Context) -> PassResult:
        cfg = ctx.config
        if not cfg.patchwise:
            return PassResult(ctx, False, "no --patchwise: skipped")
        from .greedy_mp import UniformProvider
        from .pareto import site_macs
        prov = ctx.site_optimizer or UniformProvider(ctx)
        macs = site_macs(ctx)
        before = after = 0.0
        n = 0
        for p in ctx.plan.values():
            s = p.site
            if s.op != "act_matmul":
                continue
            g = macs.get(s.name, 0.0) * p.a_bits * p.a_bits / 1e9
            before += g
            t = token_count(ctx, s) if s.role == "av" else None
            low_tokens = int(np.floor((1.0 - cfg.patch_keep) * t)) if t else 0
            if s.role != "av" or not t or low_tokens < 1 or cfg.patch_bits >= p.a_bits or None in p.acts:
                after += g
                continue
            p.patch = PatchSpec(low_tokens, t, cfg.patch_bits, list(prov.acts(s, cfg.patch_bits)), cfg.patch_score)
            p.methods.append("patchwise")
            after += patch_gbops(p.patch, macs[s.name], p.a_bits)
            n += 1
        if not n:
            return PassResult(ctx, False, "skipped: no attention·V site below --patch-bits' width", sites=0)
        saved = 1.0 - after / before if before else 0.0
        ctx.report["patchwise"] = {"sites": n, "keep": cfg.patch_keep, "low_bits": cfg.patch_bits,
                                   "attention_gbops": round(before, 6), "attention_gbops_patchwise": round(after, 6),
                                   "attention_gbops_saved": round(saved, 4)}
        return PassResult(ctx, False, f"{n} attention·V sites: {cfg.patch_bits}-bit operands for "
                                      f"{1 - cfg.patch_keep:.0%} of the tokens; attention GBOPs -{saved:.1%}", sites=n)
