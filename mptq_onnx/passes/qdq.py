"""QDQ materialization: write the plan into the graph as QuantizeLinear/DequantizeLinear pairs.

Every quantized node is annotated (node metadata and doc_string, both shown by Netron) with its
site name, role, bit-widths, quantizers and the methods that chose them; the model carries the
whole table as JSON under `mptq.quantization`.
"""
from __future__ import annotations

import json

import onnx

from ..emit import Editor
from ..modelio import set_metadata
from ..plan import Context, SitePlan
from .base import Pass, PassResult

METADATA_KEY = "mptq.quantization"


ACT_ACT_ROLES = ("qk", "av", "act_matmul")


def input_labels(role: str, n: int) -> list[str]:
    """Names of a site's activation inputs, unique within the node, for metadata and `inspect`."""
    if role == "qk":
        return ["q", "k"]
    if role == "av":
        return ["attn", "v"]
    if n == 1:
        return ["input"]
    return [chr(ord("A") + i) for i in range(n)]


def site_metadata(p: SitePlan) -> dict[str, str]:
    meta = {"mptq.site": p.site.name, "mptq.role": p.site.role}
    if p.site.op == "act_matmul":
        meta["mptq.weights"] = "none (activation x activation)"
    else:
        meta["mptq.w_bits"] = str(p.w_bits) if p.w_bits else "float"
    meta["mptq.a_bits"] = str(p.a_bits)
    meta["mptq.method"] = p.method_str()
    if p.weight is not None:
        meta["mptq.weight"] = p.weight.describe()
    for label, a, q in zip(input_labels(p.site.role, len(p.site.inputs)), p.site.inputs, p.acts):
        v = q.describe() if q is not None else "float"
        meta[f"mptq.act.{label}"] = v if a.kind == "general" else f"{v} ({a.kind})"
    if p.patch is not None:
        meta["mptq.patchwise"] = (f"{p.patch.low_tokens} of {p.patch.tokens} key tokens (least {p.patch.score} score) at "
                                  f"{p.patch.low_bits} bits: " + "; ".join(q.describe() for q in p.patch.low))
    return meta


def write_plan(model: onnx.ModelProto, plan: dict[str, SitePlan], mode: str = "qdq",
               feed: bool = False, inplace: bool = False) -> tuple[onnx.ModelProto, dict[str, dict]]:
    """Insert the plan's quantizers; returns the model (`model` itself, edited, if `inplace`) and,
    in sim mode, the fed parameter names."""
    ed = Editor(model, mode)
    weights = {t.name: t for t in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    params: dict[str, dict] = {}
    for name, p in plan.items():
        s = p.site
        node = nodes[s.node]
        base = "q_" + s.name.replace(".", "_").replace("@", "_")
        if p.patch is not None:  # PMQ's per-token widths on both operands (passes/patchwise.py)
            from .patchwise import emit_patchwise, opset
            attn, v = emit_patchwise(ed, s.node, s.inputs[0].tensor, s.inputs[1].tensor, p.acts, p.patch, base,
                                     opset(model), feed)
            ed.use(s.node, list(node.input).index(s.inputs[0].tensor), attn)
            ed.use(s.node, list(node.input).index(s.inputs[1].tensor), v)
            ed.annotate(s.node, site_metadata(p))
            continue
        for i, (a, q) in enumerate(zip(s.inputs, p.acts)):
            if q is None:
                continue
            idx = list(node.input).index(a.tensor)
            out, names = ed.act(s.node, a.tensor, q, f"{base}_in{i}", feed)
            ed.use(s.node, idx, out)
            params[f"{name}/a{i}"] = names
        if p.weight is not None:
            w = onnx.numpy_helper.to_array(weights[s.weight])
            out, names = ed.weight(s.node, s.weight, w, p.weight, f"{base}_w", feed)
            ed.use(s.node, list(node.input).index(s.weight), out)
            params[f"{name}/w"] = names
        ed.annotate(s.node, site_metadata(p))
    return ed.finish(inplace), (params, ed.defaults)


def plan_table(plan: dict[str, SitePlan]) -> list[dict]:
    rows = []
    for name, p in plan.items():
        rows.append({"site": name, "role": p.site.role, "w_bits": p.w_bits, "a_bits": p.a_bits,
                     "params": p.site.n_params, "method": p.method_str(),
                     "weight": p.weight.to_json() if p.weight is not None else None,
                     "acts": [q.to_json() if q is not None else None for q in p.acts]})
        if p.patch is not None:
            rows[-1]["patch"] = {"low_tokens": p.patch.low_tokens, "tokens": p.patch.tokens,
                                 "low_bits": p.patch.low_bits, "low": [q.to_json() for q in p.patch.low]}
    return rows


def average_bits(plan: dict[str, SitePlan], act_sizes: dict[str, float] | None = None) -> tuple[float, float]:
    """Parameter-weighted weight bits and activation bits (weighted by elements per image if given).
    A weight the plan leaves float (`ias` stopped before stage 3) counts as 32 bits."""
    wn = sum(p.site.n_params for p in plan.values() if p.site.weight)
    wb = sum(p.site.n_params * (p.w_bits or 32) for p in plan.values() if p.site.weight) / max(wn, 1)
    tot = num = 0.0
    for p in plan.values():
        for a, q in zip(p.site.inputs, p.acts):
            if q is None:
                continue
            k = act_sizes.get(a.tensor, 1.0) if act_sizes else 1.0
            tot += k
            num += k * q.bits
    return wb, num / max(tot, 1e-9)


class WriteQDQ(Pass):
    name = "qdq"

    def __call__(self, ctx: Context) -> PassResult:
        if ctx.calib is not None:  # before the weights become integers
            from .pareto import model_gbops
            ctx.report["gbops"] = round(model_gbops(ctx), 5)
        ctx.model, _ = write_plan(ctx.model, ctx.plan, "qdq", inplace=True)
        ctx.materialized = True
        ctx.invalidate()
        table = plan_table(ctx.plan)
        wb, ab = average_bits(ctx.plan, ctx.report.get("act_sizes"))
        summary = {"recipe": ctx.config.recipe, "wbits": ctx.config.wbits, "abits": ctx.config.abits,
                   "avg_w_bits": round(wb, 3), "avg_a_bits": round(ab, 3), "layers": table}
        set_metadata(ctx.model, METADATA_KEY, json.dumps(summary, sort_keys=True))
        ctx.report["layers"] = table
        ctx.report["avg_w_bits"], ctx.report["avg_a_bits"] = round(wb, 3), round(ab, 3)

        n_q = sum(n.op_type == "QuantizeLinear" for n in ctx.model.graph.node)
        n_dq = sum(n.op_type == "DequantizeLinear" for n in ctx.model.graph.node)
        return PassResult(ctx, True, f"{n_q} QuantizeLinear, {n_dq} DequantizeLinear; "
                                     f"avg W {wb:.2f} bits, A {ab:.2f} bits", sites=len(ctx.plan))
