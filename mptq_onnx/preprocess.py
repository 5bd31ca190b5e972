"""Where a model's preprocessing comes from, in order: the model's own metadata (`mptq-onnx
export` writes it), a Hugging Face `preprocessor_config.json` beside the ONNX file (what
`save_pretrained` and optimum write), the user's flags (`--mean`, `--std`, `--size`,
`--crop-pct`, `--interpolation`, on top of either), else a default matched to the input shape.
Anything but the model's own metadata is said in one line: where it came from, and what it is.
Calibrating on wrongly normalised images is silent accuracy loss (Hugging Face ViTs use mean =
std = 0.5, not ImageNet's), so a guess is never silent.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import onnx

from .errors import MptqError
from .modelio import PREPROCESS_KEY, Preprocess, get_metadata, get_preprocess

HF_CONFIG = "preprocessor_config.json"
# PIL's resample codes, as Hugging Face image processors store them
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")


@dataclasses.dataclass
class PreprocessOverrides:
    """What the user's flags say; None leaves the source's value."""
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    size: int | None = None
    crop_pct: float | None = None
    interpolation: str | None = None

    def given(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]

    def validate(self) -> None:
        for k in ("mean", "std"):
            v = getattr(self, k)
            if v is not None and (len(v) != 3 or (k == "std" and min(v) <= 0)):
                raise MptqError(f"--{k} takes three numbers (one per RGB channel){', all > 0' if k == 'std' else ''}")
        if self.size is not None and self.size < 1:
            raise MptqError(f"--size must be a positive number of pixels, got {self.size}")
        if self.crop_pct is not None and not 0 < self.crop_pct <= 1:
            raise MptqError(f"--crop-pct must lie in (0, 1], got {self.crop_pct}")
        if self.interpolation is not None and self.interpolation not in INTERPOLATIONS:
            raise MptqError(f"--interpolation must be one of {', '.join(INTERPOLATIONS)}")


def _hw(v) -> tuple[int, int] | None:
    """A Hugging Face size: an int, {"height", "width"} or {"shortest_edge"}."""
    if isinstance(v, int):
        return v, v
    if isinstance(v, dict):
        if "height" in v and "width" in v:
            return int(v["height"]), int(v["width"])
        if "shortest_edge" in v:
            return int(v["shortest_edge"]), int(v["shortest_edge"])
    return None


def from_hf_config(path: Path, channels: int = 3) -> Preprocess:
    """A Preprocess from a Hugging Face image processor's config (ViT, DeiT, Swin, ConvNeXt...)."""
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise MptqError(f"cannot read {path}: {e}") from None
    if not isinstance(d, dict):
        raise MptqError(f"{path} is not an image processor config (a JSON object)")
    pp = Preprocess()
    if d.get("do_normalize", True):
        if "image_mean" in d:
            pp.mean = tuple(float(x) for x in d["image_mean"])
        if "image_std" in d:
            pp.std = tuple(float(x) for x in d["image_std"])
    else:
        pp.mean, pp.std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    if d.get("do_rescale", True) is False or float(d.get("rescale_factor", 1 / 255)) != 1 / 255:
        raise MptqError(f"{path}: pixel rescaling other than 1/255 is not supported")
    resize = _hw(d.get("size")) if d.get("do_resize", True) else None
    crop = _hw(d.get("crop_size")) if d.get("do_center_crop", False) else None
    out = crop or resize
    if out is None:
        raise MptqError(f"{path} says no input size (size / crop_size)")
    pp.input_size = (channels, out[0], out[1])
    pp.crop_pct = float(d["crop_pct"]) if "crop_pct" in d else (out[0] / resize[0] if crop and resize else 1.0)
    pp.interpolation = _RESAMPLE.get(d.get("resample"), pp.interpolation)
    return pp


def dynamic_hw(model: onnx.ModelProto) -> bool:
    """Whether the image input leaves its height or width open (optimum's exports)."""
    from .modelio import image_input
    dims = image_input(model).type.tensor_type.shape.dim
    return len(dims) == 4 and not all(d.HasField("dim_value") for d in dims[2:])


def size_from_graph(model: onnx.ModelProto) -> tuple[int, int] | None:
    """The input size a ViT was built for, where its graph leaves it open: the patch Conv's stride
    times the side of the position embedding's token grid ([1, T, C] with T - k a square, k = 0, 1, 2
    for no, a class, or a class and a distillation token). None where there is no such embedding
    (Swin: any size its windows divide)."""
    from .modelio import image_input
    x = image_input(model).name
    inits = {t.name: t for t in model.graph.initializer}
    conv = next((n for n in model.graph.node if n.op_type == "Conv" and n.input[0] == x and n.input[1] in inits), None)
    if conv is None:
        return None
    stride = next((list(a.ints) for a in conv.attribute if a.name == "strides"), [1, 1])
    width = inits[conv.input[1]].dims[0]
    # the largest such tensor: the class and distillation tokens are [1, 1, C] too
    tokens = max((t.dims[1] for t in model.graph.initializer
                  if len(t.dims) == 3 and t.dims[0] == 1 and t.dims[2] == width and t.dims[1] >= 4), default=0)
    for k in (1, 0, 2):
        r = int(round(max(tokens - k, 0) ** 0.5))
        if r > 1 and r * r == tokens - k:
            return r * stride[0], r * stride[-1]
    return None


