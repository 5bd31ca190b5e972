"""Export a timm Vision Transformer (by timm name or from a model card) to a float32 ONNX model.

torch and timm are imported inside the functions: the rest of the package works without them
(install them with ``pip install 'mptq-onnx[export]'``).

The exported graph:

* has one input ``input`` (N, C, H, W) with a dynamic batch axis and one output ``logits``;
* is at opset 21 by default (INT4 QuantizeLinear/DequantizeLinear need it);
* has attention as explicit MatMul -> Softmax -> MatMul (``fused_attn`` is switched off before
  export, otherwise timm calls scaled_dot_product_attention);
* keeps, with the dynamo exporter, each node's module path in its ``metadata_props`` under
  ``pkg.torch.onnx.name_scopes`` (the graph passes use it); the stack traces that the exporter
  also records are removed, since they hold absolute paths of the machine that exported;
* carries its preprocessing (``mptq.preprocess``), ``mptq.source`` and ``mptq.num_classes`` in
  the model metadata.

Exporting the same source twice gives byte-identical files: random weights come from a fixed
seed and nothing machine- or time-dependent is kept.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import io
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx

from .errors import MptqError
from .graph import copy_node_metadata
from .modelio import Preprocess, save_model, set_metadata, set_preprocess
from .outputs import to_stderr, plan_outputs

REPO_ROOT = Path(__file__).resolve().parents[1]
SOURCE_KEY = "mptq.source"
NUM_CLASSES_KEY = "mptq.num_classes"
CLASS_NAMES_KEY = "mptq.class_names"  # JSON list: the ImageFolder folder name of each output index
CLASS_NAMES_FROM_KEY = "mptq.class_names_from"  # "id2label" where they are a Hugging Face config's labels
EXPORTERS = ("dynamo", "torchscript")
DEFAULT_OPSET = 21
# node metadata the dynamo exporter writes that we drop: absolute file paths, differs per machine
_DROP_NODE_METADATA = ("pkg.torch.onnx.stack_trace",)
_INSTALL_HINT = "install the export extra: pip install 'mptq-onnx[export]'"


# --------------------------------------------------------------------------- lazy imports

def _import_torch():
    try:
        import torch
    except ImportError as e:
        raise MptqError(f"exporting needs torch ({e}); {_INSTALL_HINT}") from None
    return torch


def _import_transformers():
    _import_torch()
    try:
        import transformers
    except ImportError as e:
        raise MptqError(f"exporting a Hugging Face folder needs transformers ({e}); "
                        "install the hf extra: pip install 'mptq-onnx[hf]'") from None
    return transformers


def _import_timm():
    _import_torch()
    try:
        import timm
    except ImportError as e:
        raise MptqError(f"exporting needs timm ({e}); {_INSTALL_HINT}") from None
    return timm


# --------------------------------------------------------------------------- model cards

def default_card_dirs() -> list[Path]:
    """Where card names are looked up: the repo's ``models/cards/``, then ``<repo>/../shared/models/``."""
    return [REPO_ROOT / "models" / "cards", REPO_ROOT.parent / "shared" / "models"]


def _card_dirs(cards_dir) -> list[Path]:
    return [Path(cards_dir)] if cards_dir is not None else default_card_dirs()


def _looks_like_path(source: str) -> bool:
    return source.endswith(".json") or "/" in source or os.sep in source


def find_card(source: str, cards_dir=None) -> Path | None:
    """The card .json that `source` names (a path to a .json, or a card name), or None."""
    if _looks_like_path(source):
        p = Path(source).expanduser()
        if p.is_file():
            return p
        if p.suffix == ".json" or p.exists():
            raise MptqError(f"model card not found: {p}")
        return None
    for d in _card_dirs(cards_dir):
        p = d / f"{source}.json"
        if p.is_file():
            return p
    return None


def list_cards(cards_dir=None) -> list[str]:
    names: set[str] = set()
    for d in _card_dirs(cards_dir):
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.json"))
    return sorted(names)


def _read_card(path: Path) -> dict:
    try:
        card = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise MptqError(f"cannot read model card {path}: {e}") from None
    if not isinstance(card, dict) or "timm_class" not in card and "timm_model" not in card:
        raise MptqError(f"{path} is not a model card: it needs 'timm_class' (+ 'kwargs') or 'timm_model'")
    return card


