"""The pass protocol: a small object with one entry point, run in order by a manager.

Like onnx-ir's passes, each pass returns a result saying whether it changed anything; here the
object passed around is the conversion `Context` (model + calibration + plan) rather than a bare
model, because most passes read calibration data and write the plan.
"""
from __future__ import annotations

import dataclasses
import sys
import time

from ..plan import Context


@dataclasses.dataclass
class PassResult:
    context: Context
    modified: bool
    summary: str = ""


class Pass:
    name: str = "pass"

    def __call__(self, ctx: Context) -> PassResult:
        raise NotImplementedError


class PassManager:
    def __init__(self, passes: list[Pass], verbose: bool = True):
        self.passes = list(passes)
        self.verbose = verbose

    def __call__(self, ctx: Context) -> PassResult:
        modified = False
        for p in self.passes:
            t = time.perf_counter()
            res = p(ctx)
            dt = time.perf_counter() - t
            modified |= res.modified
            ctx.report["passes"].append({"pass": p.name, "seconds": round(dt, 3), "modified": res.modified,
                                         "summary": res.summary})
            if self.verbose:
                print(f"[{p.name}] {dt:6.1f}s  {res.summary}", file=sys.stderr)
        return PassResult(ctx, modified)
