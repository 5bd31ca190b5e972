"""The conversion pipeline: recipes are ordered lists of passes run over one Context."""
from __future__ import annotations

import os
import sys

import numpy as np
import onnx

from .calibrate import release_memory
from .check import check_input_model, check_result, static_batch
from .errors import MptqError
from .modelio import load_model
from .passes.base import Pass, PassManager
from .passes.attn_smooth import AttnSmooth
from .passes.calibrate import Calibrate
from .passes.canonicalize import Canonicalize
from .passes.optm import OptM
from .passes.sqb import SmoothQuantBias
from .passes.greedy_mp import GreedyMP
from .passes.pareto import ParetoMP
from .passes.patchwise import PatchWise
from .passes.ias import IasActQuant, IasFold, IasWeights
from .passes.qdq import WriteQDQ
from .passes.reconstruct import KeepFloat, Reconstruct, require_torch
from .passes.rounding import GPTQRounding
from .passes.uniform import UniformParams
from .plan import Context, QuantConfig


def recipe_passes(cfg: QuantConfig) -> list[Pass]:
    head: list[Pass] = [Canonicalize(), Calibrate()]
    if cfg.recipe == "uniform":
        body: list[Pass] = [UniformParams()]
    elif cfg.recipe == "mptq":  # the paper's passes with our attention smoothing and GPTQ rounding
        body = [AttnSmooth(), SmoothQuantBias(), OptM()]
    elif cfg.recipe == "mptq-paper":  # the paper's passes only
        body = [SmoothQuantBias(), OptM()]
    elif cfg.recipe == "optm":  # ablation: OPT-m without SQ-b
        body = [OptM()]
    elif cfg.recipe == "sqb":  # ablation: SQ-b, then the uniform MSE baseline
        body = [SmoothQuantBias(), UniformParams()]
    elif cfg.recipe == "pmq":  # PMQ: its metric and frontier over the uniform quantizers
        if not cfg.mixed():
            raise MptqError("--recipe pmq allocates bit-widths: give --target-bits (e.g. 5) or --max-drop")
        body = [UniformParams()]
    elif cfg.recipe == "ias":  # I&S-ViT: three stages, two of them reconstruction (passes/ias.py)
        require_torch("--recipe ias", cfg.device)
        if cfg.mixed():
            raise MptqError("mixed precision (--target-bits, --max-drop) is not available with --recipe ias")
        body = [IasActQuant(), KeepFloat(), Reconstruct("ias-stage1", float_weights=True, quant_inputs=False, loss="mse"),
                IasFold(), IasWeights(), Reconstruct("ias-stage3", loss="mse")][:{1: 3, 2: 4, 3: 6}[cfg.ias_stages]]
    else:
        raise MptqError(f"unknown recipe {cfg.recipe!r}; choose from: {', '.join(RECIPES)}")
    allocator = ParetoMP() if cfg.recipe == "pmq" or cfg.allocator == "pareto" else GreedyMP()
    tail: list[Pass] = [allocator] if cfg.mixed() else []
    if cfg.reconstruct and cfg.recipe == "ias":
        raise MptqError("--recipe ias reconstructs already (its stages 1 and 3); drop --reconstruct")
    if cfg.reconstruct:
        require_torch(device=cfg.device)
        tail.append(KeepFloat())  # before GPTQ moves the weights onto their grids
        if cfg.recon_float_first:  # I&S-ViT's first stage on this recipe's activation quantizers
            tail.append(Reconstruct("recon-float", float_weights=True, quant_inputs=False))
    if cfg.rounding() == "gptq":
        if not any(isinstance(p, OptM) for p in body):
            raise MptqError(f"--weight-rounding gptq needs a recipe that runs opt-m, not {cfg.recipe!r}")
        tail.append(GPTQRounding())  # after Greedy MP: it needs the final bit-widths
    if cfg.reconstruct:
        tail.append(Reconstruct())  # trains the weights through the final quantizers
    if cfg.patchwise:
        tail.append(PatchWise())  # per-token widths in attention·V, written by the QDQ pass
    return head + body + tail + [WriteQDQ()]


RECIPES = ("uniform", "mptq", "mptq-paper", "sqb", "optm", "ias", "pmq")


def convert(model: onnx.ModelProto | str | os.PathLike, calib_images: np.ndarray, cfg: QuantConfig,
            verbose: bool = True, recon_images: np.ndarray | None = None, preprocess=None) -> Context:
    """Run the recipe's passes; the input is checked first and the result after (see check.py):
    the result's fidelity on a few calibration images is in ``ctx.report["check"]``.
    `recon_images`: what reconstruction trains on (default: the calibration images).
    `preprocess`: how `calib_images` were made (default: the model's metadata); --max-drop's
    validation images are read the same way.

    `model` is left as it is; given a path, convert reads the model itself and holds its only
    reference, so the float model is freed once canonicalization has made its copy (a caller
    holding it keeps the weights twice for the whole conversion: 344 MB more on vit_base). The
    returned Context keeps the plan and the calibration statistics, not the searches' samples.

    The CLI also sets glibc's mmap threshold for its process (calibrate.map_large_allocations: a
    process-wide setting, so a library call leaves it to its caller); the peak memory figures in
    the docs were measured that way."""
    cfg.validate()
    source = None
    if not isinstance(model, onnx.ModelProto):
        source = model
        model = load_model(model)
    check_input_model(model)
    b = static_batch(model)
    if b is not None and b > 1 and len(calib_images) % b:
        keep = len(calib_images) // b * b
        if keep == 0:
            raise MptqError(f"the model takes batches of exactly {b} images but only {len(calib_images)} "
                            "calibration images were given")
        print(f"mptq-onnx: the model takes batches of exactly {b} images: calibrating on {keep} of "
              f"{len(calib_images)}", file=sys.stderr)
        calib_images = calib_images[:keep]
    ctx = Context(model, cfg, calib_images, recon_images)
    ctx.preprocess, ctx.source = preprocess, source
    del model
    PassManager(recipe_passes(cfg), verbose=verbose and cfg.progress)(ctx)
    # the plan is written: the searches' data goes before the check's session comes
    ctx.site_optimizer = None
    ctx.teacher = None  # reconstruction's float copy
    for st in ctx.calib.stats.values():
        st.sample = None
    release_memory()
    bits = cfg.target_bits if cfg.target_bits is not None else min(cfg.wbits, cfg.abits)
    if cfg.max_drop is not None:
        bits = ctx.report["pareto_mp"]["target"]
    chk = check_result(ctx, ctx.calib.images, ctx.calib.logits, bits)
    ctx.report["check"] = chk.to_dict()
    if verbose and cfg.progress:
        print(f"[check] top-1 agreement {chk.top1_agreement:.3f}, KL {chk.kl:.4f} against float on "
              f"{chk.images} calibration images", file=sys.stderr)
    return ctx
