import os
from pathlib import Path

import pytest

from tests.tiny import build_tiny_llama

ROOT = Path(__file__).resolve().parent.parent
# Quantized models run on the default CPU kernel ("auto") in tests; tests that want another set it.
os.environ.pop("FRANKENLAB_QUANT_KERNEL", None)


def shared_data_dir() -> Path:
    return Path(os.environ.get("FRANKENLAB_DATA_DIR", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = shared_data_dir()
    if not d.is_dir():
        pytest.fail(f"evaluation data not found at {d}: set FRANKENLAB_DATA_DIR to the shared data folder")
    return d


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny random LLaMA (8 layers, hidden 64) with a BPE tokenizer and a chat template."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture
def tiny(tiny_model_dir):
    """A fresh LoadedModel of the tiny LLaMA on CPU (fp32), safe to modify."""
    from frankenlab.pipeline.loading import load_model

    return load_model(str(tiny_model_dir), device="cpu", dtype="float32")


@pytest.fixture
def one_thread(request):
    """Tiny matrices on a shared 2-core machine: one thread is ~20x faster than two fighting
    (modules ask for it with `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    if request.node.get_closest_marker("slow"):  # the bundled model's matrices are worth two threads
        yield
        return
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
