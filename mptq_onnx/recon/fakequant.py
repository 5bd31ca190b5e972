"""Torch fake quantizers that compute what the emitted QDQ nodes compute (see emit.py), with a
straight-through estimator for rounding so gradients reach the weights they quantize.

`FAKE` maps a `Quantizer.kind` to a builder: quantizer -> (tensor -> tensor). A new kind is one
builder here plus its numpy reference in quantizers.py. Quantizer parameters are frozen
(constants), as in I&S-ViT's reconstruction.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..quantizers import Quantizer


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Half-to-even rounding (as QuantizeLinear and np.rint) whose gradient is the identity."""
    return x + (torch.round(x) - x).detach()


def _per_axis(v: np.ndarray, axis: int | None, ndim: int, device) -> torch.Tensor:
    t = torch.from_numpy(np.asarray(v, np.float32).copy()).to(device)
    if axis is None or t.dim() == 0:
        return t
    shape = [1] * ndim
    shape[axis] = -1
    return t.reshape(shape)


def _uniform(q: Quantizer, device):
    zp = np.asarray(q.zero_point, np.float32)
    cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def fq(x: torch.Tensor) -> torch.Tensor:
        if x.dim() not in cache:
            cache[x.dim()] = (_per_axis(q.scale, q.axis, x.dim(), device), _per_axis(zp, q.axis, x.dim(), device))
        s, z = cache[x.dim()]
        # (clip(round(x/s) + z, qmin, qmax) - z)·s, as QuantizeLinear then DequantizeLinear
        y = torch.clamp(round_ste(x / s), q.qmin - z, q.qmax - z)
        return y * s
    return fq


def _region(q: Quantizer, device):
    sp = torch.tensor(float(np.asarray(q.scale).reshape(-1)[0]), dtype=torch.float32, device=device)
    sn = torch.tensor(q.neg_scale, dtype=torch.float32, device=device)

    def fq(x: torch.Tensor) -> torch.Tensor:
        pos = torch.clamp(round_ste(torch.relu(x) / sp), 0, q.qmax) * sp
        neg = torch.clamp(round_ste(torch.clamp(x, max=0.0) / sn), q.qmin, 0) * sn
        return pos + neg
    return fq


def _log2(q: Quantizer, device):
    k = q.steps_per_octave
    f32 = dict(dtype=torch.float32, device=device)
    s = torch.tensor(float(np.asarray(q.scale).reshape(-1)[0]), **f32)
    to_code = torch.tensor(np.float32(-k / math.log(2.0)).item(), **f32)
    from_code = torch.tensor(np.float32(-1.0 / k).item(), **f32)
    two, zero = torch.tensor(2.0, **f32), torch.tensor(0.0, **f32)

    def fq(x: torch.Tensor) -> torch.Tensor:
        # the op sequence of emit.Editor._log2, so float32 results match onnxruntime's
        t = torch.log(torch.clamp(x / s, min=1e-30)) * to_code
        e = torch.clamp(round_ste(t), 0, q.qmax)
        v = torch.pow(two, e * from_code) * s
        return torch.where(e >= q.qmax, zero, v)
    return fq


FAKE = {"uniform": _uniform, "region": _region, "log2": _log2}


def fake_quantizer(q: Quantizer, device="cpu"):
    """The torch function applying `q` (fake quantization, straight-through rounding)."""
    try:
        return FAKE[q.kind](q, device)
    except KeyError:
        raise NotImplementedError(f"no torch fake quantizer for kind {q.kind!r}") from None
