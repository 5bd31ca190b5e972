"""The one place onnxruntime sessions are made (calibration, simulation, evaluation, export checks,
deploy read-backs, latency), and the one way an exception becomes a message line."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from .errors import MptqError

PROVIDERS = ("CPUExecutionProvider",)
# short names for --providers
_PROVIDER_ALIASES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
                     "tensorrt": "TensorrtExecutionProvider", "rocm": "ROCMExecutionProvider",
                     "migraphx": "MIGraphXExecutionProvider", "dml": "DmlExecutionProvider",
                     "openvino": "OpenVINOExecutionProvider", "coreml": "CoreMLExecutionProvider"}


def check_threads(threads, name: str = "--threads"):
    """`threads` (None: the library's default), or an error naming `name` unless a positive int."""
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise MptqError(f"{name} must be a positive integer, got {threads}")
    return threads


def parse_providers(names) -> tuple[str, ...]:
    """onnxruntime execution providers from full or short names (cpu, cuda, tensorrt, dml, ...),
    in order of preference; the CPU provider is always added last (onnxruntime runs there what
    the others cannot). An provider this onnxruntime lacks is an error naming the ones it has."""
    if isinstance(names, str):
        names = [n for n in names.replace(",", " ").split() if n]
    out: list[str] = []
    have = ort.get_available_providers()
    for n in names or ():
        full = _PROVIDER_ALIASES.get(n.lower(), n)
        if full not in have:
            hint = (" (install onnxruntime-gpu for CUDA)" if full == "CUDAExecutionProvider" else "")
            raise MptqError(f"execution provider {n!r} is not available in this onnxruntime{hint}; available: "
                            + ", ".join(have))
        if full not in out:
            out.append(full)
    if "CPUExecutionProvider" not in out:
        out.append("CPUExecutionProvider")
    return tuple(out)


def first_line(e: BaseException) -> str:
    """An exception as one line: its message's first line, or its type when it has none."""
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


def session_options(threads: int | None = None, exact_int4: bool = True,
                    optimized_path: str | os.PathLike | None = None) -> ort.SessionOptions:
    """All graph optimizations, errors-only logging. `exact_int4`: the INT4 DequantizeLinear+MatMul
    fusion (MatMulNBits) computes in fp32 (accuracy level 1), what the QDQ graph says; onnxruntime's
    default (level 4) requantizes the MatMul input to int8 blocks. `optimized_path`: where
    onnxruntime writes the graph it runs."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3  # errors only: no per-node warnings on stderr
    if exact_int4:
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    if threads:
        so.intra_op_num_threads = int(threads)
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    return so


def make_session(model: onnx.ModelProto | bytes | str | os.PathLike, *, threads: int | None = None,
                 providers=None, exact_int4: bool = True, external: dict | None = None,
                 optimized_path: str | os.PathLike | None = None, what: str | None = None) -> ort.InferenceSession:
    """A session over a ModelProto, serialized bytes or a file (opened by onnxruntime, so its
    external-data files are found). `external`: initializer values handed over as arrays instead of
    serialized (AddExternalInitializers). `what`: names the model in the one-line MptqError a
    failed load becomes (None: the exception passes through). `providers`: as parse_providers
    gives them (default: the CPU)."""
    so = session_options(threads, exact_int4, optimized_path)
    if external:
        names = sorted(external)
        so.add_external_initializers(names, [v if isinstance(v, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(
            np.ascontiguousarray(v)) for v in (external[n] for n in names)])
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    if isinstance(src, Path):
        src = str(src)
    try:
        return ort.InferenceSession(src, sess_options=so, providers=list(providers or PROVIDERS))
    except Exception as e:  # onnxruntime's Fail / InvalidGraph / NotImplemented ...
        if what is None:
            raise
        raise MptqError(f"onnxruntime cannot load {what}: {first_line(e)}") from None
