"""Block reconstruction in torch on blocks taken from the ONNX graph (imports torch: the core
imports this subpackage only when `--reconstruct` is asked for)."""
from .block import ReconSettings, build_segments, reconstruct, run_segments  # noqa: F401
from .fakequant import FAKE, fake_quantizer  # noqa: F401
