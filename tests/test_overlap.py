"""Never train on what is evaluated: the overlap guard, the train splits LoRA uses, and the run refusing early."""

import gzip
import json

import pytest
import torch

from frankenlab.evals.config import from_dict
from frankenlab.evals.data import load_dataset_records
from frankenlab.evals.errors import RecipeError
from frankenlab.evals.overlap import evaluated_sets, find_overlaps, words
from frankenlab.evals.qa import load_items
from frankenlab.evals.suite import EvalConfig
from frankenlab.pipeline import events as ev
from frankenlab.pipeline.recipe import Recipe
from frankenlab.pipeline.stages import lora
from frankenlab.sessions import record_run

QA200 = EvalConfig(perplexity=(), triviaqa_closed=200, samples=False)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_named_training_sets_are_train_splits(data_dir):
    records, source, note = lora.training_records(lora.Config(dataset="triviaqa"), data_dir)
    assert source.endswith("triviaqa/triviaqa_train_8825.jsonl") and len(records) == 8825 and note == ""
    assert lora.record_text(records[0]).startswith("Question: The VS-300 was a type of what?\nAnswer: Helicopter")
    records, source, note = lora.training_records(lora.Config(dataset="wikitext2"), data_dir)
    assert source.endswith("wikitext2/wikitext-2-v1-train.jsonl.gz") and len(records) == 36718
    assert "<unk>" in note and "v1" in note  # the tokenised split: the report and log say so
    assert lora.training_records(lora.Config(dataset="wiki"), data_dir)[1].endswith("wiki/wiki_articles.txt")
    with pytest.raises(RecipeError, match="unknown training dataset 'wikitext2-test'"):
        lora.Config(dataset="wikitext2-test")


def test_default_triviaqa_lora_passes_on_200_evaluated_questions(data_dir):
    assert lora.preflight(lora.Config(dataset="triviaqa"), QA200, data_dir) == []


def test_evaluated_questions_in_the_training_file_are_refused(tmp_path, data_dir):
    items, _, _ = load_items("closed", 200, data_dir=data_dir)
    train = write_jsonl(
        tmp_path / "my_train.jsonl",
        [{"question": it.question.upper() + "  ", "answer": it.aliases[0]} for it in items[5:8]]
        + [{"question": "Which fox is quick and brown?", "answer": "that one"}],
    )
    with pytest.raises(RecipeError) as e:
        lora.preflight(lora.Config(dataset=str(train)), QA200, data_dir)
    msg = str(e.value)
    assert msg.startswith(
        "3 of the 200 evaluated closed-book questions (triviaqa-closed-validation:200:first-line) "
        f"are in the LoRA training file {train}"
    )
    assert "use the train split" in msg and "\n" not in msg


def test_plain_text_holding_questions_is_refused_and_near_duplicates_warned(tmp_path, data_dir):
    items, _, _ = load_items("closed", 200, data_dir=data_dir)
    long_q = next(it for it in items if len(words(it.question)) >= 8)
    text = tmp_path / "notes.txt"
    text.write_text(f"Some notes.\nQuestion: {long_q.question}\nAnswer: {long_q.aliases[0]}\n")
    with pytest.raises(RecipeError, match="1 of the 200 evaluated closed-book questions"):
        lora.preflight(lora.Config(dataset=str(text)), QA200, data_dir)
    # the same question inside a longer training question: its answer may be learnt, a warning
    near = write_jsonl(tmp_path / "near.jsonl", [{"question": f"Born long ago, {long_q.question}", "answer": "x"}])
    warnings = lora.preflight(lora.Config(dataset=str(near)), QA200, data_dir)
    assert len(warnings) == 1 and "appear inside longer questions" in warnings[0]


def test_training_text_holding_evaluated_wikitext_rows_is_refused(tmp_path, data_dir):
    cfg = EvalConfig(perplexity=("wikitext2-rows-512",), ppl_limit=40, samples=False)
    (sets,) = evaluated_sets(cfg, data_dir)
    assert len(sets.texts) == 40  # the first 40 non-empty rows, as the protocol scores them
    long_row = next(t for t in sets.texts if len(t.split()) > 40)
    mine = tmp_path / "articles.txt"
    mine.write_text("An unrelated line of text about foxes and dogs.\n" + long_row.replace("\n", " ") + " Extra.\n")
    with pytest.raises(RecipeError, match=r"1 of the 40 evaluated rows of wikitext2-rows-512:first40"):
        lora.preflight(lora.Config(dataset=str(mine)), cfg, data_dir)
    # rows past the evaluated ones are not evaluated: training on them is allowed
    later = next(
        t for t in load_dataset_records("wikitext2", data_dir=data_dir)[0][2000:] if len(t["text"].split()) > 40
    )
    mine.write_text(later["text"])
    assert lora.preflight(lora.Config(dataset=str(mine)), cfg, data_dir) == []


def test_training_on_the_evaluated_file_itself_is_refused(data_dir):
    val = str(data_dir / "triviaqa/triviaqa_validation_2000.jsonl")
    with pytest.raises(RecipeError, match="is the file the evaluation reads"):
        lora.preflight(lora.Config(dataset=val), QA200, data_dir)
    with pytest.raises(RecipeError, match="is the file the evaluation reads"):
        lora.preflight(
            lora.Config(dataset=str(data_dir / "wikitext2/wikitext-2-raw-v1-test.jsonl")), EvalConfig(), data_dir
        )
    # nothing evaluated, nothing to compare
    assert lora.preflight(lora.Config(dataset=val), EvalConfig(after="none"), data_dir) == []


