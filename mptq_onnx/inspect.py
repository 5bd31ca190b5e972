"""`inspect`: a per-layer table of what was done to a model, read back from its metadata."""
from __future__ import annotations

import json
import os
from pathlib import Path

from .modelio import get_metadata, load_model
from .passes.qdq import ACT_ACT_ROLES, METADATA_KEY, input_labels


def _fmt_q(q: dict | None) -> str:
    if not q:
        return "-"
    if "scale" in q:
        s = f"{q['kind']} s={q['scale']:.3g}"
        if q["kind"] in ("uniform", "sulq"):
            s += f" zp={q['zero_point']}"
        if q["kind"] == "sulq":
            s += f" η={q['shift']:.3g}"
        if q["kind"] == "region":
            s += f" s-={q['neg_scale']:.3g}"
        return s
    lo, hi = q["scale_range"]
    return f"{q['kind']}/ch s={lo:.2g}..{hi:.2g}"


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def inspect_model(path: str | os.PathLike) -> str:
    model = load_model(path)
    size = Path(path).stat().st_size
    raw = get_metadata(model, METADATA_KEY)
    ops = {}
    for n in model.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    head = [f"{path}: {size / 1e6:.2f} MB, {len(model.graph.node)} nodes, opset "
            f"{max(o.version for o in model.opset_import if o.domain in ('', 'ai.onnx'))}"]
    if not raw:
        from .analyze import analyze
        from .preprocess import resolve
        pp, _ = resolve(model, path, log=lambda _: None)  # the size, where the graph leaves it open
        info = analyze(model, pp.input_size[1:])
        rows = [[s.name, s.role, "float", "float", ", ".join(i.kind for i in s.inputs), "-"] for s in info.sites]
        return "\n".join(head + ["not quantized by mptq-onnx; quantizable sites:",
                                 table(rows, ["site", "role", "W", "A", "input kinds", "method"])])
    meta = json.loads(raw)
    rows = []
    for r in meta["layers"]:
        acts = [_fmt_q(q) for q in r["acts"]]
        if len(acts) > 1:  # name the operands: q@k and attn@v quantize both
            acts = [f"{k}: {a}" for k, a in zip(input_labels(r["role"], len(acts)), acts)]
        weight = "none (act x act)" if r["role"] in ACT_ACT_ROLES else _fmt_q(r["weight"])
        rows.append([r["site"], r["role"], r["w_bits"] or "-", r["a_bits"], weight, "; ".join(acts), r["method"]])
    head.append(f"recipe {meta['recipe']}: average weight bits {meta['avg_w_bits']} (by parameters), "
                f"activation bits {meta['avg_a_bits']} (by elements per image); "
                f"{ops.get('QuantizeLinear', 0)} QuantizeLinear, {ops.get('DequantizeLinear', 0)} DequantizeLinear")
    return "\n".join(head + [table(rows, ["site", "role", "W", "A", "weight", "activations", "method"])])
