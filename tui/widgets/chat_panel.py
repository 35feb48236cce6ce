"""The chat playground: talk to the model at any finished stage; A/B answers side by side.

One conversation: your prompts and A's replies. With A/B on, B answers that same conversation
(turned on mid-chat, it sees every earlier turn too), so the two replies differ only by model. A
then B generate one after the other, never at once, so each tokens/s measures its model, not the
two fighting for the cores. Replies stream token by token from one thread worker
(`tui.chat.stream_reply`); the widget only ever sees text pieces via `call_from_thread`.

Keys: esc in a text field leaves it (focus goes to the transcript, where digits switch panes
again); esc outside a field stops the reply. The footer says which one esc does where focus is.
"""

from __future__ import annotations

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import Checkbox, Input, Label, Select, Static
from textual.worker import get_current_worker

from frankenlab.tui.chat import (
    ChatTarget,
    ReplyOutOfMemory,
    ReplyStats,
    ReplyTimeout,
    Sampling,
    stream_reply,
    timed,
)
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
        super().__init__(id=f"transcript-{side}", classes="transcript", can_focus=side == "a")
        self.side = side

    def add(self, role: str, text: str) -> Static:
        w = Static(text, classes=f"msg {role}", markup=False)
        self.mount(w)
        self.scroll_end(animate=False)
        return w


class ChatInput(Input):
    """A text field of the chat: esc leaves it for the transcript (a second esc then stops the reply)."""

    BINDINGS = [Binding("escape", "leave", "Leave input (esc again: stop reply)")]

    def action_leave(self) -> None:
        self.screen.query_one("#transcript-a", Transcript).focus()


