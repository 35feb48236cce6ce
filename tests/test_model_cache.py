"""The lab's model cache: at most FRANKENLAB_MAX_MODELS models loaded, the least recently used dropped
first (its memory handed back), a dropped one loaded again on demand, a model in use never dropped."""

from __future__ import annotations

import gc
import threading
import weakref
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from frankenlab.pipeline.loading import load_model
from frankenlab.sessions import Session, StageRecord
from frankenlab.tui.lab_state import BASELINE, LabState
from frankenlab.tui.model_cache import DEFAULT_MAX_MODELS, MAX_MODELS_ENV, ModelCache, max_models

pytestmark = pytest.mark.usefixtures("one_thread")


class Model:
    """A stand-in model (weak references work on it)."""

    def __init__(self, name):
        self.name = name


class Loads:
    """Loaders that record each load and return a fresh stand-in model each time."""

    def __init__(self):
        self.calls: list[str] = []

    def __call__(self, key):
        def load():
            self.calls.append(key)
            return Model(key)

        return load


def cache_with_frees(limit=2):
    freed = []
    return ModelCache(limit, free=freed.append), freed


# -- least recently used ----------------------------------------------------------------------------
def test_opening_a_third_model_drops_the_least_recently_used_and_frees_memory():
    cache, freed = cache_with_frees()
    loads = Loads()
    a = cache.get("a", loads("a"))
    cache.get("b", loads("b"))
    ref = weakref.ref(a)
    del a
    cache.get("c", loads("c"))
    assert cache.keys() == ["b", "c"] and cache.dropped == ["a"]
    assert ref() is None, "the dropped model is still referenced by the cache"
    assert freed == [None]  # devices.free_cached_memory, once per drop


def test_a_model_used_again_is_kept_and_the_older_one_goes():
    cache, _ = cache_with_frees()
    loads = Loads()
    first = cache.get("a", loads("a"))
    cache.get("b", loads("b"))
    assert cache.get("a", loads("a")) is first  # used again: no load, now the most recent
    cache.get("c", loads("c"))
    assert cache.keys() == ["a", "c"] and loads.calls == ["a", "b", "c"]


def test_a_dropped_model_loads_again_when_asked_for():
    cache, _ = cache_with_frees()
    loads = Loads()
    old = cache.get("a", loads("a"))
    cache.get("b", loads("b"))
    cache.get("c", loads("c"))
    again = cache.get("a", loads("a"))
    assert again is not old and again.name == "a" and loads.calls == ["a", "b", "c", "a"]
    assert cache.keys() == ["c", "a"] and cache.loads == 4


def test_a_model_in_use_by_a_job_is_never_dropped_from_under_it():
    cache, _ = cache_with_frees(limit=2)
    loads = Loads()
    with cache.use("a", loads("a")) as a:
        cache.get("b", loads("b"))
        cache.get("c", loads("c"))  # a is the oldest but in use: b goes
        cache.get("d", loads("d"))
        assert "a" in cache and cache.in_use("a") and cache.keys() == ["a", "d"]
        assert a.name == "a"
    assert not cache.in_use("a") and cache.keys() == ["a", "d"]  # let go: the oldest, dropped next
    cache.get("e", loads("e"))
    assert cache.keys() == ["d", "e"] and loads.calls == ["a", "b", "c", "d", "e"]


def test_over_the_limit_only_while_in_use_then_back_down():
    cache, freed = cache_with_frees(limit=1)
    loads = Loads()
    with cache.held("run copy", loads("copy")):
        with cache.use("chat", loads("chat")):
            assert cache.keys() == ["run copy", "chat"]  # both in use: neither can go
        assert cache.keys() == ["run copy"] and len(freed) == 1  # the reply over: back to the limit
    assert cache.keys() == [] and len(freed) == 2  # the run's copy lets go with its block
    cache.get("chat", loads("chat"))
    assert loads.calls == ["copy", "chat", "chat"]


def test_the_baseline_kept_is_never_dropped_and_a_new_one_replaces_it():
    cache, freed = cache_with_frees(limit=2)
    loads = Loads()
    old = Model("base 1")
    ref = weakref.ref(old)
    cache.put(BASELINE, old, keep=True)
    del old
    for k in "abc":
        cache.get(k, loads(k))
    assert cache.keys() == [BASELINE, "c"]
    cache.put(BASELINE, Model("base 2"), keep=True)
    assert ref() is None and cache.keys() == ["c", BASELINE]


def test_two_threads_asking_for_the_same_model_load_it_once():
    cache, _ = cache_with_frees()
    started, release, calls = threading.Event(), threading.Event(), []

    def slow():
        calls.append(1)
        started.set()
        release.wait()
        return "model"

    got = []
    first = threading.Thread(target=lambda: got.append(cache.get("a", slow)))
    first.start()
    started.wait()
    second = threading.Thread(target=lambda: got.append(cache.get("a", slow)))
    second.start()
    release.set()
    first.join()
    second.join()
    assert got == ["model", "model"] and calls == [1]


# -- the limit ---------------------------------------------------------------------------------------
def test_the_limit_comes_from_the_environment():
    assert max_models({}) == DEFAULT_MAX_MODELS == 2
    assert max_models({MAX_MODELS_ENV: " 3 "}) == 3
    for bad in ("0", "-1", "two", "1.5"):
        with pytest.raises(ValueError, match=f"{MAX_MODELS_ENV} must be a whole number of at least 1"):
            max_models({MAX_MODELS_ENV: bad})


