"""HellaSwag on the tiny LLaMA: lm-evaluation-harness' acc and acc_norm from hand-computed log-likelihoods."""

import gzip
import json

import pytest
import torch

from frankenlab.evals import data_checks
from frankenlab.evals.hellaswag import hellaswag, load_items, parse, pick, preprocess
from frankenlab.evals.loglik import continuation_logprobs, encode_pair

ROWS = [
    {
        "idx": 0,
        "activity_label": "Roof shingle removal",
        "ctx": "A man is sitting on a roof. he",
        "endings": [
            "is using wrap to wrap a pair of skis.",
            "is ripping level tiles off.",
            "is holding a rubik's cube.",
            "starts pulling up roofing on a roof.",
        ],
        "label": 3,
    },
    {
        "idx": 1,
        "activity_label": "Clean and jerk",
        "ctx": "A lady walks to a barbell. She bends down and grabs the pole.",
        "endings": [
            "swings.",
            "pulls the barbell forward.",
            "pulls a rope attached to the barbell [title] and more.",
            "stands and lifts the weight over her head.",
        ],
        "label": 3,
    },
    {
        "idx": 2,
        "activity_label": "Cooking",
        "ctx": "The river Thames flows through London. Paris",
        "endings": ["is the capital of France.", "jumps over the lazy dog.", "wrote Hamlet.", "0 1 2 3"],
        "label": 0,
    },
]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture
def hs_file(tmp_path):
    p = tmp_path / "hs.jsonl.gz"
    with gzip.open(p, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in ROWS)
    return p


def hand_loglik(model, tokenizer, context: str, continuation: str) -> float:
    """One unpadded forward over context + continuation; sum of the continuation tokens' log-probabilities."""
    ctx = tokenizer(context, add_special_tokens=False).input_ids
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    cont = whole[len(ctx) :]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].double(), -1)
    return sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))


def test_preprocess_and_query_as_the_harness_builds_them():
    assert preprocess("  Wash hands [title] Use soap. [step] Rinse. ") == "Wash hands. Use soap. Rinse."
    item = parse(ROWS[1], 1)
    assert item.query == "Clean and jerk: A lady walks to a barbell. She bends down and grabs the pole."
    assert item.endings[2] == "pulls a rope attached to the barbell. and more."
    with pytest.raises(ValueError, match="needs ctx, endings and label"):
        parse({"ctx": "x"}, 4)


def test_pick_is_argmax_of_loglik_and_of_loglik_per_character():
    endings = ("ab", "abcdefghij", "abcd", "a" * 20)
    scores = [-10.0, -12.0, -30.0, -11.0]
    # acc: the highest log-likelihood (-10.0, ending 0); acc_norm: highest per character:
    # -10/2 = -5, -12/10 = -1.2, -30/4 = -7.5, -11/20 = -0.55 -> ending 3
    assert pick(scores, endings) == (0, 3)
    assert pick([-1.0, -1.0, -2.0, -3.0], ("a", "b", "c", "d")) == (0, 0)  # ties: the first, as numpy's argmax


def test_encode_pair_moves_trailing_space_to_the_continuation(tiny):
    tok = tiny.tokenizer
    ctx, cont = encode_pair(tok, "Paris is ", "the capital")
    assert ctx == tok("Paris is", add_special_tokens=False).input_ids
    assert ctx + cont == tok("Paris is the capital", add_special_tokens=False).input_ids


def test_batched_logliks_equal_one_forward_per_pair(tiny):
    pairs = [(parse(r, i).query, " " + e) for i, r in enumerate(ROWS) for e in parse(r, i).endings]
    got = continuation_logprobs(tiny.model, tiny.tokenizer, pairs, batch_size=5)  # left padded, sorted, batched
    want = [hand_loglik(tiny.model, tiny.tokenizer, c, k) for c, k in pairs]
    assert got == pytest.approx(want, rel=1e-4, abs=1e-3)


def test_hellaswag_acc_and_acc_norm_follow_the_harness(tiny, hs_file):
    r = hellaswag(tiny.model, tiny.tokenizer, 3, path=hs_file, batch_size=4)
    assert (r.n, r.source) == (3, str(hs_file))
    # a hand-made file is not the validation split: the label says so (issue 25, case 15)
    assert r.protocol == "hellaswag-validation:3@sha256:" + data_checks.file_sha256(hs_file)[:8]
    correct = correct_norm = 0
    for rec, row in zip(r.records, ROWS, strict=False):
        item = parse(row, row["idx"])
        lls = [hand_loglik(tiny.model, tiny.tokenizer, item.query, " " + e) for e in item.endings]
        assert rec["loglik"] == pytest.approx(lls, abs=2e-3)
        # lm-evaluation-harness: acc = argmax(lls), acc_norm = argmax(lls / len(choice)) (characters)
        raw = max(range(4), key=lambda i: lls[i])
        norm = max(range(4), key=lambda i: lls[i] / len(item.endings[i]))
        assert (rec["pred"], rec["pred_norm"]) == (raw, norm)
        correct += raw == row["label"]
        correct_norm += norm == row["label"]
    assert (r.acc, r.acc_norm) == (correct / 3, correct_norm / 3)
    acc, acc_norm = r.metrics()
    assert (acc["name"], acc["value"], acc["n"], acc["correct"]) == ("hellaswag_acc", r.acc, 3, correct)
    assert acc_norm["name"] == "hellaswag_acc_norm" and acc_norm["value"] == r.acc_norm
    assert acc["ci95"][0] <= acc["value"] <= acc["ci95"][1]


