"""Checks around a conversion: is the input model usable, and is the converted model sane.

Run before any work (so a bad model fails in a second, naming what is wrong) and after the
passes (so a broken result is flagged instead of written silently with exit 0).
"""
from __future__ import annotations

import dataclasses
import sys

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import MptqError
from .modelio import image_input

_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                onnx.TensorProto.BFLOAT16}

# Fidelity of the converted model on a few calibration images, against the float model: above
# these KL values the result is far off for its width. They sit at least 4x above what the
# weakest recipe gives on the embedded deit_tiny_tin (`mptq-onnx demo`, 32 images): uniform W8A8
# 0.0013, W6A6 0.013, W4A4 0.22, W3A3 0.64; `mptq` W4A4 0.044.
KL_WARN = {8: 0.05, 7: 0.1, 6: 0.1, 5: 0.3, 4: 1.0, 3: 2.5, 2: 5.0}
FIDELITY_IMAGES = 32


def _float_array(t: onnx.TensorProto) -> np.ndarray | None:
    if t.data_type not in _FLOAT_TYPES or t.data_location == onnx.TensorProto.EXTERNAL:
        return None
    return numpy_helper.to_array(t)


def nonfinite_initializers(model: onnx.ModelProto) -> list[tuple[str, int, int]]:
    """(name, non-finite count, size) of every float initializer holding NaN or ±Inf."""
    bad = []
    for t in model.graph.initializer:
        a = _float_array(t)
        if a is not None and a.size:
            n = int(a.size - np.count_nonzero(np.isfinite(a)))
            if n:
                bad.append((t.name, n, int(a.size)))
    return bad


def static_batch(model: onnx.ModelProto) -> int | None:
    """The image input's batch size when the graph fixes it, else None."""
    dims = image_input(model).type.tensor_type.shape.dim
    if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
        return int(dims[0].dim_value)
    return None


def check_input_model(model: onnx.ModelProto) -> None:
    """Reject a model that cannot be converted, before images are loaded or passes run."""
    vi = image_input(model)
    tt = vi.type.tensor_type
    if tt.HasField("shape"):
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
        if len(dims) != 4:
            raise MptqError(f"the model's image input {vi.name!r} has shape {dims}; expected an image batch "
                            "[N, C, H, W] (a ViT exported with its patch embedding)")
    bad = nonfinite_initializers(model)
    if bad:
        name, n, size = bad[0]
        more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        raise MptqError(f"initializer {name!r} holds {n} NaN/Inf values of {size}{more}: the float model is "
                        "broken; quantizing it would only hide that")


@dataclasses.dataclass
class ResultCheck:
    """What `check_result` found; stored in the conversion report."""

    images: int
    top1_agreement: float
    kl: float
    kl_warn_above: float
    warning: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def nonfinite_quant_params(model: onnx.ModelProto) -> list[str]:
    """Scale/zero-point initializers of Q/DQ nodes that are not finite or (scales) not positive."""
    inits = {t.name: t for t in model.graph.initializer}
    bad = []
    for n in model.graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(n.input) < 2:
            continue
        t = inits.get(n.input[1])
        a = None if t is None else _float_array(t)
        if a is not None and not (np.isfinite(a).all() and (a > 0).all()):
            bad.append(n.input[1])
    return sorted(set(bad))


def check_result(model, images: np.ndarray, float_logits: np.ndarray, bits: float,
                 n_images: int = FIDELITY_IMAGES) -> ResultCheck:
    """Finite quantizer parameters, and agreement with float on the first `n_images` calibration images.

    `model`: the ModelProto, or an object holding it as `.model` (the conversion Context), whose
    weights the session then does not copy (`calibrate.with_session`).
    Non-finite parameters or outputs are errors (the model would be garbage); a KL far above what
    the bit-width normally gives is a warning on stderr, also kept in the returned check.
    """
    from .calibrate import session, with_session
    from .simulate import kl_divergence

    owner = None if isinstance(model, onnx.ModelProto) else model
    bad = nonfinite_quant_params(model if owner is None else owner.model)
    if bad:
        raise MptqError(f"the converted model has non-finite or non-positive quantizer scales ({bad[0]}"
                        + (f" and {len(bad) - 1} more" if len(bad) > 1 else "") + "); nothing was written")
    n = min(n_images, len(images))
    x = images[:n]

    def run(sess):
        return np.concatenate([sess.run(None, {sess.get_inputs()[0].name: x[i:i + 16]})[0]
                               for i in range(0, n, 16)])

    if owner is None:
        logits = run(session(model))  # a bare model: the caller's session defaults
    else:
        logits = with_session(owner, run)
    logits = logits.reshape(n, -1)
    ref = float_logits[:n].reshape(n, -1)
    if not np.isfinite(logits).all():
        raise MptqError(f"the converted model outputs NaN/Inf logits on {int((~np.isfinite(logits)).any(1).sum())} "
                        f"of {n} calibration images; nothing was written")
    agree = float((logits.argmax(1) == ref.argmax(1)).mean())
    kl = kl_divergence(ref, logits)
    limit = KL_WARN.get(int(np.floor(bits)), 1.0)
    res = ResultCheck(n, round(agree, 4), round(kl, 6), limit)
    if kl > limit:
        res.warning = (f"the converted model is far from float for {bits:g} bits: KL {kl:.4f} (expected below "
                       f"{limit:g}), top-1 agreement {agree:.3f} on {n} calibration images")
        print(f"mptq-onnx: warning: {res.warning}", file=sys.stderr)
    return res
