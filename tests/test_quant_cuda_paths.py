"""Quantized models on a GPU, checked on the CPU: the kernel decision, the statistics from the saved checkpoint.

No GPU is needed. CUDA is reported by monkeypatching `evals.devices` (availability) and torch's
capability queries; gptqmodel's loader is wrapped so that a "CUDA" load happens on the CPU with the
torch kernel, and then either its quantized linears are moved to the meta device (weights that live
elsewhere: any read of them, or any mix with the CPU zero masks, fails) or replaced by a stand-in for
Marlin (repacked parameters on the meta device, a bias of zeros, no `dequantize_weight`). The
statistics, parameter counts and bytes must come out exactly as for the same folder opened on the
CPU. `benchmarks/gpu_smoke.py` runs the real thing on a GPU.
"""

from __future__ import annotations

import copy
import json
import types

import pytest
import safetensors.torch
import torch
from torch import nn

from frankenlab.evals import devices
from frankenlab.pipeline import quant, quant_folders
from frankenlab.pipeline.footprint import footprint
from frankenlab.pipeline.loading import count_parameters
from frankenlab.pipeline.quant_linear import (
    SavedPacking,
    attach_saved,
    dequantized_weight,
    quant_codes,
    quantized_linears,
    saved_packing,
)
from frankenlab.pipeline.stages.gptq import sparsity_after
from tests.test_quant import _quantize_tiny

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pruned(tiny_model_dir, tmp_path_factory):
    """The tiny model pruned 2:4, saved: (folder, {linear name: weight})."""
    from frankenlab.pipeline.loading import load_model
    from tests.test_memory import prune_nm

    lm = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    model = prune_nm(lm.model, 2, 4)
    path = tmp_path_factory.mktemp("pruned") / "tiny-2of4"
    model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return path, {n: m.weight.detach().clone() for n, m in model.named_modules() if n.endswith("_proj")}


@pytest.fixture(scope="module")
def quantized(pruned, tmp_path_factory):
    """One real masked GPTQ run on the CPU (tests/test_quant.py's helper): (folder, the model opened on CPU)."""
    out = tmp_path_factory.mktemp("masked") / "quantized"
    return out, _quantize_tiny(pruned[0], out, keep=True)


