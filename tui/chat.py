"""Chatting with a model: prompt building and token streaming, free of Textual.

`stream_reply` runs `generate` in a helper thread with a `TextIteratorStreamer` and yields text
pieces as they come, so a Textual thread worker can forward each piece to the screen. A run-time
layer plan is applied around the whole generation with `planned(model, plan)`; the model's lock
(`pipeline.sharing.model_lock`) is held throughout, so two chats (or a chat and a what-if estimate)
never swap its layers under each other.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from frankenlab.evals import devices
from frankenlab.pipeline.plans import LayerPlan, planned
from frankenlab.pipeline.sharing import model_lock
from frankenlab.tui.model_cache import ModelCache


@dataclass
class ChatTarget:
    """Something to chat with: a label, how to get (model, tokenizer), and an optional layer plan.

    With a `cache` (the lab's `ModelCache`), the model is held there under `cache_key`: loaded on first
    use, dropped when the lab needs room for another (least recently used first, never while it answers)
    and loaded again when chosen again. Without one (the lab's baseline, which the lab holds anyway),
    `get` is called each time."""

    key: str
    label: str
    get: Callable[[], tuple]  # () -> (model, tokenizer); may load from disk (call in a thread)
    plan: LayerPlan | None = None
    cache: ModelCache | None = field(default=None, repr=False, compare=False)
    cache_key: str | None = None

    def resolve(self) -> tuple:
        if self.cache is None:
            return self.get()
        return self.cache.get(self.cache_key or self.key, self.get)

    @contextmanager
    def use(self) -> Iterator[tuple]:
        """(model, tokenizer), kept loaded while the block runs (a reply): never dropped from under it."""
        if self.cache is None:
            yield self.get()
            return
        with self.cache.use(self.cache_key or self.key, self.get) as value:
            yield value


def prompt_ids(tokenizer, messages: list[dict]) -> torch.Tensor:
    """(1, T) input ids: the model's chat template when it has one, else a plain transcript."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant:"
    return tokenizer(text, return_tensors="pt").input_ids


class _Stop:
    """A stopping criterion that ends generation when the caller cancels."""

    def __init__(self, cancelled: Callable[[], bool]):
        self.cancelled = cancelled

    def __call__(self, input_ids, scores, **kwargs) -> bool:
        return bool(self.cancelled())


@dataclass(frozen=True)
class Sampling:
    """How a reply is decoded. temperature 0 = greedy (the default: comparisons stay deterministic)."""

    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    max_new_tokens: int = 96

    def __post_init__(self):
        if not 0 <= self.temperature <= 5:
            raise ValueError("temperature must be between 0 (greedy) and 5")
        if not 0 < self.top_p <= 1:
            raise ValueError("top-p must be above 0 and at most 1")
        if not 0.5 <= self.repetition_penalty <= 3:
            raise ValueError("repetition penalty must be between 0.5 and 3 (1 = none)")
        if not 1 <= self.max_new_tokens <= 4096:
            raise ValueError("max new tokens must be between 1 and 4096")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generate_kwargs(self) -> dict:
        kw = {"max_new_tokens": self.max_new_tokens, "do_sample": not self.greedy}
        if not self.greedy:
            kw.update(temperature=self.temperature, top_p=self.top_p)
        if self.repetition_penalty != 1.0:
            kw["repetition_penalty"] = self.repetition_penalty
        return kw

    def describe(self) -> str:
        head = "greedy" if self.greedy else f"temperature {self.temperature:g}, top-p {self.top_p:g}"
        rep = f", repetition penalty {self.repetition_penalty:g}" if self.repetition_penalty != 1.0 else ""
        return f"{head}{rep}, up to {self.max_new_tokens} new tokens"


TOKEN_TIMEOUT_S = 120.0  # a reply that yields no token for this long is stopped with one line


class ReplyTimeout(RuntimeError):
    """No token came for TOKEN_TIMEOUT_S seconds; the message is one line that says what to do."""


class ReplyOutOfMemory(RuntimeError):
    """Generation ran out of memory; the message is one line that says what to lower."""


def stream_reply(
    model,
    tokenizer,
    messages: list[dict],
    *,
    plan: LayerPlan | None = None,
    max_new_tokens: int = 96,
    cancelled: Callable[[], bool] = lambda: False,
    sampling: Sampling | None = None,
    stats: ReplyStats | None = None,
) -> Iterator[str]:
    """Yield the reply to `messages` piece by piece (greedy unless `sampling` says otherwise);
    `stats.tokens` counts the tokens generated (a text piece can hold several, or none yet)."""
    from transformers import StoppingCriteriaList, TextIteratorStreamer

    sampling = sampling or Sampling(max_new_tokens=max_new_tokens)
    device = next(model.parameters()).device
    ids = prompt_ids(tokenizer, messages).to(device)

    class CountingStreamer(TextIteratorStreamer):
        def put(self, value):
            if stats is not None and not (self.skip_prompt and self.next_tokens_are_prompt):
                stats.tokens += int(value.numel())
            super().put(value)

    timeout = TOKEN_TIMEOUT_S
    streamer = CountingStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=timeout)
    failure: list[BaseException] = []
    gave_up = threading.Event()  # no token in time: generation stops at its next token
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def generate():
        try:
            with torch.inference_mode():
                model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    **sampling.generate_kwargs(),
                    pad_token_id=pad,
                    streamer=streamer,
                    stopping_criteria=StoppingCriteriaList([_Stop(lambda: cancelled() or gave_up.is_set())]),
                )
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            failure.append(exc)
            streamer.end()

    # no evals.packed here: at one row it measured no faster than F.linear (11.8 vs 12.6 tok/s for 32
    # greedy tokens of the bundled model, benchmarks/bench_quant.py), and it holds a second weight copy
    with model_lock(model), planned(model, plan):
        thread = threading.Thread(target=generate, name="frankenlab-generate", daemon=True)
        thread.start()
        try:
            for piece in streamer:
                if piece:
                    yield piece
        except queue.Empty:
            gave_up.set()
        finally:
            thread.join()  # the model's lock and layer plan stay until generate has stopped
    if failure:
        if devices.is_oom(failure[0]):
            devices.free_cached_memory(device)
            raise ReplyOutOfMemory(
                devices.oom_message(
                    device,
                    "while generating the reply",
                    f"lower max new tokens (now {sampling.max_new_tokens}), start a new chat (a shorter "
                    "conversation), or chat with a smaller model",
                )
            ) from None
        raise failure[0]
    if gave_up.is_set():
        raise ReplyTimeout(
            f"no token after {timeout:.0f} s: the model's first reply on {device} may still be compiling "
            "kernels, or the model is too slow there; ask again, or choose a smaller model or another device"
        )


@dataclass
class ReplyStats:
    tokens: int = 0
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def timed(pieces: Iterator[str], stats: ReplyStats) -> Iterator[str]:
    """Time a reply; the tokens are counted by `stream_reply(stats=...)`, not by text pieces."""
    t0 = time.perf_counter()
    for p in pieces:
        stats.seconds = time.perf_counter() - t0
        yield p
    stats.seconds = time.perf_counter() - t0
