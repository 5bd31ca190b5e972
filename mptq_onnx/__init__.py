"""mptq-onnx: post-training quantization of Vision Transformers by rewriting their ONNX graphs.

The public API (the CLI's subcommands as functions; see mptq_onnx.api):
quantize, evaluate, deploy, export, and __version__.
"""
from __future__ import annotations

try:
    from importlib.metadata import PackageNotFoundError, version as _version
    __version__ = _version("mptq-onnx")
except PackageNotFoundError:  # a checkout on sys.path, not installed
    __version__ = "0.1.0"

from .api import QuantizeResult, deploy, evaluate, export, quantize  # noqa: E402

__all__ = ["__version__", "quantize", "evaluate", "deploy", "export", "QuantizeResult"]
