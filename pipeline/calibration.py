"""Calibration text for WANDA, GPTQ, EoRA and layer importance: fixed-length token windows.

As in the GPTQ and WANDA reference code: pick a random document long enough, then a random
window inside it, `samples` times, from a seeded generator so runs are repeatable.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from frankenlab.evals.config import option, require
from frankenlab.evals.data import check_dataset, load_dataset_records, local_file
from frankenlab.evals.errors import RecipeError


@dataclass(frozen=True)
class CalibrationConfig:
    dataset: str = option("c4", help="calibration text: c4, wikitext2, wiki, or a .txt/.jsonl file path")
    samples: int = option(32, help="token windows drawn from the text (WANDA and GPTQ papers: 128)")
    seq_len: int = option(128, label="seq len", help="tokens per window")
    seed: int = option(0, form=False, help="seed that picks the documents and windows")

    def __post_init__(self):
        require(self.samples >= 1, "calibration.samples must be at least 1")
        require(self.seq_len >= 8, "calibration.seq_len must be at least 8 tokens")


def _is_file(dataset: str) -> bool:
    return any(dataset.endswith(s) for s in (".txt", ".jsonl", ".gz", ".json"))


def check_calibration(config: CalibrationConfig, data_dir=None, *, key: str = "calibration") -> None:
    """Before any weights load: the calibration text is there, every row of it holds a `text` string
    (DataNotFound, DataError naming the file and line, or the path a user may not read), and it can
    give `samples` windows at all (RecipeError): each document gives at most one window (a long one
    one window, short ones joined at most one each), so a local file of N rows gives at most N."""
    is_file = _is_file(config.dataset)
    name = "file" if is_file else config.dataset
    held = check_dataset(name, path=config.dataset if is_file else None, data_dir=data_dir, rows="text")
    if held is not None and config.samples > held:
        where = config.dataset if is_file else (local_file(name, data_dir=data_dir) or name)
        raise RecipeError(
            f"{key}.samples = {config.samples} asks for more windows than {where} can give: it holds {held} "
            f"documents and each gives at most one window; ask for at most {held}"
        )


def check_seq_len(seq_len: int, model_config: dict | None, *, key: str = "calibration.seq_len") -> None:
    """Before any weights load: calibration windows no longer than the model takes (RecipeError)."""
    from frankenlab.evals.suite import max_positions

    limit = max_positions(model_config)
    if limit is not None and seq_len > limit:
        raise RecipeError(
            f"{key} = {seq_len} is longer than the model takes ({limit} tokens, max_position_embeddings "
            f"in its config.json): use at most {limit}"
        )


def calibration_ids(tokenizer, config: CalibrationConfig, *, data_dir=None) -> torch.Tensor:
    """(samples, seq_len) token ids."""
    is_file = _is_file(config.dataset)
    records, source = load_dataset_records(
        config.dataset if not is_file else "file",
        path=config.dataset if is_file else None,
        data_dir=data_dir,
        limit=None,
        rows="text",  # every row a {"text": string}: a bad row is named by file and line
    )
    texts = [r["text"] for r in records if r["text"].strip()]
    rng = random.Random(config.seed)
    order = list(range(len(texts)))
    rng.shuffle(order)
    windows: list[torch.Tensor] = []
    short: list[torch.Tensor] = []
    for i in order:
        ids = tokenizer(texts[i], return_tensors="pt").input_ids[0]
        if ids.numel() > config.seq_len:
            start = rng.randint(0, ids.numel() - config.seq_len - 1)
            windows.append(ids[start : start + config.seq_len])
        else:
            short.append(ids)
        if len(windows) >= config.samples:
            break
    if len(windows) < config.samples and short:
        # Few long documents (e.g. short wiki lines): join the short ones and cut windows.
        joined = torch.cat(short)
        for start in range(0, joined.numel() - config.seq_len + 1, config.seq_len):
            windows.append(joined[start : start + config.seq_len])
            if len(windows) >= config.samples:
                break
    if len(windows) < config.samples:
        raise RecipeError(
            f"calibration data {source} yields only {len(windows)} windows of {config.seq_len} "
            f"tokens; lower calibration.samples or seq_len"
        )
    return torch.stack(windows)
