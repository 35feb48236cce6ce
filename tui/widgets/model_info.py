"""The model card at the top of the Layers pane: name, source, parameters, layers, dtype, device, and
where the weights came from when that matters (a dequantized GGUF is already 4-bit rounded)."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from frankenlab.pipeline.plans import LayerPlan
from frankenlab.pipeline.provenance import weights_origin


def describe_plan(plan: LayerPlan | None, n: int) -> Text:
    if plan is None:
        return Text("plan: every layer skipped: the model needs at least one layer", style="bold red")
    t = Text("plan: ", style="bold")
    t.append(plan.to_text())
    if plan.is_identity:
        t.append(f"  (all {n} layers, unchanged)", style="dim")
    else:
        t.append(f"  ({len(plan)} of {n} positions", style="dim")
        if plan.skipped:
            t.append(f"; skipped {plan.skipped}", style="dim")
        if plan.repeated:
            t.append(f"; repeated {plan.repeated}", style="dim")
        t.append(")", style="dim")
    return t


class ModelInfo(Static):
    def loading(self, ref: str) -> None:
        self.update(Text(f"loading model {ref!r}…", style="italic"))

    def failed(self, ref: str, error: str) -> None:
        t = Text(f"model {ref!r} could not be loaded\n", style="bold red")
        t.append(error)
        self.update(t)

    def show(self, lm) -> None:
        from frankenlab.pipeline.loading import count_parameters, decoder_layers

        cfg = lm.model.config
        t = Text()
        t.append(lm.source.name or lm.source.ref, style="bold")
        kind = {"default": "bundled default", "folder": "HF folder", "gguf": "GGUF file", "hub": "hub"}.get(
            lm.source.kind, lm.source.kind
        )
        # the bundled model has no path worth showing: "(bundled default)", not "(bundled default: default)"
        where = kind if lm.source.kind == "default" else f"{kind}: {lm.source.ref}"
        t.append(f"  ({where})\n", style="dim")
        t.append(
            f"{count_parameters(lm.model) / 1e6:.1f}M parameters · {len(decoder_layers(lm.model))} layers · "
            f"hidden {getattr(cfg, 'hidden_size', '?')} · vocab {getattr(cfg, 'vocab_size', '?')} · "
            f"{str(lm.dtype).replace('torch.', '')} · {lm.device}"
        )
        origin = weights_origin(lm.source.to_dict())
        if origin:  # the bundled model is a dequantized Q4_1 GGUF: say so wherever the model is named
            t.append(
                f"\nbaseline: {origin['format']} (already {origin['quant']}-rounded: a "
                "quantization stage's cost on it is understated)",
                style="yellow",
            )
        self.update(t)
