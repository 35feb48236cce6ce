"""The decisions that depend on the device, checked on a CPU with CUDA mocked (`pipeline.devices`).

No test here needs a GPU: `torch.cuda.is_available`, `device_count`, `get_device_capability` and
`is_bf16_supported` are monkeypatched, out-of-memory errors are raised on purpose, and a Ray
module is faked. `benchmarks/gpu_smoke.py` runs the real thing on a CUDA machine.
"""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from frankenlab.evals import devices

pytestmark = pytest.mark.usefixtures("one_thread")
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "v2"


def fake_cuda(monkeypatch, *, count=1, capability=(8, 0), bf16=True):
    """CUDA as a machine with `count` GPUs of `capability` would report it (nothing is allocated)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)
    calls = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    return calls


def oom(message="CUDA out of memory. Tried to allocate 2.00 GiB"):
    return torch.OutOfMemoryError(message)


# -- the dtype "auto" means ------------------------------------------------------------------------
def test_auto_dtype_follows_the_cards_real_capability(monkeypatch):
    from frankenlab.pipeline.loading import pick_dtype

    assert pick_dtype("auto", torch.device("cpu")) == torch.float32
    fake_cuda(monkeypatch, capability=(9, 0))  # H100
    assert pick_dtype("auto", torch.device("cuda")) == torch.bfloat16
    # V100 / T4: torch says bf16 is "supported" (emulated); the card has no bf16 units: fp16
    fake_cuda(monkeypatch, capability=(7, 0), bf16=True)
    assert pick_dtype("auto", torch.device("cuda")) == torch.float16
    assert devices.half_dtype("cuda") == torch.float16
    fake_cuda(monkeypatch, capability=(8, 6), bf16=False)  # a driver that says no
    assert pick_dtype("auto", torch.device("cuda")) == torch.float16
    assert pick_dtype("bf16", torch.device("cuda")) == torch.bfloat16  # asked for: as asked
    assert devices.resolved("auto", "auto") == {"device": "cuda", "dtype": "float16"}
    assert devices.resolved("cpu", "fp32") == {"device": "cpu", "dtype": "float32"}


def test_lora_autocast_asks_the_same_decision(monkeypatch):
    from frankenlab.pipeline.stages.lora import _autocast

    fake_cuda(monkeypatch, capability=(7, 5), bf16=True)  # T4
    assert _autocast(torch.device("cuda"), "auto") == torch.float16
    fake_cuda(monkeypatch, capability=(8, 0))
    assert _autocast(torch.device("cuda"), "auto") == torch.bfloat16
    monkeypatch.setattr(devices, "cpu_bf16_units", lambda: None)  # a CPU without bf16 units (test_lora_precision.py)
    assert _autocast(torch.device("cpu"), "auto") is None


# -- sweep keys hold the resolved device and dtype ----------------------------------------------------
def tiny_sweep(model_dir, device="auto") -> str:
    return f"""