def test_a_batch_that_runs_out_of_memory_is_scored_in_halves_with_the_same_numbers(tiny, hs_file, monkeypatch):
    from frankenlab.evals import devices

    want = hellaswag(tiny.model, tiny.tokenizer, 3, path=hs_file, batch_size=8)
    real = type(tiny.model).forward
    rows = []

    def small_memory(self, *a, input_ids=None, **k):
        rows.append(input_ids.shape[0])
        if len(rows) == 1:  # the first batch does not fit
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, *a, input_ids=input_ids, **k)

    monkeypatch.setattr(type(tiny.model), "forward", small_memory)
    monkeypatch.setattr(devices, "retry_smaller_batches", lambda device: True)  # as on a GPU
    got = hellaswag(tiny.model, tiny.tokenizer, 3, path=hs_file, batch_size=8)
    assert rows[:3] == [8, 4, 4] and max(rows[1:]) == 4, "halved after the OOM, later batches at the size that fit"
    for g, w in zip(got.records, want.records, strict=True):
        assert g["loglik"] == pytest.approx(w["loglik"], abs=1e-3)
    assert [(r["pred"], r["pred_norm"]) for r in got.records] == [(r["pred"], r["pred_norm"]) for r in want.records]
    assert (got.acc, got.acc_norm) == (want.acc, want.acc_norm)

    def never_fits(self, *a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(type(tiny.model), "forward", never_fits)
    with pytest.raises(torch.OutOfMemoryError):  # one row that does not fit is the caller's to report
        hellaswag(tiny.model, tiny.tokenizer, 1, path=hs_file, batch_size=4)


def test_items_are_a_seeded_sample_of_the_validation_file(data_dir):
    items, source, total = load_items(5, data_dir=data_dir)
    assert total == 10042 and source.endswith("hellaswag_val_10042.jsonl.gz")
    assert items == load_items(5, data_dir=data_dir)[0] and items != load_items(5, seed=1, data_dir=data_dir)[0]
    assert all(len(it.endings) == 4 and 0 <= it.label < 4 for it in items)
    with pytest.raises(ValueError, match="ask for 1 to 10042"):
        load_items(20000, data_dir=data_dir)


def test_eval_command_prints_acc_and_acc_norm(tiny_model_dir, data_dir, tmp_path, capsys):
    from frankenlab.tui.cli.main import main

    out = tmp_path / "hs.json"
    assert (
        main(
            [
                "--device",
                "cpu",
                "eval",
                "--model",
                str(tiny_model_dir),
                "--hellaswag",
                "4",
                "--json",
                str(out),
                "--data-dir",
                str(data_dir),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "hellaswag_acc " in printed.replace("=", " ") and "hellaswag_acc_norm" in printed
    res = json.loads(out.read_text())
    assert [m["name"] for m in res["metrics"]] == ["hellaswag_acc", "hellaswag_acc_norm"]
    assert (
        res["metrics"][0]["protocol"] == "hellaswag-validation:4" and len(res["details"]["hellaswag"]["records"]) == 4
    )
    # the same items under a layer plan (layer 1 skipped, layer 2 twice) score differently, and bad plans are one line
    assert (
        main(
            [
                "--device",
                "cpu",
                "eval",
                "--model",
                str(tiny_model_dir),
                "--hellaswag",
                "4",
                "--plan",
                "0,2,2,3-7",
                "--json",
                str(tmp_path / "plan.json"),
                "--data-dir",
                str(data_dir),
            ]
        )
        == 0
    )
    planned = json.loads((tmp_path / "plan.json").read_text())
    assert planned["plan"] == "0,2,2,3-7"
    assert (
        planned["details"]["hellaswag"]["records"][0]["loglik"] != res["details"]["hellaswag"]["records"][0]["loglik"]
    )
    capsys.readouterr()
    assert main(["--device", "cpu", "eval", "--model", str(tiny_model_dir), "--hellaswag", "4", "--plan", "0,99"]) == 2
    assert "plan error" in capsys.readouterr().out
