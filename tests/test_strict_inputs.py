"""Issue 25, strict loading and the tracebacks (cases 9, 10, 17-22, 26 and the "Also" list).

A model folder whose weights do not match its config.json (missing, unexpected or mis-shaped
tensors, a truncated file) or that is not a LLaMA-architecture model is refused with one line
before any weight loads; bad files and output paths are told in one line with exit 2 before the
work they would spoil; Ctrl-C during imports, SIGTERM and Rich markup in messages behave.
"""

from __future__ import annotations

import io
import json
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from frankenlab.evals.errors import ModelLoadError
from frankenlab.pipeline.loading import load_model

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


# -- broken model folders, made from the tiny LLaMA --------------------------------------------------
def _copy(tiny_model_dir: Path, dst: Path) -> Path:
    shutil.copytree(tiny_model_dir, dst)
    return dst


def _edit_config(folder: Path, **changes) -> Path:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def _edit_weights(folder: Path, edit) -> Path:
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def _one_line_refusal(ref: Path, *needles: str) -> str:
    with pytest.raises(ModelLoadError) as info:
        load_model(str(ref), device="cpu", dtype="float32")
    msg = str(info.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, msg
    return msg


def test_config_with_more_layers_than_the_weights_is_refused(tiny_model_dir, tmp_path):
    """Case 9: config.json says 10 layers, the weights hold 8: never two random layers."""
    folder = _edit_config(_copy(tiny_model_dir, tmp_path / "m"), num_hidden_layers=10)
    _one_line_refusal(folder, "missing", "model.layers.8.")


def test_a_dropped_layer_an_unexpected_and_a_misshaped_tensor_are_refused(tiny_model_dir, tmp_path):
    dropped = _edit_weights(
        _copy(tiny_model_dir, tmp_path / "dropped"),
        lambda t: [t.pop(k) for k in [k for k in t if k.startswith("model.layers.3.")]],
    )
    _one_line_refusal(dropped, "missing", "model.layers.3.")
    extra = _edit_weights(
        _copy(tiny_model_dir, tmp_path / "extra"),
        lambda t: t.__setitem__("model.layers.0.extra.weight", t["model.norm.weight"].clone()),
    )
    _one_line_refusal(extra, "unexpected", "model.layers.0.extra.weight")
    key = "model.layers.1.mlp.down_proj.weight"
    shaped = _edit_weights(
        _copy(tiny_model_dir, tmp_path / "shaped"), lambda t: t.__setitem__(key, t[key][:, :-1].contiguous())
    )
    _one_line_refusal(shaped, "mis-shaped", key)


def test_tied_embeddings_load_and_an_untied_config_without_a_head_is_refused(tiny_model_dir, tmp_path):
    from frankenlab.pipeline.checkpoint_check import check_model_folder

    check_model_folder(tiny_model_dir)  # tied: lm_head.weight is absent from the file, and that is fine
    lm = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    assert lm.model.lm_head.weight is lm.model.model.embed_tokens.weight
    untied = _edit_config(_copy(tiny_model_dir, tmp_path / "untied"), tie_word_embeddings=False)
    _one_line_refusal(untied, "missing", "lm_head.weight")
    # an untied checkpoint that holds its head loads
    with_head = _edit_weights(
        _edit_config(_copy(tiny_model_dir, tmp_path / "head"), tie_word_embeddings=False),
        lambda t: t.__setitem__("lm_head.weight", t["model.embed_tokens.weight"].clone()),
    )
    lm = load_model(str(with_head), device="cpu", dtype="float32")
    assert lm.model.lm_head.weight is not lm.model.model.embed_tokens.weight


def test_buffers_old_checkpoints_saved_are_no_unexpected_tensors(tiny_model_dir, tmp_path):
    """Older LLaMA checkpoints hold each layer's rotary_emb.inv_freq: transformers skips them, so do we."""
    import torch

    folder = _edit_weights(
        _copy(tiny_model_dir, tmp_path / "m"),
        lambda t: t.__setitem__("model.layers.0.self_attn.rotary_emb.inv_freq", torch.ones(8)),
    )
    lm = load_model(str(folder), device="cpu", dtype="float32")
    assert len(lm.model.model.layers) == 8


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_broken_safetensors_file_is_one_line(tiny_model_dir, tmp_path, damage):
    """Case 18 (the loader): SafetensorError before; now one line naming the file."""
    folder = _copy(tiny_model_dir, tmp_path / "m")
    f = folder / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"not safetensors " * 40, "empty": b""}[damage])
    _one_line_refusal(folder, "model.safetensors is not a complete safetensors file", "download")