name = "keys"
[base]
model = {{ source = "{model_dir}", device = "{device}" }}
[base.evaluation]
perplexity = ["wikitext2-concat-64"]
ppl_limit = 2
samples = false
[[base.stages]]
kind = "width"
pattern = "1:8"
[axes]
"width.pattern" = ["1:8"]
"""


def test_sweep_keys_hold_the_resolved_device_and_dtype_not_auto(tiny_model_dir):
    from frankenlab.sessions.sweep import build_tree, parse_sweep

    configs = parse_sweep(tiny_sweep(tiny_model_dir)).expand()
    cpu, _ = build_tree(configs, resolve=lambda d, t: {"device": "cpu", "dtype": "float32"})
    gpu, _ = build_tree(configs, resolve=lambda d, t: {"device": "cuda", "dtype": "bfloat16"})
    assert not set(cpu) & set(gpu), "a sweep resumed on a GPU box must not reuse the CPU's fp32 nodes"
    here, _ = build_tree(configs)  # this machine: hidden GPUs, so the CPU in fp32
    assert set(here) == set(cpu)
    assert all(n.loads_as == {"device": "cpu", "dtype": "float32"} for n in here.values())
    # "auto", "float32" and "fp32" on a CPU are the same model, so the same nodes
    data = tiny_sweep(tiny_model_dir, "cpu").replace('device = "cpu" }', 'device = "cpu", dtype = "fp32" }')
    explicit, _ = build_tree(parse_sweep(data).expand())
    assert set(explicit) == set(cpu)


def copy_fixture(name: str, root: Path) -> Path:
    for src in (FIXTURES / name).rglob("*"):
        if src.is_file():
            dst = root / src.relative_to(FIXTURES)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_text(src.read_text().replace("@ROOT@", str(root)))
    return root / name


@pytest.fixture
def old_sweep(tmp_path):
    """The first-format sweep folder (keys without the device) beside the tiny model it was made from."""
    from tests.tiny import build_tiny_llama

    build_tiny_llama(tmp_path / "tiny-llama")  # seed 0: the weights the fixture's keys hash
    return copy_fixture("sweep", tmp_path)


def test_an_old_sweep_folder_is_reused_under_the_new_keys(old_sweep, data_dir):
    from frankenlab.sessions.sweep import load_record, parse_sweep, run_sweep
    from frankenlab.sessions.sweep.tree import build_tree, find_node

    sweep = parse_sweep((old_sweep / "sweep.toml").read_text(), str(old_sweep / "sweep.toml"))
    nodes, _ = build_tree(sweep.expand())
    old_keys = set(load_record(old_sweep)["nodes"])
    assert not set(nodes) & old_keys and {n.legacy for n in nodes.values()} == old_keys
    assert all(find_node(old_sweep, n) is not None for n in nodes.values())
    record = run_sweep(sweep, old_sweep, data_dir=data_dir)
    assert record["status"] == "done"
    assert record["runs"][-1]["nodes_computed"] == 0 and record["runs"][-1]["nodes_reused"] == 4
    # the same old nodes are not taken for a machine that would load the model as bf16 on a GPU
    gpu, _ = build_tree(sweep.expand(), resolve=lambda d, t: {"device": "cuda", "dtype": "bfloat16"})
    assert all(find_node(old_sweep, n) is None for n in gpu.values())


def test_a_job_loads_the_model_as_its_keys_say(tiny_model_dir, tmp_path):
    from frankenlab.sessions.sweep import build_tree, parse_sweep, plan_jobs
    from frankenlab.sessions.sweep.run import _job_spec

    configs = parse_sweep(tiny_sweep(tiny_model_dir)).expand()
    nodes, _ = build_tree(configs, resolve=lambda d, t: {"device": "cuda", "dtype": "float16"})
    job = plan_jobs(nodes, set())[0]
    state = {"nodes": nodes, "configs": {c.index: c for c in configs}, "finished": {}, "out": tmp_path}
    model = _job_spec(state, job, None)["recipe"]["model"]
    assert model["device"] == "cuda" and model["dtype"] == "float16"


# -- replay uses the recorded device and dtype ---------------------------------------------------------
def test_replay_of_a_cpu_session_runs_on_the_cpu_in_fp32_on_a_gpu_box(monkeypatch):
    from frankenlab.sessions.replay import environment_notes, recorded_settings
    from frankenlab.sessions.session import Session

    fake_cuda(monkeypatch, capability=(9, 0))
    saved = Session(recipe={}, model_source={}, environment={"device": "cpu", "dtype": "float32"})
    assert recorded_settings(saved, "auto", "auto", {}) == {"device": "cpu", "dtype": "float32"}
    assert recorded_settings(saved, "auto", "auto", {"dtype": "auto"}) == {"device": "cpu", "dtype": "float32"}
    assert recorded_settings(saved, "auto", "auto", {"dtype": "bf16", "device": "cuda"}) == {}  # the user's choice
    assert recorded_settings(saved, "cuda", "float16", {}) == {}  # the recipe named them
    on_gpu = Session(recipe={}, model_source={}, environment={"device": "cuda:1", "dtype": "bfloat16"})
    assert recorded_settings(on_gpu, "auto", "auto", {}) == {"device": "cuda", "dtype": "bfloat16"}
    fake_cuda(monkeypatch, count=0)  # a CUDA session replayed on a laptop: the device stays auto (a note says so)
    assert recorded_settings(on_gpu, "auto", "auto", {}) == {"dtype": "bfloat16"}
    same_kind = Session(recipe={}, model_source={}, environment={"device": "cuda:0", "dtype": "bfloat16"})
    assert environment_notes(on_gpu, same_kind) == []  # another GPU of the same machine is no difference
    assert environment_notes(saved, on_gpu) == ["device: saved cpu, now cuda:1", "dtype: saved float32, now bfloat16"]


def test_replay_passes_the_recorded_settings_to_the_run(monkeypatch, tmp_path):
    import frankenlab.sessions.recorder as recorder
    from frankenlab.sessions.replay import replay
    from frankenlab.sessions.session import Session

    fake_cuda(monkeypatch, capability=(9, 0))
    seen = {}

    def fake_record_run(recipe, out_dir, **kw):
        seen["model"] = recipe.model
        return Session(recipe=recipe.to_dict(), model_source={}, environment={"device": "cpu", "dtype": "float32"})

    monkeypatch.setattr(recorder, "record_run", fake_record_run)
    saved = Session(
        recipe={"model": {"source": "default"}, "stages": []},
        model_source={},
        environment={"device": "cpu", "dtype": "float32"},
    )
    result = replay(saved, tmp_path / "again")
    assert (seen["model"].device, seen["model"].dtype) == ("cpu", "float32")
    assert not [n for n in result.notes if n.startswith(("device", "dtype"))]


# -- the blocked head in fp32 -----------------------------------------------------------------------
def test_blocked_head_scores_a_bf16_model_in_fp32():
    from frankenlab.evals.head import blocked_token_nll

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(16, 64, generator=g) * 2).to(torch.bfloat16)
    w = torch.randn(300, 64, generator=g).to(torch.bfloat16)
    y = torch.randint(0, 300, (16,), generator=g)
    ref = nn.functional.cross_entropy(x.float() @ w.float().T, y, reduction="none")
    got = blocked_token_nll(x, w, None, y, block=128)
    assert got.dtype == torch.float32
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-5), (got - ref).abs().max()
    x32, w32 = torch.randn(8, 32, generator=g), torch.randn(100, 32, generator=g)  # fp32: unchanged
    y32 = torch.randint(0, 100, (8,), generator=g)
    ref32 = nn.functional.cross_entropy(x32 @ w32.T, y32, reduction="none")
    assert torch.allclose(blocked_token_nll(x32, w32, None, y32, block=40), ref32, atol=1e-5)


# -- local sweeps: one process per GPU ------------------------------------------------------------------
def test_several_gpus_get_one_process_each_with_only_their_gpu_visible(monkeypatch):
    fake_cuda(monkeypatch, count=2)
    slots = devices.local_sweep_slots("auto")
    assert slots == ["cuda:0", "cuda:1"] and devices.local_sweep_slots("cuda") == slots
    assert devices.process_per_job(slots)
    env = devices.job_environment("cuda:1", {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "0,1"})
    assert env == {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "1"}
    assert devices.slot_device("cuda:1", own_process=True) == "cuda"  # its one visible GPU
    assert devices.slot_device("cuda:1", own_process=False) == "cuda:1"
    assert devices.local_sweep_slots("cpu") == [None]
    fake_cuda(monkeypatch, count=1)
    assert devices.local_sweep_slots("auto") == [None] and not devices.process_per_job([None])
    fake_cuda(monkeypatch, count=0)
    assert devices.local_sweep_slots("auto") == [None]

    from frankenlab.sessions.sweep.executors import LocalExecutor

    fake_cuda(monkeypatch, count=2)
    executor = LocalExecutor("auto")
    try:
        assert executor.slots == 2 and executor.own_process
    finally:
        executor.close()
    executor = LocalExecutor("cpu")
    try:
        assert executor.slots == 1 and not executor.own_process  # CPU: in this process, as before
    finally:
        executor.close()


def test_a_job_in_its_own_process_reports_back(tiny_model_dir, tmp_path, data_dir):
    from frankenlab.sessions.sweep import parse_sweep, run_sweep
    from frankenlab.sessions.sweep.executors import LocalExecutor

    executor = LocalExecutor("cpu", process_per_job=True)
    events = []
    record = run_sweep(
        parse_sweep(tiny_sweep(tiny_model_dir, "cpu")),
        tmp_path / "sw",
        executor=executor,
        data_dir=data_dir,
        listener=events.append,
    )
    assert record["status"] == "done" and record["runs"][-1]["nodes_computed"] == 2
    for key in record["nodes"]:
        node = json.loads((tmp_path / "sw" / "nodes" / key / "node.json").read_text())
        assert node["status"] == "done" and node["environment"]["device"] == "cpu"
    job_logs = list((tmp_path / "sw" / "nodes").glob("*.log"))
    assert job_logs, "the job's process writes its log beside its node"
    assert any(type(e).__name__ == "NodeProgress" for e in events), "the child's progress reaches the listener"
    from frankenlab.sessions.sweep.worker import run_in_process

    calls = []
    result = run_in_process(
        {
            "sweep_dir": str(tmp_path / "sw2"),
            "keys": ["k"],
            "recipe": {"model": {"source": str(tmp_path / "nowhere")}},
            "first": 0,
            "start_artifact": None,
            "data_dir": str(data_dir),
        },
        dict(os.environ),
        listener=calls.append,
    )
    assert result["status"] == "failed" and result["pid"] != os.getpid()


# -- Ray placement -------------------------------------------------------------------------------------
class FakeRay(types.ModuleType):
    def __init__(self, resources):
        super().__init__("ray")
        self.resources, self.options, self.shut = resources, [], False

    def is_initialized(self):
        return True

    def cluster_resources(self):
        return self.resources

    def remote(self, fn):
        ray = self

        class Task:
            def options(self, **kw):
                ray.options.append((fn.__name__, kw))
                return types.SimpleNamespace(remote=lambda *a: ("ref", fn, a))

        return Task()

    def get(self, ref):
        return ref[1](*ref[2])

    def shutdown(self):
        self.shut = True


def test_ray_refuses_cuda_on_a_cluster_without_gpus_at_once(monkeypatch):
    from frankenlab.sessions.sweep.executors import RayExecutor

    monkeypatch.setitem(sys.modules, "ray", FakeRay({"CPU": 8.0}))
    for device in ("cuda", "cuda:1"):
        with pytest.raises(RuntimeError) as err:
            RayExecutor(device=device)
        message = str(err.value)
        assert "\n" not in message and "has no GPU" in message and 'device = "auto"' in message
    ex = RayExecutor(device="auto")  # auto on a CPU cluster: CPU tasks
    assert not ex.wants_gpu and ex.slots == 8 and sys.modules["ray"].options[0][1]["num_gpus"] == 0
    assert ex.resolve("auto", "auto") == {"device": "cpu", "dtype": "float32"}
    monkeypatch.setitem(sys.modules, "ray", FakeRay({"CPU": 8.0, "GPU": 2.0}))
    ex = RayExecutor(device="cuda:1")
    assert ex.wants_gpu and ex.slots == 2 and sys.modules["ray"].options[0][1]["num_gpus"] == 1


def test_a_ray_task_maps_cuda_n_to_its_own_gpu(monkeypatch):
    import frankenlab.sessions.sweep.executors as executors

    seen = {}
    monkeypatch.setattr(executors, "run_job", lambda spec: seen.setdefault("spec", spec))
    executors._ray_job({"recipe": {"model": {"source": "x", "device": "cuda:3"}, "stages": []}, "keys": ["k"]})
    assert seen["spec"]["recipe"]["model"]["device"] == "cuda"
    assert devices.task_device("cpu") == "cpu" and devices.task_device("auto") == "auto"


# -- memory ----------------------------------------------------------------------------------------------
def test_halving_on_oom_retries_down_to_one_row():
    sizes = []

    def score(b, e):
        sizes.append(e - b)
        if e - b > 2:
            raise oom()
        return list(range(b, e))

    parts, size = devices.halving_on_oom(score, 7)
    assert [x for p in parts for x in p] == list(range(7)) and size == 1 or size == 2
    assert sizes[0] == 7 and max(sizes[1:]) <= 3
    with pytest.raises(torch.OutOfMemoryError):
        devices.halving_on_oom(lambda b, e: (_ for _ in ()).throw(oom()), 4)
    with pytest.raises(ValueError):  # anything else is not retried
        devices.halving_on_oom(lambda b, e: (_ for _ in ()).throw(ValueError("no")), 4)
    assert devices.is_oom(RuntimeError("CUDA error: out of memory")) and not devices.is_oom(RuntimeError("shape"))


def test_perplexity_on_a_gpu_halves_a_batch_that_does_not_fit(tiny, data_dir, monkeypatch):
    import frankenlab.evals.perplexity as ppl

    want = ppl.perplexity(tiny.model, tiny.tokenizer, "wikitext2-concat-64", data_dir=data_dir, limit=6, batch_size=4)
    real = ppl.nll_sum
    rows = []

    def small_memory(model, ids, labels, packs=None):
        rows.append(ids.shape[0])
        if ids.shape[0] > 1:
            raise oom()
        return real(model, ids, labels, packs)

    monkeypatch.setattr(ppl, "nll_sum", small_memory)
    monkeypatch.setattr(devices, "retry_smaller_batches", lambda device: True)  # as on a GPU
    monkeypatch.setenv("FRANKENLAB_EVAL_WORKERS", "1")
    got = ppl.perplexity(tiny.model, tiny.tokenizer, "wikitext2-concat-64", data_dir=data_dir, limit=6, batch_size=4)
    assert got.value == pytest.approx(want.value, rel=1e-6) and got.tokens == want.tokens
    first_fit = rows.index(1)
    assert rows[0] > 1 and rows.count(1) == 6
    assert set(rows[first_fit:]) == {1}, "later batches start at the size that fit"
    monkeypatch.setattr(devices, "retry_smaller_batches", lambda device: False)  # a CPU: no retry, as before
    with pytest.raises(torch.OutOfMemoryError):
        ppl.perplexity(tiny.model, tiny.tokenizer, "wikitext2-concat-64", data_dir=data_dir, limit=6, batch_size=4)


def test_generation_on_a_gpu_halves_a_batch_that_does_not_fit(tiny, monkeypatch):
    import frankenlab.evals.generate as gen

    prompts = ["Question: one?\nAnswer:", "Q: two two?\nAnswer:", "three", "Question: four four four?\nAnswer:"]
    want = [g.text for g in gen.generate_greedy(tiny.model, tiny.tokenizer, prompts, max_new_tokens=4, batch_size=4)]
    real = gen._decode

    def small_memory(model, ids, *a):
        if ids.shape[0] > 1:
            raise oom()
        return real(model, ids, *a)

    monkeypatch.setattr(gen, "_decode", small_memory)
    monkeypatch.setattr(devices, "retry_smaller_batches", lambda device: True)
    got = [g.text for g in gen.generate_greedy(tiny.model, tiny.tokenizer, prompts, max_new_tokens=4, batch_size=4)]
    assert got == want


def test_eval_cli_out_of_memory_is_one_line(tiny_model_dir, data_dir, monkeypatch, capsys):
    import frankenlab.evals.suite as suite
    from frankenlab.tui.cli.main import main

    def boom(*a, **kw):
        raise oom()

    monkeypatch.setattr(suite, "evaluate", boom)
    rc = main(
        ["eval", "--model", str(tiny_model_dir), "--limit", "2", "--data-dir", str(data_dir), "--batch-size", "8"]
    )
    out = capsys.readouterr().out
    assert rc == 2 and "Traceback" not in out
    line = next(ln for ln in out.splitlines() if "out of memory" in ln)
    assert "try --batch-size 4" in line and "smaller model" in line


def test_loading_out_of_memory_on_the_device_is_one_line(tiny_model_dir, monkeypatch):
    from frankenlab.evals.errors import ModelLoadError
    from frankenlab.pipeline.loading import load_model

    def no_room(self, *a, **kw):
        raise oom()

    monkeypatch.setattr(nn.Module, "to", no_room)
    with pytest.raises(ModelLoadError) as err:
        load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    assert "out of memory loading" in str(err.value) and "\n" not in str(err.value)


def test_free_cached_memory_only_on_cuda(monkeypatch):
    calls = fake_cuda(monkeypatch)
    devices.free_cached_memory("cpu")
    assert calls == []
    devices.free_cached_memory("cuda:0")
    assert calls == ["empty_cache"]


def test_the_runner_frees_cached_memory_after_each_stage(tiny, tmp_path, data_dir, monkeypatch):
    import frankenlab.pipeline.runner as runner
    from frankenlab.pipeline.recipe import Recipe

    freed = []
    monkeypatch.setattr(runner, "free_cached_memory", lambda device=None: freed.append(str(device)))
    recipe = Recipe.from_dict(
        {
            "model": {"source": tiny.source.path, "device": "cpu"},
            "evaluation": {"perplexity": ["wikitext2-concat-64"], "ppl_limit": 2, "samples": False},
            "stages": [{"kind": "width", "pattern": "1:8"}],
        }
    )
    result = runner.run_recipe(recipe, tmp_path / "run", loaded=tiny, save_models=False, data_dir=data_dir)
    assert result.status == "done" and freed == ["cpu", "cpu"]  # baseline and stage 1


def test_the_labs_run_copy_is_made_on_the_cpu_for_a_gpu_model(tiny, monkeypatch):
    from frankenlab.evals.errors import ModelLoadError
    from frankenlab.tui import lab_state

    model = tiny.model
    moved = []

    def to(self, *a, **kw):
        moved.append(a[0] if a else kw.get("device"))
        return self

    monkeypatch.setattr(devices, "model_device", lambda m: torch.device("cuda:0"))  # as if on the GPU
    monkeypatch.setattr(nn.Module, "to", to)
    twin = lab_state.run_copy(model)
    assert moved == [torch.device("cuda:0")]
    originals = {p.data_ptr() for p in model.parameters()}
    assert all(p.device.type == "cpu" and p.data_ptr() not in originals for p in twin.parameters())
    assert (twin.lm_head.weight is twin.model.embed_tokens.weight) == (
        model.lm_head.weight is model.model.embed_tokens.weight
    )
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters(), strict=True))

    def no_room(self, *a, **kw):
        raise oom()

    monkeypatch.setattr(nn.Module, "to", no_room)
    with pytest.raises(ModelLoadError) as err:
        lab_state.run_copy(model)
    assert "out of GPU memory" in str(err.value) and "\n" not in str(err.value)


# -- CPU fast paths stay on the CPU ----------------------------------------------------------------------
def test_packed_linears_leave_a_gpu_models_linears_alone():
    from frankenlab.evals.packed import packed_linears

    with torch.device("meta"):  # a model whose weights are not on the CPU
        model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    with packed_linears(model) as packs:
        assert not packs.enabled
        assert all("forward" not in m.__dict__ for m in model)
    cpu = nn.Sequential(nn.Linear(8, 8))
    with packed_linears(cpu) as packs:
        if packs.enabled:  # a build with oneDNN: the CPU model is wrapped, as before
            assert "forward" in cpu[0].__dict__


def test_malloc_tuning_only_for_a_model_on_the_cpu(monkeypatch):
    from frankenlab.evals import malloc

    calls = []
    fake = types.SimpleNamespace(mallopt=lambda *a: calls.append(a), malloc_trim=lambda *a: calls.append(("trim",)))
    monkeypatch.setattr(malloc, "_glibc", lambda: fake)
    monkeypatch.setattr(malloc, "enabled", lambda: True)
    with malloc.reuse_freed_memory(on_cpu=False):
        pass
    assert calls == []
    with malloc.reuse_freed_memory():
        pass
    assert calls and calls[-1] == ("trim",)


# -- the suite itself runs on the CPU -------------------------------------------------------------------
def test_the_suite_hides_gpus_unless_gpu_tests_are_selected():
    from tests.conftest import gpu_selected

    assert os.environ.get("CUDA_VISIBLE_DEVICES") == ""
    assert not torch.cuda.is_available()
    assert gpu_selected("gpu") and gpu_selected("gpu and not slow") and gpu_selected("slow or gpu")
    assert not gpu_selected("not gpu") and not gpu_selected("not bench") and not gpu_selected("")


@pytest.mark.gpu
def test_a_cuda_model_loads_in_the_auto_dtype_and_evaluates(tiny_model_dir, data_dir):
    from frankenlab.evals.perplexity import perplexity
    from frankenlab.pipeline.loading import load_model

    lm = load_model(str(tiny_model_dir), device="auto", dtype="auto")
    assert lm.device.type == "cuda" and lm.dtype == devices.auto_dtype(lm.device)
    r = perplexity(lm.model, lm.tokenizer, "wikitext2-concat-64", data_dir=data_dir, limit=2)
    cpu = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    want = perplexity(cpu.model, cpu.tokenizer, "wikitext2-concat-64", data_dir=data_dir, limit=2)
    assert r.value == pytest.approx(want.value, rel=0.05)


def test_chat_models_beyond_the_labs_limit_leave_the_gpu(monkeypatch):
    """The chat's models live in the lab's model cache: one too many drops the least recently used and
    empties CUDA's cache; chosen again, it loads again (tests/test_model_cache.py has the rest)."""
    from frankenlab.tui.chat import ChatTarget
    from frankenlab.tui.model_cache import ModelCache

    calls = fake_cuda(monkeypatch)
    loads = []
    cache = ModelCache(2)
    targets = {
        k: ChatTarget(k, k, lambda k=k: loads.append(k) or (f"model {k}", "tok"), cache=cache)
        for k in ("s1", "s2", "s3")
    }
    for t in targets.values():
        t.resolve()
    assert cache.keys() == ["s2", "s3"] and calls == ["empty_cache"]
    targets["s1"].resolve()  # chosen again: loaded again, and s2 (now the oldest) leaves
    assert loads == ["s1", "s2", "s3", "s1"] and cache.keys() == ["s3", "s1"] and calls == ["empty_cache"] * 2


def test_gpu_smoke_on_a_cpu_machine_says_so_and_passes(capsys):
    from benchmarks.gpu_smoke import main

    assert main([]) == 0
    assert capsys.readouterr().out.strip() == "no CUDA device: nothing to check"
