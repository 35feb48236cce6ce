"""The lab's footer: Textual's compact Footer without the work it repeats on every focus change.

Textual's Footer recomposes itself whenever the screen's active bindings may have changed, which is
every focus change (every tab key), and each FooterKey it mounts then sets its `-compact` class,
one CSS restyle per key. With torch busy in worker threads that work competes for the GIL and was
the largest single cost of a tab switch on the event loop (benchmarks/bench_lab.py --together).
Here the footer recomposes only when the keys it shows (key, description, enabled) changed, and
its keys are born with the `-compact` class, so binding it later changes nothing.
"""

from __future__ import annotations

from textual.widgets import Footer
from textual.widgets._footer import FooterKey  # noqa: PLC2701 - the key widget Footer composes


class LabFooter(Footer):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._shown: tuple | None = None
        self._fit_tries = 0

    def _signature(self, screen) -> tuple:
        return tuple(
            (binding.key, binding.description, enabled)
            for (_node, binding, enabled, _tip) in screen.active_bindings.values()
            if binding.show
        )

    def bindings_changed(self, screen) -> None:
        will_rebuild = screen.app.app_focus and self.is_attached and screen is self.screen  # as Footer decides
        if not will_rebuild:
            super().bindings_changed(screen)
            return
        try:
            shown = self._signature(screen)
        except Exception:  # noqa: BLE001 - a screen mid-teardown: let Footer decide as it always did
            shown = None
        if shown is not None and shown == self._shown and self._bindings_ready:
            return
        self._shown = shown  # remembered only for a rebuild that happens
        super().bindings_changed(screen)

    def compose(self):
        for widget in super().compose():
            if self.compact and isinstance(widget, FooterKey):
                widget.add_class("-compact", update=False)
            yield widget
        self.call_after_refresh(self._fit)

    # -- a narrow terminal: keys that do not fit are left out whole, never cut ("f1 H") ------------
    def on_resize(self) -> None:
        for child in self._keys():
            child.display = True
        self.call_after_refresh(self._fit)

    def _keys(self) -> list:
        return [c for c in self.children if not c.has_class("-command-palette")]

    def _fit(self) -> None:
        """Hide every key (or key group) from the first one that runs under the palette key or past
        the edge: a narrow footer shows fewer keys, each whole (the palette, ctrl+p, lists them all)."""
        palette = [c for c in self.children if c.has_class("-command-palette")]
        keys = [c for c in self._keys() if c.display]
        if not self.region.width or any(not c.region.width for c in keys + palette):  # not laid out yet
            self._fit_tries += 1
            if self._fit_tries < 20:
                self.call_after_refresh(self._fit)
            return
        self._fit_tries = 0
        limit = palette[0].region.x if palette else self.region.right
        over = next((i for i, c in enumerate(keys) if c.region.right > limit), None)
        if over is None:
            return
        for c in keys[over:]:
            c.display = False
