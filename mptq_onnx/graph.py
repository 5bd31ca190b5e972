"""A read-only index over an ONNX graph: producers, consumers, constants and shapes."""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import numpy_helper


def attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def node_scope(node: onnx.NodeProto) -> str | None:
    """The torch module path that produced `node` (dynamo: metadata; TorchScript: node name)."""
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = [s.strip().strip("'\"") for s in p.value.strip("[]").split(",")]
            except Exception:
                return None
            # the last entry names the aten op (e.g. 'linear'); the one before it is the module
            mods = [s for s in scopes[:-1] if s]
            return mods[-1] if mods else None
    if node.name.startswith("/") and node.name.count("/") >= 2:
        # TorchScript names look like /blocks.0/attn/qkv/MatMul
        path: list[str] = []
        for part in (p for p in node.name.split("/")[1:-1] if p):
            if path and part.startswith(".".join(path) + "."):
                path = part.split(".")  # '/blocks/blocks.0/...' repeats the parent's path
            else:
                path.append(part)
        if path:
            return ".".join(path)
    return None


class GraphIndex:
    def __init__(self, model: onnx.ModelProto, shapes_from: onnx.GraphProto | None = None):
        """`shapes_from`: a graph with the same tensors whose value_info gives the shapes (the
        shape-inferred shell of `model`)."""
        self.model = model
        g = model.graph
        self.graph = g
        self.initializers = {t.name: t for t in g.initializer}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        self.nodes = {}
        for i, n in enumerate(g.node):
            if not n.name:
                n.name = f"{n.op_type}_{i}"
            self.nodes[n.name] = n
            for o in n.output:
                self.producer[o] = n
            for x in n.input:
                if x:
                    self.consumers[x].append(n)
        self.graph_inputs = [i.name for i in g.input if i.name not in self.initializers]
        self.graph_outputs = [o.name for o in g.output]
        self.shapes: dict[str, list] = {}
        self.types: dict[str, int] = {}  # onnx elem_type, where known
        sg = g if shapes_from is None else shapes_from
        for vi in list(sg.value_info) + list(sg.input) + list(sg.output):
            t = vi.type.tensor_type
            if t.elem_type:
                self.types[vi.name] = t.elem_type
            if t.HasField("shape"):
                self.shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                        for d in t.shape.dim]
        self._const_cache: dict[str, np.ndarray | None] = {}

    def const(self, name: str) -> np.ndarray | None:
        """The value of `name` if it is an initializer or a Constant node's output."""
        if name in self._const_cache:
            return self._const_cache[name]
        val = None
        if name in self.initializers:
            val = numpy_helper.to_array(self.initializers[name])
        else:
            p = self.producer.get(name)
            if p is not None and p.op_type == "Constant":
                t = attr(p, "value")
                if t is not None:
                    val = numpy_helper.to_array(t)
        self._const_cache[name] = val
        return val

    def is_const(self, name: str) -> bool:
        return name in self.initializers or (
            name in self.producer and self.producer[name].op_type == "Constant")

    def rank(self, name: str) -> int | None:
        s = self.shapes.get(name)
        return len(s) if s is not None else None

    def last_dim(self, name: str):
        s = self.shapes.get(name)
        return s[-1] if s else None


def copy_node_metadata(src: list[onnx.NodeProto], dst: list[onnx.NodeProto]) -> None:
    """Copy node metadata_props (the module paths) that a rewrite dropped: by node name when the
    names are unique and all found, else by position when the op types line up."""
    by_name = {n.name: n for n in src if n.name}
    if len(by_name) == len(src) and all(n.name in by_name for n in dst if n.name):
        pairs = [(by_name[n.name], n) for n in dst if n.name]
    elif len(src) == len(dst) and all(a.op_type == b.op_type for a, b in zip(src, dst)):
        pairs = list(zip(src, dst))
    else:
        pairs = [(by_name[n.name], n) for n in dst if n.name in by_name]
    for a, b in pairs:
        if a.metadata_props and not b.metadata_props:
            b.metadata_props.extend(a.metadata_props)
