"""Issue 25, the leftovers: unreadable data (case 19), absurd sizes refused before any weights load,
and the last writes put through the output-path guard (the GGUF cache, `eval --json`).

Unreadable is simulated (the `unreadable` fixture in conftest.py): the tests run as root, for whom
chmod takes nothing away.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from frankenlab.evals import data as evdata
from frankenlab.evals.errors import DataError, RecipeError

pytestmark = pytest.mark.usefixtures("one_thread")
WIKI = "wikitext2/wikitext-2-raw-v1-test.jsonl"
C4 = "c4/c4-en-train-first1000.jsonl"
HELLASWAG = "hellaswag/hellaswag_val_10042.jsonl.gz"
SMOLLM2 = {"model_type": "llama", "max_position_embeddings": 8192}  # the bundled model's config.json


def _cli(argv, capsys) -> tuple[int, str]:
    from frankenlab.tui.cli.main import main

    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out + out.err


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading weights fails the test: the problem must be found before."""

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the inputs were checked")

    monkeypatch.setattr("frankenlab.pipeline.runner.load_model", refuse)  # first: importing it binds the real one
    monkeypatch.setattr("frankenlab.pipeline.loading.load_model", refuse)


def _copy_data(data_dir: Path, dst: Path, *relpaths: str) -> Path:
    for rel in relpaths:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(data_dir / rel, dst / rel)
    return dst


def _says_unreadable(msg: str, path: Path) -> None:
    assert "\n" not in msg, msg
    assert str(path) in msg and "Permission denied" in msg and "permissions" in msg, msg


# -- case 19 for data: a DataError from the data layer itself ----------------------------------------
def test_an_unreadable_data_folder_is_a_data_error_naming_the_path(tmp_path, data_dir, unreadable):
    """Before: PermissionError (a traceback unless each command caught OSError itself)."""
    data = _copy_data(data_dir, tmp_path / "data", WIKI)
    unreadable(data)
    for call in (
        lambda: evdata.check_dataset("wikitext2", data_dir=data),
        lambda: evdata.load_texts("wikitext2", data_dir=data),
        lambda: evdata.load_dataset_records("file", path=data / WIKI),  # an explicit file path
    ):
        with pytest.raises(DataError) as info:
            call()
        _says_unreadable(str(info.value), data / WIKI)


@pytest.mark.parametrize("rel, name", [(WIKI, "wikitext2"), (HELLASWAG, "hellaswag")])
def test_an_unreadable_data_file_is_a_data_error_naming_it(tmp_path, data_dir, unreadable, rel, name):
    """A file the user may not open (chmod 000), plain or .gz: one line naming it."""
    data = _copy_data(data_dir, tmp_path / "data", rel)
    unreadable(data / rel)
    with pytest.raises(DataError) as info:
        evdata.check_dataset(name, data_dir=data)
    _says_unreadable(str(info.value), data / rel)
    with pytest.raises(DataError):
        evdata.data_label(name, str(data / rel))  # the checksum reads it too


def test_unreadable_c4_is_a_data_error_in_calibration(tmp_path, data_dir, unreadable):
    from frankenlab.pipeline.calibration import CalibrationConfig, calibration_ids, check_calibration

    data = _copy_data(data_dir, tmp_path / "data", C4)
    unreadable(data / "c4")
    with pytest.raises(DataError) as info:
        check_calibration(CalibrationConfig("c4"), data)
    _says_unreadable(str(info.value), data / C4)
    with pytest.raises(DataError) as info:
        calibration_ids(None, CalibrationConfig("c4"), data_dir=data)  # no tokenizer is reached
    _says_unreadable(str(info.value), data / C4)


def test_eval_reports_an_unreadable_data_file_in_one_line(tmp_path, data_dir, unreadable, capsys, no_model_load):
    data = _copy_data(data_dir, tmp_path / "data", WIKI)
    unreadable(data / WIKI)
    rc, text = _cli(["eval", "--ppl", "wikitext2-rows-64", "--limit", "1", "--data-dir", data], capsys)
    assert rc == 2 and "Traceback" not in text and len(text.strip().splitlines()) == 1, text
    _says_unreadable(text.strip().replace("\n", ""), data / WIKI)