def cuda_reported(monkeypatch, *, capability=(8, 0), bf16=True):
    """CUDA as `evals.devices` sees it (torch itself, and so gptqmodel, still sees none)."""
    monkeypatch.setattr(devices, "cuda_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)


class FakeMarlinLinear(nn.Module):
    """What gptqmodel's Marlin leaves of a quantized linear on a GPU: qweight, scales, qzeros and g_idx
    as parameters in its own tiled layout (here on the meta device, so reading them fails), qzeros and
    g_idx emptied, a bias buffer of zeros the checkpoint does not have, a workspace, no dequantize_weight."""

    def __init__(self, src: nn.Module):
        super().__init__()
        self.bits, self.group_size = int(src.bits), int(src.group_size)
        self.in_features, self.out_features = int(src.in_features), int(src.out_features)

        def meta(*shape, dtype=torch.int32):
            return nn.Parameter(torch.empty(*shape, dtype=dtype, device="meta"), requires_grad=False)

        self.qweight = meta(self.in_features // 16, self.out_features * 2)
        self.scales = meta(*src.scales.shape, dtype=torch.float16)
        self.qzeros = meta(0)
        self.g_idx = meta(0)
        self.register_buffer("bias", torch.zeros(self.out_features, dtype=torch.float16, device="meta"))
        self.register_buffer("workspace", torch.empty(0, dtype=torch.int32, device="meta"), persistent=False)

    def forward(self, x):  # pragma: no cover - these tests never run the model
        raise AssertionError("a stand-in kernel is not run")


@pytest.fixture
def gpu_load(monkeypatch):
    """`quant.load_quantized(..., device="cuda")` on this CPU: every gptqmodel load is recorded, done on
    the CPU with the torch kernel, and its quantized linears end up where a GPU kernel would keep them."""
    gm = quant.gptqmodel()
    real = gm.GPTQModel.load
    calls = []

    def load(path, backend=None, device=None, dtype=None, **kwargs):
        calls.append({"backend": backend, "device": device, "dtype": dtype})
        wrapper = real(path, backend=gm.BACKEND.GPTQ_TORCH, device="cpu", dtype=torch.bfloat16, **kwargs)
        calls[-1]["compiled"] = sum(
            "dequantize_weight" in m.__dict__ for m in quantized_linears(wrapper.model).values()
        )
        for name, mod in list(quantized_linears(wrapper.model).items()):
            if backend == gm.BACKEND.GPTQ_TORCH:
                mod.to("meta")  # its weights are on "the GPU": nothing here may read them or mix them with CPU masks
            else:
                parent, _, leaf = name.rpartition(".")
                setattr(wrapper.model.get_submodule(parent), leaf, FakeMarlinLinear(mod))
        return wrapper

    monkeypatch.setattr(gm.GPTQModel, "load", staticmethod(load))
    cuda_reported(monkeypatch)
    return calls


def zero_masks(reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: w == 0 for name, w in reference.items() if bool((w == 0).any())}


# -- which kernel, which dtype ---------------------------------------------------------------------------
def test_gpu_kernel_is_chosen_here_never_gptqmodels_auto(monkeypatch):
    monkeypatch.delenv(devices.CUDA_QUANT_KERNEL_ENV, raising=False)
    cuda_reported(monkeypatch, capability=(8, 0))
    cuda = torch.device("cuda")
    assert devices.cuda_quant_kernel(cuda, bits=4, group_size=128) == ("torch", None)  # the default
    assert devices.cuda_quant_kernel(cuda, bits=4, group_size=128, choice="marlin") == ("marlin", None)
    monkeypatch.setenv(devices.CUDA_QUANT_KERNEL_ENV, "exllama_v2")
    assert devices.cuda_quant_kernel(cuda, bits=4, group_size=64, features=(2048, 8192)) == ("exllama_v2", None)
    # a kernel that cannot run the model falls back to torch, and says why
    kernel, note = devices.cuda_quant_kernel(cuda, bits=3, group_size=64)
    assert kernel == "torch" and "3-bit" in note
    kernel, note = devices.cuda_quant_kernel(cuda, bits=4, group_size=128, features=(2048, 100), choice="triton")
    assert kernel == "torch" and "widths not multiples of 32" in note
    kernel, note = devices.cuda_quant_kernel(cuda, bits=4, group_size=128, sym=False, choice="marlin")
    assert kernel == "torch" and "asymmetric" in note
    cuda_reported(monkeypatch, capability=(7, 5))
    kernel, note = devices.cuda_quant_kernel(cuda, bits=4, group_size=128, choice="marlin")
    assert kernel == "torch" and "compute capability 7.5 (needs 8.0)" in note
    monkeypatch.setenv(devices.CUDA_QUANT_KERNEL_ENV, "machete")
    with pytest.raises(devices.DeviceError, match=r"unknown GPU kernel 'machete'.*choose one of torch, triton"):
        devices.cuda_quant_kernel(cuda, bits=4, group_size=128)
    # the CPU keeps its kernels; a GPU model whose widths do not fit the groups takes torch whatever is asked
    monkeypatch.setenv(devices.CUDA_QUANT_KERNEL_ENV, "marlin")
    assert quant.kernel_for(torch.device("cpu"), True, bits=4, group_size=32) == ("torch_fused", None)
    assert quant.kernel_for(torch.device("cpu"), True, bits=3, group_size=32) == ("torch", None)
    assert quant.kernel_for(cuda, False, bits=4, group_size=128) == ("torch", None)


def test_quantized_models_never_run_in_emulated_bf16(monkeypatch):
    # a T4/V100 reports bf16 "supported" through emulation: GPTQ calibrates and runs in fp16 there
    cuda_reported(monkeypatch, capability=(7, 0), bf16=True)
    assert quant.quant_dtype(torch.device("cuda")) == torch.float16
    cuda_reported(monkeypatch, capability=(8, 0), bf16=True)
    assert quant.quant_dtype(torch.device("cuda")) == torch.bfloat16
    assert quant.quant_dtype(torch.device("cpu")) == torch.float32


def test_the_session_records_the_gpu_kernel(monkeypatch):
    from frankenlab.pipeline.preflight import environment

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    loaded = types.SimpleNamespace(device=torch.device("cuda"), dtype=torch.bfloat16, model=nn.Linear(2, 2))
    recipe = types.SimpleNamespace(calibration=types.SimpleNamespace(seed=0))
    monkeypatch.delenv(devices.CUDA_QUANT_KERNEL_ENV, raising=False)
    assert environment(loaded, recipe)["quant_kernel"] == "torch"
    monkeypatch.setenv(devices.CUDA_QUANT_KERNEL_ENV, "marlin")
    assert environment(loaded, recipe)["quant_kernel"] == "marlin"
    loaded.model.frankenlab_backend = "torch"  # a quantized model that fell back: what it runs is recorded
    assert environment(loaded, recipe)["quant_kernel"] == "torch"


# -- a quantized folder opened "on the GPU" ---------------------------------------------------------------
def test_gpu_load_asks_for_an_explicit_kernel_and_runs_dequantize_eagerly(quantized, gpu_load, monkeypatch):
    folder, _ = quantized
    monkeypatch.delenv(devices.CUDA_QUANT_KERNEL_ENV, raising=False)
    gm = quant.gptqmodel()
    model = quant.load_quantized(folder, device="cuda").model
    (call,) = gpu_load
    assert call["backend"] == gm.BACKEND.GPTQ_TORCH and call["device"] == "cuda:0"
    assert call["dtype"] == torch.bfloat16  # native on capability 8.0
    # gptqmodel compiled every module's dequantize_weight; none of those stays (first forward: minutes on a GPU)
    mods = quantized_linears(model)
    assert call["compiled"] == len(mods) == 8 * 7
    assert not any("dequantize_weight" in m.__dict__ for m in mods.values())
    assert model.frankenlab_backend == "torch"
    assert quant.kernel_description(model) == "torch (TorchLinear)"
    assert all(isinstance(saved_packing(m), SavedPacking) for m in mods.values())


@pytest.mark.parametrize("kernel", ["torch", "marlin"])
def test_statistics_counts_and_bytes_come_from_the_saved_checkpoint(kernel, quantized, pruned, gpu_load, monkeypatch):
    folder, on_cpu = quantized
    monkeypatch.setenv(devices.CUDA_QUANT_KERNEL_ENV, kernel)
    model = quant.load_quantized(folder, device="cuda").model
    mods = quantized_linears(model)
    assert len(mods) == 8 * 7
    assert {type(m).__name__ for m in mods.values()} == {"TorchLinear" if kernel == "torch" else "FakeMarlinLinear"}
    assert {m.qweight.device.type for m in mods.values()} == {"meta"}  # nothing below may read these
    assert model.frankenlab_backend == kernel
    # GPTQ's report: the zero masks (CPU) against the quantized weights, exactly as on the CPU
    masks = zero_masks(pruned[1])
    expect = sparsity_after(on_cpu, masks)
    assert expect["pattern_holds"] is True and expect["zeros_before"] > 0
    assert sparsity_after(model, masks) == expect
    # parameter counts: packed codes count as the weights they encode; Marlin's zero bias does not exist
    assert count_parameters(model) == count_parameters(on_cpu)
    assert count_parameters(model, nonzero=True) == count_parameters(on_cpu, nonzero=True)
    # memory accounting: the same storage per quantized matrix (2:4 codes found); the packed bytes are the
    # checkpoint's (the dense parts differ: bf16 here, float32 on the CPU)
    fp, ref = footprint(model), footprint(on_cpu)
    quant_entries = {e.name: e.storage for e in fp.entries if e.storage.quant}
    assert quant_entries == {e.name: e.storage for e in ref.entries if e.storage.quant}
    assert len(quant_entries) == 8 * 7 and all(s.nm == (2, 4) for s in quant_entries.values())
    assert not any(e.name.endswith((".bias", ".qweight", ".scales", ".workspace")) for e in fp.entries)
    saved = safetensors.torch.load_file(str(folder / "model.safetensors"))
    packed = {e.name: e.buffers_bytes for e in fp.entries if e.storage.quant}
    assert packed == {
        name: sum(saved[f"{name[: -len('.weight')]}.{b}"].nbytes for b in ("qweight", "qzeros", "scales"))
        for name in quant_entries
    }


def test_saved_zero_points_read_as_gptqmodel_reads_them(quantized):
    """The checkpoint stores zero points minus one (GPTQ v1); read back they equal the runtime module's."""
    folder, on_cpu = quantized
    assert json.loads((folder / "quantize_config.json").read_text())["checkpoint_format"] == "gptq"
    copy_ = copy.deepcopy(on_cpu)
    assert attach_saved(copy_, folder, runtime_is_saved=lambda module: False) == 8 * 7
    runtime = quantized_linears(on_cpu)
    for name, mod in quantized_linears(copy_).items():
        saved = saved_packing(mod)
        codes, zeros = quant_codes(saved)
        want_codes, want_zeros = quant_codes(runtime[name])
        assert torch.equal(codes, want_codes) and torch.equal(zeros, want_zeros), name
        mod._frankenlab_weight = None  # the CPU kernel's copy: read the checkpoint instead
        assert torch.equal(dequantized_weight(mod), runtime[name]._frankenlab_weight), name
    # plain torch kernels on the CPU keep the saved packing: load_quantized attaches nothing there
    assert not any(saved_packing(m) for m in runtime.values())


# -- writes through the output guard --------------------------------------------------------------------
def test_manifest_is_written_through_the_output_guard(tmp_path):
    from frankenlab.pipeline.atomic import UnsafeOutputPath

    victim = tmp_path / "victim.json"
    victim.write_text("precious")
    folder = tmp_path / "stage"
    folder.mkdir()
    (folder / quant_folders.MANIFEST).symlink_to(victim)
    with pytest.raises(UnsafeOutputPath, match="symbolic link"):
        quant_folders.write_manifest(folder, tmp_path / "quantized")
    assert victim.read_text() == "precious"
    (folder / quant_folders.MANIFEST).unlink()
    quant_folders.write_manifest(folder, tmp_path / "quantized", rank=4)
    assert json.loads((folder / quant_folders.MANIFEST).read_text()) == {
        "format": "gptqmodel",
        "quantized": "../quantized",
        "rank": 4,
    }


# -- chat: no token in time -------------------------------------------------------------------------------
class SilentModel(nn.Module):
    """A model whose generate yields no token until it is told to stop (a first forward still compiling)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.stopped = False

    def generate(self, ids, *, streamer, stopping_criteria, **kwargs):
        import threading

        gate = threading.Event()
        while not stopping_criteria[0](ids, None):
            gate.wait(0.01)
        self.stopped = True
        streamer.end()
        return ids


def test_chat_without_a_token_in_time_is_one_line(tiny_model_dir, monkeypatch):
    from transformers import AutoTokenizer

    from frankenlab.tui import chat

    monkeypatch.setattr(chat, "TOKEN_TIMEOUT_S", 0.2)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = SilentModel()
    with pytest.raises(chat.ReplyTimeout) as err:
        list(chat.stream_reply(model, tok, [{"role": "user", "content": "hi"}], max_new_tokens=4))
    message = str(err.value)
    assert message.startswith("no token after 0 s: ") and "\n" not in message
    assert "ask again, or choose a smaller model or another device" in message
    assert model.stopped  # generation was stopped, not left running under the model's lock


class OutOfMemoryModel(SilentModel):
    def generate(self, ids, *, streamer, stopping_criteria, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 512.00 MiB")


def test_chat_out_of_memory_is_one_line_that_says_what_to_lower(tiny_model_dir):
    from transformers import AutoTokenizer

    from frankenlab.tui import chat

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    with pytest.raises(chat.ReplyOutOfMemory) as err:
        list(chat.stream_reply(OutOfMemoryModel(), tok, [{"role": "user", "content": "hi"}], max_new_tokens=4))
    message = str(err.value)
    assert message.startswith("out of memory while generating the reply: lower max new tokens (now 4)")
    assert "\n" not in message and "smaller model" in message
