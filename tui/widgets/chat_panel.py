"""The chat playground: talk to the model at any finished stage; A/B answers side by side.

Each side keeps its own history. Replies stream token by token from a thread worker
(`tui.chat.stream_reply`); the widget only ever sees text pieces via `call_from_thread`.
"""

from __future__ import annotations

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import Checkbox, Input, Label, Select, Static
from textual.worker import get_current_worker

from frankenlab.tui.chat import ChatTarget, ReplyStats, Sampling, stream_reply, timed
from frankenlab.tui.widgets.tickbox import TickBox

# (key, label, default, tooltip): the sampling row, shared by the single and the A/B view
SAMPLING_FIELDS = (
    ("temp", "temp", "0", "temperature: 0 = greedy (deterministic, the default for comparisons)"),
    ("topp", " top-p", "1", "nucleus sampling: keep the most likely tokens up to this probability mass"),
    ("rep", " rep", "1", "repetition penalty: 1 = none, 1.1-1.3 discourages loops"),
    ("max", " max", "96", "max new tokens per reply"),
)


class Transcript(VerticalScroll):
    def __init__(self, side: str):
        super().__init__(id=f"transcript-{side}", classes="transcript", can_focus=False)
        self.side = side
        self.history: list[dict] = []

    def add(self, role: str, text: str) -> Static:
        w = Static(text, classes=f"msg {role}", markup=False)
        self.mount(w)
        self.scroll_end(animate=False)
        return w


