"""A checkbox whose glyph differs on and off, not only in colour.

Textual's Checkbox draws `▐X▌` in both states and tells them apart by colour alone, which a
monochrome terminal, a screen reader or a `tmux capture-pane` cannot see: on is `▐X▌`, off `▐ ▌`.
"""

from __future__ import annotations

from textual.widgets import Checkbox


class TickBox(Checkbox):
    @property
    def BUTTON_INNER(self) -> str:  # noqa: N802 - Textual reads the class constant through the instance
        return "X" if self.value else " "