class ChatPanel(Vertical):
    BINDINGS = [Binding("escape", "stop", "Stop reply"), Binding("ctrl+n", "new_chat", "New chat")]

    class ReplyDone(Message):
        def __init__(
            self,
            side: str,
            text: str,
            stats: ReplyStats,
            error: str | None = None,
            how: str = "",
            stopped: bool = False,
        ):
            super().__init__()
            self.side, self.text, self.stats, self.error, self.how = side, text, stats, error, how
            self.stopped = stopped  # esc (or a new chat) ended it early

    def __init__(self, *, id: str | None = None, max_new_tokens: int = 96):
        super().__init__(id=id)
        self.targets: dict[str, ChatTarget] = {}
        self.max_new_tokens = max_new_tokens
        self._sampling_defaults = {k: (str(max_new_tokens) if k == "max" else v) for k, _, v, _ in SAMPLING_FIELDS}
        self._auto: dict[str, str | None] = {}  # the value each side got by default (not picked by the user)
        self.history: list[dict] = []  # the one conversation: prompts and A's replies (B answers it too)
        self._conversation = 0  # a new chat starts another; replies to an older one are dropped

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
                yield ChatInput(self._sampling_defaults[key], id=f"chat-{key}", compact=True, tooltip=tip)
        yield ChatInput(
            placeholder="say something to the model (enter sends, esc leaves the field)",
            id="chat-input",
            compact=True,
        )

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
        self.targets = targets  # their models stay in the lab's model cache, under the same keys
        options = [(t.label, k) for k, t in targets.items()]
        keys = [k for _, k in options]
        # defaults: A the baseline, B the latest model other than A's (the latest stage's, else the grid's
        # plan); a choice the user made is kept while it exists
        chosen: dict[str, str | None] = {}
        for side in ("a", "b"):
            sel = self.query_one(f"#chat-{side}", Select)
            current = sel.value
            sel.set_options(options)
            keep = current in targets and current != self._auto.get(side)
            if side == "a":
                default = "base" if "base" in keys else (keys[0] if keys else None)
            else:
                others = [k for k in keys if k != chosen["a"]]
                default = others[-1] if others else (keys[-1] if keys else None)
            value = current if keep else default
            if value is not None:
                sel.value = value
            chosen[side] = value
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
        b = self.query_one("#transcript-b", Transcript)
        b.display = ab
        self.query_one("#chat-b").display = ab
        turns = sum(m["role"] == "user" for m in self.history)
        if ab and turns and not b.children:
            b.add("note", f"B answers the same conversation as A ({turns} earlier prompt(s) and A's replies)")

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
        if any(w.group == "chat" and w.node is self and not w.is_finished for w in self.app.workers):
            self.app.notify("a reply is still coming: wait, or esc to stop it", severity="warning")
            return
        sides = ["a"] + (["b"] if self.query_one("#chat-ab", Checkbox).value else [])
        jobs = []
        for side in sides:
            key = self.query_one(f"#chat-{side}", Select).value
            target = self.targets.get(key) if isinstance(key, str) else None
            tr = self.query_one(f"#transcript-{side}", Transcript)
            tr.add("user", f"you: {text}")
            if target is None:
                tr.add("error", "no model to answer: load a model or finish a stage first")
                continue
            waiting = "…" if side == "a" or len(jobs) == 0 else "… (after A: one model at a time, so speeds compare)"
            jobs.append((side, target, tr.add("assistant", f"{target.label}: {waiting}")))
        if jobs:
            self.history.append({"role": "user", "content": text})
            self._answer(jobs, list(self.history), sampling, self._conversation)

    @work(thread=True, group="chat")
    def _answer(
        self, jobs: list[tuple[str, ChatTarget, Static]], messages: list[dict], sampling: Sampling, conversation: int
    ) -> None:
        """Every side's reply to the same `messages`, one after the other (A, then B)."""
        worker = get_current_worker()
        for side, target, reply in jobs:
            stats = ReplyStats()
            text, error = "", None
            prefix = f"{target.label}: "
            if not worker.is_cancelled:
                try:
                    # the lab's model cache: loaded (room made first), kept while it answers, then the
                    # least recently used of the lab's models goes when another needs room
                    with target.use() as (model, tokenizer):
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
                except (ReplyOutOfMemory, ReplyTimeout) as exc:  # one line that says what to do
                    error = str(exc)
                except Exception as exc:  # noqa: BLE001 - shown in the transcript, the app keeps running
                    error = f"{type(exc).__name__}: {exc}"
            if worker.is_cancelled and not text:
                self.app.call_from_thread(reply.update, prefix + "(stopped before it started)")
            done = self.ReplyDone(side, text, stats, error, sampling.describe(), worker.is_cancelled)
            done.conversation = conversation
            self.post_message(done)

    def on_chat_panel_reply_done(self, event: ChatPanel.ReplyDone) -> None:
        if getattr(event, "conversation", self._conversation) != self._conversation:
            return  # a reply to a chat cleared since
        tr = self.query_one(f"#transcript-{event.side}", Transcript)
        if event.error:
            tr.add("error", event.error)
            self.app.notify(f"chat failed: {event.error}", severity="error")
            if event.side == "a" and self.history and self.history[-1]["role"] == "user":
                self.history.pop()  # the conversation goes on without the prompt A could not answer
            return
        if event.side == "a":  # A's reply is the conversation's; B's is shown beside it
            self.history.append({"role": "assistant", "content": event.text})
        rate = f"{event.stats.tokens} tokens, {event.stats.rate:.1f} tokens/s"
        tr.add("stats", f"stopped: {rate} ({event.how})" if event.stopped else f"{rate} ({event.how})")

    def action_stop(self) -> None:
        focused = self.app.focused
        if isinstance(focused, Input) and focused in self.query(Input):
            self.query_one("#transcript-a", Transcript).focus()  # esc always leaves a text field first
            return
        for w in self.app.workers:
            if w.group == "chat" and w.node is self:
                w.cancel()

    def action_new_chat(self) -> None:
        self.action_stop_all()
        self._conversation += 1
        self.history.clear()
        for tr in self.query(Transcript):
            tr.remove_children()

    def action_stop_all(self) -> None:
        for w in self.app.workers:
            if w.group == "chat" and w.node is self:
                w.cancel()
