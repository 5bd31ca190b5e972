"""What a conversion carries between passes: the config, the model, calibration data and the plan.

The *plan* maps every site to its bit-widths and quantizers. Passes fill and refine it (uniform
parameters, SQ-b, OPT-m, Greedy MP); the QDQ pass writes it into the graph.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import onnx

from .analyze import GraphInfo, Site, analyze
from .calibrate import CalibData
from .errors import MptqError
from .modelio import Spill, is_large_raw, model_shell
from .quantizers import Quantizer

BITS_RANGE = (2, 8)


def parse_image_bits(s: str) -> int | None:
    """An --image-bits value: a bit-width, or 'abits' (None: follow --abits)."""
    return None if s == "abits" else int(s)


# how reconstruction weighs a block's output error (recon/block.py, ReconSettings.loss).
# fisher_abs lowered the held-out tin_calib KL against mse in three of four (deit and swin, W3A3
# and W4A4) with the lowest geometric mean of the rule set before measuring (docs/results.md)
RECON_LOSSES = ("mse", "fisher", "fisher_mean", "fisher_abs", "fisher_kl", "fisher_dplr")
RECON_LOSS_DEFAULT = "fisher_abs"
# how reconstruction treats the weights (ReconSettings.rounding): trains them through
# straight-through rounding, or trains each one's rounding down or up (AdaRound)
RECON_ROUNDINGS = ("ste", "learned")


@dataclasses.dataclass
class QuantConfig:
    wbits: int = 8
    abits: int = 8
    recipe: str = "uniform"
    calib_size: int = 128
    act_method: str = "mse"          # minmax | mse
    weight_method: str = "mse"       # minmax | mse
    target_bits: float | None = None  # mixed precision: the average bit-width
    # mixed precision by accuracy instead: the smallest frontier point whose top-1 on val_dir is
    # within max_drop points of float (pareto allocator; bisection on the frontier)
    max_drop: float | None = None
    val_dir: str | None = None
    val_size: int = 1000              # labelled images (spread over val_dir) each tried point is scored on
    # None: 8 6 5 4, and 3 too for targets below 5. 3 is left out at 5 and above: at a 5-bit target,
    # Greedy MP measuring sensitivities at 5 and 4 bits rather than 4 and 3 lowered the final KL on
    # tin_calib (deit 0.0127 -> 0.0118, swin 0.0049 -> 0.0048)
    mp_candidates: tuple[int, ...] | None = None
    # pareto (PMQ: passes/pareto.py) | greedy (MPTQ-ViT's Greedy MP). pareto measured as well as greedy
    # on tin_val_dev at a 5-bit target (deit +0.00 points, swin +0.06) and at 4 (deit +0.36), in
    # less search time, with the whole frontier in the report (docs/results.md#pmq)
    allocator: str = "pareto"
    pmq_masks: int = 32               # random configurations per image the PMQ metric scores
    pmq_probe_bits: int | None = None  # width the PMQ metric measures at (None: the lowest candidate)
    pmq_measure_kl: bool = True       # measure the chosen allocation's KL (one evaluation, for the report)
    frontier_plot: str | None = None  # PNG of the frontier (pareto allocator; needs matplotlib)
    omega_from: str | None = None     # reuse the Ω of an earlier run's report (pareto allocator)
    patchwise: bool = False           # PMQ's patch-wise bits inside attention (passes/patchwise.py)
    patch_keep: float = 0.5           # share of key tokens that keep the site's width
    patch_bits: int = 2               # width of the other tokens' attention·V operands
    patch_score: str = "mass"         # mass | cls: what ranks the tokens (passes/patchwise.py)
    mp_images: int = 16               # calibration images Greedy MP scores configurations on
    sqb_alphas: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
    row_budget: int = 4096            # token rows kept per Linear input for the searches
    full_images: int = 16             # images whose attention tensors are kept whole
    batch_size: int = 32
    # calibration memory: one batch's tensors to quantize, and the whole-tensor (attention) samples;
    # both bind only on large models (vit_base at 224: ~95 MB of tensors per image)
    calib_batch_mb: int = 256
    full_sample_mb: int = 256
    seed: int = 0
    progress: bool = True
    skip_sites: tuple[str, ...] = ()  # site names (or roles) left in float
    # The image input of the first layer is 8-bit pixel data; in their W4A4, RepQ-ViT quantizes it
    # at 8 bits and I&S-ViT leaves it as it is. None quantizes it with --abits like the rest.
    image_bits: int | None = 8
    weight_rounding: str | None = None  # nearest | gptq; None: the recipe's (gptq in mptq)
    reconstruct: bool = False          # block reconstruction in torch (passes/reconstruct.py)
    # per block; None: 100, or 500 with learned rounding (at 100 its choices barely move; session 17)
    recon_iters: int | None = None
    recon_batch: int = 32
    # 100 iterations at 3e-4 lowered held-out KL most on deit_tiny_tin W4A4 (tin_calib; 1e-4 and
    # 1e-3 less); the reference code's 4e-5 is for 1,000 iterations
    recon_lr: float = 3e-4
    recon_images: int | None = None    # images reconstruction trains on (None: the calibration images)
    recon_drop: float = 0.0            # QDrop: probability an activation skips its quantizer while training
    # learning rate of the uniform and region activation scales (their logarithms) while
    # reconstructing; 0 keeps the calibrated scales frozen. 3e-3 lowered held-out KL most on
    # deit_tiny_tin W4A4 (tin_calib; 1e-2 less)
    recon_scale_lr: float = 3e-3
    # --reconstruct: first train the float weights under the plan's activation quantizers (I&S-ViT's
    # stage 1, inputs from the float model), then round and reconstruct as usual
    recon_float_first: bool = False
    # one of RECON_LOSSES, or "default": RECON_LOSS_DEFAULT after any recipe, mse in the ias
    # recipe's own stages (I&S-ViT's loss)
    recon_loss: str = "default"
    # reconstruction also trains the γ and β of LayerNorms feeding quantized inputs
    recon_norms: bool = False
    # "ste": reconstruction trains the weights (straight-through rounding); "learned": it trains
    # each weight's choice of grid point instead (AdaRound), from the rounding before it, nearest
    # unless weight_rounding says gptq, towards the float weight's side
    recon_rounding: str = "ste"
    # learned rounding: Adam's learning rate on AdaRound's V (1e-2 lowered held-out KL at 500
    # iterations where 1e-3 raised it, journal session 17)
    recon_round_lr: float = 1e-2
    device: str = "cpu"                # where reconstruction trains: cpu | cuda[:N]
    # post-Softmax inputs: "default", the recipe's own choice, or "sulq" (I&S-ViT's
    # shift-uniform-log2) on every one of them
    softmax_quantizer: str = "default"
    # ias recipe, for ablations: 1 stops after stage 1 (per-channel activations, float weights),
    # 2 after the fold (weights float), 3 runs all of I&S-ViT
    ias_stages: int = 3
    # where onnxruntime calibrates and simulates: execution providers in order (runtime.parse_providers;
    # the CPU is always last) and intra-op threads (None: onnxruntime's default)
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    threads: int | None = None

    def mixed(self) -> bool:
        """Whether an allocator chooses the widths (a target, or an accuracy budget)."""
        return self.target_bits is not None or self.max_drop is not None

    def candidates(self) -> tuple[int, ...]:
        """The widths mixed precision chooses from (mp_candidates, else the default for the target)."""
        if self.mp_candidates:
            return tuple(self.mp_candidates)
        low = (self.target_bits is not None and self.target_bits < 5) or self.max_drop is not None
        return (8, 6, 5, 4, 3) if low else (8, 6, 5, 4)

    def rounding(self) -> str:
        """The weight rounding this config uses: its own, else the recipe's (GPTQ in `mptq`)."""
        if self.weight_rounding:
            return self.weight_rounding
        if self.reconstruct and self.recon_rounding == "learned":
            return "nearest"  # from GPTQ's rounding it measured no better (journal, session 18)
        return "gptq" if self.recipe == "mptq" else "nearest"

    def iters(self) -> int:
        """Reconstruction iterations per block: recon_iters, else the default for the rounding."""
        if self.recon_iters is not None:
            return self.recon_iters
        return 500 if self.recon_rounding == "learned" else 100

    def smoothing_scores_weights(self) -> bool:
        """Whether SQ-b's α/shift search scores the weights' rounding error too (see sqb.py)."""
        return self.rounding() != "gptq" or self.mixed()

    def held_abits(self, site) -> int | None:
        """The activation bits a site is held at whatever --abits or Greedy MP say (the image input)."""
        if self.image_bits is not None and any(a.kind == "image" for a in site.inputs):
            return self.image_bits
        return None

    def site_abits(self, site) -> int:
        held = self.held_abits(site)
        return self.abits if held is None else held

    def validate(self) -> None:
        from .runtime import check_threads, parse_providers
        self.providers = parse_providers(self.providers)  # full names, CPU last; unknown ones refused
        check_threads(self.threads)
        lo, hi = BITS_RANGE
        for name in ("wbits", "abits"):
            b = getattr(self, name)
            if not isinstance(b, int) or not lo <= b <= hi:
                raise MptqError(f"--{name} must be an integer from {lo} to {hi}, got {b}")
        if self.image_bits is not None and not (isinstance(self.image_bits, int) and lo <= self.image_bits <= hi):
            raise MptqError(f"--image-bits must be an integer from {lo} to {hi}, got {self.image_bits}")
        for b in self.candidates():
            if not lo <= b <= hi:
                raise MptqError(f"bit-width candidates must lie in {lo}..{hi}, got {b}")
        if self.target_bits is not None and not lo <= self.target_bits <= hi:
            raise MptqError(f"--target-bits must lie in {lo}..{hi}, got {self.target_bits}")
        if self.target_bits is not None and self.target_bits < min(self.candidates()):
            c = self.candidates()
            raise MptqError(f"--target-bits {self.target_bits:g} cannot be met: the candidate widths {' '.join(map(str, c))} "
                            f"reach averages from {min(c)} to {max(c)} (add narrower ones with --mp-candidates)")
        if self.max_drop is not None:
            if self.target_bits is not None:
                raise MptqError("give --target-bits or --max-drop, not both: --max-drop finds the target itself")
            if self.allocator != "pareto" and self.recipe != "pmq":
                raise MptqError("--max-drop searches PMQ's frontier: it needs --allocator pareto")
            if not self.val_dir:
                raise MptqError("--max-drop needs --val DIR: labelled images (ImageFolder) to measure the drop on")
            if not self.max_drop >= 0 or self.val_size < 1:
                raise MptqError("--max-drop must be >= 0 points and --val-size >= 1")
        if self.omega_from is not None:
            if self.allocator != "pareto" and self.recipe != "pmq":
                raise MptqError("--omega-from reuses PMQ's sensitivity: it needs --allocator pareto")
            if not Path(self.omega_from).is_file():
                raise MptqError(f"--omega-from: report not found: {self.omega_from}")
        if self.frontier_plot is not None:
            if not self.mixed() or (self.allocator != "pareto" and self.recipe != "pmq"):
                raise MptqError("--frontier-plot draws PMQ's frontier: give --target-bits with --allocator pareto "
                                "(or --recipe pmq)")
            from .plot import require_matplotlib
            require_matplotlib()
        if self.patchwise and not (0.0 <= self.patch_keep < 1.0 and lo <= self.patch_bits <= hi):
            raise MptqError(f"--patch-keep must lie in [0, 1) and --patch-bits in {lo}..{hi}")
        if self.patch_score not in ("mass", "cls"):
            raise MptqError(f"--patch-score must be 'mass' or 'cls', got {self.patch_score!r}")
        if self.allocator not in ("greedy", "pareto"):
            raise MptqError(f"--allocator must be 'greedy' or 'pareto', got {self.allocator!r}")
        if self.pmq_masks < 1:
            raise MptqError("the PMQ metric needs at least one configuration per image")
        if self.mp_images < 1:
            raise MptqError(f"--mp-images must be at least 1, got {self.mp_images}")
        if self.calib_size < 1:
            raise MptqError(f"--calib-size must be at least 1, got {self.calib_size}")
        if self.weight_rounding not in (None, "nearest", "gptq"):
            raise MptqError(f"--weight-rounding must be 'nearest' or 'gptq', got {self.weight_rounding!r}")
        if self.recon_images is not None and self.recon_images < 1:
            raise MptqError(f"--recon-images must be at least 1, got {self.recon_images}")
        if not 0.0 <= self.recon_drop < 1.0:
            raise MptqError(f"the QDrop probability must lie in [0, 1), got {self.recon_drop}")
        if self.recon_rounding not in RECON_ROUNDINGS:
            raise MptqError(f"the reconstruction's weight rounding must be one of {', '.join(RECON_ROUNDINGS)}, "
                            f"got {self.recon_rounding!r}")
        if self.recon_loss not in ("default",) + RECON_LOSSES:
            raise MptqError(f"the reconstruction loss must be one of default, {', '.join(RECON_LOSSES)}, "
                            f"got {self.recon_loss!r}")
        if self.recon_scale_lr < 0:
            raise MptqError(f"the scale learning rate must not be negative, got {self.recon_scale_lr}")
        if self.iters() < 0 or self.recon_batch < 1 or not self.recon_lr > 0 or not self.recon_round_lr > 0:
            raise MptqError("--iters must be >= 0, --recon-batch >= 1 and the learning rates > 0")
        self.recon_iters = self.iters()  # concrete from here on, as the report records it
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise MptqError(f"--device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.softmax_quantizer not in ("default", "sulq"):
            raise MptqError(f"--softmax-quantizer must be 'default' or 'sulq', got {self.softmax_quantizer!r}")
        if self.ias_stages not in (1, 2, 3):
            raise MptqError(f"ias_stages must be 1, 2 or 3, got {self.ias_stages}")
        if self.act_method not in ("minmax", "mse") or self.weight_method not in ("minmax", "mse"):
            raise MptqError("--act-method/--weight-method must be 'minmax' or 'mse'")


@dataclasses.dataclass
class PatchSpec:
    """Patch-wise bits of an attention·V MatMul (passes/patchwise.py): in each image, the
    `low_tokens` key tokens with the least attention mass take `low` (one quantizer per input:
    attention probabilities, V) instead of the site's own quantizers."""
    low_tokens: int
    tokens: int
    low_bits: int
    low: list[Quantizer]
    score: str = "mass"  # mass: mean attention over heads and queries; cls: the class token's row


@dataclasses.dataclass
class SitePlan:
    site: Site
    w_bits: int | None
    a_bits: int
    weight: Quantizer | None = None
    acts: list[Quantizer | None] = dataclasses.field(default_factory=list)
    methods: list[str] = dataclasses.field(default_factory=list)
    patch: "PatchSpec | None" = None  # PMQ's patch-wise bits (an attention·V site only)

    def method_str(self) -> str:
        return "+".join(dict.fromkeys(self.methods)) or "uniform"


class Context:
    """State shared by the passes of one conversion."""

    def __init__(self, model: onnx.ModelProto, config: QuantConfig, calib_images: np.ndarray | None = None,
                 recon_images: np.ndarray | None = None):
        self.model = model
        self.config = config
        self.calib_images = calib_images
        self.recon_images = recon_images  # reconstruction's training images, where not the calibration ones
        self.calib: CalibData | None = None
        self.plan: dict[str, SitePlan] = {}
        self.report: dict = {"passes": []}
        self.materialized = False
        self.site_optimizer = None  # OPT-m's cache of per-(site, bits) quantizers, reused by Greedy MP
        self.teacher: onnx.ModelProto | None = None  # the float model reconstruction aims at (KeepFloat)
        self.preprocess = None  # how the calibration images were made (None: the model's metadata)
        self.source = None  # the model's file, where it came from one (class names beside it)
        self.shape_cache: dict = {}  # tensor shapes the analysis ran the model for (analyze._probe_shapes)
        self._info: GraphInfo | None = None
        self.t0 = time.perf_counter()

    @property
    def info(self) -> GraphInfo:
        if self._info is None:
            self._info = self.analyze(self.model)
        return self._info

    def analyze(self, model: onnx.ModelProto) -> GraphInfo:
        """`model` (this one, or its float copy) analysed with this conversion's input size and
        probed shapes."""
        hw = self.preprocess.input_size[1:] if self.preprocess is not None else None
        return analyze(model, hw, self.shape_cache)

    def invalidate(self) -> None:
        """Call after a pass changed the graph structure (not after initializer-only edits)."""
        self._info = None

    def initializer(self, name: str) -> onnx.TensorProto:
        for t in self.model.graph.initializer:
            if t.name == name:
                return t
        raise KeyError(name)

    def weight(self, name: str) -> np.ndarray:
        return onnx.numpy_helper.to_array(self.initializer(name))

    def set_initializer(self, name: str, value: np.ndarray) -> None:
        t = self.initializer(name)
        t.CopyFrom(onnx.numpy_helper.from_array(np.ascontiguousarray(value), name))

    def set_initializers(self, new: Spill) -> None:
        """`set_initializer` for every array in `new`, for passes that rewrite many weights: the
        proto frees nothing until dropped whole (upb arena), so each rewrite left the old values
        in it. The model is rebuilt instead; its other large initializers wait in `new`'s file
        meanwhile, so it is never held twice."""
        replaced = set(new)
        shell = model_shell(self.model)
        for t in self.model.graph.initializer:
            if is_large_raw(t) and t.name not in replaced:
                new.put(t.name, t.raw_data)
        self.model = None
        for t in shell.graph.initializer:
            if t.name in replaced:
                t.CopyFrom(onnx.numpy_helper.from_array(new.array(t.name), t.name))
            elif t.name in new and not t.HasField("raw_data"):
                t.raw_data = new[t.name]
        self.model = shell