class ChatPanel(Vertical):
    BINDINGS = [Binding("escape", "stop", "Stop reply"), Binding("ctrl+n", "new_chat", "New chat")]

    class ReplyDone(Message):
        def __init__(self, side: str, text: str, stats: ReplyStats, error: str | None = None, how: str = ""):
            super().__init__()
            self.side, self.text, self.stats, self.error, self.how = side, text, stats, error, how

    def __init__(self, *, id: str | None = None, max_new_tokens: int = 96):
        super().__init__(id=id)
        self.targets: dict[str, ChatTarget] = {}
        self.max_new_tokens = max_new_tokens
        self._sampling_defaults = {k: (str(max_new_tokens) if k == "max" else v) for k, _, v, _ in SAMPLING_FIELDS}
        self._auto: dict[str, str | None] = {}  # the value each side got by default (not picked by the user)

    def compose(self) -> ComposeResult:
        with Horizontal(id="chat-controls"):
            yield Label("A", classes="side-label")
            yield Select([], prompt="model (A)", id="chat-a", compact=True)
            yield TickBox(
                "A/B",
                False,
                id="chat-ab",
                compact=True,
                tooltip="A/B: answer the same prompt with two models side by side",
            )
            yield Select([], prompt="model (B)", id="chat-b", compact=True)
        with Horizontal(id="transcripts"):
            yield Transcript("a")
            yield Transcript("b")
        with Horizontal(id="chat-sampling"):  # greedy by default, so A/B comparisons are deterministic
            for key, label, _value, tip in SAMPLING_FIELDS:
                yield Label(label, classes="field-label")
                yield Input(self._sampling_defaults[key], id=f"chat-{key}", compact=True, tooltip=tip)
        yield Input(placeholder="say something to the model (enter sends, esc stops)", id="chat-input", compact=True)

    def sampling(self) -> Sampling:
        """The settings in the sampling row; raises ValueError with a message saying what to change."""
        values = {}
        for key, label, _, _ in SAMPLING_FIELDS:
            text = self.query_one(f"#chat-{key}", Input).value.strip()
            try:
                values[key] = int(text) if key == "max" else float(text)
            except ValueError:
                raise ValueError(f"{label.strip()} must be a number, got {text!r}") from None
        return Sampling(
            temperature=values["temp"],
            top_p=values["topp"],
            repetition_penalty=values["rep"],
            max_new_tokens=values["max"],
        )

    def on_mount(self) -> None:
        self._sync_ab()

    # -- attributes down -------------------------------------------------------------------------
    def set_targets(self, targets: dict[str, ChatTarget]) -> None:
        old = {k: self.targets.get(k) for k in targets}
        # keep cached models of targets that did not change
        for k, t in targets.items():
            if old.get(k) is not None and old[k].label == t.label:
                t._cache = old[k]._cache
        self.targets = targets
        options = [(t.label, k) for k, t in targets.items()]
        keys = [k for _, k in options]
        # defaults: A the baseline, B the latest stage; a choice the user made is kept while it exists
        defaults = {"a": "base" if "base" in keys else (keys[0] if keys else None), "b": keys[-1] if keys else None}
        for side in ("a", "b"):
            sel = self.query_one(f"#chat-{side}", Select)
            current = sel.value
            sel.set_options(options)
            keep = current in targets and current != self._auto.get(side)
            value = current if keep else defaults[side]
            if value is not None:
                sel.value = value
            self._auto[side] = None if keep else value

    def select(self, a: str | None = None, b: str | None = None, ab: bool | None = None) -> None:
        if a is not None:
            self.query_one("#chat-a", Select).value = a
        if b is not None:
            self.query_one("#chat-b", Select).value = b
        if ab is not None:
            self.query_one("#chat-ab", Checkbox).value = ab

    @on(Checkbox.Changed, "#chat-ab")
    def _sync_ab(self) -> None:
        ab = self.query_one("#chat-ab", Checkbox).value
        self.query_one("#transcript-b").display = ab
        self.query_one("#chat-b").display = ab

    # -- sending ------------------------------------------------------------------------------
    @on(Input.Submitted, "#chat-input")
    def _send(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        if not text:
            return
        event.input.value = ""
        self.send(text)

    def send(self, text: str) -> None:
        try:
            sampling = self.sampling()
        except ValueError as exc:
            self.app.notify(str(exc), title="chat settings", severity="error")
            return
        sides = ["a"] + (["b"] if self.query_one("#chat-ab", Checkbox).value else [])
        for side in sides:
            key = self.query_one(f"#chat-{side}", Select).value
            target = self.targets.get(key) if isinstance(key, str) else None
            tr = self.query_one(f"#transcript-{side}", Transcript)
            tr.add("user", f"you: {text}")
            if target is None:
                tr.add("error", "no model to answer: load a model or finish a stage first")
                continue
            tr.history.append({"role": "user", "content": text})
            reply = tr.add("assistant", f"{target.label}: …")
            self._answer(side, target, list(tr.history), reply, sampling)

    @work(thread=True, group="chat")
    def _answer(self, side: str, target: ChatTarget, messages: list[dict], reply: Static, sampling: Sampling) -> None:
        worker = get_current_worker()
        stats = ReplyStats()
        text, error = "", None
        prefix = f"{target.label}: "
        try:
            model, tokenizer = target.resolve()
            for piece in timed(
                stream_reply(
                    model,
                    tokenizer,
                    messages,
                    plan=target.plan,
                    sampling=sampling,
                    stats=stats,
                    cancelled=lambda: worker.is_cancelled,
                ),
                stats,
            ):
                text += piece
                self.app.call_from_thread(reply.update, prefix + text)
        except Exception as exc:  # noqa: BLE001 - shown in the transcript, the app keeps running
            error = f"{type(exc).__name__}: {exc}"
        self.post_message(self.ReplyDone(side, text, stats, error, sampling.describe()))

    def on_chat_panel_reply_done(self, event: ChatPanel.ReplyDone) -> None:
        tr = self.query_one(f"#transcript-{event.side}", Transcript)
        if event.error:
            tr.add("error", event.error)
            self.app.notify(f"chat failed: {event.error}", severity="error")
            if tr.history and tr.history[-1]["role"] == "user":
                tr.history.pop()
            return
        tr.history.append({"role": "assistant", "content": event.text})
        tr.add("stats", f"{event.stats.tokens} tokens, {event.stats.rate:.1f} tokens/s ({event.how})")

    def action_stop(self) -> None:
        for w in self.app.workers:
            if w.group == "chat" and w.node is self:
                w.cancel()

    def action_new_chat(self) -> None:
        for tr in self.query(Transcript):
            tr.history.clear()
            tr.remove_children()
