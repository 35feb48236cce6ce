"""What makes a data file usable, apart from where it comes from (`evals.data`): the checks every
row of a dataset must pass (`ROW_CHECKS`, `row_problem`: a bad row is a `DataError` naming what the
row must hold), the `DataError` for a file or folder the user may not read, and the files' sha256
(`file_sha256`, cached per path, size and mtime) with the shared data folder's known checksums
(`KNOWN_SHA256`) that `evals.data.data_label` compares against. It imports nothing of `evals.data`,
so the loaders there can use it without a cycle.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

from frankenlab.evals.errors import DataError

DATA_DIR_ENV = "FRANKENLAB_DATA_DIR"


def unreadable_data(path: str | os.PathLike, exc: OSError) -> DataError:
    """A `DataError` for a data file or folder that exists but cannot be read: which path, why, what to do."""
    where = exc.filename if isinstance(exc.filename, str) and exc.filename else str(path)
    if isinstance(exc, PermissionError):
        fix = "check the permissions of the file and its folders (chmod, or run as their owner)"
    else:
        fix = "check the file and the disk it is on, or point --data-dir / $" + DATA_DIR_ENV + " at another copy"
    return DataError(f"cannot read {where} ({exc.strerror or exc}): {fix}")


def is_data_file(path: Path) -> bool:
    """`path.is_file()`, except that a file the user may not even look at (a folder without read or
    search permission on the way) is a `DataError`, not a PermissionError traceback."""
    try:
        return path.is_file()
    except OSError as exc:
        raise unreadable_data(path, exc) from None


# -- row checks --------------------------------------------------------------------------------------
def _show(value) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_str_list(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _fields(rec: dict) -> str:
    return ", ".join(sorted(map(str, rec))) or "none"


def _text_row(rec: dict) -> str | None:
    if "text" not in rec:
        return f'has no "text" field (its fields: {_fields(rec)})'
    if not isinstance(rec["text"], str):
        return f'"text" must be a string, got {_show(rec["text"])}'
    return None


def _triviaqa_row(rec: dict) -> str | None:
    q, ctx = rec.get("question"), rec.get("context")
    if q is not None and not isinstance(q, str):
        return f'"question" must be a string, got {_show(q)}'
    if not q:
        if ctx is None:
            return f'has no "question" (or "context") field (its fields: {_fields(rec)})'
        if not isinstance(ctx, str):
            return f'"context" must be a string, got {_show(ctx)}'
    ans, aliases = rec.get("answer"), rec.get("aliases")
    if isinstance(ans, dict):  # hub rows: answer = {"value", "aliases", ...}
        aliases = aliases if aliases is not None else ans.get("aliases")
        ans = ans.get("value")
    if ans is not None and not isinstance(ans, str):
        return f'"answer" must be a string, got {_show(ans)}'
    if aliases is not None and not _is_str_list(aliases):
        return f'"aliases" must be a list of strings, got {_show(aliases)}'
    if not ans and not aliases:
        return 'has no "answer" and no "aliases"'
    return None


def _hellaswag_row(rec: dict) -> str | None:
    ctx = rec.get("ctx")
    if ctx is None:
        if not (isinstance(rec.get("ctx_a"), str) and isinstance(rec.get("ctx_b"), str)):
            return f'needs a "ctx" string (or "ctx_a" and "ctx_b"); its fields: {_fields(rec)}'
    elif not isinstance(ctx, str):
        return f'"ctx" must be a string, got {_show(ctx)}'
    if not isinstance(rec.get("activity_label", ""), str):
        return f'"activity_label" must be a string, got {_show(rec["activity_label"])}'
    endings = rec.get("endings")
    if not _is_str_list(endings) or len(endings) < 2:
        return f'"endings" must be a list of at least 2 strings, got {_show(endings)}'
    label = rec.get("label")
    if isinstance(label, str) and label.strip().isdigit():
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(endings):
        return f'"label" must be the index of the right ending (0 to {len(endings) - 1}), got {_show(label)}'
    return None


def _nq_open_row(rec: dict) -> str | None:
    if not isinstance(rec.get("question"), str) or not rec["question"]:
        return f'"question" must be a non-empty string, got {_show(rec.get("question"))}'
    answers = rec.get("answers")
    if not _is_str_list(answers) or not answers:
        return f'"answers" must be a non-empty list of strings, got {_show(answers)}'
    ctxs = rec.get("ctxs")
    if not isinstance(ctxs, list) or not ctxs or not isinstance(ctxs[0], dict):
        return '"ctxs" must be a list of passages ({"text": ...}), the gold one first'
    if not isinstance(ctxs[0].get("text"), str):
        return f'"ctxs"[0]["text"] must be a string, got {_show(ctxs[0].get("text"))}'
    return None


# name -> (check, what a row must hold, for the message)
ROW_CHECKS: dict[str, tuple[Callable[[dict], str | None], str]] = {
    "text": (_text_row, 'each row must be a JSON object with a "text" string'),
    "triviaqa": (
        _triviaqa_row,
        'each row needs a "question" (or "context" as "Question: ...\\nAnswer:") and an "answer" string '
        'or an "aliases" list of strings',
    ),
    "hellaswag": (_hellaswag_row, 'each row needs "ctx", "endings" (a list of strings) and "label"'),
    "nq-open": (_nq_open_row, 'each row needs "question", "answers" (a list of strings) and "ctxs"'),
}


def row_problem(rows: str | None, rec) -> str | None:
    """What is wrong with one row for the dataset kind `rows` (None: only that it is an object)."""
    if not isinstance(rec, dict):
        return f"is not a JSON object but {_show(rec)}"
    if rows is None:
        return None
    check, expect = ROW_CHECKS[rows]
    problem = check(rec)
    return f"{problem}; {expect}" if problem else None


# The shared data folder's SHA256SUMS: the files the standard protocol names stand for.
KNOWN_SHA256 = {
    "c4/c4-en-train-first1000.jsonl": "cdd5b754119131d2934e3e799a059a9d64f53a6aac9e7e2ef79b43120bb01a32",
    "nq_open/nq-open-oracle.jsonl.gz": "6a7f72b846f663a133ef952244e5a4e43f06bcf190afe34e8fbe687ce0d1653e",
    "triviaqa/triviaqa_validation_2000.jsonl": "de2c9835f841dcd4c060e7adaa374b3fbdee4def84075b2f70af19a84d29c0fe",
    "wiki/wiki_articles.txt": "69c0c4d067a95a1a65022f2ae1efff9654b1953b09f206f8832620ebbffa0daf",
    "wikitext2/wikitext-2-raw-v1-test.jsonl": "9bce95eb77e24108988cfa34aadf318bd9a9d9135231c42447d5a3f712f59f1c",
    "triviaqa/triviaqa_train_8825.jsonl": "fbeea24751d5bbc2b65e606c171595e7fe9f828aec2b35ac30487d03c73e04a6",
    "wikitext2/wikitext-2-v1-train.jsonl.gz": "b46b2f436b758a08f0e8fc56c7197cf1c6c9b23289ab8887ec3de7f4c4b3daf1",
    "hellaswag/hellaswag_val_10042.jsonl.gz": "6b7e264a7c88f876910a02e3c950e6e5bd5b2136addaf2a3220622f98e37a823",
}
_SHA_CACHE: dict[tuple, str] = {}


def file_key(path: Path) -> tuple:
    try:
        st = path.stat()
        return (str(path.resolve()), st.st_size, st.st_mtime_ns)
    except OSError as exc:
        raise unreadable_data(path, exc) from None


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError as exc:
        raise unreadable_data(path, exc) from None
    return h.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """The file's sha256, computed once per (path, size, mtime)."""
    p = Path(path)
    key = file_key(p)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = _sha256_file(p)
    return _SHA_CACHE[key]
