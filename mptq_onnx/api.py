"""The Python API: what the CLI's subcommands do, as functions (the CLI is built on them).

    import mptq_onnx
    res = mptq_onnx.quantize("deit_s.onnx", "calib_images/", "deit_s.w4a4.onnx", recipe="mptq", wbits=4, abits=4)
    print(res.report["avg_w_bits"], res.check["top1_agreement"])
    print(mptq_onnx.evaluate(res.model_path, "val_images/").top1)
    mptq_onnx.deploy(res.model_path)

Options are QuantConfig's fields (`recipe`, `wbits`, `abits`, `target_bits`, `allocator`,
`reconstruct`, `recon_iters`, `providers`, `threads`, ...) and the preprocessing overrides (`mean`, `std`, `size`,
`crop_pct`, `interpolation`), with the CLI's defaults, and are checked as the CLI checks its
flags: an option that would do nothing is refused, not dropped.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from .errors import MptqError

PathLike = str | os.PathLike

# QuantConfig fields whose CLI flag is not --FIELD-NAME
_FLAG = {"recon_iters": "--iters", "val_dir": "--val", "skip_sites": "--skip", "progress": "--quiet"}


@dataclasses.dataclass
class QuantizeResult:
    model_path: Path          # the quantized ONNX file
    report_path: Path         # its JSON report
    report: dict              # the report (what the file holds)
    check: dict               # fidelity against float on calibration images (report["check"])


def quant_config(**options):
    """A QuantConfig with the CLI's defaults and `options` on top, validated as the CLI validates."""
    from .cli import RECON_IMAGES_DEFAULT, _refuse_unused
    from .plan import QuantConfig
    fields = {f.name for f in dataclasses.fields(QuantConfig)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise MptqError(f"unknown option {unknown[0]!r}; options are QuantConfig's fields: {', '.join(sorted(fields))}")
    base = {"recon_images": RECON_IMAGES_DEFAULT}  # the one default the CLI sets apart from the library's
    for k in ("mp_candidates", "sqb_alphas", "skip_sites"):
        if k in options and options[k] is not None:
            options[k] = tuple(options[k])
    cfg = QuantConfig(**{**base, **options})
    cfg.validate()
    _refuse_unused(cfg, {_FLAG.get(k, "--" + k.replace("_", "-")) for k in options})
    return cfg


def quantize(model: PathLike, calib: PathLike, output: PathLike | None = None, *, report: PathLike | None = None,
             force: bool = False, **options) -> QuantizeResult:
    """Quantize the float ONNX file `model` on the calibration images `calib` (an ImageFolder
    folder or an .npy/.npz of preprocessed NCHW images) and write the quantized model and its
    JSON report, exactly as `mptq-onnx convert` does (the same report for the same options).
    `output` defaults to a name beside `model`; nothing is overwritten without `force`."""
    from .cli import default_output, run_convert
    from .modelio import load_model
    from .preprocess import PreprocessOverrides, resolve
    pre = {k: options.pop(k) for k in ("mean", "std", "size", "crop_pct", "interpolation") if k in options}
    cfg = quant_config(**options)
    src = Path(model)
    notes: list[str] = []
    pp = resolve(load_model(src), src, PreprocessOverrides(**pre), log=notes.append, calib=calib)
    out = Path(output) if output is not None else default_output(src, cfg)
    _, rep = run_convert(src, None, calib, cfg, out, force, Path(report) if report else None, pp=pp, notes=notes)
    rp = Path(report) if report else out.with_suffix(".report.json")
    rep = json.loads(rp.read_text())  # what the file holds (JSON types), as a CLI user reads it
    return QuantizeResult(out, rp, rep, rep.get("check", {}))


def evaluate(model: PathLike, data: PathLike, *, limit: int | None = None, batch_size: int = 64,
             progress: bool = False, providers=("cpu",), threads: int | None = None, **preprocess):
    """Top-1/top-5 of an ONNX classifier (float or quantized) on a labelled ImageFolder: an
    EvalResult (`top1`, `top5`, `images`, per-image `hits`). `preprocess`: the overrides `mean`,
    `std`, `size`, `crop_pct`, `interpolation`, resolved as `quantize` resolves them."""
    from .evaluator import evaluate as _evaluate
    from .preprocess import PreprocessOverrides
    from .runtime import check_threads, parse_providers
    return _evaluate(model, data, batch_size=batch_size, limit=limit, progress=progress,
                     overrides=PreprocessOverrides(**preprocess), threads=check_threads(threads, "threads"),
                     providers=parse_providers(providers))


def deploy(model: PathLike, output: PathLike | None = None, *, force: bool = False, **options):
    """Lower a converted model to onnxruntime's integer and 4-bit kernels (`mptq-onnx deploy`);
    options are DeployConfig's fields (`w4`, `accuracy_level`, `block_size`, `verify`). Returns
    the DeployReport (`output`, per-layer kernels)."""
    from .deployer import DeployConfig, deploy_file
    fields = {f.name for f in dataclasses.fields(DeployConfig)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise MptqError(f"unknown deploy option {unknown[0]!r}; options: {', '.join(sorted(fields))}")
    cfg = DeployConfig(**options)
    return deploy_file(model, output, cfg, force=force)


def export(name: str, output: PathLike, **options) -> Path:
    """Export a timm model, a model card or a Hugging Face save_pretrained folder to ONNX
    (`mptq-onnx export`; needs the export extra, and the hf extra for a folder)."""
    from .exporter import export_model
    return export_model(name, output, **options)
