import os

import pytest

from frankenlab.evals.errors import ModelLoadError
from frankenlab.pipeline.loading import count_parameters, load_model, resolve_source


def test_load_local_folder(tiny):
    assert tiny.source.kind == "folder"
    assert count_parameters(tiny.model) == sum(p.numel() for p in tiny.model.parameters())
    # tied embeddings are counted once
    assert tiny.model.lm_head.weight is tiny.model.model.embed_tokens.weight


@pytest.mark.parametrize(
    "ref, message",
    [
        ("/no/such/folder", "does not exist"),
        ("./missing-model", "does not exist"),
        ("missing.gguf", "GGUF file 'missing.gguf' does not exist"),
    ],
)
def test_missing_paths_are_clear(ref, message):
    with pytest.raises(ModelLoadError, match=message):
        load_model(ref)


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_source(str(tmp_path))


def test_hub_id_fails_fast_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    with pytest.raises(ModelLoadError, match="cannot be reached from here"):
        resolve_source("meta-llama/Llama-3.2-1B-Instruct")


def test_gguf_file_and_default_share_one_conversion():
    from frankenlab.pipeline.loading import bundled_gguf_path, cache_dir

    try:
        gguf = bundled_gguf_path()
    except ModelLoadError:
        pytest.skip("bundled model not installed")
    default = resolve_source(None)
    as_file = resolve_source(str(gguf))
    assert default.kind == "default" and as_file.kind == "gguf"
    assert default.path == as_file.path and as_file.path.startswith(str(cache_dir()))
    assert os.path.exists(os.path.join(as_file.path, "config.json"))
