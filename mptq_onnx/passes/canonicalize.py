"""Canonicalize: opset 21 (INT4 QuantizeLinear/DequantizeLinear), named nodes, no dead code, and
no parameter shared between nodes."""
from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

from ..errors import MptqError
from ..analyze import GraphInfo
from ..graph import copy_node_metadata
from ..plan import Context
from .base import Pass, PassResult

TARGET_OPSET = 21


def canonicalize_model(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    done = []
    src_nodes = list(model.graph.node)  # the converter and graphsurgeon drop node metadata
    ops = {o.domain: o.version for o in model.opset_import}
    ver = ops.get("", ops.get("ai.onnx", 0))
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear", "QLinearMatMul", "MatMulInteger")
           for n in model.graph.node):
        raise MptqError("the model is already quantized (it has QuantizeLinear/DequantizeLinear or integer "
                        "ops); give the float model")
    floats = [i for i in model.graph.input if i.type.tensor_type.elem_type != onnx.TensorProto.FLOAT
              and i.name not in {t.name for t in model.graph.initializer}]
    if floats:
        raise MptqError(f"input {floats[0].name!r} is not float32; export the model in float32")
    if ver < TARGET_OPSET:
        try:
            model = onnx.version_converter.convert_version(model, TARGET_OPSET)
        except Exception:
            # the ops of exported ViTs keep their semantics from opset 17 to 21; the converter
            # only fails on adapters it lacks, so the import can be raised in place
            for o in model.opset_import:
                if o.domain in ("", "ai.onnx"):
                    o.version = TARGET_OPSET
        done.append(f"opset {ver}->{TARGET_OPSET}")
    if model.ir_version < 10:
        model.ir_version = 10  # INT4 tensors need IR 10
    graph = gs.import_onnx(model)
    n_before = len(graph.nodes)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    new = gs.export_onnx(graph, do_type_check=False)
    # graphsurgeon drops model-level fields; keep ours
    new.ir_version = model.ir_version
    del new.opset_import[:]
    new.opset_import.extend(model.opset_import)
    del new.metadata_props[:]
    new.metadata_props.extend(model.metadata_props)
    new.producer_name, new.producer_version = model.producer_name, model.producer_version
    if len(new.graph.node) != n_before:
        done.append(f"removed {n_before - len(new.graph.node)} dead nodes")
    copy_node_metadata(src_nodes, list(new.graph.node))
    seen = set()
    for i, n in enumerate(new.graph.node):
        if not n.name or n.name in seen:
            n.name = f"{n.op_type}_{i}"
        seen.add(n.name)
    return new, done


def unshare_parameters(model: onnx.ModelProto, info: GraphInfo) -> int:
    """Give every consumer of a shared parameter (a site's weight or bias, a LayerNorm's γ or β) its
    own copy; returns the number of copies made.

    The torch exporter merges identical initializers: with random or fresh weights all LayerNorm γ
    become one tensor and all zero biases another, so a pass folding a rescaling into one node's
    parameter would change every other node using it. Copies are named `<name>.<consumer node>`
    and follow the original in the initializer list; a model that shares nothing is left as is.
    """
    params = {t for s in info.sites for t in (s.weight, s.bias) if t}
    params |= {t for g in info.ln_groups for t in (g.gamma, g.beta) if t}
    inits = {t.name: t for t in model.graph.initializer}
    users: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for x in dict.fromkeys(n.input):
            if x in params and x in inits:
                users.setdefault(x, []).append(n)
    names = set(inits) | {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}
    copies: dict[str, list[onnx.TensorProto]] = {}
    for x, nodes in users.items():
        for n in nodes[1:]:  # the first consumer keeps the original
            name, k = f"{x}.{n.name}", 1
            while name in names:
                name, k = f"{x}.{n.name}_{k}", k + 1
            names.add(name)
            t = onnx.TensorProto()
            t.CopyFrom(inits[x])
            t.name = name
            copies.setdefault(x, []).append(t)
            for i, y in enumerate(n.input):
                if y == x:
                    n.input[i] = name
    if copies:
        new = []
        for t in model.graph.initializer:
            new += [t] + copies.get(t.name, [])
        del model.graph.initializer[:]
        model.graph.initializer.extend(new)
    return sum(map(len, copies.values()))


class Canonicalize(Pass):
    name = "canonicalize"

    def __call__(self, ctx: Context) -> PassResult:
        ctx.model, done = canonicalize_model(ctx.model)
        ctx.invalidate()
        n_copies = unshare_parameters(ctx.model, ctx.info)
        if n_copies:
            ctx.invalidate()
            done.append(f"{n_copies} copies of shared parameters")
        info = ctx.info
        return PassResult(ctx, bool(done), f"{info.family}: {len(info.sites)} sites ({info.summary()})"
                          + (f"; {', '.join(done)}" if done else ""))