def test_overlap_needs_most_of_a_row_and_ignores_short_rows():
    from frankenlab.evals.overlap import EvaluatedSet

    row = "the quick brown fox jumps over the lazy dog while paris stays the capital of france for ever"
    ev = EvaluatedSet("rows", "rows", "x", [row, "= Heading ="])
    assert find_overlaps([row.upper() + " and more"], [], [ev])[0].found == [0]
    half = " ".join(row.split()[:9])
    assert find_overlaps([half], [], [ev]) == []  # half a row is not the row
    assert find_overlaps(["= Heading ="], [], [ev]) == []  # headings are everywhere


def test_run_is_refused_before_any_weights_load(tiny_model_dir, tmp_path, data_dir, monkeypatch):
    import frankenlab.pipeline.runner as runner

    items, _, _ = load_items("closed", 50, data_dir=data_dir)
    train = write_jsonl(
        tmp_path / "leaky.jsonl", [{"question": it.question, "answer": it.aliases[0]} for it in items[:3]]
    )
    recipe = Recipe.loads(f"""
name = "leaky"
model = "{tiny_model_dir}"
[evaluation]
perplexity = []
triviaqa_closed = 50
samples = false
[[stages]]
kind = "lora"
dataset = "{train}"
steps = 1
""")

    def no_loading(*a, **k):
        raise AssertionError("weights were loaded before the overlap check")

    monkeypatch.setattr(runner, "load_model", no_loading)
    seen = []
    session = record_run(recipe, tmp_path / "run", listener=seen.append, data_dir=data_dir)
    assert session.status == "failed"
    failed = next(e for e in seen if isinstance(e, ev.RunFailed))
    assert failed.message.startswith("stage 1 (lora): 3 of the 50 evaluated closed-book questions")
    assert str(train) in failed.message
    assert not any(isinstance(e, ev.ModelReady) for e in seen)


def test_session_records_the_training_file_and_the_match_protocol(tiny_model_dir, tmp_path, data_dir):
    recipe = Recipe.loads(f"""
name = "tqa-lora"
model = "{tiny_model_dir}"
[evaluation]
perplexity = []
triviaqa_closed = 4
qa_batch_size = 4
match = "thesis"
samples = false
after = "last"
[[stages]]
kind = "lora"
dataset = "triviaqa"
steps = 2
batch_size = 2
seq_len = 32
""")
    torch.manual_seed(0)
    session = record_run(recipe, tmp_path / "run", data_dir=data_dir, save_models=False)
    assert session.status == "done", session.events[-3:]
    report = session.stages[1].report
    assert report["dataset"].endswith("triviaqa/triviaqa_train_8825.jsonl") and report["dataset_name"] == "triviaqa"
    (qa,) = session.stages[1].metrics
    assert qa["match"] == "thesis" and qa["protocol"] == "triviaqa-closed-validation:4:thesis" and qa["n"] == 4
    assert session.recipe["evaluation"]["match"] == "thesis"


def test_lora_config_from_a_recipe_refuses_unknown_sets():
    with pytest.raises(RecipeError, match="use wikitext2, triviaqa, wiki"):
        from_dict(lora.Config, {"dataset": "hellaswag"}, "stage 1 (lora)")


def test_wikitext2_train_prefers_the_raw_split_where_it_exists(tmp_path, monkeypatch):
    import frankenlab.evals.data as evdata

    monkeypatch.setattr(evdata, "_hub_reachable", lambda: False)
    monkeypatch.setattr(evdata, "_hub_cache_path", lambda info: None)
    (tmp_path / "wikitext2").mkdir()
    with gzip.open(tmp_path / "wikitext2/wikitext-2-v1-train.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": " the <unk> text \n"}) + "\n")
    records, source = evdata.load_dataset_records("wikitext2-train", data_dir=tmp_path)
    assert source.endswith("wikitext-2-v1-train.jsonl.gz") and evdata.source_note("wikitext2-train", source)
    write_jsonl(tmp_path / "wikitext2/wikitext-2-raw-v1-train.jsonl", [{"text": " raw text \n"}])
    records, source = evdata.load_dataset_records("wikitext2-train", data_dir=tmp_path)
    assert source.endswith("wikitext-2-raw-v1-train.jsonl") and evdata.source_note("wikitext2-train", source) == ""


def test_runner_preflight_passes_near_duplicate_warnings_on(tmp_path, data_dir):
    from frankenlab.pipeline.preflight import preflight

    items, _, _ = load_items("closed", 200, data_dir=data_dir)
    long_q = next(it for it in items if len(words(it.question)) >= 8)
    near = write_jsonl(tmp_path / "near.jsonl", [{"question": f"As everyone knows, {long_q.question}", "answer": "x"}])
    recipe = Recipe.loads(f"""
[evaluation]
perplexity = []
triviaqa_closed = 200
[[stages]]
kind = "lora"
dataset = "{near}"
""")
    (warning,) = preflight(recipe, data_dir)
    assert warning.startswith("stage 1 (lora): LoRA: 1 of the 200 evaluated closed-book questions")