def _bert(tiny_model_dir, tmp_path) -> Path:
    return _edit_config(_copy(tiny_model_dir, tmp_path / "bert"), model_type="bert", architectures=["BertForMaskedLM"])


def test_a_non_llama_config_is_refused(tiny_model_dir, tmp_path):
    """Cases 10 and 26 (the loader): a bert config over LLaMA weights is no LLaMA-architecture model."""
    _one_line_refusal(_bert(tiny_model_dir, tmp_path), "'bert'", "LLaMA-architecture")


def _cli(argv, capsys) -> tuple[int, str]:
    from frankenlab.tui.cli.main import main

    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out + out.err


@pytest.mark.parametrize("command", ["memory", "eval"])
def test_memory_and_eval_refuse_a_bert_folder_in_one_line(tiny_model_dir, tmp_path, capsys, command):
    """Case 10: `memory` printed a total (exit 0); case 26: `eval` loaded a random BERT and raised IndexError."""
    extra = ["--ppl", "wikitext2-rows-64", "--limit", "1"] if command == "eval" else []
    rc, text = _cli([command, "--model", _bert(tiny_model_dir, tmp_path), "--device", "cpu", *extra], capsys)
    assert rc == 2, text
    assert "Traceback" not in text and "total" not in text
    assert len(text.strip().splitlines()) == 1 and "'bert'" in text, text


def test_run_with_a_truncated_model_is_exit_2_and_said_once(tiny_model_dir, tmp_path, capsys, data_dir):
    """Case 18 through `run`: exit 1 and the raw SafetensorError printed twice before."""
    folder = _copy(tiny_model_dir, tmp_path / "m")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 3])
    (tmp_path / "r.toml").write_text('name = "t"\n[evaluation]\nperplexity = []\n')
    rc, text = _cli(
        ["run", tmp_path / "r.toml", "--model", folder, "--out", tmp_path / "o", "--data-dir", data_dir], capsys
    )
    assert rc == 2, text
    assert text.count("not a complete safetensors file") == 1, text
    assert "SafetensorError" not in text and "Traceback" not in text


# -- recipe files -----------------------------------------------------------------------------------
def test_a_binary_recipe_is_one_line(tmp_path, capsys):
    """Case 17: UnicodeDecodeError before."""
    recipe = tmp_path / "r.toml"
    recipe.write_bytes(bytes(range(256)) * 4)
    rc, text = _cli(["run", recipe, "--out", tmp_path / "o"], capsys)
    assert rc == 2 and "Traceback" not in text
    assert len(text.strip().splitlines()) == 1 and "not a text file" in text, text
    sweep = tmp_path / "s.toml"
    sweep.write_bytes(b"\xff\xfe\x00binary")
    rc, text = _cli(["sweep", sweep, "--out", tmp_path / "so", "--dry-run"], capsys)
    assert rc == 2 and "not a text file" in text and "Traceback" not in text, text


# -- unreadable folders (case 19) --------------------------------------------------------------------
def test_an_unreadable_model_folder_is_one_line(tiny_model_dir, tmp_path, unreadable):
    folder = _copy(tiny_model_dir, tmp_path / "m")
    unreadable(folder)
    msg = _one_line_refusal(folder, "Permission denied", "permissions")
    assert str(folder) in msg


def test_an_unreadable_data_folder_is_one_line_in_eval(tiny_model_dir, tmp_path, capsys, data_dir, unreadable):
    data = tmp_path / "data"
    shutil.copytree(data_dir / "wikitext2", data / "wikitext2")
    unreadable(data)
    rc, text = _cli(
        ["eval", "--model", tiny_model_dir, "--ppl", "wikitext2-rows-64", "--limit", "1", "--data-dir", data], capsys
    )
    assert rc == 2 and "Traceback" not in text, text
    assert "Permission denied" in text and "permissions" in text, text


