"""Where evaluation, calibration and training text comes from.

Resolution order, for every dataset: an explicit file path, then a data directory
(`--data-dir` or `FRANKENLAB_DATA_DIR`, laid out like the shared data folder), then the Hugging
Face hub, or its local `datasets` cache when the hub cannot be reached. When none works the error
names all three and what file is expected where. Local files are read directly (JSONL, JSONL.gz,
or plain text one record per line); the hub path goes through `datasets.load_dataset`.
"""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass
from pathlib import Path

from frankenlab.evals.hub import hub_endpoint_reachable, offline

DATA_DIR_ENV = "FRANKENLAB_DATA_DIR"


class DataNotFound(FileNotFoundError):
    """No source for a dataset; the message lists what was tried."""


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    relpath: str  # where it lives inside a data directory
    description: str
    hub: tuple | None = None  # args for datasets.load_dataset(path, name, split=...)
    hub_kwargs: tuple = ()  # extra keyword arguments as (key, value) pairs
    # (relpath, note): a lesser local copy, tried in the data directory only after the hub
    fallback: tuple[str, str] | None = None


DATASETS: dict[str, DatasetInfo] = {
    "wikitext2": DatasetInfo(
        "wikitext2",
        "wikitext2/wikitext-2-raw-v1-test.jsonl",
        "WikiText-2 raw test split",
        ("wikitext", "wikitext-2-raw-v1", "test"),
    ),
    "wikitext2-train": DatasetInfo(
        "wikitext2-train",
        "wikitext2/wikitext-2-raw-v1-train.jsonl",
        "WikiText-2 raw train split",
        ("wikitext", "wikitext-2-raw-v1", "train"),
        fallback=(
            "wikitext2/wikitext-2-v1-train.jsonl.gz",
            "WikiText-2 v1 train, the tokenised split: rare words are <unk> "
            "(the raw train split is not available here)",
        ),
    ),
    "c4": DatasetInfo(
        "c4",
        "c4/c4-en-train-first1000.jsonl",
        "C4 en train documents (calibration)",
        ("allenai/c4", None, "train"),
        (("data_files", "en/c4-train.00000-of-01024.json.gz"),),
    ),
    "triviaqa": DatasetInfo(
        "triviaqa",
        "triviaqa/triviaqa_validation_2000.jsonl",
        "TriviaQA validation questions with aliases",
        ("mandarjoshi/trivia_qa", "rc.nocontext", "validation"),
    ),
    "triviaqa-train": DatasetInfo(
        "triviaqa-train",
        "triviaqa/triviaqa_train_8825.jsonl",
        "TriviaQA train-split questions with aliases (LoRA training)",
        ("mandarjoshi/trivia_qa", "rc.nocontext", "train"),
    ),
    "hellaswag": DatasetInfo(
        "hellaswag",
        "hellaswag/hellaswag_val_10042.jsonl.gz",
        "HellaSwag validation (context, 4 endings, label)",
        ("Rowan/hellaswag", None, "validation"),
    ),
    "triviaqa-rc": DatasetInfo(
        "triviaqa-rc",
        "triviaqa/triviaqa_rc_validation.jsonl",
        "TriviaQA validation questions with evidence documents (open book)",
        ("mandarjoshi/trivia_qa", "rc", "validation"),
    ),
    "nq-open": DatasetInfo(
        "nq-open", "nq_open/nq-open-oracle.jsonl.gz", "NQ-open questions with gold passages (open book)", None
    ),
    "wiki": DatasetInfo(
        "wiki",
        "wiki/wiki_articles.txt",
        "Wikipedia articles (LoRA training text)",
        ("wikitext", "wikitext-2-raw-v1", "train"),
    ),
}


def default_data_dir(explicit: str | os.PathLike | None = None) -> Path | None:
    if explicit:
        return Path(explicit).expanduser()
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env).expanduser() if env else None


def read_records(path: Path, limit: int | None = None) -> list[dict]:
    """JSONL (optionally .gz) as dicts; any other file as {"text": line} per non-empty line."""
    opener = gzip.open if path.suffix == ".gz" else open
    records: list[dict] = []
    is_jsonl = ".jsonl" in path.suffixes or ".json" in path.suffixes
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if is_jsonl:
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            else:
                line = line.rstrip("\n")
                if line.strip():
                    records.append({"text": line})
            if limit is not None and len(records) >= limit:
                break
    return records


