"""Torch fake quantizers that compute what the emitted QDQ nodes compute (see emit.py), with a
straight-through estimator for rounding so gradients reach the weights they quantize.

`FAKE` maps a `Quantizer.kind` to a builder: quantizer -> (tensor -> tensor). A new kind is one
builder here plus its numpy reference in quantizers.py. Quantizer parameters are frozen
(constants), as in I&S-ViT's reconstruction.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from ..quantizers import Quantizer


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Half-to-even rounding (as QuantizeLinear and np.rint) whose gradient is the identity."""
    return x + (torch.round(x) - x).detach()


def _per_axis(v, axis: int | None, ndim: int, device) -> torch.Tensor:
    """`v` (an array, or a tensor, kept in autograd's graph) shaped to broadcast along `axis` of an
    `ndim`-dimensional tensor."""
    t = v if isinstance(v, torch.Tensor) else torch.from_numpy(np.asarray(v, np.float32).copy()).to(device)
    if axis is None or t.dim() == 0:
        return t
    shape = [1] * ndim
    shape[axis] = -1
    return t.reshape(shape)


def _inside(r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """1.0 where the rounded code r is inside the clip range (r == clip(r)), else 0.0: integers
    differ by at least 1 outside. Float arithmetic, not a bool mask: on this CPU torch.where and
    masked_fill ran 15x slower than one arithmetic op, and comparisons 3x (tools/recon_profile.py)."""
    return (r - c).abs_().clamp_(max=1.0).neg_().add_(1.0)


class _UniformSTE(torch.autograd.Function):
    """clip(round(x/s), lo, hi)·s with the straight-through gradient 1 where round(x/s) lies in
    [lo, hi], bounds included (autograd's clamp of the composed ops gives 0 at a bound, so a
    channel's largest weight never trained): one node and one saved mask instead of the five ops'
    saved tensors. Where `s` trains, its gradient is LSQ's (Esser et al. 2020): clip(round(x/s)) -
    x/s inside the range, the bound outside it."""

    @staticmethod
    def forward(ctx, x, s, lo, hi):
        xs = x / s
        r = torch.round(xs)
        c = torch.clamp(r, lo, hi)
        gx, gs = ctx.needs_input_grad[:2]
        m = _inside(r, c) if gx or gs else None
        del r
        # LSQ: c - x/s inside the range, c outside (xs·0 = 0 there)
        ctx.save_for_backward(m if gx else None, (c - xs.mul_(m)) if gs else None)
        ctx.s_shape = s.shape
        return c.mul_(s)

    @staticmethod
    def backward(ctx, g):
        m, ds = ctx.saved_tensors
        gx = g * m if m is not None else None
        gs = (g * ds).sum_to_size(ctx.s_shape) if ds is not None else None
        return gx, gs, None, None


class _RegionSTE(torch.autograd.Function):
    """The region quantizer (positive and negative parts on their own scales), gradient 1 where
    the value lies inside its part's range; LSQ's gradient for each scale that trains.

    One scale per element, s = sp where x > 0 else sn, then clip(round(x/s), qmin, qmax)·s: a
    positive x rounds to a code >= 0 and a negative one to a code <= 0, so the one clip is each
    part's own. The same values as quantizing the two parts apart and adding them (up to the sign
    of a zero), in float arithmetic throughout (see _inside): the region quantizer of the
    post-GELU input was half of a deit block's training step (tools/recon_profile.py)."""

    @staticmethod
    def forward(ctx, x, sp, sn, qmin, qmax):
        pos = torch.sign(x).clamp_(min=0.0)  # 1.0 where x > 0, else 0.0
        s = (pos * sp).add_((1.0 - pos).mul_(sn))  # exactly sp or sn: one term is 0
        xs = x / s
        r = torch.round(xs)
        c = torch.clamp(r, qmin, qmax)
        gx, gp, gn = ctx.needs_input_grad[:3]
        m = _inside(r, c) if gx or gp or gn else None
        del r
        d = (c - xs.mul_(m)) if gp or gn else None
        ctx.save_for_backward(m if gx else None, d, pos if gp or gn else None)
        return c.mul_(s)

    @staticmethod
    def backward(ctx, g):
        m, d, pos = ctx.saved_tensors
        gd = g * d if d is not None else None
        gp = (gd * pos).sum() if ctx.needs_input_grad[1] else None
        gn = (gd * (1.0 - pos)).sum() if ctx.needs_input_grad[2] else None
        return (g * m if m is not None else None, gp, gn, None, None)


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


LEARNABLE = ("uniform", "region")


class LearnedScale:
    """A uniform or region quantizer whose scales train with the weights (LSQ's gradient), held
    as s0·exp(θ) so that one Adam step on θ moves a scale by a ratio, whatever its size. Zero points
    and bit-widths stay. `quantizer()` is `q` with the trained scales, in the float32 values the
    forward pass used, so the emitted QDQ computes what was trained."""

    def __init__(self, q: Quantizer, device="cpu"):
        if q.kind not in LEARNABLE:
            raise NotImplementedError(f"no learnable scale for kind {q.kind!r}")
        self.q = q
        # s = s0·exp(θ), θ from 0: exactly the calibrated scale until it trains (exp(log(s)) is not)
        s0 = [np.asarray(q.scale, np.float32)] + ([np.float32(q.neg_scale)] if q.kind == "region" else [])
        self.s0 = [torch.from_numpy(np.array(v, np.float32)).to(device) for v in s0]
        self.params = [torch.nn.Parameter(torch.zeros_like(v)) for v in self.s0]
        self.zp = np.asarray(q.zero_point, np.float32)
        self.device = device
        self._bounds: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # by x.dim(), as _uniform caches

    def _scales(self) -> list[torch.Tensor]:
        return [s0 * torch.exp(p) for s0, p in zip(self.s0, self.params)]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q
        if q.kind == "region":
            sp, sn = self._scales()
            return _RegionSTE.apply(x, sp.reshape(()), sn, q.qmin, q.qmax)
        if x.dim() not in self._bounds:
            z = _per_axis(self.zp, q.axis, x.dim(), self.device)
            self._bounds[x.dim()] = (q.qmin - z, q.qmax - z)
        (s,) = self._scales()
        return _UniformSTE.apply(x, _per_axis(s, q.axis, x.dim(), self.device), *self._bounds[x.dim()])

    def quantizer(self) -> Quantizer:
        with torch.no_grad():
            s = [v.cpu().numpy().astype(np.float32) for v in self._scales()]
        method = self.q.method if self.q.method.endswith("+lsq") else self.q.method + "+lsq"
        if self.q.kind == "region":
            return dataclasses.replace(self.q, scale=s[0].reshape(np.shape(self.q.scale)),
                                       neg_scale=float(s[1]), method=method)
        return dataclasses.replace(self.q, scale=s[0].reshape(np.shape(self.q.scale)), method=method)


# AdaRound's rectified sigmoid stretch (Nagel et al. 2020): h(V) reaches 0 and 1 exactly
_ZETA, _GAMMA = 1.1, -0.1


class LearnedRounding:
    """A uniform weight quantizer whose per-element choice between two neighbouring grid points
    trains (AdaRound, Nagel et al. 2020): code = base + h(V), h a stretched sigmoid in [0, 1], with
    a regularizer that pushes every h to 0 or 1. The weights themselves stay; `hard` (the default,
    and after training) takes h >= 0.5. `weight()` is the weight on the grid, so the emitted QDQ
    (round to nearest) computes what was trained.

    The start is the weights' own rounding, so a segment's loss before training is the given
    quantizer's (up to ties): `w` is rounded to nearest, and the other choice is the neighbour on
    the side of `w_float` (the weight before an earlier rounding, e.g. GPTQ's, put `w` on the grid;
    None: `w` itself), with h starting at `w_float`'s position between the two, held on `w`'s
    rounding's side. Where `w_float` is `w` this is floor(w/s) + frac(w/s) (rounding half up, as
    with None) but for fractions within 1e-4 of one half, held on the side w/s rounds to."""

    def __init__(self, q: Quantizer, w: np.ndarray, device="cpu", w_float: np.ndarray | None = None):
        if q.kind != "uniform":
            raise NotImplementedError(f"no learned rounding for kind {q.kind!r}")
        self.q = q
        w = torch.from_numpy(np.array(w, np.float32)).to(device)
        self.s = _per_axis(q.scale, q.axis, w.dim(), device)
        z = _per_axis(np.asarray(q.zero_point, np.float32), q.axis, w.dim(), device)
        self.lo, self.hi = q.qmin - z, q.qmax - z
        ws = w / self.s
        if w_float is None:
            self.base = torch.floor(ws)
            frac = ws - self.base
        else:
            code = torch.clamp(torch.round(ws), self.lo, self.hi)  # the given rounding
            r = torch.from_numpy(np.array(w_float, np.float32)).to(device) / self.s - code
            up = r >= 0  # the other choice is code + 1: h starts below 1/2, else code - 1 and above
            self.base = torch.where(up, code, code - 1)
            frac = torch.where(up, r.clamp(0.0, 0.4999), (1 + r).clamp(0.5001, 1.0))
        p = ((frac - _GAMMA) / (_ZETA - _GAMMA)).clamp(1e-4, 1 - 1e-4)
        self.param = torch.nn.Parameter(torch.log(p / (1 - p)))
        self.hard = True

    def h(self) -> torch.Tensor:
        return (torch.sigmoid(self.param) * (_ZETA - _GAMMA) + _GAMMA).clamp(0.0, 1.0)

    def _value(self, hard: bool) -> torch.Tensor:
        h = (self.param >= 0).float() if hard else self.h()
        return torch.clamp(self.base + h, self.lo, self.hi) * self.s

    def __call__(self, _w: torch.Tensor | None = None) -> torch.Tensor:
        return self._value(self.hard)

    def regularizer(self, beta: float) -> torch.Tensor:
        """AdaRound's f_reg: sum of 1 - |2h - 1|^beta, zero once every h is 0 or 1."""
        return (1.0 - (2.0 * self.h() - 1.0).abs().pow(beta)).sum()

    def weight(self) -> np.ndarray:
        with torch.no_grad():
            return self._value(True).cpu().numpy().astype(np.float32)
