"""Where evaluation, calibration and training text comes from.

Resolution order, for every dataset: an explicit file path, then a data directory
(`--data-dir` or `FRANKENLAB_DATA_DIR`, laid out like the shared data folder), then the Hugging
Face hub, or its local `datasets` cache when the hub cannot be reached. When none works the error
names all three and what file is expected where. Local files are read directly (JSONL, JSONL.gz,
or plain text one record per line); the hub path goes through `datasets.load_dataset`.

Every row is checked against the fields and types its dataset needs (`evals.data_checks.ROW_CHECKS`: a `text`
string, a TriviaQA question with a list of aliases, a HellaSwag context with its endings and
label...): a bad row, a file that is not UTF-8 text or a broken .gz is a `DataError` naming the
file and line, never a wrong number or a traceback later. `check_dataset` does that for a whole
file before any weights load (the runner's and `frankenlab eval`'s preflight).

`data_label(name, source)` says whether a local file is the standard data its name stands for:
"" when its sha256 is the one in the shared data folder's SHA256SUMS (`evals.data_checks.KNOWN_SHA256`,
kept in the code so that another folder's own SHA256SUMS cannot vouch for different files), else
`@sha256:<first 8 hex digits>`, which protocol labels carry so a number on other data is never
mistaken for the standard one. Both checks are cached per (path, size, mtime).

A data folder or file the user may not read (PermissionError, or any other OSError while reading)
is a `DataError` too, raised here where the file is touched, naming the path and what to do: every
command that reads data (`eval`, `run`, `sweep`, the lab) reports it in one line. `check_dataset`
returns how many rows a local file holds, so callers can refuse sizes the data cannot give
(`evals.suite.check_data`, `pipeline.calibration.check_calibration`) before any weights load.
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

from frankenlab.evals.data_checks import (
    DATA_DIR_ENV,
    KNOWN_SHA256,
    file_key,
    file_sha256,
    is_data_file,
    row_problem,
    unreadable_data,
)
from frankenlab.evals.errors import DataError
from frankenlab.evals.hub import hub_endpoint_reachable, offline


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
    rows: str = "text"  # which ROW_CHECKS entry every row must pass


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
        rows="triviaqa",
    ),
    "triviaqa-train": DatasetInfo(
        "triviaqa-train",
        "triviaqa/triviaqa_train_8825.jsonl",
        "TriviaQA train-split questions with aliases (LoRA training)",
        ("mandarjoshi/trivia_qa", "rc.nocontext", "train"),
        rows="triviaqa",
    ),
    "hellaswag": DatasetInfo(
        "hellaswag",
        "hellaswag/hellaswag_val_10042.jsonl.gz",
        "HellaSwag validation (context, 4 endings, label)",
        ("Rowan/hellaswag", None, "validation"),
        rows="hellaswag",
    ),
    "triviaqa-rc": DatasetInfo(
        "triviaqa-rc",
        "triviaqa/triviaqa_rc_validation.jsonl",
        "TriviaQA validation questions with evidence documents (open book)",
        ("mandarjoshi/trivia_qa", "rc", "validation"),
        rows="triviaqa",
    ),
    "nq-open": DatasetInfo(
        "nq-open",
        "nq_open/nq-open-oracle.jsonl.gz",
        "NQ-open questions with gold passages (open book)",
        None,
        rows="nq-open",
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


def read_records(path: Path, limit: int | None = None, rows: str | None = None) -> list[dict]:
    """JSONL (optionally .gz) as dicts; any other file as {"text": line} per non-empty line.

    Every JSONL row must be an object and pass `ROW_CHECKS[rows]`; a bad row, undecodable text or a
    broken .gz raises `DataError` naming the file and the line."""
    opener = gzip.open if path.suffix == ".gz" else open
    records: list[dict] = []
    is_jsonl = ".jsonl" in path.suffixes or ".json" in path.suffixes
    lineno = 0
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if is_jsonl:
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
                    problem = row_problem(rows, rec)
                    if problem:
                        raise DataError(f"{path}:{lineno}: the row {problem}")
                    records.append(rec)
                else:
                    line = line.rstrip("\n")
                    if line.strip():
                        records.append({"text": line})
                if limit is not None and len(records) >= limit:
                    break
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path}:{lineno + 1}: not UTF-8 text ({exc.reason} at byte {exc.start} of the line's block): "
            "is this the right file?"
        ) from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: not a readable .gz file ({exc.__class__.__name__}: {exc}); is it complete?") from None
    except OSError as exc:  # permissions, an I/O error: one line naming the file
        raise unreadable_data(path, exc) from None
    return records


def _check_hub_rows(records: list[dict], rows: str | None, where: str) -> list[dict]:
    for i, rec in enumerate(records):
        problem = row_problem(rows, rec)
        if problem:
            raise DataError(f"{where} row {i}: the row {problem}")
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
    rows: str | None = None,
) -> tuple[list[dict], str]:
    """Records of dataset `name` and a label saying where they came from.

    Rows are checked against `ROW_CHECKS[rows]` (default: the dataset's own kind; a "file" of
    unknown kind is only checked to hold JSON objects)."""
    info = DATASETS.get(name)
    rows = rows or (info.rows if info is not None else None)
    if path:
        p = Path(path).expanduser()
        if not is_data_file(p):
            raise DataNotFound(f"{name}: the file {p} given explicitly does not exist")
        return read_records(p, limit, rows), str(p)
    if info is None:
        raise DataNotFound(f"unknown dataset {name!r}; known: {', '.join(DATASETS)} (or pass a file path)")
    tried = []
    ddir = default_data_dir(data_dir)
    if ddir is not None:
        p = ddir / info.relpath
        if is_data_file(p):
            return read_records(p, limit, rows), str(p)
        tried.append(f"data directory: {p} does not exist")
    else:
        tried.append(f"data directory: none given (--data-dir or ${DATA_DIR_ENV}; it would hold {info.relpath})")
    if info.hub is not None:
        if _hub_reachable():
            try:
                records = _from_hub(info, limit)
            except Exception as exc:  # noqa: BLE001 - any hub failure becomes a listed attempt
                tried.append(f"Hugging Face hub: {info.hub[0]} failed ({exc.__class__.__name__}: {exc})")
            else:
                return _check_hub_rows(records, rows, f"hub:{info.hub[0]}"), f"hub:{info.hub[0]}"
        else:
            cached = _hub_cache_path(info)
            if cached is not None:
                try:
                    records = _from_cache(info, limit)
                except Exception as exc:  # noqa: BLE001 - a broken cache becomes a listed attempt
                    tried.append(f"Hugging Face cache: {cached} could not be read ({exc.__class__.__name__}: {exc})")
                else:
                    return _check_hub_rows(records, rows, f"hf-cache:{info.hub[0]}"), f"hf-cache:{info.hub[0]}"
            else:
                tried.append(
                    f"Hugging Face hub: {info.hub[0]} cannot be reached (offline) and is not in the "
                    "local datasets cache"
                )
    else:
        tried.append("Hugging Face hub: this dataset has no hub source")
    if ddir is not None and info.fallback is not None:
        p = ddir / info.fallback[0]
        if is_data_file(p):
            return read_records(p, limit, rows), str(p)
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
    """The `text` of every row (each row checked to hold a `text` string)."""
    records, where = load_dataset_records(name, rows="text", **kw)
    return [r["text"] for r in records], where


# -- whole-file checks and labels, cached per (path, size, mtime) (`evals.data_checks` hashes) -----------
_CHECKED: dict[tuple, int] = {}  # (path, size, mtime, row kind) -> rows


def data_label(name: str, source: str) -> str:
    """ "" when `source` is the standard data of dataset `name` (the hub, or a local file whose sha256
    is the shared data folder's), else "@sha256:<8 hex digits>" for protocol labels to carry."""
    info = DATASETS.get(name)
    p = Path(source)
    if info is None or source.startswith(("hub:", "hf-cache:")) or not is_data_file(p):
        return ""
    digest = file_sha256(p)
    return "" if digest == KNOWN_SHA256.get(info.relpath) else f"@sha256:{digest[:8]}"


def local_file(name: str, *, path=None, data_dir=None) -> Path | None:
    """The local file dataset `name` would be read from (an explicit path, or the data directory)."""
    if path:
        return Path(path).expanduser()
    info = DATASETS.get(name)
    ddir = default_data_dir(data_dir)
    if info is None or ddir is None:
        return None
    p = ddir / info.relpath
    return p if is_data_file(p) else None


def check_dataset(name: str, *, path=None, data_dir=None, rows: str | None = None) -> int | None:
    """Fail now (DataNotFound, DataError naming file and line, or the path a user may not read) if
    dataset `name` cannot be used: a local file is read and every row checked (once per path, size
    and mtime); a hub source is only looked up (its first row).

    Returns how many rows the local file holds (None for a hub source: not counted)."""
    p = local_file(name, path=path, data_dir=data_dir)
    if p is None or not is_data_file(p):
        load_dataset_records(name, path=path, data_dir=data_dir, limit=1, rows=rows)
        return None
    info = DATASETS.get(name)
    kind = rows or (info.rows if info is not None else None)
    key = (*file_key(p), kind)
    if key not in _CHECKED:
        _CHECKED[key] = len(read_records(p, None, kind))
    return _CHECKED[key]
