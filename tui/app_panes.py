"""The lab's panes: which widget a pane focuses, tab keys, Esc out of a text field, and `LabTabs`.

A mixin of `tui.app.FrankenLab` (handlers by name: Textual's `@on` needs the app's own class, so the
`TabActivated` handler that calls `_focus_pane` stays in `tui/app.py`). Split out of the app because
pane switching and focus are one job with its own subtleties (stale focus messages under fast tab
keys), apart from wiring the panes' data.
"""

from __future__ import annotations

from textual.actions import SkipAction
from textual.widgets import Input, TabbedContent, TabPane, TextArea


class LabTabs(TabbedContent):
    """TabbedContent that ignores a stale switch-back from the lab's own pane focus.

    Focusing a widget inside a pane makes TabbedContent show that pane, one message later. When tab
    keys come faster than the screen (ctrl+pageup four times), the focus the lab gave the pane just
    left arrives after the next key and switched back to it. The lab numbers every pane request
    (`_pane_seq`) and notes, per pane, the request at which it last focused that pane (`_auto_focus`):
    a focus message for a pane the lab focused at an older request, no longer shown, is dropped. Code
    that focuses a widget in another pane asks for that pane first (a new request), so such focus
    switches panes as before, and so does a click."""

    def on_tab_pane_focused(self, event: TabPane.Focused) -> None:
        pane = event.tab_pane.id
        seq = getattr(self.app, "_auto_focus", {}).get(pane)
        if seq is not None and seq != getattr(self.app, "_pane_seq", seq) and self.active != pane:
            event.prevent_default()  # TabbedContent's own handler would show the pane again
            event.stop()


class PaneActions:
    FOCUS = {
        "layers": "#grid",
        "recipe": "#form",
        "run": "#run-log",
        "results": "#results-table",
        "chat": "#transcript-a",  # not the prompt: a pane never grabs the keys on arrival (digits stay pane keys)
        "sessions": "#sessions-list",
        "sweep": "#sweep-table",
        "plan": "#plan-body",  # not the budget field: digits stay pane keys on arrival
    }

    def _focus_pane(self, pane: str) -> None:
        """Focus the pane's main widget, if that pane is still the one shown and focus is not in it yet.

        TabbedContent switches to the pane of any widget focused in code. Without these checks a
        focus scheduled for a tab the user has already left switched back to it, whose own focus
        switched back again: fast tab keys (5 4 5 3) ping-ponged between two panes forever."""
        tabs = self._cached(TabbedContent)
        if tabs is None or tabs.active != pane or self.screen is not tabs.screen:
            return
        focused = self.focused
        if focused is not None and any(a.id == pane for a in focused.ancestors_with_self):
            return
        target = self._cached(self.FOCUS[pane])
        if target is not None:
            self._auto_focus[pane] = self._pane_seq
            target.focus()

    def action_tab(self, tab: str) -> None:
        self._pane_seq += 1
        self.query_one(TabbedContent).active = tab

    def action_next_tab(self, step: int) -> None:
        """The next (step 1) or previous (-1) pane, wrapping around: as many panes as there are."""
        self._pane_seq += 1
        tabs = self.query_one(TabbedContent)
        panes = [p.id for p in tabs.query(TabPane) if p.id]
        if tabs.active in panes:
            tabs.active = panes[(panes.index(tabs.active) + step) % len(panes)]

    def action_leave_input(self) -> None:
        """Esc in a text field: focus leaves it (to the pane's main widget), so pane keys work again."""
        focused = self.focused
        if not isinstance(focused, Input | TextArea) or self.screen is not self.screen_stack[0]:
            raise SkipAction()  # not typing (or in a dialog, whose esc is its own)
        tabs = self._cached(TabbedContent)
        target = self._cached(self.FOCUS[tabs.active]) if tabs is not None and tabs.active in self.FOCUS else None
        if target is not None and target.focusable and not isinstance(target, Input | TextArea):
            target.focus()
        else:
            self.set_focus(None)