def _tensor_hw(calib) -> tuple[int, int] | None:
    """Height and width of the images in an .npy/.npz of preprocessed NCHW tensors, else None."""
    p = Path(calib) if calib is not None else None
    if p is None or not p.is_file() or p.suffix not in (".npy", ".npz"):
        return None
    try:
        if p.suffix == ".npy":
            shape = np.load(p, mmap_mode="r", allow_pickle=False).shape
        else:
            with np.load(p, allow_pickle=False) as z:
                shape = z[z.files[0]].shape if z.files else ()
    except Exception:
        return None  # the calibration loader says what is wrong with it
    return (int(shape[2]), int(shape[3])) if len(shape) == 4 else None


def resolve(model: onnx.ModelProto, model_path: str | Path | None = None,
            overrides: PreprocessOverrides | None = None, log=None, calib=None) -> tuple[Preprocess, str]:
    """(the preprocessing, where it came from); see the module doc. `log` gets the one line said
    when the default is assumed (default: stderr). `calib`: the calibration source; tensors
    (.npy/.npz) give the size where the graph leaves it open."""
    ov = overrides or PreprocessOverrides()
    ov.validate()
    if get_metadata(model, PREPROCESS_KEY):
        pp, src = get_preprocess(model), "the model's metadata"
    elif model_path is not None and (Path(model_path).parent / HF_CONFIG).is_file():
        p = Path(model_path).parent / HF_CONFIG
        pp, src = from_hf_config(p), str(p)
    else:
        pp, src = get_preprocess(model), "default"
    size_note = ""
    if src == "default" and dynamic_hw(model):
        hw, whence = _tensor_hw(calib), "the calibration tensors"
        if hw is None:
            hw, whence = size_from_graph(model), "the position embedding"
        if hw is not None:
            pp.input_size = (pp.input_size[0], *hw)
            pp.crop_pct = 1.0 if hw[0] < 224 else pp.crop_pct
            size_note = f"; the input's height and width are dynamic: {hw[0]}x{hw[1]} from {whence}"
        else:
            size_note = "; the input's height and width are dynamic and nothing in the graph fixes them"
    if ov.mean is not None:
        pp.mean = tuple(ov.mean)
    if ov.std is not None:
        pp.std = tuple(ov.std)
    if ov.size is not None:
        pp.input_size = (pp.input_size[0], ov.size, ov.size)
        if src == "default" and ov.crop_pct is None:
            pp.crop_pct = 1.0 if ov.size < 224 else Preprocess.crop_pct  # the default's rule for small inputs
    if ov.crop_pct is not None:
        pp.crop_pct = ov.crop_pct
    if ov.interpolation is not None:
        pp.interpolation = ov.interpolation
    if ov.given():
        src = ("flags " + ", ".join("--" + g.replace("_", "-") for g in ov.given())
               + ("" if src == "default" else f" over {src}"))
    say = log or (lambda m: print(m, file=sys.stderr))
    if src not in ("default", "the model's metadata"):  # read from beside the model, or typed: said
        say(f"mptq-onnx: note: preprocessing from {src}: mean {_fmt(pp.mean)}, std {_fmt(pp.std)}, "
            f"{pp.input_size[1]}x{pp.input_size[2]} ({pp.interpolation}, crop {pp.crop_pct:g}){size_note}")
    elif src == "default":
        msg = (f"mptq-onnx: note: no preprocessing in the model or a {HF_CONFIG} beside it; assuming mean "
               f"{_fmt(pp.mean)}, std {_fmt(pp.std)}, {pp.input_size[1]}x{pp.input_size[2]} ({pp.interpolation}, "
               f"crop {pp.crop_pct:g}){size_note}: if the model was trained otherwise, say so with --mean/--std/"
               f"--size/--crop-pct/--interpolation")
        say(msg)
        src = "default (assumed)"
    return pp, src


def _fmt(v) -> str:
    return "(" + ", ".join(f"{x:g}" for x in v) + ")"


def record(pp: Preprocess, source: str) -> dict:
    """The report's entry."""
    return {**dataclasses.asdict(pp), "source": source}