def test_a_run_refuses_unreadable_calibration_text_before_loading(
    tiny_model_dir, tmp_path, data_dir, unreadable, no_model_load
):
    from frankenlab.pipeline import events as ev
    from frankenlab.pipeline import runner
    from frankenlab.pipeline.recipe import Recipe

    data = _copy_data(data_dir, tmp_path / "data", C4)
    unreadable(data / C4)
    recipe = Recipe.loads(
        f'name = "t"\nmodel = "{tiny_model_dir}"\n[evaluation]\nafter = "none"\n'
        '[[stages]]\nkind = "width"\npattern = "2:4"\nmethod = "wanda"\n'
    )
    seen = []
    result = runner.run_recipe(recipe, tmp_path / "o", listener=seen.append, data_dir=data)
    assert result.status == "failed", result.message
    _says_unreadable(result.message, data / C4)
    assert [e.cause for e in seen if isinstance(e, ev.RunFailed)] == ["input"]


SWEEP = """
name = "s"
[base]
model = "{model}"
[base.evaluation]
perplexity = ["wikitext2-rows-32"]
ppl_limit = 1
samples = false
[[base.stages]]
kind = "width"
pattern = "2:4"
method = "magnitude"
[axes]
"width.pattern" = ["2:4", "1:4"]
"""


def test_a_sweep_refuses_unreadable_data_before_any_job(tiny_model_dir, tmp_path, data_dir, unreadable, capsys):
    """Before: every job failed on its own (exit 1) after the sweep had started."""
    data = _copy_data(data_dir, tmp_path / "data", WIKI)
    spec = tmp_path / "s.toml"
    spec.write_text(SWEEP.format(model=tiny_model_dir))
    assert _cli(["sweep", spec, "--out", tmp_path / "dry", "--dry-run"], capsys)[0] == 0  # the spec is fine
    unreadable(data)
    rc, text = _cli(["sweep", spec, "--out", tmp_path / "out", "--data-dir", data], capsys)
    assert rc == 2 and "Traceback" not in text, text
    line = next(line for line in text.splitlines() if "cannot run the sweep" in line)
    assert "Permission denied" in text and "permissions" in text and str(data / WIKI) in text.replace("\n", ""), line
    assert not (tmp_path / "out" / "sweep.json").exists()  # no job ran, no record written


async def test_the_lab_reports_unreadable_data_in_one_notification(tiny, tmp_path, data_dir, unreadable):
    from frankenlab.tui.app import create_app
    from tests.test_tui import short_recipe, wait_for

    data = _copy_data(data_dir, tmp_path / "data", WIKI, C4)
    unreadable(data)
    app = create_app(loaded=tiny, model_ref=tiny.source.ref, data_dir=data, runs_dir=tmp_path / "runs", whatif=False)
    async with app.run_test(size=(100, 40)) as pilot:
        app._show_recipe(short_recipe())
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: app.lab.session is not None and not app.lab.running, timeout=60)
        assert app.lab.session.status == "failed"
        errors = [str(n.message) for n in app._notifications if n.severity == "error"]
        assert len(errors) == 1 and "\n" not in errors[0], errors
        assert "cannot read" in errors[0] and "Permission denied" in errors[0], errors


# -- sizes refused before any weights load -----------------------------------------------------------
@pytest.mark.parametrize(
    "argv, says",
    [
        (["--triviaqa-closed", "5000"], ["triviaqa_closed", "--triviaqa-closed", "5000", "at most 2000"]),
        (["--hellaswag", "20000"], ["hellaswag", "20000", "at most 10042"]),
        (["--triviaqa-open", "10000000"], ["triviaqa_open", "10000000", "at most"]),
    ],
)
def test_eval_refuses_more_questions_than_the_file_holds_before_loading(
    tmp_path, capsys, data_dir, no_model_load, argv, says
):
    """Before: the model loaded (and for TriviaQA the whole WikiText default ran first in a recipe)."""
    rc, text = _cli(["eval", *argv, "--data-dir", data_dir], capsys)
    assert rc == 2 and "Traceback" not in text and len(text.strip().splitlines()) == 1, text
    for needle in says:
        assert needle in text, text


