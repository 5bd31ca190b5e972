"""The pass protocol: a small object with one entry point, run in order by a manager.

Like onnx-ir's passes, each pass returns a result saying whether it changed anything; here the
object passed around is the conversion `Context` (model + calibration + plan) rather than a bare
model, because most passes read calibration data and write the plan.
"""
from __future__ import annotations

import dataclasses
import sys
import time

import numpy as np

from ..calibrate import release_memory, with_session
from ..errors import MptqError
from ..modelio import image_input
from ..plan import Context

FLOAT_CHECK_IMAGES = 2  # calibration images the float-model check runs (its "before": ctx.calib.logits)


@dataclasses.dataclass
class PassResult:
    context: Context
    modified: bool
    summary: str = ""
    # (max |Δlogit|, tolerance) a preserves_float pass measured itself after its last change,
    # against calibration's float logits: PassManager checks it instead of running the model again
    float_drift: tuple[float, float] | None = None
    # how many sites (or blocks, for reconstruction) the pass acted on: the report's "sites", so
    # that a pass that quietly found nothing to do on a foreign graph shows as 0
    sites: int | None = None


class Pass:
    name: str = "pass"
    # True for passes that rewrite the graph but must leave its float outputs unchanged (up to
    # rounding); PassManager checks that they did
    preserves_float: bool = False

    def __call__(self, ctx: Context) -> PassResult:
        raise NotImplementedError


class PassManager:
    def __init__(self, passes: list[Pass], verbose: bool = True):
        self.passes = list(passes)
        self.verbose = verbose

    def __call__(self, ctx: Context) -> PassResult:
        modified = False
        for p in self.passes:
            # once weights were trained away from float, "unchanged" means unchanged by this pass
            ref = float_outputs(ctx) if p.preserves_float and ctx.teacher is not None else None
            t = time.perf_counter()
            res = p(ctx)
            release_memory()  # what the pass freed, back to the OS before the next one allocates
            dt = time.perf_counter() - t
            modified |= res.modified
            ctx.report["passes"].append({"pass": p.name, "seconds": round(dt, 3), "modified": res.modified,
                                         "summary": res.summary, "sites": res.sites})
            if self.verbose:
                print(f"[{p.name}] {dt:6.1f}s  {res.summary}", file=sys.stderr)
            if p.preserves_float:
                check_float(ctx, p.name, ref, res.float_drift if ref is None else None)
        return PassResult(ctx, modified)


def float_tolerance(ref_absmax: float) -> float:
    return 1e-3 * ref_absmax + 1e-4


def _float_runnable(ctx: Context) -> bool:
    """Calibrated, and the graph still float (not yet written as QDQ)."""
    return ctx.calib is not None and ctx.calib_images is not None and not ctx.materialized


def float_outputs(ctx: Context, n: int = FLOAT_CHECK_IMAGES) -> np.ndarray | None:
    """The graph's outputs now on the first `n` calibration images (None before calibration)."""
    if not _float_runnable(ctx):
        return None
    x = ctx.calib_images[:n]
    out, inp = ctx.model.graph.output[0].name, image_input(ctx.model).name
    return with_session(ctx, lambda sess: sess.run([out], {inp: x})[0])


def float_drift(ctx: Context, n: int = FLOAT_CHECK_IMAGES, ref: np.ndarray | None = None) -> tuple[float, float]:
    """(max |Δlogit|, its tolerance) of the graph now against `ref`, by default the float logits
    recorded at calibration, on the first `n` calibration images."""
    y = float_outputs(ctx, n)
    ref = ctx.calib.logits[:len(y)] if ref is None else ref
    return float(np.abs(y - ref).max()), float_tolerance(float(np.abs(ref).max()))


def check_float(ctx: Context, pass_name: str, ref: np.ndarray | None = None,
                measured: tuple[float, float] | None = None) -> None:
    """Raise MptqError if the graph's float outputs moved since calibration (or since `ref`, the
    outputs before the pass), i.e. a rewrite went wrong. `measured`: the pass's own float_drift."""
    if not _float_runnable(ctx):
        return
    d, tol = measured if measured is not None else float_drift(ctx, ref=ref)
    ctx.report.setdefault("float_check", {})[pass_name] = d
    if not d <= tol:  # NaN fails too
        raise MptqError(f"pass {pass_name!r} should keep the float model but changed its outputs by up to {d:.3g} "
                        f"(tolerance {tol:.3g}, first {min(FLOAT_CHECK_IMAGES, len(ctx.calib_images))} "
                        f"calibration images); this graph is not supported by {pass_name}: use a recipe "
                        f"without it (e.g. --recipe optm) and report the model")