def test_an_unreadable_data_folder_in_a_run_is_a_read_problem(tiny_model_dir, tmp_path, data_dir, unreadable):
    """`run` told a data file it may not read as "cannot write the run folder"."""
    from frankenlab.pipeline import runner
    from frankenlab.pipeline.recipe import Recipe

    data = tmp_path / "data"
    shutil.copytree(data_dir / "wikitext2", data / "wikitext2")
    unreadable(data)
    recipe = Recipe.loads(
        f'name = "t"\nmodel = "{tiny_model_dir}"\n[evaluation]\nperplexity = ["wikitext2-rows-64"]\nppl_limit = 1\n'
    )
    result = runner.run_recipe(recipe, tmp_path / "o", data_dir=data)
    assert result.status == "failed", result.message
    assert "cannot read" in result.message and "Permission denied" in result.message, result.message
    assert "cannot write the run folder" not in result.message


# -- output paths checked before the work (cases 20, 21) ---------------------------------------------
@pytest.fixture
def no_model_load(monkeypatch):
    """The commands must refuse before a model loads: loading fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the output path was checked")

    monkeypatch.setattr("frankenlab.pipeline.loading.load_model", refuse)


def test_eval_json_into_a_folder_is_refused_before_evaluating(tmp_path, capsys, no_model_load):
    """Case 20: the results were lost after the whole evaluation."""
    rc, text = _cli(["eval", "--model", tmp_path, "--json", tmp_path, "--limit", "1"], capsys)
    assert rc == 2 and "is a folder" in text and "Traceback" not in text, text
    (tmp_path / "file").write_text("x")
    rc, text = _cli(["eval", "--json", tmp_path / "file" / "out.json", "--limit", "1"], capsys)
    assert rc == 2 and "is a file, not a folder" in text, text


def test_memory_compact_at_an_existing_file_is_refused_before_loading(tmp_path, capsys, no_model_load):
    """Case 21: it failed after loading the model."""
    target = tmp_path / "taken"
    target.write_text("keep me")
    rc, text = _cli(["memory", "--compact", target], capsys)
    assert rc == 2 and "is a file" in text and "Traceback" not in text, text
    assert target.read_text() == "keep me"


# -- signals (case 22, SIGTERM) ----------------------------------------------------------------------
IMPORT_CTRL_C = """
import builtins, sys
real = builtins.__import__
def interrupted(name, *args, **kwargs):
    if name == "torch" or name.startswith("torch."):
        raise KeyboardInterrupt  # Ctrl-C while torch imports
    return real(name, *args, **kwargs)
