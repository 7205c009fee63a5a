"""Re-quantization (`kiln compile --quant NAME`): which matrices are re-quantized, into which scheme, and how.

Every F32 / F16 / BF16 / Q8_0 matrix (2-D; never norms or other 1-D tensors) is dequantized with gguf.quants.dequantize and
re-quantized into the chosen scheme by the pack stage, one part at a time; other types stay as they are.
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T

from ..errors import UnsupportedModelError
from .blocks32 import F32, Q8_0
from .scheme import QuantScheme

REQUANT_SOURCES = (T.F32, T.F16, T.BF16, T.Q8_0)   # matrix types `--quant` re-quantizes (lower-bit ones stay)


def kiln_schemes() -> dict[str, type[QuantScheme]]:
    """kiln's own schemes (not GGUF types), from the one registry."""
    return {n: s for n, s in QuantScheme.registry.items() if s.ggml_type is None}


def requant_targets() -> tuple[str, ...]:
    return ("q8_0", *kiln_schemes())


def requant_scheme(name: str) -> type[QuantScheme]:
    """The scheme `kiln compile --quant NAME` re-quantizes into."""
    if name in requant_targets():
        return QuantScheme.registry[name]
    raise UnsupportedModelError(f"unknown --quant scheme {name!r} (choose from {', '.join(requant_targets())})")


def requantize(scheme: type[QuantScheme], w: np.ndarray) -> np.ndarray:
    """(rows, K) float32 -> the raw bytes `scheme.pack` takes."""
    if scheme is F32:   # a vector stored as F16 / BF16 / ...: the kernels read norms and biases as f32
        return np.ascontiguousarray(w, np.float32).view(np.uint8).reshape(-1)
    if scheme is Q8_0:
        from gguf.quants import quantize
        return np.ascontiguousarray(quantize(np.asarray(w, np.float32), T.Q8_0)).view(np.uint8).reshape(-1)
    return scheme.quantize(w)
