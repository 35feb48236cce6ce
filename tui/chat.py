"""Chatting with a model: prompt building and token streaming, free of Textual.

`stream_reply` runs `generate` in a helper thread with a `TextIteratorStreamer` and yields text
pieces as they come, so a Textual thread worker can forward each piece to the screen. A run-time
layer plan is applied around the whole generation with `planned(model, plan)`; the model's lock
(`pipeline.sharing.model_lock`) is held throughout, so two chats (or a chat and a what-if estimate)
never swap its layers under each other.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from pipeline.plans import LayerPlan, planned
from pipeline.sharing import model_lock


@dataclass
class ChatTarget:
    """Something to chat with: a label, how to get (model, tokenizer), and an optional layer plan."""

    key: str
    label: str
    get: Callable[[], tuple]  # () -> (model, tokenizer); may load from disk (call in a thread)
    plan: LayerPlan | None = None
    _cache: tuple | None = field(default=None, repr=False)

    def resolve(self) -> tuple:
        if self._cache is None:
            self._cache = self.get()
        return self._cache


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


def stream_reply(model, tokenizer, messages: list[dict], *, plan: LayerPlan | None = None,
                 max_new_tokens: int = 96, cancelled: Callable[[], bool] = lambda: False) -> Iterator[str]:
    """Yield the reply to `messages` piece by piece (greedy decoding)."""
    from transformers import StoppingCriteriaList, TextIteratorStreamer

    device = next(model.parameters()).device
    ids = prompt_ids(tokenizer, messages).to(device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=120)
    failure: list[BaseException] = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def generate():
        try:
            with torch.inference_mode():
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                               do_sample=False, pad_token_id=pad, streamer=streamer,
                               stopping_criteria=StoppingCriteriaList([_Stop(cancelled)]))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            failure.append(exc)
            streamer.end()

    with model_lock(model), planned(model, plan):
        thread = threading.Thread(target=generate, name="frankenlab-generate", daemon=True)
        thread.start()
        try:
            for piece in streamer:
                if piece:
                    yield piece
        finally:
            thread.join()
    if failure:
        raise failure[0]


@dataclass
class ReplyStats:
    tokens: int = 0
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def timed(pieces: Iterator[str], stats: ReplyStats) -> Iterator[str]:
    t0 = time.perf_counter()
    for p in pieces:
        stats.tokens += 1
        stats.seconds = time.perf_counter() - t0
        yield p
    stats.seconds = time.perf_counter() - t0