def test_eval_refuses_a_sequence_longer_than_the_model_takes_before_loading(
    tiny_model_dir, capsys, data_dir, no_model_load
):
    rc, text = _cli(["eval", "--model", tiny_model_dir, "--ppl", "wikitext2-rows-1024", "--data-dir", data_dir], capsys)
    assert rc == 2 and "Traceback" not in text and len(text.strip().splitlines()) == 1, text
    assert "wikitext2-rows-1024" in text and "max_position_embeddings" in text and "512" in text, text


def _run_refused(recipe_text: str, tmp_path: Path, data_dir: Path) -> str:
    from frankenlab.pipeline import events as ev
    from frankenlab.pipeline import runner
    from frankenlab.pipeline.recipe import Recipe

    seen = []
    result = runner.run_recipe(Recipe.loads(recipe_text), tmp_path / "o", listener=seen.append, data_dir=data_dir)
    assert result.status == "failed", result.message
    assert "\n" not in result.message and not any(isinstance(e, ev.StageStarted) for e in seen)
    assert [e.cause for e in seen if isinstance(e, ev.RunFailed)] == ["input"], result.message
    return result.message


WIDTH = '[[stages]]\nkind = "width"\npattern = "2:4"\nmethod = "wanda"\n'


def test_a_run_refuses_absurd_calibration_samples_before_loading(tiny_model_dir, tmp_path, data_dir, no_model_load):
    """Before: the model loaded, the baseline was evaluated, then the stage tokenized all of c4 and failed."""
    msg = _run_refused(
        f'name = "t"\nmodel = "{tiny_model_dir}"\n[calibration]\nsamples = 1000000000\n'
        f'[evaluation]\nafter = "none"\n{WIDTH}',
        tmp_path,
        data_dir,
    )
    assert "calibration.samples = 1000000000" in msg and "at most 1000" in msg and C4 in msg, msg


def test_a_run_refuses_calibration_windows_longer_than_the_model_takes(
    tiny_model_dir, tmp_path, data_dir, no_model_load
):
    msg = _run_refused(
        f'name = "t"\nmodel = "{tiny_model_dir}"\n[calibration]\nseq_len = 4096\n[evaluation]\nafter = "none"\n{WIDTH}',
        tmp_path,
        data_dir,
    )
    assert "calibration.seq_len = 4096" in msg and "at most 512" in msg, msg


@pytest.mark.parametrize(
    "evaluation, says",
    [
        ('perplexity = ["wikitext2-concat-2048"]', ["wikitext2-concat-2048", "512"]),
        ("perplexity = []\ntriviaqa_closed = 3000\nsamples = false", ["triviaqa_closed", "3000", "at most 2000"]),
    ],
)
def test_a_run_refuses_absurd_evaluation_sizes_before_loading(
    tiny_model_dir, tmp_path, data_dir, no_model_load, evaluation, says
):
    """Before: the TriviaQA count failed after the model loaded and the WikiText protocols ran."""
    msg = _run_refused(f'name = "t"\nmodel = "{tiny_model_dir}"\n[evaluation]\n{evaluation}\n', tmp_path, data_dir)
    for needle in says:
        assert needle in msg, msg


def test_a_loaded_model_is_checked_for_lengths_before_its_baseline(tiny, tmp_path, data_dir):
    """The lab hands the runner a loaded model: its config is checked before the baseline evaluation."""
    from frankenlab.pipeline import events as ev
    from frankenlab.pipeline import runner
    from frankenlab.pipeline.recipe import Recipe

    recipe = Recipe.loads('name = "t"\n[calibration]\nseq_len = 600\n[evaluation]\nsamples = false\n' + WIDTH)
    seen = []
    result = runner.run_recipe(recipe, tmp_path / "o", listener=seen.append, loaded=tiny, data_dir=data_dir)
    assert result.status == "failed" and "calibration.seq_len = 600" in result.message, result.message
    assert not any(isinstance(e, ev.StageStarted) for e in seen)


