"""Where a model's weights came from, when that changes what its numbers mean.

The bundled default is SmolLM2-135M-Instruct shipped as a Q4_1 GGUF file and dequantized to fp32:
its weights are already rounded to 4-bit levels (with exact zeros where a level is zero), so a
GPTQ stage measured on it does not show the cost of 4-bit quantization on a full-precision model,
and densities are relative to the zeros the file already had. Any model converted from a
quantized GGUF file gets the same note. The quantization type is read from the file name
(llama.cpp's convention, "name.Q4_1.gguf"): parsing the header would read the whole vocabulary.
"""

from __future__ import annotations

import re
from pathlib import Path

_QUANT = re.compile(r"(?:^|[.\-_])((?:I?Q\d(?:_K)?(?:_[0-9A-Z]+)?)|TQ\d_\d)(?=[.\-_]|$)", re.IGNORECASE)


def gguf_quant_type(path: str) -> str | None:
    """'Q4_1' for 'SmolLM2-135M-Instruct.Q4_1.gguf'; None for an fp16/fp32 file or an unknown name."""
    m = _QUANT.search(Path(path).stem)
    return m.group(1).upper() if m else None


def weights_origin(source: dict) -> dict | None:
    """{"format", "quant", "note"} for a model dequantized from a quantized GGUF file, else None."""
    gguf = source.get("gguf_file")
    quant = gguf_quant_type(gguf) if gguf else None
    if quant is None:
        return None
    return {
        "format": f"{quant} GGUF, dequantized to fp32",
        "quant": quant,
        "note": f"dequantized to fp32 from a {quant} GGUF file: the weights are already {quant}-rounded, so "
        "quantization costs measured on it understate those on a full-precision model",
    }


def describe_zeros(params: int, nonzero: int) -> str:
    """'325,128 exact zeros (0.24 %) already in the weights'."""
    zeros = params - nonzero
    return f"{zeros:,} exact zeros ({100 * zeros / params:.2f} %) in the weights as loaded" if params else ""
