"""Where a reconstruction step's time goes, and how fast one block trains (issue 24).

    python tools/recon_profile.py --card deit_tiny_tin --spec mptq:4 --segment blocks.5 --iters 30
    python tools/recon_profile.py ... --profile            # + torch.profiler's table of ops

Runs the passes before reconstruction once (128 tin_calib images, as convert), takes the named
segment with the quantized model's inputs to it, and times `--iters` training steps
(recon.block.train_segment, batch --batch) for each --threads value; the first --warmup steps are
not timed. Prints ms per step; --profile adds the top ops by self CPU time. Run it on an idle
machine: the numbers are timings.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mptq_onnx.convert import recipe_passes  # noqa: E402
from mptq_onnx.data import load_calibration  # noqa: E402
from mptq_onnx.modelio import get_preprocess, load_model  # noqa: E402
from mptq_onnx.passes.base import PassManager  # noqa: E402
from mptq_onnx.passes.reconstruct import Reconstruct  # noqa: E402
from mptq_onnx.plan import Context  # noqa: E402
from tools.specs import float_model, quant_config  # noqa: E402


def prepare(card: str, spec: str, shared: Path, work: Path, images: int):
    """(ctx before the first reconstruction, its ReconSettings, the images it trains on)."""
    cfg, rest = quant_config(spec)
    if rest:
        raise SystemExit(f"{spec}: unknown modifiers {rest}")
    cfg.reconstruct, cfg.progress = True, False
    float_path = float_model(card, shared, work)
    pp = get_preprocess(load_model(float_path))
    calib_dir = shared / "data" / "tin_calib"
    recon = load_calibration(calib_dir, pp, images, progress=False)
    ctx = Context(load_model(float_path), cfg, load_calibration(calib_dir, pp, cfg.calib_size, progress=False), recon)
    passes = recipe_passes(cfg)
    first = next(i for i, p in enumerate(passes) if isinstance(p, Reconstruct))
    PassManager(passes[:first], verbose=False)(ctx)
    return ctx, recon


def segment_inputs(ctx, images, name: str):
    """The segment named `name` (torch), its quantized inputs and its float targets."""
    import numpy as np
    import torch

    from mptq_onnx.recon.block import _batched, build_segments
    segs = build_segments(ctx.model, ctx.info, ctx.plan, "cpu", learn_scales=ctx.config.recon_scale_lr > 0)
    names = [sp.name for sp, _ in segs]
    if name not in names:
        raise SystemExit(f"no segment {name!r}; segments: {', '.join(names)}")
    env = {segs[0][0].inputs[0]: torch.from_numpy(np.ascontiguousarray(images, np.float32))}
    for sp, seg in segs:
        xs = [env[t] for t in sp.inputs]
        if sp.name == name:
            return seg, xs, _batched(seg, xs, False, 64, "cpu"), names.index(name)
        ys = _batched(seg, xs, True, 64, "cpu")
        env = dict(zip(sp.outputs, ys))
    raise AssertionError


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--card", default="deit_tiny_tin")
    ap.add_argument("--spec", default="mptq:4")
    ap.add_argument("--segment", default="blocks.5")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--images", type=int, default=512, help="training images (tin_calib)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--malloc", choices=["cli", "cli-heap", "default"], default="cli-heap",
                    help="cli: glibc set as the CLI sets it (map_large_allocations); cli-heap: that, with "
                         "reconstruction's heap_allocations around the steps (what convert does now); default: "
                         "glibc untouched")
    ap.add_argument("--shared", default=str(REPO.parent / "shared"))
    ap.add_argument("--work", default=str(REPO / "runs"))
    a = ap.parse_args(argv)
    import torch

    from mptq_onnx.recon.block import ReconSettings, train_segment
    import contextlib

    from mptq_onnx.calibrate import heap_allocations, map_large_allocations
    if a.malloc != "default":
        map_large_allocations()
    around = heap_allocations if a.malloc == "cli-heap" else contextlib.nullcontext
    ctx, images = prepare(a.card, a.spec, Path(a.shared), Path(a.work), a.images)
    seg, qx, targets, k = segment_inputs(ctx, images, a.segment)
    cfg = ctx.config
    st = ReconSettings(iters=a.warmup, batch=a.batch, lr=cfg.recon_lr, scale_lr=cfg.recon_scale_lr)
    start = [p.detach().clone() for p in seg.parameters()]
    print(f"{a.card} {a.spec} segment {a.segment}: {len(seg.nodes)} nodes, {len(seg.param_names)} trained tensors, "
          f"inputs {[tuple(x.shape) for x in qx]}")
    for threads in a.threads:
        torch.set_num_threads(threads)
        with torch.no_grad():
            for p, p0 in zip(seg.parameters(), start):
                p.copy_(p0)
        with around():
            train_segment(seg, qx, targets, None, st, k)  # warm-up: allocator, first-call paths
            timed = dataclasses.replace(st, iters=a.iters)
            t = time.perf_counter()
            train_segment(seg, qx, targets, None, timed, k)
            dt = time.perf_counter() - t
        print(f"threads {threads}, malloc {a.malloc}: {1000 * dt / a.iters:.1f} ms per step (batch {a.batch}, {a.iters} steps)")
    if a.profile:
        from torch.profiler import ProfilerActivity, profile
        with around(), profile(activities=[ProfilerActivity.CPU]) as prof:
            train_segment(seg, qx, targets, None, dataclasses.replace(st, iters=a.iters), k)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    return 0


if __name__ == "__main__":
    sys.exit(main())
