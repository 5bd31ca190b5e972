"""Block reconstruction (I&S-ViT's last stage): train each block's weights and biases through its
frozen quantizers to match the float block. Thin: the torch work is in `mptq_onnx.recon`, imported
only here, when the pass runs.

`KeepFloat` stores the float model before the first pass that moves weights off it (GPTQ
rounding, I&S-ViT's first stage), so that reconstruction aims at the float model's blocks and not
at blocks whose weights were already rounded or trained.
"""
from __future__ import annotations

import copy
import tempfile

import numpy as np

from ..errors import MptqError
from ..modelio import Spill
from ..plan import RECON_LOSS_DEFAULT, Context
from .base import Pass, PassResult

TORCH_HINT = "--reconstruct needs torch: pip install 'mptq-onnx[export]' (or pip install torch)"


def require_torch(what: str = "--reconstruct", device: str = "cpu") -> None:
    """Fail early, in one line, where torch (or the CUDA device asked for) is missing, before the
    minutes of the passes before."""
    try:
        import torch
    except ImportError:
        raise MptqError(TORCH_HINT.replace("--reconstruct", what)) from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MptqError(f"--device {device}: torch sees no CUDA device (train on the CPU: --device cpu)")


class KeepFloat(Pass):
    name = "keep-float"

    def __call__(self, ctx: Context) -> PassResult:
        if ctx.teacher is None:
            ctx.teacher = copy.deepcopy(ctx.model)
        return PassResult(ctx, False, "float model kept as the reconstruction target")


class Reconstruct(Pass):
    """Train weights and biases block by block. `float_weights`/`quant_inputs`: see ReconSettings
    (I&S-ViT's first stage sets float_weights=True, quant_inputs=False). `loss` is the block loss
    where the config leaves it at "default" (the ias recipe keeps I&S-ViT's mse)."""
    name = "reconstruct"

    def __init__(self, name: str = "reconstruct", float_weights: bool = False, quant_inputs: bool = True,
                 loss: str = RECON_LOSS_DEFAULT):
        self.name = name
        self.float_weights = float_weights
        self.quant_inputs = quant_inputs
        self.loss = loss

    def __call__(self, ctx: Context) -> PassResult:
        cfg = ctx.config
        require_torch(device=cfg.device)
        from ..recon import ReconSettings, reconstruct
        st = ReconSettings(iters=cfg.iters(), batch=cfg.recon_batch, lr=cfg.recon_lr, device=cfg.device,
                           seed=cfg.seed, progress=cfg.progress, float_weights=self.float_weights,
                           quant_inputs=self.quant_inputs, drop=cfg.recon_drop, scale_lr=cfg.recon_scale_lr,
                           loss=self.loss if cfg.recon_loss == "default" else cfg.recon_loss,
                           threads=cfg.threads, train_norms=cfg.recon_norms,
                           rounding=cfg.recon_rounding, round_lr=cfg.recon_round_lr)
        try:
            images = ctx.calib_images if ctx.recon_images is None else ctx.recon_images
            t_info = ctx.analyze(ctx.teacher) if ctx.teacher is not None else None  # as the model is
            new, rows, acts = reconstruct(ctx.model, ctx.info, ctx.plan, images, st, ctx.teacher, t_info)
        except NotImplementedError as e:
            raise MptqError(f"{self.name}: {e}") from None
        changed = set(new)
        if new:
            with tempfile.TemporaryFile(prefix="mptq_weights_") as f:
                spill = Spill(f)  # one rebuild of the model, as GPTQ rounding writes its weights
                for name in list(new):
                    spill.put(name, new.pop(name))
                ctx.set_initializers(spill)
        for p in ctx.plan.values():
            if p.site.weight in changed:
                p.methods.append("recon")
        for (site, i), q in acts.items():  # trained activation scales: the QDQ pass emits these
            ctx.plan[site].acts[i] = q
        ctx.report.setdefault("reconstruct", {})[self.name] = rows
        ctx.report.setdefault("reconstruct_loss", {})[self.name] = st.loss
        trained = [r for r in rows if "loss_after" in r]
        if not trained:
            return PassResult(ctx, False, "nothing to train", sites=0)
        ratio = np.median([r["loss_after"] / max(r["loss_before"], 1e-30) for r in trained])
        return PassResult(ctx, True, f"{len(trained)} blocks x {st.iters} iterations; "
                                     f"block loss ({st.loss}) x{ratio:.2f} (median)", sites=len(trained))
