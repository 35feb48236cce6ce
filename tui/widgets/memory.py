"""Memory bars: a model state's footprint by component, against a hardware target's budgets.

Footprints come from `pipeline.footprint` (storage-format accounting: N:M values plus indexes, int4
codes plus scales, ...). The live baseline is measured in a thread worker; stages come from the
session record (the runner stores `footprint` per stage). Targets and their fit verdicts come
from `pipeline.targets`.
"""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Label, Select, Static

from frankenlab.pipeline.footprint import footprint_summary
from frankenlab.pipeline.targets import load_targets
from frankenlab.pipeline.units import fmt_bytes

BAR_W = 24


def bar(fraction: float, width: int = BAR_W, style: str = "green") -> Text:
    """A bar filled to `fraction` of `width`; over 1 the bar is full and red."""
    f = max(0.0, fraction)
    full = min(width, int(round(min(f, 1.0) * width)))
    t = Text("█" * full, style="red" if f > 1.0 else style)
    t.append("░" * (width - full), style="dim")
    return t


def list_targets() -> dict:
    """name -> Target from `pipeline.targets` (empty when the targets files cannot be read)."""
    try:
        return dict(load_targets())
    except Exception:  # noqa: BLE001 - a broken targets file must not break the lab
        return {}


class MemoryPanel(Vertical):
    def __init__(self, *, id: str | None = None):
        super().__init__(id=id)
        self.footprints: dict[str, dict] = {}
        self.targets = list_targets()
        # the selector follows the latest finished stage until the user picks a state themselves
        self.picked: str | None = None

    def compose(self) -> ComposeResult:
        with Horizontal(id="memory-controls"):
            yield Label("memory of", classes="field-label")
            yield Select([], prompt="model state", id="memory-state", compact=True)
            if self.targets:
                names = list(self.targets)
                default = next((n for n in names if "siracusa" in n.lower()), names[0])
                yield Label(" on ", classes="field-label")
                yield Select(
                    [(n, n) for n in names], value=default, allow_blank=False, id="memory-target", compact=True
                )
        yield Static("", id="memory-bars")

    # -- feeding ------------------------------------------------------------------------------
    def set_model(self, label: str, model) -> None:
        self._measure(label, model)

    @work(thread=True, group="memory", exit_on_error=False)
    def _measure(self, label: str, model) -> None:
        fp = footprint_summary(model)  # holds the model's lock while it reads the model
        self.app.call_from_thread(self._add, label, fp)

    def set_session(self, session) -> None:
        for key in [k for k in self.footprints if k.startswith("stage ")]:
            del self.footprints[key]
        for st in session.stages:
            if st.footprint:
                self.footprints[f"stage {st.index} {st.name or st.kind}"] = st.footprint
        self._options()

    def _add(self, label: str, fp: dict) -> None:
        self.footprints[label] = fp
        self._options()

    def _options(self) -> None:
        sel = self.query_one("#memory-state", Select)
        with sel.prevent(Select.Changed):  # set here, not picked by the user
            sel.set_options([(k, k) for k in self.footprints])
            if self.picked in self.footprints:
                sel.value = self.picked
            elif self.footprints:
                sel.value = list(self.footprints)[-1]  # baseline first, then stages in order: the latest
        self.draw()

    @on(Select.Changed, "#memory-state")
    def _changed(self, event: Select.Changed) -> None:
        if isinstance(event.value, str):
            self.picked = event.value  # the user chose it: later stages no longer move the selector
        self.draw()

    @on(Select.Changed, "#memory-target")
    def _target_changed(self) -> None:
        self.draw()

    def focus_selector(self) -> None:
        self.query_one("#memory-state", Select).focus()

    # -- drawing ------------------------------------------------------------------------------
    def draw(self) -> None:
        out = self.query_one("#memory-bars", Static)
        key = self.query_one("#memory-state", Select).value
        fp = self.footprints.get(key) if isinstance(key, str) else None
        if not fp:
            return
        comps = {k: v for k, v in (fp.get("components") or {}).items() if v}
        table = Table.grid(padding=(0, 1))
        table.add_column(width=12)
        table.add_column()
        table.add_column(justify="right", no_wrap=True)
        top = max(comps.values(), default=1)
        for name, b in sorted(comps.items(), key=lambda kv: -kv[1]):
            table.add_row(name, bar(b / top, style="cyan"), fmt_bytes(b))
        table.add_row("weights", Text(""), fmt_bytes(fp.get("weights_bytes")))
        table.add_row("runtime", Text("KV cache + activations", style="dim"), fmt_bytes(fp.get("runtime_bytes")))
        parts = [table]
        if self.targets:
            tkey = self.query_one("#memory-target", Select).value
            parts.append(self._target_table(self.targets.get(tkey), fp, str(tkey)))
        else:
            parts.append(Text("hardware targets: not available here", style="dim"))
        from rich.console import Group

        out.update(Group(*parts))

    def _target_table(self, target, fp: dict, name: str):
        table = Table.grid(padding=(0, 1))
        table.add_column(width=22)
        table.add_column(no_wrap=True)
        table.add_column()
        table.add_row(Text(f"on {name}", style="bold"), Text(getattr(target, "label", "") or "", style="dim"), Text(""))
        if target is None:
            return table
        for check in target.verdict(fp):
            table.add_row(
                f"{check.what}",
                bar(check.factor, width=16),
                Text(
                    f"{check.text}: {fmt_bytes(check.need)} of {fmt_bytes(check.have)}",
                    style="green" if check.fits else "bold red",
                ),
            )
        l1 = getattr(target, "l1", None)
        if l1:
            table.add_row(
                "L1 (reference)", Text(""), Text(f"{fmt_bytes(l1)} scratchpad; tiles stream through it", style="dim")
            )
        return table
