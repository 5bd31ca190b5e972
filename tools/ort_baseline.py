#!/usr/bin/env python
"""Baseline: onnxruntime's own static quantization (QDQ) of a float model, and its accuracy.

    python tools/ort_baseline.py --model float.onnx --calib DIR --data DIR \
        --bits 8 4 --methods MinMax Percentile --calib-size 128 [--limit N] \
        [--json-out F] [--out-dir DIR]

Scope, as in the comparison it serves: the inputs of MatMul/Gemm/Conv (Linear and Conv layers
and the attention matmuls), per-channel symmetric weights, asymmetric activations; W/A bits b
means weights QInt<b> and activations QUInt<b> (8, 4 and 16 have onnxruntime types).
`--bits 4/8` (or W4A8) gives different weight and activation widths.

`ort_quantize_static()` is the reusable part: `from tools.ort_baseline import ort_quantize_static`.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import onnx
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                      QuantType, quantize_static)

from mptq_onnx.data import load_calibration
from mptq_onnx.errors import MptqError
from mptq_onnx.evaluator import evaluate
from mptq_onnx.modelio import PREPROCESS_KEY, get_metadata, get_preprocess, image_input, load_model, set_metadata

OP_TYPES = ["MatMul", "Gemm", "Conv"]
# bits -> (weight type, activation type); only what this onnxruntime build provides
ORT_TYPES: dict[int, tuple[QuantType, QuantType]] = {
    b: (getattr(QuantType, f"QInt{b}"), getattr(QuantType, f"QUInt{b}"))
    for b in (4, 8, 16) if hasattr(QuantType, f"QInt{b}") and hasattr(QuantType, f"QUInt{b}")
}
_EXTERNAL_THRESHOLD = 1_800_000_000


class UnsupportedBits(MptqError):
    """onnxruntime has no quantized type of this width."""


def calibration_method(name: str | CalibrationMethod) -> CalibrationMethod:
    if isinstance(name, CalibrationMethod):
        return name
    for m in CalibrationMethod:
        if m.name.lower() == str(name).lower():
            return m
    raise MptqError(f"unknown calibration method {name!r}; onnxruntime has "
                    f"{', '.join(m.name for m in CalibrationMethod)}")


def ort_types(wbits: int, abits: int) -> tuple[QuantType, QuantType]:
    """(weight_type, activation_type) for these widths, or UnsupportedBits saying why not."""
    have = ", ".join(str(b) for b in sorted(ORT_TYPES))
    for what, b in (("weight", wbits), ("activation", abits)):
        if b not in ORT_TYPES:
            raise UnsupportedBits(f"onnxruntime has no {b}-bit {what} type (QuantType offers {have} bits)")
    return ORT_TYPES[wbits][0], ORT_TYPES[abits][1]


class ArrayDataReader(CalibrationDataReader):
    """Feeds a preprocessed [N, C, H, W] array to onnxruntime's calibrator in batches."""

    def __init__(self, input_name: str, array: np.ndarray, batch_size: int = 16):
        self.input_name = input_name
        self.array = np.ascontiguousarray(array, dtype=np.float32)
        self.batch_size = max(1, int(batch_size))
        self.pos = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.pos >= len(self.array):
            return None
        x = self.array[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        return {self.input_name: x}

    def rewind(self) -> None:
        self.pos = 0

    def __len__(self) -> int:
        return -(-len(self.array) // self.batch_size)


def ort_pre_process(float_path: str | Path, out_path: str | Path) -> Path | None:
    """onnxruntime's quant_pre_process (shape inference + graph optimization); None on failure."""
    from onnxruntime.quantization.shape_inference import quant_pre_process
    try:
        quant_pre_process(str(float_path), str(out_path))
        onnx.checker.check_model(str(out_path))
        return Path(out_path)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"warning: quant_pre_process failed, quantizing the model as exported ({msg})", file=sys.stderr)
        return None


def ort_quantize_static(float_path: str | Path, calib_array: np.ndarray, out_path: str | Path,
                        wbits: int, abits: int, method: str | CalibrationMethod = "MinMax",
                        batch_size: int = 16, extra_options: dict | None = None) -> float:
    """Quantize `float_path` with onnxruntime's quantize_static into `out_path`; seconds it took.

    QDQ format, per-channel weights, MatMul/Gemm/Conv inputs only, weights QInt<wbits>,
    activations QUInt<abits>, calibration on `calib_array` ([N, C, H, W] preprocessed float32)
    with `method` (MinMax, Percentile, Entropy, Distribution; onnxruntime's default settings).
    Raises UnsupportedBits (an MptqError) for widths onnxruntime has no type for.  The
    returned time covers the quantize_static call (calibration inference included).
    """
    wtype, atype = ort_types(int(wbits), int(abits))
    meth = calibration_method(method)
    float_path, out_path = Path(float_path), Path(out_path)
    header = load_model(float_path, load_external=False)
    vi = image_input(header)
    dims = vi.type.tensor_type.shape.dim
    if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
        batch_size = dims[0].dim_value  # a fixed batch dimension: feed exactly that
        calib_array = calib_array[: len(calib_array) // batch_size * batch_size]
        if len(calib_array) == 0:
            raise MptqError(f"the model takes batches of {dims[0].dim_value}; too few calibration images")
    if len(calib_array) == 0:
        raise MptqError("no calibration images")
    big = float_path.stat().st_size > _EXTERNAL_THRESHOLD or any(
        t.data_location == onnx.TensorProto.EXTERNAL for t in header.graph.initializer)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    reader = ArrayDataReader(vi.name, calib_array, batch_size)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # the Percentile calibrator print()s its settings
        quantize_static(
            str(float_path), str(out_path), reader,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(OP_TYPES),
            per_channel=True,
            activation_type=atype,
            weight_type=wtype,
            calibrate_method=meth,
            use_external_data_format=big,
            extra_options=dict(extra_options or {}),
        )
    seconds = time.perf_counter() - t0
    pp_json = get_metadata(header, PREPROCESS_KEY)
    if pp_json:  # keep the preprocessing config with the quantized model
        q = onnx.load(str(out_path), load_external_data=False)
        if get_metadata(q, PREPROCESS_KEY) != pp_json:
            set_metadata(q, PREPROCESS_KEY, pp_json)
            onnx.save(q, str(out_path))
    return seconds


class _DropAdvice(logging.Filter):
    """Hide onnxruntime's 'consider pre-processing' advice: --pre-process decides that."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing" not in record.getMessage()


def parse_bits(spec: str) -> tuple[int, int]:
    """'8' -> (8, 8); '4/8', 'W4A8' or 'w4a8' -> (4, 8)."""
    s = str(spec).strip()
    m = re.fullmatch(r"(\d+)", s) or re.fullmatch(r"(\d+)/(\d+)", s) or re.fullmatch(r"[wW](\d+)[aA](\d+)", s)
    if not m:
        raise argparse.ArgumentTypeError(f"bad bit width {spec!r}: use 8, 4/8 or W4A8")
    w = int(m.group(1))
    a = int(m.group(2)) if m.lastindex == 2 else w
    if not (1 <= w <= 32 and 1 <= a <= 32):
        raise argparse.ArgumentTypeError(f"bit widths must be 1..32, got {spec!r}")
    return w, a


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def format_table(rows: list[dict]) -> str:
    head = ["method", "W/A bits", "top1", "top5", "quantize s", "note"]
    body = [[r["method"], f"{r['wbits']}/{r['abits']}", _fmt(r.get("top1")), _fmt(r.get("top5")),
             "-" if r.get("quantize_s") is None else f"{r['quantize_s']:.2f}", r.get("note") or ""]
            for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(b) for b in body])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="float ONNX model")
    ap.add_argument("--calib", required=True, help="calibration ImageFolder, or .npy/.npz of preprocessed tensors")
    ap.add_argument("--data", required=True, help="evaluation ImageFolder")
    ap.add_argument("--bits", nargs="+", type=parse_bits, default=[(8, 8)],
                    help="bit widths: 8 (= W8A8), 4/8 or W4A8 (default 8)")
    ap.add_argument("--methods", nargs="+", default=["MinMax"],
                    help="calibration methods: MinMax Percentile Entropy Distribution (default MinMax)")
    ap.add_argument("--calib-size", type=int, default=128)
    ap.add_argument("--calib-batch", type=int, default=16, help="calibration batch size (default 16)")
    ap.add_argument("--limit", type=int, default=None, help="evaluate on an evenly spread subset of N images")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads for evaluation")
    ap.add_argument("--pre-process", choices=["on", "off"], default="off",
                    help="run onnxruntime's quant_pre_process first (default off; skipped if it fails)")
    ap.add_argument("--no-float", action="store_true", help="do not evaluate the float model")
    ap.add_argument("--json-out", default=None, help="write the results as JSON here")
    ap.add_argument("--out-dir", default=None, help="keep the quantized models here (default: a temporary dir)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    logging.getLogger().addFilter(_DropAdvice())

    try:
        methods = [calibration_method(m) for m in args.methods]
        model_path = Path(args.model)
        pp = get_preprocess(load_model(model_path, load_external=False))
        progress = not args.quiet
        calib = load_calibration(args.calib, pp, n=args.calib_size, progress=progress)
        print(f"calibration: {calib.shape[0]} images from {args.calib}", file=sys.stderr)

        rows: list[dict] = []
        if not args.no_float:
            r = evaluate(model_path, args.data, batch_size=args.batch_size, limit=args.limit,
                         progress=progress, preprocess=pp, threads=args.threads)
            rows.append({"method": "float", "wbits": 32, "abits": 32, **r.to_dict(), "quantize_s": None})
            print(f"float: {r}", file=sys.stderr)

        with tempfile.TemporaryDirectory(prefix="ort_baseline_") as tmp:
            out_dir = Path(args.out_dir) if args.out_dir else Path(tmp)
            out_dir.mkdir(parents=True, exist_ok=True)
            src = model_path
            if args.pre_process == "on":
                t0 = time.perf_counter()
                pre = ort_pre_process(model_path, out_dir / f"{model_path.stem}_pre.onnx")
                if pre is not None:
                    src = pre
                    print(f"quant_pre_process: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
            for meth in methods:
                for wbits, abits in args.bits:
                    row = {"method": meth.name, "wbits": wbits, "abits": abits, "top1": None, "top5": None,
                           "quantize_s": None}
                    out = out_dir / f"{model_path.stem}_ort_{meth.name.lower()}_w{wbits}a{abits}.onnx"
                    try:
                        row["quantize_s"] = ort_quantize_static(src, calib, out, wbits, abits, meth,
                                                                batch_size=args.calib_batch)
                    except UnsupportedBits as e:
                        row["note"] = str(e)
                    except Exception as e:  # report the failure and go on with the other configs
                        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
                        row["note"] = f"quantize_static failed: {type(e).__name__}: {msg}"
                    if row["quantize_s"] is not None:
                        r = evaluate(out, args.data, batch_size=args.batch_size, limit=args.limit,
                                     progress=progress, preprocess=pp, threads=args.threads)
                        row.update(r.to_dict())
                        if args.out_dir:
                            row["path"] = str(out)
                        print(f"{meth.name} W{wbits}A{abits}: {r} (quantize_static {row['quantize_s']:.1f} s)",
                              file=sys.stderr)
                    else:
                        print(f"{meth.name} W{wbits}A{abits}: n/a ({row['note']})", file=sys.stderr)
                    rows.append(row)

        print(format_table(rows))
        if args.json_out:
            report = {"model": str(model_path), "calib": str(args.calib), "calib_images": int(calib.shape[0]),
                      "data": str(args.data), "limit": args.limit, "pre_process": args.pre_process,
                      "op_types": OP_TYPES, "results": rows}
            Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json_out).write_text(json.dumps(report, indent=2) + "\n")
    except MptqError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