def _card_weights(card_path: Path, cards_dir) -> Path | None:
    """`NAME.safetensors` beside the card; else (a card copied without its weights) in the other card dirs."""
    candidates = [card_path.with_suffix(".safetensors")]
    candidates += [d / f"{card_path.stem}.safetensors" for d in _card_dirs(cards_dir) + default_card_dirs()]
    for c in candidates:
        if c.is_file():
            return c
    return None


def _card_preprocess(card: dict) -> Preprocess:
    pp = dict(card.get("preprocess") or {})
    if "input_size" in card:
        pp["input_size"] = card["input_size"]
    return Preprocess.from_dict(pp)


# --------------------------------------------------------------------------- Hugging Face folders

HF_MODEL_CONFIG = "config.json"


def is_hf_dir(source) -> bool:
    """A `save_pretrained` folder: config.json (+ weights) inside."""
    p = Path(source).expanduser()
    return p.is_dir() and (p / HF_MODEL_CONFIG).is_file()


def hf_class_names(config: dict) -> list[str] | None:
    """`id2label` in index order, or None when absent, incomplete, or transformers' placeholders
    (LABEL_0, LABEL_1, ...: a config that never named its classes)."""
    raw = config.get("id2label")
    if not isinstance(raw, dict) or not raw:
        return None
    try:
        by_index = {int(k): str(v) for k, v in raw.items()}
    except (TypeError, ValueError):
        return None
    names = [by_index.get(i) for i in range(len(by_index))]
    if any(n is None for n in names) or all(n == f"LABEL_{i}" for i, n in enumerate(names)):
        return None
    return names


