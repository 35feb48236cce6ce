"""LoRA's mixed_precision on a CPU (evals/devices.lora_precision): honoured or refused, never ignored.
Each CPU case is mocked: with bf16 units and faster, with units but slower, without units."""

import pytest
import torch

from frankenlab.evals import devices
from frankenlab.evals.errors import RecipeError
from frankenlab.pipeline import events as ev
from frankenlab.pipeline.stages import lora
from tests.test_lora import ctx_for, quick, text_file  # noqa: F401 - text_file is a fixture

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


def cpu(monkeypatch, units, speedup=None):
    monkeypatch.setattr(devices, "cpu_bf16_units", lambda: units)

    def measured():
        if speedup is None:
            raise AssertionError("no measurement without bf16 units")
        return speedup

    monkeypatch.setattr(devices, "cpu_bf16_speedup", measured)


def test_auto_picks_bf16_only_with_units_and_a_faster_measurement(monkeypatch):
    cpu(monkeypatch, "AMX", 2.4)
    dtype, why = devices.lora_precision(CPU, "auto")
    assert dtype is torch.bfloat16 and "AMX" in why and "2.40x faster" in why
    cpu(monkeypatch, "AVX-512-bf16", 1.1)
    dtype, why = devices.lora_precision(CPU, "auto")
    assert dtype is None and "measured 1.10x" in why
    cpu(monkeypatch, None)  # an AVX2 CPU: not even measured
    dtype, why = devices.lora_precision(CPU, "auto")
    assert dtype is None and "no bf16 matmul units" in why


def test_explicit_bf16_runs_and_says_when_it_is_slow(monkeypatch):
    cpu(monkeypatch, None)
    dtype, why = devices.lora_precision(CPU, "bf16")
    assert dtype is torch.bfloat16 and "slower than fp32" in why
    cpu(monkeypatch, "AMX")
    assert devices.lora_precision(CPU, "bf16") == (torch.bfloat16, "asked for; this CPU has AMX")
    assert devices.lora_precision(CPU, "no")[0] is None


def test_fp16_on_a_cpu_is_refused_in_one_line():
    with pytest.raises(RecipeError) as err:
        devices.lora_precision(CPU, "fp16")
    assert "\n" not in str(err.value) and '"bf16"' in str(err.value)


def test_the_measurement_is_cached_per_process(monkeypatch):
    monkeypatch.setattr(devices, "_BF16_SPEEDUP", {})
    first = devices.cpu_bf16_speedup(tokens=8, hidden=8, out=8, reps=1)
    assert first > 0

    def no_more(*a, **k):
        raise AssertionError("measured twice")

    monkeypatch.setattr(torch.nn.functional, "linear", no_more)
    assert devices.cpu_bf16_speedup(tokens=8, hidden=8, out=8, reps=1) == first


def test_cpu_detection_reads_the_flags(monkeypatch):
    monkeypatch.setattr(devices, "_cpu_flags", lambda: {"avx2", "amx_bf16", "avx512_bf16"})
    assert devices.cpu_bf16_units() == "AMX"
    monkeypatch.setattr(devices, "_cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})
    assert devices.cpu_bf16_units() == "AVX-512-bf16"
    monkeypatch.setattr(devices, "_cpu_flags", lambda: {"avx2", "fma"})
    assert devices.cpu_bf16_units() is None


def test_the_stage_runs_what_it_says(tiny, tiny_model_dir, tmp_path, text_file, monkeypatch):  # noqa: F811
    cpu(monkeypatch, None)
    logs = []
    listen = lambda e: logs.append(e.message) if isinstance(e, ev.LogLine) else None  # noqa: E731
    casts = []
    real = torch.autocast.__init__

    def spy(self, device_type, dtype=None, enabled=True, cache_enabled=None):
        casts.append((device_type, dtype if enabled else None))
        real(self, device_type, dtype=dtype, enabled=enabled, cache_enabled=cache_enabled)

    monkeypatch.setattr(torch.autocast, "__init__", spy)
    res = lora.run(
        tiny.model, ctx_for(tiny, tmp_path, listen), quick(text_file, steps=1, mixed_precision="bf16", merge=False)
    )
    r = res.report
    assert r["mixed_precision"].startswith("bf16 (asked for") and r["compute_dtype"] == "bfloat16"
    assert ("cpu", torch.bfloat16) in casts, "the training step ran under bf16 autocast"
    assert any("slower than fp32" in m for m in logs)
    adapters = [p for n, p in res.model.named_parameters() if "lora_" in n]
    assert adapters and all(p.dtype == torch.float32 for p in adapters), "adapters stay fp32 under bf16 autocast"
    from frankenlab.pipeline.loading import load_model

    tiny = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    auto = lora.run(tiny.model, ctx_for(tiny, tmp_path / "b"), quick(text_file, steps=1, mixed_precision="auto")).report
    assert auto["mixed_precision"].startswith("fp32 (auto: this CPU has no bf16") and auto["compute_dtype"] == "float32"
    with pytest.raises(RecipeError):
        lora.run(tiny.model, ctx_for(tiny, tmp_path / "c"), quick(text_file, steps=1, mixed_precision="fp16"))