def test_stage_sizes_eora_samples_and_lora_eora_windows():
    from frankenlab.evals.suite import EvalConfig
    from frankenlab.pipeline.stages import stage_kind

    eora, lora = stage_kind("eora"), stage_kind("lora")
    with pytest.raises(RecipeError, match=r"eora\.samples = 5000 .* at most 1000"):
        eora.preflight(eora.Config(samples=5000), EvalConfig(), None)
    assert eora.preflight(eora.Config(samples=64), EvalConfig(), None) == []  # the thesis recipe's
    with pytest.raises(RecipeError, match="seq_len = 1024 .* at most 512"):
        eora.check_config(eora.Config(seq_len=1024), {"max_position_embeddings": 512})
    eora.check_config(eora.Config(), {"max_position_embeddings": 512})  # the recipe's, checked by the runner
    with pytest.raises(RecipeError, match="seq_len = 1024 .* at most 512"):
        lora.check_config(lora.Config(seq_len=1024), {"max_position_embeddings": 512})
    lora.check_config(lora.Config(), {"max_position_embeddings": 512})


def test_reasonable_sizes_pass_at_their_limits(data_dir):
    from frankenlab.evals.suite import EvalConfig, check_data, check_lengths
    from frankenlab.pipeline.calibration import CalibrationConfig, check_calibration, check_seq_len

    check_data(EvalConfig(perplexity=(), triviaqa_closed=2000, triviaqa_open=100, hellaswag=10042), data_dir)
    check_calibration(CalibrationConfig("c4", samples=1000), data_dir)
    check_lengths(EvalConfig(perplexity=("wikitext2-rows-512",)), {"max_position_embeddings": 512})
    check_seq_len(512, {"max_position_embeddings": 512})
    check_seq_len(10**6, {})  # a config that does not say: nothing to check against


def test_the_bundled_recipes_and_sweeps_pass_the_size_checks(data_dir, monkeypatch):
    """Never refuse what the thesis recipes use (the bundled model takes 8192 positions)."""
    from frankenlab.pipeline import preflight
    from frankenlab.pipeline.recipe import Recipe, bundled_recipes
    from frankenlab.sessions.sweep import load_sweep
    from frankenlab.sessions.sweep.spec import SWEEPS_DIR
    from frankenlab.tui.cli.sweep import inputs_problem

    monkeypatch.setattr(preflight, "model_config", lambda ref: dict(SMOLLM2))
    seen: set = set()
    for name in bundled_recipes():
        recipe = Recipe.load(name)
        preflight.preflight(recipe, data_dir, seen)
        preflight.check_sizes(recipe, SMOLLM2)
        recipe.check_config(SMOLLM2)
    sweeps = sorted(Path(SWEEPS_DIR).glob("*.toml"))
    assert len(sweeps) >= 3
    for path in sweeps:
        assert inputs_problem(load_sweep(path).expand(), data_dir) is None, path


# -- the output-path guard: the GGUF cache, eval --json ----------------------------------------------
def _fake_gguf(tmp_path: Path) -> Path:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 64)
    return gguf


def test_a_linked_gguf_cache_folder_is_refused(tmp_path, monkeypatch):
    """Before: the conversion's temporary folder was made inside the link's target."""
    from frankenlab.pipeline.loading import ModelLoadError, _file_digest, resolve_source

    cache, elsewhere = tmp_path / "cache", tmp_path / "elsewhere"
    cache.mkdir()
    elsewhere.mkdir()
    monkeypatch.setenv("FRANKENLAB_CACHE", str(cache))
    gguf = _fake_gguf(tmp_path)
    (cache / "models").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(ModelLoadError) as info:
        resolve_source(str(gguf))
    assert "symbolic link" in str(info.value) and "FRANKENLAB_CACHE" in str(info.value), info.value
    assert list(elsewhere.iterdir()) == []
    (cache / "models").unlink()
    (cache / "models").mkdir()
    (cache / "models" / f"m-{_file_digest(gguf)}").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(ModelLoadError, match="symbolic link"):
        resolve_source(str(gguf))
    assert list(elsewhere.iterdir()) == []


