"""Config specs shared by the tools: RECIPE:BITS (W=A=BITS) or RECIPE-mp:TARGET (Greedy MP), then
optional :KEY=VALUE modifiers:
  skip=ROLE_OR_SITE   leave that site (or every site of that role) in float (repeatable)
  img=BITS|abits      bits of the image input (default 8; abits: the same as the other activations)
  FIELD=VALUE         any other QuantConfig field, e.g. sqb_alphas=0.5,0.7,0.9 or mp_images=32
"""
from __future__ import annotations

import dataclasses

from mptq_onnx.plan import QuantConfig, parse_image_bits


def _parse_like(default, v: str):
    if isinstance(default, tuple):
        return tuple(type(default[0])(x) for x in v.split(","))
    if default is None:  # target_bits (a number) or weight_rounding (a word)
        try:
            return float(v)
        except ValueError:
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
        k, v = m.split("=", 1)
        if k == "skip":
            cfg.skip_sites += (v,)
        elif k == "img":
            cfg.image_bits = parse_image_bits(v)
        elif k in fields:
            cfg = dataclasses.replace(cfg, **{k: _parse_like(getattr(cfg, k), v)})
        else:
            rest.append((k, v))
    return cfg, rest
