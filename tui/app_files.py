"""The lab's files: recipes read into the form and written from it, sessions opened, saved, compared.

A mixin of `tui.app.FrankenLab` (handlers by name: Textual's `@on` needs the app's own class).
Sessions are read only through `sessions.load_session`, which validates them; every problem
(missing, corrupted, not a session, a recipe this lab cannot read) is a one-line notification.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from textual.widgets import TabbedContent

from frankenlab.evals.errors import RecipeError
from frankenlab.sessions import SessionError, load_session
from frankenlab.sessions.store import remember_session, save_copy
from frankenlab.tui.lab_state import grid_plan
from frankenlab.tui.screens.compare import CompareScreen
from frankenlab.tui.screens.prompt import PromptScreen
from frankenlab.tui.widgets.layer_grid import LayerGrid
from frankenlab.tui.widgets.memory import MemoryPanel
from frankenlab.tui.widgets.recipe_form import RecipeForm
from frankenlab.tui.widgets.results import ResultsPanel
from frankenlab.tui.widgets.run_panel import RunPanel
from frankenlab.tui.widgets.sessions_panel import SessionsPanel


class FileActions:
    def action_load_recipe(self) -> None:
        self.push_screen(
            PromptScreen("Load recipe (TOML file or bundled name):", placeholder="depth2"),
            lambda p: p and self._load_recipe_file(p),
        )

    def _load_recipe_file(self, path: str) -> None:
        from frankenlab.pipeline.recipe import Recipe

        try:
            recipe = Recipe.load(path)
        except RecipeError as exc:
            self.notify(str(exc), title="recipe not loaded", severity="error", timeout=10)
            return
        self._show_recipe(recipe)
        self.notify(f"recipe {recipe.name} loaded")

    def _show_recipe(self, recipe) -> None:
        for note in self.query_one(RecipeForm).load(recipe):
            self.notify(note, severity="warning")
        if self.query_one(LayerGrid).counts:
            self._grid_plan_from(lambda n: grid_plan(recipe, n))

    def _show_saved_recipe(self, session) -> str | None:
        """Show a session's recipe in the form and the grid; the problem when this lab cannot read it."""
        from frankenlab.pipeline.recipe import Recipe

        try:
            self._show_recipe(Recipe.from_dict(session.recipe))
        except RecipeError as exc:
            return str(exc)
        return None

    def action_save_recipe(self) -> None:
        try:
            recipe = self.query_one(RecipeForm).build()
        except RecipeError as exc:
            self.notify(str(exc), title="recipe refused", severity="error")
            return
        self.push_screen(
            PromptScreen("Write recipe to:", f"{recipe.name}.toml"),
            lambda p: (
                p and self._write(recipe.save, p, "recipe written to", "recipe not written", f"{recipe.name}.toml")
            ),
        )

    def action_save_session(self) -> None:
        if self.lab.session is None:
            self.notify("no session yet: run a recipe or open a session", severity="warning")
            return
        session = self.lab.session
        self.push_screen(
            PromptScreen("Save session as:", self.lab.save_session_default()),
            lambda path: (
                path
                and self._write(
                    lambda target: self._save_session_copy(session, target),
                    path,
                    "session saved to",
                    "session not saved",
                    "session.json",
                )
            ),
        )

    def _save_session_copy(self, session, target: Path) -> Path:
        """Save (stage models still found from the new place), remember it, and list it in Sessions."""
        written = save_copy(session, target)
        remember_session(written)
        self.query_one(SessionsPanel).refresh_list()
        return written

    def _write(self, save: Callable, path: str, done: str, failed: str, file_name: str) -> None:
        """Every save says where it wrote (the full path), or why it could not, in a notification and
        in the run log. A folder (existing, or typed with a trailing /) gets `file_name` inside it;
        ~ is expanded."""
        target = Path(path.strip()).expanduser()
        if path.strip().endswith(("/", os.sep)) or target.is_dir():
            target = target / file_name
        try:
            written = save(target) or target
        except (OSError, ValueError) as exc:
            why = f"cannot write {target} ({getattr(exc, 'strerror', None) or exc}): choose another place"
            self.notify(why, title=failed, severity="error", timeout=10)
            self.query_one(RunPanel).write(f"{failed}: {why}", "bold red")
            return
        where = Path(written).resolve()
        self.notify(f"{done} {where}", timeout=8)
        self.query_one(RunPanel).write(f"{done} {where}", "green")

    def action_open_session(self) -> None:
        self.push_screen(
            PromptScreen("Open session (session.json or run folder):"), lambda p: p and self._open_session(Path(p))
        )

    def _open_session(self, path: Path) -> bool:
        try:
            s = self.lab.open_session(path)
        except SessionError as exc:  # missing, unreadable, corrupted, not a session: one line
            self.notify(str(exc), title="session not opened", severity="error", timeout=10)
            return False
        remember_session(s.path)  # listed in Sessions wherever it lives
        self.query_one(SessionsPanel).refresh_list()
        self._show_session(s)
        problem = self._show_saved_recipe(s)
        if problem:
            self.notify(f"the session's recipe cannot be shown: {problem}", severity="warning")
        self._refresh_chat_targets()
        self.query_one(TabbedContent).active = "results"
        self.notify(f"session {s.id} ({s.status}) opened")
        return True

    def _show_session(self, s) -> None:
        self.query_one(ResultsPanel).show_session(s)
        self.query_one(MemoryPanel).set_session(s)
        self._show_scores(s)

    def on_sessions_panel_requested(self, event: SessionsPanel.Requested) -> None:
        if event.action == "open":
            self._open_session(event.paths[0])
        elif event.action == "compare":
            sessions = []
            for p in event.paths:
                try:
                    sessions.append(load_session(p))
                except SessionError as exc:
                    self.notify(str(exc), severity="error")
            if sessions:
                self.push_screen(CompareScreen(sessions))
        elif event.action == "replay":
            self.replay(event.paths[0])
