"""Distillation in the LoRA stage (pipeline/distill.py): the teacher is the run's source model, its
top-k logits are cached once and reused, and kd / ce+kd score what they should."""

import pytest

from frankenlab.evals.errors import RecipeError
from frankenlab.pipeline import distill
from frankenlab.pipeline.stages import lora
from tests.test_lora import ctx_for, prune_2of4, quick, text_file  # noqa: F401 - text_file is a fixture

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("FRANKENLAB_CACHE", str(folder))
    return folder


def source(tiny_model_dir) -> dict:
    return {"source": str(tiny_model_dir), "device": "cpu", "dtype": "float32"}


def counting_loads(monkeypatch) -> list:
    calls, real = [], distill.load_model
    monkeypatch.setattr(distill, "load_model", lambda *a, **k: calls.append(a) or real(*a, **k))
    return calls


def first_kd(tiny, tmp_path, text_file, tiny_model_dir, **kw):  # noqa: F811
    ctx = ctx_for(tiny, tmp_path, source_model=source(tiny_model_dir))
    return lora.run(tiny.model, ctx, quick(text_file, steps=1, loss="kd", **kw)).report


@pytest.mark.parametrize("top_k", [0, 8])
def test_kd_is_zero_when_the_student_is_the_teacher(tiny, tmp_path, text_file, tiny_model_dir, cache, top_k):  # noqa: F811
    r = first_kd(tiny, tmp_path, text_file, tiny_model_dir, teacher_top_k=top_k)
    assert r["first_loss"] == pytest.approx(0.0, abs=2e-3), "LoRA starts at B = 0: the student is the source model"
    assert r["ce_curve"][0] > 1.0, "the CE is still reported beside the KD loss"


def test_the_teacher_is_the_source_model_not_the_stage_input(tiny, tmp_path, text_file, tiny_model_dir, cache):  # noqa: F811
    prune_2of4(tiny.model)  # this stage's input is a pruned model; its teacher stays the source
    ctx = ctx_for(tiny, tmp_path, source_model=source(tiny_model_dir), input_artifact=tmp_path / "pruned")
    r = lora.run(tiny.model, ctx, quick(text_file, steps=3, loss="kd", teacher_top_k=0)).report
    assert r["first_loss"] > 0.05, "KL to the unpruned source, not to the (identical) input"
    assert r["teacher"]["path"] == str(tiny_model_dir) and len(r["teacher"]["digest"]) == 64
    assert r["teacher_logits"] == "on the fly" and r["teacher_forwards"] == 3 and r["temperature"] == 2.0


def test_top_k_cache_is_written_once_and_reused(tiny_model_dir, tmp_path, text_file, cache, monkeypatch):  # noqa: F811
    from frankenlab.pipeline.loading import load_model

    loads = counting_loads(monkeypatch)
    reports = []
    for run in ("a", "b"):
        lm = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
        prune_2of4(lm.model)
        ctx = ctx_for(lm, tmp_path / run, source_model=source(tiny_model_dir))
        reports.append(lora.run(lm.model, ctx, quick(text_file, steps=2, loss="kd", teacher_top_k=8)).report)
    first, second = reports
    assert len(loads) == 1, "the second run never loads the teacher"
    assert first["teacher_logits"] == "top-k cached (computed now)" and first["teacher_forwards"] > 0
    assert second["teacher_logits"] == "top-k cached (reused)" and second["teacher_forwards"] == 0
    files = list((cache / distill.CACHE_FOLDER).iterdir())
    assert (
        [f.name for f in files]
        == [first["teacher_cache"].rsplit("/", 1)[-1]]
        == [second["teacher_cache"].rsplit("/", 1)[-1]]
    )
    assert second["loss_curve"] == pytest.approx(first["loss_curve"], rel=1e-5)
    # another top_k is another key: computed again
    lm = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    lora.run(
        lm.model,
        ctx_for(lm, tmp_path / "c", source_model=source(tiny_model_dir)),
        quick(text_file, steps=1, loss="kd", teacher_top_k=4),
    )
    assert len(loads) == 2 and len(list((cache / distill.CACHE_FOLDER).iterdir())) == 2


def test_ce_plus_kd_mixes_the_first_losses(tiny_model_dir, tmp_path, text_file, cache):  # noqa: F811
    from frankenlab.pipeline.loading import load_model

    first = {}
    for loss in ("ce", "kd", "ce+kd"):
        lm = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
        prune_2of4(lm.model)
        ctx = ctx_for(lm, tmp_path / loss.replace("+", "_"), source_model=source(tiny_model_dir))
        first[loss] = lora.run(
            lm.model, ctx, quick(text_file, steps=1, loss=loss, kd_weight=0.25, teacher_top_k=0)
        ).report
    ce, kd = first["ce"]["first_loss"], first["kd"]["first_loss"]
    assert first["ce+kd"]["first_loss"] == pytest.approx(0.75 * ce + 0.25 * kd, rel=1e-5)
    assert first["ce+kd"]["kd_weight"] == 0.25 and "teacher" not in first["ce"]


def test_kd_without_a_source_model_says_what_to_do(tiny, tmp_path, text_file):  # noqa: F811
    with pytest.raises(RecipeError) as err:
        lora.run(tiny.model, ctx_for(tiny, tmp_path), quick(text_file, steps=1, loss="kd"))
    assert "\n" not in str(err.value) and 'loss = "ce"' in str(err.value)


def test_runner_hands_the_recipe_source_to_the_stage(tiny_model_dir, tmp_path, data_dir, text_file, cache):  # noqa: F811
    import json

    from frankenlab.sessions import record_run
    from tests.test_runner import tiny_recipe

    stages = (
        '[[stages]]\nkind = "width"\npattern = "2:4"\n[[stages]]\nkind = "lora"\n'
        f'dataset = "{text_file}"\nsteps = 2\nbatch_size = 2\nseq_len = 32\nloss = "kd"\nteacher_top_k = 0\n'
        "eval_every = 0\n"
    )
    session = record_run(tiny_recipe(tiny_model_dir, stages), tmp_path / "run", data_dir=data_dir)
    assert session.status == "done", session
    report = json.loads((tmp_path / "run" / "session.json").read_text())["stages"][2]["report"]
    assert report["teacher"]["source"] == str(tiny_model_dir) and report["first_loss"] > 0.05


@pytest.mark.parametrize(
    "damage",
    ["truncated", "other shapes", "ids past the vocabulary"],
)
def test_a_damaged_top_k_cache_is_computed_again_never_half_used(
    tiny_model_dir,
    tmp_path,
    text_file,  # noqa: F811
    cache,
    monkeypatch,
    damage,
):
    from safetensors.torch import load_file, save_file

    from frankenlab.pipeline.loading import load_model

    def run(name):
        lm = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
        ctx = ctx_for(lm, tmp_path / name, source_model=source(tiny_model_dir))
        return lora.run(lm.model, ctx, quick(text_file, steps=1, loss="kd", teacher_top_k=8)).report

    first = run("a")
    path = cache / distill.CACHE_FOLDER / first["teacher_cache"].rsplit("/", 1)[-1]
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    else:
        data = load_file(str(path))
        if damage == "other shapes":
            data = {k: v[:1] for k, v in data.items()}
        else:
            data["indices"] = data["indices"].clone().fill_(30000)
        save_file({k: v.contiguous() for k, v in data.items()}, str(path))
    loads = counting_loads(monkeypatch)
    second = run("b")
    assert len(loads) == 1 and second["teacher_logits"] == "top-k cached (computed now)"
    assert second["loss_curve"] == pytest.approx(first["loss_curve"], rel=1e-5)
