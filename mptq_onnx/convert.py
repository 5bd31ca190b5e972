"""The conversion pipeline: recipes are ordered lists of passes run over one Context."""
from __future__ import annotations

import numpy as np
import onnx

from .errors import MptqError
from .passes.base import Pass, PassManager
from .passes.attn_smooth import AttnSmooth
from .passes.calibrate import Calibrate
from .passes.canonicalize import Canonicalize
from .passes.optm import OptM
from .passes.sqb import SmoothQuantBias
from .passes.greedy_mp import GreedyMP
from .passes.qdq import WriteQDQ
from .passes.reconstruct import Reconstruct, require_torch
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
    else:
        raise MptqError(f"unknown recipe {cfg.recipe!r}; choose from: {', '.join(RECIPES)}")
    tail: list[Pass] = [GreedyMP()] if cfg.target_bits is not None else []
    if cfg.rounding() == "gptq":
        if not any(isinstance(p, OptM) for p in body):
            raise MptqError(f"--weight-rounding gptq needs a recipe that runs opt-m, not {cfg.recipe!r}")
        tail.append(GPTQRounding())  # after Greedy MP: it needs the final bit-widths
    if cfg.reconstruct:
        require_torch()
        tail.append(Reconstruct())  # last: trains the weights through the final quantizers
    return head + body + tail + [WriteQDQ()]


RECIPES = ("uniform", "mptq", "mptq-paper", "sqb", "optm")


def convert(model: onnx.ModelProto, calib_images: np.ndarray, cfg: QuantConfig,
            verbose: bool = True) -> Context:
    cfg.validate()
    ctx = Context(model, cfg, calib_images)
    PassManager(recipe_passes(cfg), verbose=verbose and cfg.progress)(ctx)
    return ctx
