"""HellaSwag: which of four endings does the model find most likely? acc and acc_norm.

Zero-shot, as lm-evaluation-harness' `hellaswag` task computes it: the query is
`preprocess(activity_label + ": " + ctx)`, each choice is `" " + preprocess(ending)`, and the
score of a choice is the summed log-likelihood of its tokens given the query (`evals.loglik`).
`acc`: the highest score is the labelled ending; `acc_norm`: the highest score divided by the
ending's length in characters. One difference from the harness, forced by the local data: the
file holds `ctx` = ctx_a + " " + ctx_b without the harness' capitalisation of ctx_b's first letter.

Items are a seeded sample of the validation file (seed 0), in file order, like the QA questions;
the protocol names it: `hellaswag-validation:500` (with `@sha256:<8 hex digits>` when the file
is not the standard validation file). Every row is checked when read (`evals.data_checks.ROW_CHECKS`:
`ctx`, a list of `endings`, a `label` indexing them), a bad one named by file and line. Layer plans (Franken mode) are scored by
running this under the plan: `with pipeline.plans.planned(model, plan) as m: hellaswag(m, ...)`.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from frankenlab.evals.data import data_label, load_dataset_records
from frankenlab.evals.loglik import continuation_logprobs
from frankenlab.evals.stats import accuracy_fields


def preprocess(text: str) -> str:
    """lm-evaluation-harness' cleaning of WikiHow artefacts (a no-op on already clean text)."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


@dataclass(frozen=True)
class Item:
    index: int  # row in the source file
    query: str
    endings: tuple[str, ...]  # preprocessed, without the leading space
    label: int


def parse(rec: dict, index: int) -> Item:
    try:
        ctx = rec.get("ctx") or (rec["ctx_a"] + " " + rec["ctx_b"].capitalize())
        endings = tuple(preprocess(e) for e in rec["endings"])
        label = int(rec["label"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"HellaSwag row {index} needs ctx, endings and label") from None
    if not 0 <= label < len(endings):
        raise ValueError(f"HellaSwag row {index}: label {label} but {len(endings)} endings")
    return Item(rec.get("idx", index), preprocess(f"{rec.get('activity_label', '')}: {ctx}"), endings, label)


def pick(scores: list[float], endings: tuple[str, ...]) -> tuple[int, int]:
    """(acc choice, acc_norm choice): argmax of the log-likelihood, and of it per character."""
    raw = max(range(len(scores)), key=lambda i: scores[i])
    norm = max(range(len(scores)), key=lambda i: scores[i] / len(endings[i]))
    return raw, norm


def protocol_name(n: int, seed: int, total: int) -> str:
    return f"hellaswag-validation:{n}" + (f":seed{seed}" if seed and n < total else "")


def load_items(n: int, *, seed: int = 0, data_dir=None, path=None) -> tuple[list[Item], str, int]:
    records, source = load_dataset_records("hellaswag", path=path, data_dir=data_dir)
    if not 1 <= n <= len(records):
        raise ValueError(
            f"{n} HellaSwag items asked for but {source} holds {len(records)}: ask for 1 to {len(records)}"
        )
    picked = sorted(random.Random(seed).sample(range(len(records)), n)) if n < len(records) else range(n)
    return [parse(records[i], i) for i in picked], source, len(records)


@dataclass
class HellaSwagResult:
    acc: float
    acc_norm: float
    n: int
    protocol: str
    seconds: float
    source: str
    records: list[dict] = field(default_factory=list)

    def metrics(self) -> list[dict]:
        """Two metrics, `hellaswag_acc` and `hellaswag_acc_norm`, each with count and 95 % interval."""
        out = []
        for name, key in (("hellaswag_acc", "pred"), ("hellaswag_acc_norm", "pred_norm")):
            correct = sum(r[key] == r["label"] for r in self.records)
            out.append(
                {
                    "name": name,
                    "value": correct / self.n,
                    "protocol": self.protocol,
                    **accuracy_fields(correct, self.n),
                    "seconds": self.seconds,
                    "source": self.source,
                }
            )
        return out


def hellaswag(
    model,
    tokenizer,
    n: int,
    *,
    seed: int = 0,
    batch_size: int = 16,
    data_dir=None,
    path=None,
    progress: Callable[[float], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> HellaSwagResult:
    """Score n HellaSwag items; `batch_size` counts (query, ending) rows per forward pass."""
    t0 = time.perf_counter()
    items, source, total = load_items(n, seed=seed, data_dir=data_dir, path=path)
    pairs = [(it.query, " " + e) for it in items for e in it.endings]
    scores = continuation_logprobs(
        model, tokenizer, pairs, batch_size=batch_size, progress=progress, cancelled=cancelled
    )
    records, at = [], 0
    for it in items:
        s = scores[at : at + len(it.endings)]
        at += len(it.endings)
        raw, norm = pick(s, it.endings)
        records.append(
            {"index": it.index, "label": it.label, "pred": raw, "pred_norm": norm, "loglik": [round(x, 4) for x in s]}
        )
    acc = sum(r["pred"] == r["label"] for r in records) / len(records)
    acc_norm = sum(r["pred_norm"] == r["label"] for r in records) / len(records)
    return HellaSwagResult(
        acc,
        acc_norm,
        len(records),
        protocol_name(n, seed, total) + data_label("hellaswag", source),  # "@sha256:..." on other data
        time.perf_counter() - t0,
        source,
        records,
    )