def test_the_lab_refuses_a_bad_limit_in_one_line(monkeypatch, capsys):
    from frankenlab.tui.app import run_lab

    monkeypatch.setenv(MAX_MODELS_ENV, "none")
    assert run_lab(SimpleNamespace(model=None, session=None)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"frankenlab: {MAX_MODELS_ENV} must be a whole number")


# -- the lab's models on the tiny LLaMA ----------------------------------------------------------------
@pytest.fixture
def lab_with_stages(tmp_path, tiny_model_dir, tiny):
    """A lab on the tiny LLaMA (limit 2) whose session has two finished stages saved as models."""
    runner_calls = []
    lab = LabState(
        loader=load_model,
        runner=lambda *a, **k: runner_calls.append(k) or "session",
        runs_dir=tmp_path / "runs",
        device="cpu",
        dtype="float32",
        models=ModelCache(2),
    )
    lab.runner_calls = runner_calls
    lab.model_ready(tiny)
    gc.unfreeze()  # model_ready froze the collector's survivors; the test checks what it frees
    run = tmp_path / "runs" / "r-1"
    stages = []
    for i in (1, 2):
        folder = run / "stages" / f"{i}-copy"
        tiny.model.save_pretrained(folder)
        tiny.tokenizer.save_pretrained(folder)
        stages.append(StageRecord(i, "copy", "depth", status="done", artifact=str(folder)))
    lab.session = Session(recipe={"name": "r"}, stages=[StageRecord(0, "baseline", "baseline", status="done"), *stages])
    lab.session.path = str(run / "session.json")
    return lab


def stage_targets(lab):
    targets = lab.chat_targets()
    return [t for k, t in targets.items() if k.startswith("stage")]


def test_the_labs_chat_keeps_the_baseline_and_one_stage_model_by_default(lab_with_stages):
    lab = lab_with_stages
    one, two = stage_targets(lab)
    m1, _ = one.resolve()
    ref = weakref.ref(m1)
    del m1
    assert lab.models.keys() == [BASELINE, one.cache_key]
    two.resolve()  # a third model: the stage-1 model goes, the baseline (the lab's) stays
    assert lab.models.keys() == [BASELINE, two.cache_key]
    gc.collect()
    assert ref() is None, "the dropped stage model is still held somewhere"
    base, _ = lab.chat_targets()["base"].resolve()
    assert base is lab.loaded.model
    again, _ = one.resolve()  # chosen again: loaded again from its folder
    assert Path(again.config._name_or_path).name == "1-copy" and lab.models.loads == 3


def test_a_chat_model_answering_is_kept_while_the_other_loads(lab_with_stages):
    lab = lab_with_stages
    one, two = stage_targets(lab)
    with one.use() as (model, _):
        two.resolve()  # A/B: B loads while A is still in use
        assert set(lab.models.keys()) == {BASELINE, one.cache_key, two.cache_key}
        assert lab.models.in_use(one.cache_key)
    assert lab.models.keys() == [BASELINE, two.cache_key]  # over the limit only while A answered


def test_a_run_copy_counts_makes_room_and_leaves_with_the_run(lab_with_stages, tmp_path):
    lab = lab_with_stages
    one, _ = stage_targets(lab)
    one.resolve()
    seen = {}

    def runner(recipe, out, **kw):
        seen["keys"] = lab.models.keys()
        seen["in use"] = [lab.models.in_use(k) for k in seen["keys"]]
        seen["copy"] = kw["loaded"].model
        return "session"

    lab.runner = runner
    out = tmp_path / "runs" / "new"
    assert lab.run(SimpleNamespace(name="r"), out, listener=lambda e: None) == "session"
    copy_key = f"run copy: {out}"
    assert seen["keys"] == [BASELINE, copy_key] and seen["in use"] == [True, True]  # the chat model made room
    assert seen["copy"] is not lab.loaded.model
    ref = weakref.ref(seen.pop("copy"))
    gc.collect()
    assert lab.models.keys() == [BASELINE] and ref() is None


def layered(name):
    """A stand-in model with decoder layers (what the lab counts)."""
    model = Model(name)
    model.model = SimpleNamespace(layers=torch.nn.ModuleList([torch.nn.Identity()]))
    return model


def test_loading_another_baseline_first_drops_the_chat_models_not_in_use(tmp_path):
    loaded = []
    lab = LabState(
        loader=lambda ref, **kw: loaded.append(ref) or SimpleNamespace(model=layered(ref), tokenizer="tok"),
        runner=lambda *a, **k: None,
        runs_dir=tmp_path / "runs",
        models=ModelCache(2, free=lambda device: None),
    )
    lab.model_ready(lab.load("first"))
    gc.unfreeze()
    lab.models.get("chat: stage 1", lambda: Model("stage 1"))
    new = lab.load("second")  # room made before the load: the old baseline stays until the new one is ready
    assert lab.models.keys() == [BASELINE] and lab.loaded.model.name == "first"
    lab.model_ready(new)
    gc.unfreeze()
    assert lab.models.keys() == [BASELINE] and lab.models.get(BASELINE, None).model.name == "second"
