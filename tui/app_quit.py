"""ctrl+c and quitting while a run or a sweep goes: cancel first, then ask before quitting.

A mixin of `tui.app.FrankenLab` (handlers by name: Textual's `@on` needs the app's own class); it
must come before `App` in the bases so its `action_quit` wraps Textual's. Split out of the app
because what a key does during a job (and what quitting would lose) is its own job.
"""

from __future__ import annotations

from textual.actions import SkipAction

from frankenlab.tui.screens.confirm import ConfirmScreen
from frankenlab.tui.widgets.sweep_pane import SweepPane


class QuitActions:
    def _busy(self) -> str | None:
        """What would be lost by quitting now: "a run", "a sweep", or None."""
        if self.lab.running:
            return "a run"
        sweep = self._cached(SweepPane)
        return "a sweep" if sweep is not None and sweep.running else None

    def action_interrupt(self) -> None:
        """ctrl+c: cancel the running job (finished stages are kept); pressed again, ask to quit."""
        sweep = self._cached(SweepPane)
        if self.lab.running and not self.lab.cancel.is_set():
            self.action_cancel_run(" (ctrl+c again asks to quit)")  # one toast, when the run has stopped
        elif sweep is not None and sweep.running and not sweep.cancel.is_set():
            sweep.stop()
            self.notify("stopping the sweep after the current batch; ctrl+c again asks to quit", title="ctrl+c")
        elif self._busy():
            self.run_worker(self.action_quit(), exclusive=True, group="quit")
        else:
            raise SkipAction()  # nothing runs: copy in a text field, Textual's quit hint elsewhere

    async def action_quit(self) -> None:
        """Quit; during a run or a sweep, only after a yes (the job is cancelled, finished stages kept)."""
        busy = self._busy()
        if busy is None:
            await super().action_quit()
            return
        if isinstance(self.screen, ConfirmScreen):
            return

        def answer(yes: bool | None) -> None:
            if yes:
                self.lab.cancel.set()
                sweep = self._cached(SweepPane)
                if sweep is not None:
                    sweep.cancel.set()
                self.exit()

        self.push_screen(
            ConfirmScreen(
                f"{busy.capitalize()} is going. Quit anyway? It is cancelled; what finished stays in its session.",
                yes="Quit",
                no="Keep running",
            ),
            answer,
        )