def test_the_gguf_conversion_writes_its_source_note_through_the_guard(tiny_model_dir, tmp_path, monkeypatch):
    """FRANKENLAB_SOURCE.txt was a bare write_text; now atomic_write_text (the output-path guard)."""
    import transformers

    from frankenlab.pipeline import atomic, loading

    real_tok, real_lm = transformers.AutoTokenizer, transformers.AutoModelForCausalLM

    class Tok:  # what the GGUF reader would give: the tiny LLaMA
        @staticmethod
        def from_pretrained(*args, **kwargs):
            return real_tok.from_pretrained(str(tiny_model_dir))

    class Lm:
        @staticmethod
        def from_pretrained(*args, **kwargs):
            model = real_lm.from_pretrained(str(tiny_model_dir))
            return model, {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}

    written = []

    def spy(path, text, *args, **kwargs):
        written.append(Path(path).name)
        return atomic.atomic_write_text(path, text, *args, **kwargs)

    monkeypatch.setattr(loading, "atomic_write_text", spy)  # AttributeError before: it was not used
    gguf = _fake_gguf(tmp_path)
    with monkeypatch.context() as m:
        m.setattr(transformers, "AutoTokenizer", Tok)
        m.setattr(transformers, "AutoModelForCausalLM", Lm)
        out = loading.convert_gguf(gguf, tmp_path / "cache" / "models" / "m-x")
    assert written == ["FRANKENLAB_SOURCE.txt"]
    assert (out / "FRANKENLAB_SOURCE.txt").read_text() == f"converted from {gguf}\n"
    assert (out / "config.json").is_file()
    assert [p.name for p in out.parent.iterdir()] == ["m-x"]  # no temporary folder left


def test_eval_json_at_a_symbolic_link_is_refused_before_evaluating(tmp_path, capsys, no_model_load):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    link = tmp_path / "out.json"
    link.symlink_to(victim)
    rc, text = _cli(["eval", "--json", link, "--limit", "1"], capsys)
    assert rc == 2 and "symbolic link" in text and "Traceback" not in text, text
    assert victim.read_text() == "keep me" and link.is_symlink()


def _eval_json(tiny_model_dir, data_dir, out: Path, capsys) -> tuple[int, str]:
    argv = ["eval", "--model", tiny_model_dir, "--device", "cpu", "--ppl", "wikitext2-rows-32", "--limit", "1"]
    return _cli([*argv, "--data-dir", data_dir, "--json", out], capsys)


def test_eval_json_is_written_atomically_never_through_a_link(tiny_model_dir, tmp_path, data_dir, capsys, monkeypatch):
    """Before: a stale `out.json.tmp` link was written through (its target overwritten), and a link made
    at `out.json` during the evaluation was silently replaced."""
    from frankenlab.evals import suite

    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    out = tmp_path / "res" / "out.json"
    out.parent.mkdir()
    (out.parent / "out.json.tmp").symlink_to(victim)  # a fixed temporary name would follow this
    rc, text = _eval_json(tiny_model_dir, data_dir, out, capsys)
    assert rc == 0, text
    assert json.loads(out.read_text())["metrics"][0]["name"] == "perplexity"
    assert victim.read_text() == "keep me"
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.json", "out.json.log", "out.json.tmp"]

    real = suite.evaluate
    late = tmp_path / "late.json"

    def evaluate_then_link(*args, **kwargs):  # a link appears at the target while the evaluation runs
        result = real(*args, **kwargs)
        os.symlink(victim, late)
        return result

    monkeypatch.setattr(suite, "evaluate", evaluate_then_link)
    rc, text = _eval_json(tiny_model_dir, data_dir, late, capsys)
    assert rc == 2 and "symbolic link" in text and "Traceback" not in text, text
    assert victim.read_text() == "keep me" and late.is_symlink()
