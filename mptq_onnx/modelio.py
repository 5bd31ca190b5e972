"""Loading and saving ONNX models, and the preprocessing config that travels in their metadata."""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
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


LARGE_BYTES = 1 << 16  # initializers from this size up are "weights" to the functions below


def tensor_nbytes(t: onnx.TensorProto) -> int:
    item = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    return item * int(np.prod(t.dims, dtype=np.int64))


def is_large_raw(t: onnx.TensorProto, float_only: bool = False) -> bool:
    """A large initializer stored in raw_data (not external, float32 if `float_only`)."""
    return (t.HasField("raw_data") and t.data_location != onnx.TensorProto.EXTERNAL
            and (not float_only or t.data_type == onnx.TensorProto.FLOAT) and tensor_nbytes(t) >= LARGE_BYTES)


def model_shell(model: onnx.ModelProto, float_only: bool = False) -> onnx.ModelProto:
    """A copy of `model` in which the large raw-data initializers (`is_large_raw`) keep every field
    but their data. A protobuf message frees nothing until it is dropped whole (upb allocates it in
    one arena), so passes that need the graph but not the weights work on a shell, and
    `fill_shell` puts the data back: the result serializes to the same bytes as `model`."""
    m = onnx.ModelProto()
    for fd, v in model.ListFields():
        if fd.name != "graph":
            _set_field(m, fd, v)
    for fd, v in model.graph.ListFields():
        if fd.name != "initializer":
            _set_field(m.graph, fd, v)
    for t in model.graph.initializer:
        if is_large_raw(t, float_only):
            shell = m.graph.initializer.add()
            for fd, v in t.ListFields():
                if fd.name != "raw_data":
                    _set_field(shell, fd, v)
        else:
            m.graph.initializer.add().CopyFrom(t)
    return m


def _set_field(msg, fd, v) -> None:
    if fd.is_repeated:
        getattr(msg, fd.name).extend(v)
    elif fd.message_type is not None:
        getattr(msg, fd.name).CopyFrom(v)
    else:
        setattr(msg, fd.name, v)


def take_weights(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """(shell of `model` without its large float32 initializers' data, their values as arrays)."""
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer if is_large_raw(t, True)}
    return model_shell(model, float_only=True), weights


def fill_shell(shell: onnx.ModelProto, data: dict) -> onnx.ModelProto:
    """Put the raw data of `data` (name -> bytes, array, or TensorProto to read it from) into the
    initializers of `shell` that lack it, in place; array entries are dropped from `data` as they
    are copied, so the weights are not held twice."""
    for t in shell.graph.initializer:
        if t.name in data and not t.HasField("raw_data"):
            v = data[t.name]
            if isinstance(v, onnx.TensorProto):
                t.raw_data = v.raw_data
            else:
                t.raw_data = v if isinstance(v, bytes) else np.ascontiguousarray(data.pop(t.name)).tobytes()
    return shell


class Spill(Mapping):
    """Tensors' raw bytes in a (temporary) file, read back one at a time: name -> bytes."""

    def __init__(self, f):
        self._f, self._at = f, {}

    def put(self, name: str, data: bytes | np.ndarray) -> None:
        a = np.ascontiguousarray(data) if isinstance(data, np.ndarray) else None
        self._f.seek(0, os.SEEK_END)
        self._at[name] = (self._f.tell(), len(data) if a is None else a.nbytes,
                          None if a is None else (a.dtype, a.shape))
        self._f.write(data if a is None else a.data)

    def __getitem__(self, name: str) -> bytes:
        offset, n, _ = self._at[name]
        self._f.seek(offset)
        return self._f.read(n)

    def array(self, name: str) -> np.ndarray:
        dtype, shape = self._at[name][2]
        return np.frombuffer(self[name], dtype).reshape(shape)

    def __contains__(self, name) -> bool:
        return name in self._at

    def __iter__(self):
        return iter(self._at)

    def __len__(self) -> int:
        return len(self._at)