builtins.__import__ = interrupted
from frankenlab.tui.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def test_ctrl_c_during_imports_is_one_line_and_130(tmp_path):
    """Case 22: a KeyboardInterrupt traceback from deep inside `import torch` before."""
    out = subprocess.run(
        [sys.executable, "-c", IMPORT_CTRL_C, "memory", "--model", str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 130, out.stderr[-2000:]
    assert "Traceback" not in out.stderr + out.stdout
    assert out.stderr.strip().splitlines()[-1] == "frankenlab: cancelled (Ctrl-C)"


def test_sigterm_is_told_as_sigterm_and_exits_143(monkeypatch):
    from frankenlab.tui.cli.console import make_console
    from frankenlab.tui.cli.signals import cancelled_exit_code, ctrl_c_cancels

    assert threading.current_thread() is threading.main_thread()
    cancel, restore = ctrl_c_cancels(make_console(file=io.StringIO()))
    try:
        signal.raise_signal(signal.SIGTERM)
    finally:
        restore()
    assert cancel.is_set() and cancel.reason == "SIGTERM" and cancelled_exit_code(cancel) == 143
    cancel, restore = ctrl_c_cancels(make_console(file=io.StringIO()))
    try:
        signal.raise_signal(signal.SIGINT)
    finally:
        restore()
    assert cancel.reason == "Ctrl-C" and cancelled_exit_code(cancel) == 130


def test_run_cancelled_by_sigterm_says_so_and_exits_143(tiny_model_dir, tmp_path, capsys, monkeypatch, data_dir):
    """SIGTERM exited 130 and said "cancelled by the user"."""
    import frankenlab.tui.cli.run as run_cli

    def sigterm_already(console, verb="cancelling"):
        cancel = threading.Event()
        cancel.reason = "SIGTERM"
        cancel.set()
        return cancel, lambda: None

    monkeypatch.setattr(run_cli, "ctrl_c_cancels", sigterm_already)
    (tmp_path / "r.toml").write_text(f'name = "t"\nmodel = "{tiny_model_dir}"\n[evaluation]\nperplexity = []\n')
    rc, text = _cli(["run", tmp_path / "r.toml", "--out", tmp_path / "o", "--data-dir", data_dir], capsys)
    assert rc == 143, text
    assert "cancelled by SIGTERM" in text and "by the user" not in text, text


# -- Rich markup in messages ---------------------------------------------------------------------------
def test_log_lines_keep_their_brackets():
    """`add [[stages]] kind = "gptq"` came out as `add [] kind = "gptq"`."""
    from rich.progress import Progress

    from frankenlab.pipeline import events as ev
    from frankenlab.tui.cli.console import make_console
    from frankenlab.tui.cli.run import ProgressView

    buf = io.StringIO()
    console = make_console(file=buf)
    with Progress(console=console) as progress:
        view = ProgressView(console, progress)
        view(ev.LogLine(-1, 'add [[stages]] kind = "gptq" before [bold]eora', "warning"))
        view(ev.LogLine(1, "Traceback (most recent call last):\nValueError: [[stages]] [red]x", "error"))
    text = buf.getvalue()
    assert 'add [[stages]] kind = "gptq" before [bold]eora' in text, text
    assert "ValueError: [[stages]] [red]x" in text, text


def test_lab_notifications_are_plain_text(monkeypatch):
    from textual.app import App

    from frankenlab.tui.app import FrankenLab

    seen = {}
    monkeypatch.setattr(App, "notify", lambda self, message, **kw: seen.update(message=message, **kw))
    lab = FrankenLab.__new__(FrankenLab)
    lab.notify('add [[stages]] kind = "gptq" before the eora stage', severity="error", markup=True)
    assert seen["markup"] is False and seen["message"].startswith("add [[stages]]")


# -- shape problems in the preflight -------------------------------------------------------------------
def test_an_nm_pattern_that_does_not_divide_the_widths_is_refused_before_loading(
    tiny_model_dir, tmp_path, monkeypatch, data_dir
):
    """2:7 on a 576-wide matrix surfaced after the baseline evaluation; now before any weight loads."""
    from frankenlab.pipeline import events as ev
    from frankenlab.pipeline import runner
    from frankenlab.pipeline.recipe import Recipe

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the N:M check")

    monkeypatch.setattr(runner, "load_model", refuse)
    recipe = Recipe.loads(
        f'name = "t"\nmodel = "{tiny_model_dir}"\n[evaluation]\nperplexity = []\n'
        '[[stages]]\nkind = "depth"\nk = 1\n[[stages]]\nkind = "width"\npattern = "2:7"\nmethod = "magnitude"\n'
    )
    seen = []
    result = runner.run_recipe(recipe, tmp_path / "o", listener=seen.append, data_dir=data_dir)
    assert result.status == "failed", result.message
    assert "stage 2 (width)" in result.message and "M=7" in result.message and "64" in result.message
    failed = [e for e in seen if isinstance(e, ev.RunFailed)]
    assert failed and failed[0].cause == "input" and failed[0].stage == 2
    assert not any(isinstance(e, ev.StageFinished) for e in seen)


def test_an_nm_pattern_is_checked_against_a_loaded_model_before_its_baseline(tiny, tmp_path, data_dir):
    """A model handed in already loaded (the lab) is checked before its baseline evaluation."""
    from frankenlab.pipeline import events as ev
    from frankenlab.pipeline import runner
    from frankenlab.pipeline.recipe import Recipe

    recipe = Recipe.loads('name = "t"\n[[stages]]\nkind = "width"\npattern = "1:3"\nmethod = "magnitude"\n')
    seen = []
    result = runner.run_recipe(recipe, tmp_path / "o", listener=seen.append, loaded=tiny, data_dir=data_dir)
    assert result.status == "failed" and "M=3" in result.message, result.message
    assert not any(isinstance(e, ev.StageStarted) for e in seen)
