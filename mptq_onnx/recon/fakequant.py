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


class _UniformSTE(torch.autograd.Function):
    """clip(round(x/s), lo, hi)·s with the straight-through gradient 1 where round(x/s) lies in
    [lo, hi], bounds included (autograd's clamp of the composed ops gives 0 at a bound, so a
    channel's largest weight never trained): one node and one saved mask instead of the five ops'
    saved tensors."""

    @staticmethod
    def forward(ctx, x, s, lo, hi):
        r = torch.round(x / s)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward((r >= lo) & (r <= hi))
        return torch.clamp(r, lo, hi).mul_(s)

    @staticmethod
    def backward(ctx, g):
        (mask,) = ctx.saved_tensors
        return g * mask, None, None, None


class _RegionSTE(torch.autograd.Function):
    """The region quantizer (positive and negative parts on their own scales), gradient 1 where
    the value lies inside its part's range."""

    @staticmethod
    def forward(ctx, x, sp, sn, qmin, qmax):
        rp = torch.round(torch.relu(x) / sp)
        rn = torch.round(torch.clamp(x, max=0.0) / sn)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(((x > 0) & (rp <= qmax)) | ((x <= 0) & (rn >= qmin)))
        return torch.clamp(rp, 0, qmax).mul_(sp).add_(torch.clamp(rn, qmin, 0).mul_(sn))

    @staticmethod
    def backward(ctx, g):
        (mask,) = ctx.saved_tensors
        return g * mask, None, None, None, None


def _uniform(q: Quantizer, device):
    zp = np.asarray(q.zero_point, np.float32)
    cache: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def fq(x: torch.Tensor) -> torch.Tensor:
        if x.dim() not in cache:
            z = _per_axis(zp, q.axis, x.dim(), device)
            cache[x.dim()] = (_per_axis(q.scale, q.axis, x.dim(), device), q.qmin - z, q.qmax - z)
        # (clip(round(x/s) + z, qmin, qmax) - z)·s, as QuantizeLinear then DequantizeLinear
        return _UniformSTE.apply(x, *cache[x.dim()])
    return fq


def _region(q: Quantizer, device):
    sp = torch.tensor(float(np.asarray(q.scale).reshape(-1)[0]), dtype=torch.float32, device=device)
    sn = torch.tensor(q.neg_scale, dtype=torch.float32, device=device)

    def fq(x: torch.Tensor) -> torch.Tensor:
        return _RegionSTE.apply(x, sp, sn, q.qmin, q.qmax)
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


def _sulq(q: Quantizer, device):
    f32 = dict(dtype=torch.float32, device=device)
    eta = torch.tensor(np.float32(q.shift).item(), **f32)
    inv_ln2 = torch.tensor(np.float32(1.0 / math.log(2.0)).item(), **f32)
    tiny, two = torch.tensor(1e-30, **f32), torch.tensor(2.0, **f32)
    log_domain = _uniform(q, device)  # the uniform quantizer of log2(x + η)

    def fq(x: torch.Tensor) -> torch.Tensor:
        # the op sequence of emit.Editor._sulq; the exponent's rounding is straight-through too
        t = torch.log(torch.maximum(x + eta, tiny)) * inv_ln2
        return torch.pow(two, round_ste(log_domain(t))) - eta
    return fq


FAKE = {"uniform": _uniform, "region": _region, "log2": _log2, "sulq": _sulq}


def fake_quantizer(q: Quantizer, device="cpu"):
    """The torch function applying `q` (fake quantization, straight-through rounding)."""
    try:
        return FAKE[q.kind](q, device)
    except KeyError:
        raise NotImplementedError(f"no torch fake quantizer for kind {q.kind!r}") from None
