"""Canonicalize: opset 21 (INT4 QuantizeLinear/DequantizeLinear), named nodes, no dead code."""
from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

from ..errors import MptqError
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


class Canonicalize(Pass):
    name = "canonicalize"

    def __call__(self, ctx: Context) -> PassResult:
        ctx.model, done = canonicalize_model(ctx.model)
        ctx.invalidate()
        info = ctx.info
        return PassResult(ctx, bool(done), f"{info.family}: {len(info.sites)} sites ({info.summary()})"
                          + (f"; {', '.join(done)}" if done else ""))
