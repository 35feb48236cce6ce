import os
from pathlib import Path

import pytest

from tests.tiny import build_tiny_llama

ROOT = Path(__file__).resolve().parent.parent
NO_CUDA = "needs a CUDA device: run `pytest -m gpu` on a GPU machine"


def gpu_selected(markexpr: str) -> bool:
    """Whether `-m` asks for the gpu tests (then GPUs stay visible): "gpu", "gpu and not slow", ..."""
    import re

    words = re.findall(r"\bnot\s+gpu\b|\bgpu\b", markexpr or "")
    return any(w == "gpu" for w in words)


def pytest_configure(config):
    # The suite runs on the CPU on every machine (recipes with device "auto" assert CPU facts): GPUs are
    # hidden before anything initialises CUDA, except for a run that selects the gpu tests (-m gpu).
    if not gpu_selected(config.getoption("markexpr", "")):
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=NO_CUDA)
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


# Quantized models run on the default CPU kernel ("auto") in tests; tests that want another set it.
os.environ.pop("FRANKENLAB_QUANT_KERNEL", None)
# `frankenlab run` and `sweep` print no duration estimate in tests (its probes would cost every run test
# time and write the user's rate cache); tests/test_estimate.py turns it on with its own cache folder.
os.environ["FRANKENLAB_ESTIMATE"] = "0"


def shared_data_dir() -> Path:
    return Path(os.environ.get("FRANKENLAB_DATA_DIR", ROOT.parent / "shared" / "data"))


@pytest.fixture(autouse=True)
def _own_data_home(tmp_path_factory, monkeypatch):
    """Every test has its own user data folder: the lab remembers opened and saved sessions there
    (recent-sessions.json), and a test must neither read nor write the user's real one."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path_factory.mktemp("data-home")))


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


@pytest.fixture
def unreadable(monkeypatch):
    """`unreadable(path)`: from now on `path` behaves as for a user without read permission there.
    A folder: what is inside it gives EACCES from open, stat, scandir and listdir (a folder without
    read and search permission). A file: opening it gives EACCES, its stat still works (chmod 000).
    Simulated, because the tests run as root, for whom chmod takes nothing away."""
    import builtins
    import io

    folders: list[Path] = []
    files: list[Path] = []

    def where(path) -> Path | None:
        try:
            return Path(os.fsdecode(path)).absolute()
        except TypeError:  # a file descriptor
            return None

    def denied(path, *, inside_only: bool, opens: bool) -> bool:
        p = where(path)
        if p is None:
            return False
        if opens and p in files:
            return True
        return any((c in p.parents) or (p == c and not inside_only) for c in folders)

    def wrap(fn, *, inside_only: bool, opens: bool = False):
        def wrapper(path, *args, **kwargs):
            if denied(path, inside_only=inside_only, opens=opens):
                raise PermissionError(13, "Permission denied", os.fsdecode(path))
            return fn(path, *args, **kwargs)

        return wrapper

    monkeypatch.setattr(builtins, "open", wrap(builtins.open, inside_only=True, opens=True))
    monkeypatch.setattr(io, "open", wrap(io.open, inside_only=True, opens=True))
    monkeypatch.setattr(os, "stat", wrap(os.stat, inside_only=True))
    monkeypatch.setattr(os, "scandir", wrap(os.scandir, inside_only=False))
    monkeypatch.setattr(os, "listdir", wrap(os.listdir, inside_only=False))

    def close(path) -> None:
        p = Path(path).absolute()
        (files if p.is_file() else folders).append(p)

    return close
