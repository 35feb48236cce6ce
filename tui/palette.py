"""The lab's entries in the command palette (ctrl+p): every action, with the key that also does it."""

from __future__ import annotations

from collections.abc import Callable, Iterator

TABS = ("layers", "recipe", "run", "results", "chat", "sessions", "sweep", "plan")


def lab_commands(app) -> Iterator[tuple[str, str, Callable]]:
    """(title, help, callback) for each action of the lab `app` (tui.app.FrankenLab)."""
    yield from (
        ("Run the recipe", "start a run of the recipe in the Recipe pane (ctrl+r)", app.action_run),
        ("Cancel the run", "stop after the current batch, keep finished stages (ctrl+x)", app.action_cancel_run),
        (
            "Use the grid's plan as the depth stage",
            "the layer grid becomes the recipe's depth stage (u)",
            app.action_use_plan,
        ),
        ("Reset the layer plan", "keep every layer once", lambda: app.query_one("#grid").action_reset()),
        ("Estimate the plan's perplexity", "what-if estimate of the grid's plan (e)", app.action_estimate),
        ("Importance scan", "perplexity without each layer, as heat colours (i)", app.action_scan),
        ("Load a recipe", "read a recipe TOML into the form (ctrl+l)", app.action_load_recipe),
        ("Write the recipe", "save the form as a recipe TOML (ctrl+w)", app.action_save_recipe),
        ("Save the session as", "write the current session to a file (ctrl+s)", app.action_save_session),
        ("Open a session", "reopen a saved session (ctrl+o)", app.action_open_session),
        ("Compare sessions", "pick sessions in the Sessions pane, then Compare", lambda: app.action_tab("sessions")),
        (
            "Chat A/B",
            "answer one prompt with two models side by side",
            lambda: (app.action_tab("chat"), app.query_one("#chatpanel").select(ab=True)),
        ),
        ("New chat", "clear the chat history", lambda: app.query_one("#chatpanel").action_new_chat()),
        (
            "Run a sweep",
            "a grid of configurations sharing prefixes, in the background (Sweep pane, 7)",
            lambda: app.action_tab("sweep"),
        ),
        (
            "Plan for a memory budget",
            "the best per-layer skip / N:M / bits plan within a budget (Plan pane, 8)",
            lambda: app.action_tab("plan"),
        ),
        (
            "Use the planner's plan",
            "the Plan pane's chosen plan into the recipe form (u in the Plan pane)",
            lambda: app.query_one("#planpane").action_use_plan(),
        ),
        ("Toggle dark/light theme", "ctrl+t", app.action_toggle_theme),
        ("Help", "keys and panes (f1)", app.action_help),
    )
    for i, t in enumerate(TABS):
        yield f"Go to {t}", f"show the {t} pane ({i + 1})", lambda t=t: app.action_tab(t)
