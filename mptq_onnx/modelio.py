"""Loading and saving ONNX models, and the preprocessing config that travels in their metadata."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import onnx

from .errors import MptqError

PREPROCESS_KEY = "mptq.preprocess"
# protobuf refuses to serialise a single message over 2 GiB; stay well below it
_EXTERNAL_THRESHOLD = 1_800_000_000


@dataclasses.dataclass
class Preprocess:
    """How images become the model's input tensor (timm's pretrained-config fields)."""

    input_size: tuple[int, int, int] = (3, 224, 224)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bicubic"
    crop_pct: float = 0.875

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        for k in ("input_size", "mean", "std"):
            if k in kw:
                kw[k] = tuple(kw[k])
        return cls(**kw)


def load_model(path: str | os.PathLike, load_external: bool = True) -> onnx.ModelProto:
    p = Path(path)
    if not p.exists():
        raise MptqError(f"ONNX file not found: {p}")
    if p.is_dir():
        raise MptqError(f"expected an ONNX file, got a directory: {p}")
    try:
        model = onnx.load(str(p), load_external_data=load_external)
    except Exception as e:  # protobuf raises DecodeError, onnx raises several kinds
        raise MptqError(f"cannot read {p} as ONNX ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'corrupt file'})") from None
    if not model.graph.node:
        raise MptqError(f"{p} has no graph nodes: not an ONNX model, or an empty one")
    return model


def save_model(model: onnx.ModelProto, path: str | os.PathLike, force: bool = False, staging=None) -> Path:
    """Write a model; files above protobuf's 2 GiB limit get their tensors in `<name>.data`.

    The file appears whole or not at all (temp file + rename, see outputs.py). With `staging` (an
    outputs.Staging) the model is only staged and lands when that Staging commits, together with
    the other files of the run; the caller has then checked the paths with outputs.plan_outputs.
    """
    from .outputs import Staging, final_path, plan_outputs

    p = Path(path)
    external = model.ByteSize() > _EXTERNAL_THRESHOLD
    if staging is None:
        plan_outputs({}, {"model": p, "external data": _data_path(p) if external else None}, force, log=None)
        with Staging(force) as st:
            _stage_model(model, final_path(p), external, st)
    else:
        _stage_model(model, final_path(p), external, staging)
    return p


def _data_path(p: Path) -> Path:
    return p.with_name(p.name + ".data")


def _stage_model(model: onnx.ModelProto, p: Path, external: bool, st) -> None:
    if external:
        # onnx writes the data file beside the model under its final name: stage both in a temp folder
        folder = st.temp_folder(p)
        data_name = _data_path(p).name
        onnx.save_model(model, str(folder / p.name), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
        st.add(folder / data_name, p.parent / data_name)  # data first: the model never names a missing file
        st.add(folder / p.name, p)
    else:
        onnx.save_model(model, str(st.temp_for(p)))


def get_metadata(model: onnx.ModelProto, key: str) -> str | None:
    for prop in model.metadata_props:
        if prop.key == key:
            return prop.value
    return None


def set_metadata(model: onnx.ModelProto, key: str, value: str) -> None:
    for prop in model.metadata_props:
        if prop.key == key:
            prop.value = value
            return
    model.metadata_props.add(key=key, value=value)


def image_input(model: onnx.ModelProto) -> onnx.ValueInfoProto:
    """The graph input images are fed to: the first input that is not an initializer."""
    inits = {t.name for t in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name not in inits:
            return vi
    raise MptqError("the model has no graph input to feed images to")


def get_preprocess(model: onnx.ModelProto) -> Preprocess:
    """The preprocessing config stored by `export`; otherwise a default matched to the input shape."""
    raw = get_metadata(model, PREPROCESS_KEY)
    if raw:
        return Preprocess.from_dict(json.loads(raw))
    pp = Preprocess()
    dims = image_input(model).type.tensor_type.shape.dim
    if len(dims) == 4 and all(d.HasField("dim_value") for d in dims[1:]):
        pp.input_size = (dims[1].dim_value, dims[2].dim_value, dims[3].dim_value)
        if pp.input_size[1] < 224:
            pp.crop_pct = 1.0
    return pp


def set_preprocess(model: onnx.ModelProto, pp: Preprocess) -> None:
    set_metadata(model, PREPROCESS_KEY, pp.to_json())
