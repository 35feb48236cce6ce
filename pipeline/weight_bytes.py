"""Stored weight bytes from config.json facts alone: one decoder layer at a per-layer choice, and the
embeddings + head at a format, priced by the same rules as `pipeline.footprint` (per-tensor
`pipeline.tensor_formats.Storage`), without a model. The planner prices its options with these.

    shape = ModelShape.from_config(json.load(open("config.json")))
    layer_weight_bytes(shape, pattern=(2, 4), bits=4, group_size=128)   # 2:4 + GPTQ int4 g128
    layer_weight_bytes(shape, pattern="1:8")                            # 1:8, values in bf16
    layer_weight_bytes(shape, skipped=True)                             # removed by depth: 0
    embedding_weight_bytes(shape)                                       # embeddings (+ untied head) + final norm

A decoder layer is its seven projections plus its two RMSNorm weights. A projection is stored
- dense in `dtype` (the float dtype the model runs in: "bfloat16", "float32"...),
- N:M pruned (`pattern`, N of every M inputs pruned, thesis notation): the kept values plus index
  metadata, when M divides its input width (the width stage refuses other M),
- GPTQ-quantized (`bits` 2/3/4/8; None or 16 = not quantized): codes of `bits`, one fp16 scale and
  one `bits`-wide zero point per group of `group_size` inputs (-1 = one group per row); with a
  pattern, only the kept codes plus the index (masked GPTQ keeps every pruned weight exactly zero;
  the footprint finds that pattern in the codes for 2/4/8-bit packing only, so 3-bit is priced dense).
Norms stay in `dtype`. `targets` limits the pattern to some projections (the width stage's targets).

Agreement with `footprint(model).by_layer()` on real models: exact for these choices (tests on the
tiny model: dense, N:M, int8/int4 and N:M + masked int4/int2 layers), except that the footprint
prices what it finds in the tensors: where GPTQ happens to put extra codes on the zero point
(low bits over a pruned layer) it may find a cheaper bitmask, so these figures are then an upper bound.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from frankenlab.evals.errors import RecipeError
from frankenlab.pipeline.tensor_formats import DECODER_LINEARS, Storage

FLOAT_BITS = 16  # "not quantized" in a per-layer bits choice
_CODE_PATTERN_BITS = (2, 4, 8)  # packings whose zero codes the footprint reads as an N:M pattern


@dataclass(frozen=True)
class ModelShape:
    """The config.json facts the bytes depend on (a LLaMA-architecture decoder)."""

    hidden: int
    intermediate: int
    layers: int
    vocab: int
    tied: bool
    heads: int
    kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, cfg: dict) -> ModelShape:
        cfg = cfg.get("text_config") or cfg
        try:
            hidden, heads = int(cfg["hidden_size"]), int(cfg.get("num_attention_heads") or 1)
            return cls(
                hidden=hidden,
                intermediate=int(cfg.get("intermediate_size") or 4 * hidden),
                layers=int(cfg["num_hidden_layers"]),
                vocab=int(cfg["vocab_size"]),
                tied=bool(cfg.get("tie_word_embeddings", False)),
                heads=heads,
                kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RecipeError(
                f"config.json lacks the sizes the byte count needs ({exc}): is it a LLaMA model?"
            ) from None

    def projections(self) -> dict[str, tuple[int, int]]:
        """(out, in) of each projection of one decoder layer."""
        h, i = self.hidden, self.intermediate
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {
            "q_proj": (q, h),
            "k_proj": (kv, h),
            "v_proj": (kv, h),
            "o_proj": (h, q),
            "gate_proj": (i, h),
            "up_proj": (i, h),
            "down_proj": (h, i),
        }


def _nm(pattern) -> tuple[int, int] | None:
    if pattern is None or pattern == "none":
        return None
    if isinstance(pattern, tuple):
        n, m = pattern
    else:
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(pattern))
        if match is None:
            raise RecipeError(f"pattern {pattern!r} is neither 'none' nor N:M (e.g. 2:4)")
        n, m = int(match.group(1)), int(match.group(2))
    if not 1 <= n < m:
        raise RecipeError(f"pattern {n}:{m}: N:M needs 1 <= N < M (N of every M pruned)")
    return int(n), int(m)


def layer_weight_bytes(
    shape: ModelShape,
    *,
    pattern: tuple[int, int] | str | None = None,
    bits: int | None = None,
    group_size: int = 128,
    skipped: bool = False,
    dtype: str = "bfloat16",
    targets: tuple[str, ...] = DECODER_LINEARS,
) -> int:
    """Stored bytes of one decoder layer at a choice: `pattern` ("2:4", (2, 4), None/"none"), `bits`
    (None or 16: not quantized), `group_size` (-1: per row), `skipped` (removed: 0 bytes)."""
    if skipped:
        return 0
    nm = _nm(pattern)
    quantized = bits is not None and bits != FLOAT_BITS
    total = 2 * Storage((shape.hidden,), dtype).bytes  # input and post-attention RMSNorm
    for name, (rows, cols) in shape.projections().items():
        use_nm = nm if nm is not None and name in targets and cols % nm[1] == 0 else None
        if quantized:
            group = cols if group_size in (-1, 0) else group_size
            if bits not in _CODE_PATTERN_BITS:
                use_nm = None
            total += Storage((rows, cols), "float16", nm=use_nm, quant=(int(bits), group)).bytes
        else:
            total += Storage((rows, cols), dtype, nm=use_nm).bytes
    return total


def embedding_weight_bytes(
    shape: ModelShape, *, dtype: str = "bfloat16", bits: int | None = None, group_size: int = 128
) -> int:
    """Embeddings + head (stored once when tied) + the final norm. `bits` prices the embedding
    matrices as if GPTQ-quantized per group (a what-if: no stage of the project produces it)."""
    rows, cols = shape.vocab, shape.hidden
    if bits is None or bits == FLOAT_BITS:
        one = Storage((rows, cols), dtype).bytes
    else:
        one = Storage((rows, cols), "float16", quant=(int(bits), cols if group_size in (-1, 0) else group_size)).bytes
    return one * (1 if shape.tied else 2) + Storage((shape.hidden,), dtype).bytes
