"""What the tools share: `float_model` (a card's float export) and config specs, RECIPE:BITS
(W=A=BITS) or RECIPE-mp:TARGET (Greedy MP), then optional :KEY=VALUE modifiers:
  skip=ROLE_OR_SITE   leave that site (or every site of that role) in float (repeatable)
  img=BITS|abits      bits of the image input (default 8; abits: the same as the other activations)
  recon               block reconstruction (--reconstruct); iters=N its iterations per block
  FIELD=VALUE         any other QuantConfig field, e.g. sqb_alphas=0.5,0.7,0.9 or mp_images=32
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from mptq_onnx.plan import QuantConfig, parse_image_bits


def float_model(card: str, shared: Path, work: Path) -> Path:
    """The float ONNX export of a model card of ../shared/models, exported into `work` if missing."""
    path = Path(work) / f"{card}.onnx"
    if not path.exists():
        from mptq_onnx.exporter import export_model  # torch: only when an export is needed
        path.parent.mkdir(parents=True, exist_ok=True)
        export_model(str(Path(shared) / "models" / f"{card}.json"), path)
    return path


def _parse_like(default, v: str):
    if isinstance(default, bool):  # bool("0") is True
        if v.lower() not in ("0", "1", "true", "false"):
            raise ValueError(f"expected 0/1 or true/false, got {v!r}")
        return v.lower() in ("1", "true")
    if isinstance(default, tuple):
        return tuple(type(default[0])(x) for x in v.split(","))
    if default is None:  # target_bits, recon_images (numbers) or weight_rounding (a word)
        for kind in (int, float):
            try:
                return kind(v)
            except ValueError:
                pass
        return v
    return type(default)(v)


def quant_config(spec: str) -> tuple[QuantConfig, list[tuple[str, str]]]:
    """The QuantConfig a spec names, and the modifiers it did not consume (for the caller)."""
    recipe, bits, *mods = spec.split(":")
    if recipe.endswith("-mp"):
        cfg = QuantConfig(recipe=recipe[:-3], target_bits=float(bits), progress=False)
    else:
        cfg = QuantConfig(recipe=recipe, wbits=int(bits), abits=int(bits), progress=False)
    fields = {f.name for f in dataclasses.fields(QuantConfig)}
    rest = []
    for m in mods:
        if m == "recon":
            cfg.reconstruct = True
            continue
        k, v = m.split("=", 1)
        if k == "iters":
            cfg.recon_iters = int(v)
        elif k == "skip":
            cfg.skip_sites += (v,)
        elif k == "img":
            cfg.image_bits = parse_image_bits(v)
        elif k in fields:
            cfg = dataclasses.replace(cfg, **{k: _parse_like(getattr(cfg, k), v)})
        else:
            rest.append((k, v))
    return cfg, rest


def conversion_config(spec: str) -> QuantConfig:
    """`quant_config` for tools that only convert: no fidelity modifiers, no progress bars."""
    cfg, opts = quant_config(spec)
    if opts:
        raise SystemExit(f"{spec}: modifiers {opts} are for tools/fidelity.py")
    cfg.progress = False
    return cfg


def pass_times(report: dict, digits: int = 1) -> str:
    """'canonicalize 0.2, calibrate 1.8, ...' from a conversion report."""
    return ", ".join(f"{p['pass']} {p['seconds']:.{digits}f}" for p in report["passes"])
