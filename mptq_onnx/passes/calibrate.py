"""Calibrate: run the float model over the calibration images and keep statistics for the plan."""
from __future__ import annotations

import tempfile

from ..calibrate import calibrate, release_memory
from ..modelio import Spill, fill_shell, take_weights
from ..errors import MptqError
from ..plan import Context
from .base import Pass, PassResult


def site_tensors(ctx: Context) -> tuple[list[str], list[str]]:
    """Tensors to sample by token rows (Linear inputs) and whole (attention and image inputs)."""
    rows, full = [], []
    for s in ctx.info.sites:
        for a in s.inputs:
            (rows if s.op == "linear" else full).append(a.tensor)
    return list(dict.fromkeys(rows)), list(dict.fromkeys(full))


class Calibrate(Pass):
    name = "calibrate"

    def __call__(self, ctx: Context) -> PassResult:
        if ctx.calib_images is None or len(ctx.calib_images) == 0:
            raise MptqError("no calibration images: pass --calib DIR (an image folder) or an .npy/.npz file")
        cfg = ctx.config
        rows, full = site_tensors(ctx)
        # onnxruntime copies the weights into its session: while it runs, the model waits as a
        # shell and its weights in a temporary file, not in memory a second time (344 MB on vit_base)
        shell, weights = take_weights(ctx.model)
        ctx.model = None
        with tempfile.TemporaryFile(prefix="mptq_weights_") as f:
            spilled = Spill(f)
            for name, w in weights.items():
                spilled.put(name, w)
            try:
                ctx.calib = calibrate(shell, ctx.calib_images, rows, full, row_budget=cfg.row_budget,
                                      full_images=cfg.full_images, batch_size=cfg.batch_size, seed=cfg.seed,
                                      progress=cfg.progress, batch_bytes=cfg.calib_batch_mb << 20,
                                      full_bytes=cfg.full_sample_mb << 20, weights=weights,
                                      threads=cfg.threads, providers=cfg.providers)
            finally:
                weights.clear()
                ctx.model = fill_shell(shell, spilled)  # the same bytes as before
        release_memory()
        ctx.report["calibration_images"] = int(len(ctx.calib_images))
        ctx.report["calibration_batch"] = ctx.calib.batch_size
        ctx.report["calibration_full_images"] = ctx.calib.full_images
        # elements per image of each quantized activation: the weights of the activation bit average
        ctx.report["act_sizes"] = {k: st.numel / len(ctx.calib_images) for k, st in ctx.calib.stats.items()}
        return PassResult(ctx, False, f"{len(ctx.calib_images)} images, {len(rows) + len(full)} tensors")