def _hub_reachable() -> bool:
    return not offline("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") and hub_endpoint_reachable()


def _from_hub(info: DatasetInfo, limit: int | None) -> list[dict]:
    import datasets

    path, name, split = info.hub
    kwargs = dict(info.hub_kwargs)
    if limit:
        split = f"{split}[:{limit}]"
    ds = datasets.load_dataset(path, name, split=split, **kwargs)
    return [dict(r) for r in ds]


def _hub_cache_path(info: DatasetInfo) -> Path | None:
    """The `datasets` cache folder of a hub dataset, if an earlier online run filled it."""
    try:
        from datasets import config
        from datasets.utils.py_utils import camelcase_to_snakecase
    except ImportError:
        return None
    parts = info.hub[0].split("/")
    parts[-1] = camelcase_to_snakecase(parts[-1])
    root = Path(config.HF_DATASETS_CACHE).expanduser() / "___".join(parts)
    return root if any(p.is_dir() for p in root.glob("*/*/*")) else None


def _from_cache(info: DatasetInfo, limit: int | None) -> list[dict]:
    """Load from the local `datasets` cache with the hub switched off, so nothing waits on the network."""
    import huggingface_hub.constants as hub_constants
    from datasets import config

    saved = config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE
    config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        return _from_hub(info, limit)
    finally:
        config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


def load_dataset_records(
    name: str,
    *,
    path: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    limit: int | None = None,
) -> tuple[list[dict], str]:
    """Records of dataset `name` and a label saying where they came from."""
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise DataNotFound(f"{name}: the file {p} given explicitly does not exist")
        return read_records(p, limit), str(p)
    info = DATASETS.get(name)
    if info is None:
        raise DataNotFound(f"unknown dataset {name!r}; known: {', '.join(DATASETS)} (or pass a file path)")
    tried = []
    ddir = default_data_dir(data_dir)
    if ddir is not None:
        p = ddir / info.relpath
        if p.is_file():
            return read_records(p, limit), str(p)
        tried.append(f"data directory: {p} does not exist")
    else:
        tried.append(f"data directory: none given (--data-dir or ${DATA_DIR_ENV}; it would hold {info.relpath})")
    if info.hub is not None:
        if _hub_reachable():
            try:
                return _from_hub(info, limit), f"hub:{info.hub[0]}"
            except Exception as exc:  # noqa: BLE001 - any hub failure becomes a listed attempt
                tried.append(f"Hugging Face hub: {info.hub[0]} failed ({exc.__class__.__name__}: {exc})")
        else:
            cached = _hub_cache_path(info)
            if cached is not None:
                try:
                    return _from_cache(info, limit), f"hf-cache:{info.hub[0]}"
                except Exception as exc:  # noqa: BLE001 - a broken cache becomes a listed attempt
                    tried.append(f"Hugging Face cache: {cached} could not be read ({exc.__class__.__name__}: {exc})")
            else:
                tried.append(
                    f"Hugging Face hub: {info.hub[0]} cannot be reached (offline) and is not in the "
                    "local datasets cache"
                )
    else:
        tried.append("Hugging Face hub: this dataset has no hub source")
    if ddir is not None and info.fallback is not None:
        p = ddir / info.fallback[0]
        if p.is_file():
            return read_records(p, limit), str(p)
        tried.append(f"data directory: {p} does not exist either")
    raise DataNotFound(
        f"{info.description} ({name}) not found. Tried: explicit file path: none given; "
        + "; ".join(tried)
        + f". Pass a file, or point --data-dir / ${DATA_DIR_ENV} at a folder holding {info.relpath}."
    )


def source_note(name: str, source: str) -> str:
    """What a user should know about where dataset `name` came from (empty when nothing)."""
    info = DATASETS.get(name)
    if info is not None and info.fallback is not None and source.endswith(info.fallback[0]):
        return info.fallback[1]
    return ""


def load_texts(name: str, **kw) -> tuple[list[str], str]:
    records, where = load_dataset_records(name, **kw)
    return [r.get("text", "") for r in records], where