def _build_hf(folder: Path, *, seed: int, img_size, num_classes, pretrained: bool, checkpoint,
              log) -> "BuiltModel":
    """A transformers image classifier (ViT, DeiT, Swin, ...) from a `save_pretrained` folder,
    with eager attention (explicit MatMul -> Softmax -> MatMul in the graph)."""
    torch = _import_torch()
    transformers = _import_transformers()
    from .preprocess import HF_CONFIG, from_hf_config

    if pretrained or checkpoint is not None or num_classes is not None:
        raise MptqError("a Hugging Face folder brings its own weights and classes: drop --pretrained, "
                        "--checkpoint and --num-classes")
    try:
        config = json.loads((folder / HF_MODEL_CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise MptqError(f"cannot read {folder / HF_MODEL_CONFIG}: {e}") from None
    arch = ", ".join(config.get("architectures") or []) or config.get("model_type", "?")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            hf = transformers.AutoModelForImageClassification.from_pretrained(
                str(folder), attn_implementation="eager", local_files_only=True)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise MptqError(f"cannot load {folder} as a transformers image classifier ({arch}; "
                            f"{type(e).__name__}: {first})") from None

    class Logits(torch.nn.Module):
        """pixel_values -> logits (transformers returns an output object)."""

        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, pixel_values):
            return self.model(pixel_values=pixel_values).logits

    module = _prepare(Logits(hf))
    channels = int(config.get("num_channels", 3))
    if (folder / HF_CONFIG).is_file():
        pp = from_hf_config(folder / HF_CONFIG, channels)
        pp_known = True
    else:
        size = config.get("image_size", 224)
        size = _img_size_tuple(size if isinstance(size, int) else tuple(size))
        pp = Preprocess(input_size=(channels, *size))
        pp_known = False
    if img_size is not None:
        pp.input_size = (pp.input_size[0], *_img_size_tuple(img_size))
    if not pp_known and log:
        log(f"note: {folder} has no {HF_CONFIG}: the ONNX model carries no preprocessing, and convert/eval "
            "will assume one and say so (or pass --mean/--std/--size there)")
    n_cls = int(getattr(hf.config, "num_labels", 0) or 0)
    names = hf_class_names(config)
    return BuiltModel(module=module, preprocess=pp, source=folder.name, num_classes=n_cls,
                      weights=f"{folder.name} ({arch})", class_names=names if names and len(names) == n_cls else None,
                      preprocess_known=pp_known, class_names_from="id2label")


# --------------------------------------------------------------------------- building the torch model

@dataclasses.dataclass
class BuiltModel:
    """A torch model ready to export, and what goes into the ONNX metadata."""

    module: Any  # torch.nn.Module in eval mode, fused_attn off
    preprocess: Preprocess
    source: str  # timm name or card name (never an absolute path: it goes into the file)
    num_classes: int
    weights: str  # "random (seed N)", "pretrained", or the checkpoint file name
    class_names: list[str] | None = None  # folder name (e.g. wnid) of each class, where the card lists them
    preprocess_known: bool = True  # False: a Hugging Face folder without preprocessor_config.json
    class_names_from: str | None = None  # "id2label": labels (words), which folders may not bear


def _timm_class(timm, name: str):
    cls = getattr(timm.models, name, None)
    if cls is None:
        for mod_name, mod in list(sys.modules.items()):
            if mod_name.startswith("timm.models.") and hasattr(mod, name):
                cls = getattr(mod, name)
                break
    if cls is None:
        raise MptqError(f"the model card names timm class {name!r}, which this timm ({timm.__version__}) does not have")
    return cls


def _unknown_timm_name(timm, name: str, cards_dir) -> MptqError:
    # names containing the given one first (e.g. 'deit_tiny'), else the closest spellings
    near = list(timm.list_models(f"*{name}*"))
    if near:
        near.sort(key=lambda n: (not n.startswith(name), -difflib.SequenceMatcher(None, name, n).ratio(), n))
        near = near[:6]
    else:
        near = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    cards = difflib.get_close_matches(name, list_cards(cards_dir), n=3, cutoff=0.5)
    msg = f"unknown model {name!r}: not a timm model name nor a model card"
    if near:
        msg += "; close timm names: " + ", ".join(near)
    if cards:
        msg += "; close cards: " + ", ".join(cards)
    return MptqError(msg)


def _load_state_dict(path: Path) -> dict:
    torch = _import_torch()
    if not path.is_file():
        raise MptqError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except ImportError:
        raise MptqError(f"reading .safetensors needs the safetensors package; {_INSTALL_HINT}") from None
    except Exception as e:
        raise MptqError(f"cannot read checkpoint {path} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    for key in ("model", "state_dict", "model_state_dict", "module"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not all(hasattr(v, "shape") for v in sd.values()):
        raise MptqError(f"{path} does not hold a state dict (a dict of tensors, optionally under 'model' or 'state_dict')")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    # float16/bfloat16 weights on disk: the float32 model built from their values is the reference
    return {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}


def _fit_report(model, sd: dict) -> str | None:
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]

    def few(items, n=3):
        return ", ".join(items[:n]) + (f", ... (+{len(items) - n})" if len(items) > n else "")

    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys ({few(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys ({few(unexpected)})")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches ({few(shapes, 2)})")
    return "; ".join(parts) or None


def _load_weights(model, path: Path, label: str) -> None:
    sd = _load_state_dict(path)
    problem = _fit_report(model, sd)
    if problem:
        # original-format checkpoints (e.g. the DeiT/Swin releases): timm's own converter may fit them
        filt = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
        if filt is not None:
            try:
                converted = filt(dict(sd), model)
                if _fit_report(model, converted) is None:
                    sd, problem = converted, None
            except Exception:
                pass
    if problem:
        raise MptqError(f"checkpoint {path.name} does not fit {label}: {problem}")
    model.load_state_dict(sd, strict=True)


def _prepare(model):
    model.eval()
    for mod in model.modules():
        if hasattr(mod, "fused_attn"):
            mod.fused_attn = False  # explicit MatMul -> Softmax -> MatMul in the graph
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _img_size_tuple(img_size) -> tuple[int, int]:
    if isinstance(img_size, int):
        return (img_size, img_size)
    h, w = img_size
    return (int(h), int(w))


def build_model(source: str, *, pretrained: bool = False, checkpoint=None, cards_dir=None,
                img_size=None, num_classes: int | None = None, seed: int = 0, log=None) -> BuiltModel:
    """The torch model `export_model` exports (same arguments). Random weights come from `seed`,
    drawn in a forked RNG so the caller's torch RNG is left as it was."""
    if is_hf_dir(source):
        return _build_hf(Path(source).expanduser(), seed=seed, img_size=img_size, num_classes=num_classes,
                         pretrained=pretrained, checkpoint=checkpoint, log=log)
    card_path = find_card(source, cards_dir)
    torch = _import_torch()
    timm = _import_timm()

    if card_path is not None:
        card = _read_card(card_path)
        kwargs = dict(card.get("kwargs") or {})
        label = f"card {card.get('name', card_path.stem)}"
        if num_classes is not None and num_classes != kwargs.get("num_classes", num_classes):
            raise MptqError(f"{label} has {kwargs['num_classes']} classes; its weights fix that, drop --num-classes")
        if img_size is not None:
            kwargs["img_size"] = img_size
        if pretrained:
            raise MptqError("--pretrained is for timm names; a model card brings its own weights")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            try:
                if "timm_model" in card:
                    model = timm.create_model(card["timm_model"], pretrained=False, **kwargs)
                else:
                    model = _timm_class(timm, card["timm_class"])(**kwargs)
            except (TypeError, ValueError, RuntimeError) as e:
                raise MptqError(f"cannot build {label}: {e}") from None
        weights = Path(checkpoint) if checkpoint is not None else _card_weights(card_path, cards_dir)
        if weights is None:
            raise MptqError(f"no weights for {label}: expected {card_path.stem}.safetensors beside "
                            f"{card_path} or in {', '.join(str(d) for d in default_card_dirs())}; "
                            "or pass a checkpoint")
        _load_weights(model, weights, label)
        pp = _card_preprocess(card)
        if img_size is not None:
            pp.input_size = (pp.input_size[0], *_img_size_tuple(img_size))
        name = str(card.get("name", card_path.stem))
        weights_label = weights.name
        class_names = _card_classes(card, card_path, int(kwargs.get("num_classes", 0) or 0))
    else:
        if _looks_like_path(source):
            raise MptqError(f"model card not found: {source}")
        if not timm.is_model(source):
            raise _unknown_timm_name(timm, source, cards_dir)
        kwargs = {}
        if img_size is not None:
            kwargs["img_size"] = img_size
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        load_pretrained = pretrained and checkpoint is None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            try:
                model = timm.create_model(source, pretrained=load_pretrained, **kwargs)
            except (TypeError, ValueError) as e:
                raise MptqError(f"cannot build timm model {source}: {e}") from None
            except Exception as e:
                if not load_pretrained:
                    raise
                raise MptqError(f"cannot get pretrained weights for {source} ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''}); download them elsewhere "
                                "and pass the file as a checkpoint") from None
        if checkpoint is not None:
            _load_weights(model, Path(checkpoint), f"timm model {source}")
        cfg = timm.data.resolve_data_config({}, model=model)
        pp = Preprocess.from_dict(dict(cfg))
        if img_size is not None:
            pp.input_size = (pp.input_size[0], *_img_size_tuple(img_size))
        name = source
        class_names = None
        weights_label = (Path(checkpoint).name if checkpoint is not None
                         else "pretrained" if pretrained else f"random (seed {seed})")

    _prepare(model)
    n_cls = int(getattr(model, "num_classes", 0) or 0)
    if class_names is not None and len(class_names) != n_cls:
        class_names = None
    return BuiltModel(module=model, preprocess=pp, source=name, num_classes=n_cls, weights=weights_label,
                      class_names=class_names)


def _card_classes(card: dict, card_path: Path, n: int) -> list[str] | None:
    """Class folder names from the card: a `classes` list, or a `class_list` TSV (index, name, ...).
    None when absent or not `n` long."""
    if isinstance(card.get("classes"), list):
        names = [str(c) for c in card["classes"]]
        return names if len(names) == n else None
    ref = str(card.get("class_list") or "").split(" ")[0]
    if not ref:
        return None
    # beside the card, one folder up, or where the shared cards live: the same card found in
    # models/cards/ or ../shared/models/ must export the same bytes
    for base in (card_path.parent, card_path.parent.parent, *(d.parent for d in default_card_dirs())):
        f = base / ref
        if f.is_file():
            rows = [ln.split("\t") for ln in f.read_text().splitlines() if ln.strip()]
            try:
                by_index = {int(r[0]): r[1].strip() for r in rows if len(r) >= 2}
            except ValueError:
                return None
            names = [by_index.get(i) for i in range(n)]
            return names if all(names) and len(by_index) == n else None
    return None


# --------------------------------------------------------------------------- exporting

def _export_dynamo(torch, model, x) -> onnx.ModelProto:
    batch = torch.export.Dim("batch")
    prog = torch.onnx.export(model, (x,), None, dynamo=True, opset_version=18,
                             input_names=["input"], output_names=["logits"],
                             dynamic_shapes=({0: batch},), verbose=False)
    return prog.model_proto


def _export_torchscript(torch, model, x, opset: int) -> onnx.ModelProto:
    buf = io.BytesIO()
    torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=opset, do_constant_folding=True,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return onnx.load_from_string(buf.getvalue())


# Ops whose schema changes between opset 18 and 21 only add input types (float8, int4, ...) or
# optional attributes whose defaults keep the old behaviour. A graph using only these ops (or ops
# unchanged since 18) means the same at 21, so bumping its opset import is a valid conversion.
# Cast/CastLike(19, 21): new types and `saturate` (only used for float8). Constant,
# ConstantOfShape, Identity, Flatten, Reshape, Shape, Size, Squeeze, Unsqueeze, Transpose, If,
# Loop, Scan, Equal: new types only. Pad-19/21: 'wrap' mode added, new types. Resize-19:
# 'half_pixel_symmetric' mode added. QuantizeLinear/DequantizeLinear-19/21: new types, `saturate`,
# `block_size` (default 0 = the old per-tensor/per-axis behaviour), `output_dtype` (default: the
# zero point's type, as before).
_SAME_MEANING_18_TO_21 = frozenset({
    "Cast", "CastLike", "Constant", "ConstantOfShape", "Identity", "Flatten", "Reshape", "Shape",
    "Size", "Squeeze", "Unsqueeze", "Transpose", "If", "Loop", "Scan", "Equal", "Pad", "Resize",
    "QuantizeLinear", "DequantizeLinear",
})


def bump_opset(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """Fallback for when onnx's version converter fails: raise the default-domain opset import to
    `target` after checking that every op used means the same there."""
    cur = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if cur is None or cur >= target:
        return model
    changed = set()
    for op in sorted({n.op_type for n in model.graph.node if n.domain in ("", "ai.onnx")}):
        try:
            old = onnx.defs.get_schema(op, cur).since_version
            new = onnx.defs.get_schema(op, target).since_version
        except Exception:
            changed.add(op)
            continue
        if old != new and op not in _SAME_MEANING_18_TO_21:
            changed.add(op)
    if changed or cur < 18:
        raise MptqError(f"cannot move the graph from opset {cur} to {target}: ops {sorted(changed)} "
                        "changed meaning in between")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for o in out.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = target
    return out


def _convert_opset(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    cur = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), target)
    if cur == target:
        return model
    try:
        from onnx import version_converter

        out = version_converter.convert_version(model, target)
    except Exception:
        return bump_opset(model, target)
    _restore_metadata(model, out)
    return out


def _restore_metadata(src: onnx.ModelProto, dst: onnx.ModelProto) -> None:
    """The version converter drops node/input/output metadata_props (the module paths): copy
    them back, by node name (the converter keeps names), else by position when ops line up."""
    copy_node_metadata(list(src.graph.node), list(dst.graph.node))
    for s_list, d_list in ((src.graph.input, dst.graph.input), (src.graph.output, dst.graph.output)):
        names = {v.name: v for v in s_list}
        for d in d_list:
            if d.name in names and not d.metadata_props:
                d.metadata_props.extend(names[d.name].metadata_props)
    for key in ("producer_name", "producer_version", "doc_string"):
        if getattr(src, key) and not getattr(dst, key):
            setattr(dst, key, getattr(src, key))


def _strip_variable(model: onnx.ModelProto) -> None:
    """Remove what differs between machines or runs (absolute paths in stack traces)."""

    def strip(props):
        keep = [p for p in props if p.key not in _DROP_NODE_METADATA]
        if len(keep) != len(props):
            del props[:]
            props.extend(keep)

    def walk(graph):
        for n in graph.node:
            strip(n.metadata_props)
            n.doc_string = ""
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g)
                for g in a.graphs:
                    walk(g)

    walk(model.graph)
    for f in model.functions:
        for n in f.node:
            strip(n.metadata_props)
            n.doc_string = ""


def _fix_ir_version(model: onnx.ModelProto) -> None:
    try:
        need = onnx.helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    except TypeError:  # older onnx without ignore_unknown
        need = onnx.helper.find_min_ir_version_for(list(model.opset_import))
    if model.ir_version < need:
        model.ir_version = need


def to_onnx(built: BuiltModel, *, exporter: str = "dynamo", opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """Export a `BuiltModel` to an in-memory ONNX model (opset `opset`, metadata set)."""
    torch = _import_torch()
    if exporter not in EXPORTERS:
        raise MptqError(f"unknown exporter {exporter!r}: choose one of {', '.join(EXPORTERS)}")
    max_opset = onnx.defs.onnx_opset_version()
    if not 17 <= opset <= max_opset:
        raise MptqError(f"opset must be between 17 and {max_opset}, got {opset}")
    c, h, w = built.preprocess.input_size
    # batch 2, not 1: torch.export specialises dimensions of size 0/1
    x = torch.randn(2, c, h, w, generator=torch.Generator().manual_seed(0))
    chatter = io.StringIO()  # the exporters print progress lines and warn about tracing
    try:
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(chatter):
            warnings.simplefilter("ignore")
            if exporter == "dynamo":
                proto = _export_dynamo(torch, built.module, x)
            else:
                proto = _export_torchscript(torch, built.module, x, min(opset, 20))
    except MptqError:
        raise
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise MptqError(f"the {exporter} exporter failed on {built.source} ({type(e).__name__}: {first})") from None
    proto = _convert_opset(proto, opset)
    _fix_ir_version(proto)
    _strip_variable(proto)
    if built.preprocess_known:
        set_preprocess(proto, built.preprocess)
    set_metadata(proto, SOURCE_KEY, built.source)
    set_metadata(proto, NUM_CLASSES_KEY, str(built.num_classes))
    if built.class_names:
        set_metadata(proto, CLASS_NAMES_KEY, json.dumps(built.class_names))
        if built.class_names_from:
            set_metadata(proto, CLASS_NAMES_FROM_KEY, built.class_names_from)
    return proto


@dataclasses.dataclass
class Verification:
    max_abs_diff: float
    cosine: float  # of the flattened logits

    def __str__(self) -> str:
        return f"max |onnx - torch| = {self.max_abs_diff:.3g}, cosine = {self.cosine:.7f}"


def verify_onnx(proto: onnx.ModelProto, torch_model, input_size, *, batch: int = 2, seed: int = 0) -> Verification:
    """Run `batch` random inputs through onnxruntime and torch and compare the logits."""
    from .runtime import make_session
    torch = _import_torch()

    x = torch.randn(batch, *input_size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = torch_model(x).float().numpy()
    sess = make_session(proto)
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    if got.shape != ref.shape:
        raise MptqError(f"exported model gives logits of shape {got.shape}, torch gives {ref.shape}")
    a, b = got.astype(np.float64).ravel(), ref.astype(np.float64).ravel()
    denom = float(np.linalg.norm(a) * np.linalg.norm(b))
    cos = float(a @ b / denom) if denom > 0 else (1.0 if np.array_equal(a, b) else 0.0)
    return Verification(max_abs_diff=float(np.max(np.abs(a - b))), cosine=cos)


def export_model(source: str, output, *, pretrained: bool = False, checkpoint=None, cards_dir=None,
                 img_size=None, num_classes: int | None = None, exporter: str = "dynamo",
                 opset: int = DEFAULT_OPSET, force: bool = False, verify: bool = True,
                 seed: int = 0, log: Callable[[str], None] | None = print) -> Path:
    """Export `source` (a timm model name, a card .json path, or a card name) to `output`.

    Timm names get random weights (from `seed`) unless `pretrained` or `checkpoint` (a
    .safetensors or torch .pth/.pt/.bin state dict, optionally under 'model'/'state_dict').
    Cards (``timm_class`` + ``kwargs`` + ``input_size`` + ``preprocess``) take their weights from
    ``NAME.safetensors`` beside the card (or from `checkpoint`). With `verify`, the ONNX logits on
    two random inputs are compared with torch's and a cosine below 0.999 is an error.
    """
    out = Path(output)
    card = None if is_hf_dir(source) else find_card(source, cards_dir)
    # checked before the minutes of building and exporting; never the card, its weights or the checkpoint
    plan_outputs({"checkpoint": checkpoint, "model card": card,
                  "card's weights": _card_weights(card, cards_dir) if card is not None else None},
                 {"output": out}, force, log=to_stderr if log else None,
                 may_write={"external data": out.with_name(out.name + ".data")})
    built = build_model(source, pretrained=pretrained, checkpoint=checkpoint, cards_dir=cards_dir,
                        img_size=img_size, num_classes=num_classes, seed=seed, log=log)
    proto = to_onnx(built, exporter=exporter, opset=opset)
    if verify:
        v = verify_onnx(proto, built.module, built.preprocess.input_size)
        if log:
            log(f"verified {built.source} against torch: {v}")
        if not np.isfinite(v.cosine) or v.cosine < 0.999:
            raise MptqError(f"the ONNX export of {built.source} does not match torch ({v})")
    save_model(proto, out, force=force)
    if log:
        log(f"wrote {out} (opset {opset}, weights: {built.weights})")
    return out
