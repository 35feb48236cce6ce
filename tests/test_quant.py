"""GPTQ and EoRA stages on the tiny LLaMA, through the runner: depth 1 + width 2:4 + LoRA + GPTQ + EoRA.

One quantization is shared by the tests of this module (gptqmodel on a 2-core CPU takes tens of
seconds even for the tiny model). Group size 32 fits the tiny model's 64 / 160 dimensions.
"""

import json
import math
from pathlib import Path

import pytest
import torch

from frankenlab.evals.errors import RecipeError
from frankenlab.pipeline.quant_linear import dequantized_weight, quantized_linears
from frankenlab.pipeline.recipe import Recipe
from frankenlab.sessions import record_run

CHAIN = """
[[stages]]
kind = "depth"
k = 1
metric = "l1"
[[stages]]
kind = "width"
pattern = "2:4"
method = "magnitude"
[[stages]]
kind = "lora"
steps = 2
batch_size = 2
seq_len = 32
dataset = "wiki"
[[stages]]
kind = "gptq"
bits = 4
group_size = 32
samples = 8
seq_len = 32
[[stages]]
kind = "eora"
rank = 4
samples = 8
seq_len = 32
"""


def recipe_text(model_dir, stages: str) -> str:
    return f"""
name = "tiny-recovery"
model = "{model_dir}"
[calibration]
samples = 8
seq_len = 32
[evaluation]
perplexity = ["wikitext2-concat-64"]
ppl_limit = 2
samples = false
{stages}
"""


@pytest.fixture(scope="module")
def chain(tiny_model_dir, data_dir, tmp_path_factory):
    import os

    out = tmp_path_factory.mktemp("recovery") / "run"
    cwd = Path.cwd()
    scratch = tmp_path_factory.mktemp("cwd")
    os.chdir(scratch)  # gptqmodel must not write ./logs into wherever we run from
    try:
        session = record_run(Recipe.loads(recipe_text(tiny_model_dir, CHAIN)), out, data_dir=data_dir)
    finally:
        os.chdir(cwd)
    return session, out, scratch


def test_chain_finishes_with_finite_perplexity(chain):
    session, out, scratch = chain
    errors = [e for e in session.events if e.get("level") == "error" or e.get("event") == "RunFailed"]
    assert session.status == "done", errors
    for st in session.stages:
        assert st.status == "done"
        ppl = st.metric("perplexity")
        assert ppl is not None and math.isfinite(ppl["value"]), st.kind
    assert not (scratch / "logs").exists()


def test_gptq_report_and_saved_model(chain):
    session, out, _ = chain
    st = next(s for s in session.stages if s.kind == "gptq")
    r = st.report
    assert (r["bits"], r["group_size"], r["desc_act"]) == (4, 32, False)
    assert r["kernel"].startswith("CPU: calibration in float32; inference kernel auto: fused int4")
    assert session.environment["quant_kernel"] == "auto"
    qdir = Path(r["quantized_path"])
    assert st.artifact == str(qdir) and (qdir / "quantize_config.json").is_file()
    assert json.loads((qdir / "quantize_config.json").read_text())["bits"] == 4
    assert r["disk_bytes"] > 0 and r["disk_bytes"] < r["prequant_disk_bytes"]
    assert r["quantized_linears"] == 7 * 7  # 8 layers - 1 removed, 7 projections each
    assert r["density_before"] == pytest.approx(0.5, abs=1e-3)  # width 2:4, LoRA merged with the mask
    # masked GPTQ (keep_sparsity defaults on when zeros are present): every pruned weight stays zero;
    # a kept weight may round to zero too, so the density can only go down
    assert r["keep_sparsity"] is True and r["pattern_holds"] is True and r["zeros_kept_fraction"] == 1.0
    assert 0.45 < r["density_after"] <= r["density_before"]
    # every masked module went through the per-column patch (gptqmodel's default GAR ordering included)
    assert r["masked"]["modules"] == 7 * 7 and r["masked"]["fixed_after"] == 0
    assert (qdir.parent / "logs").is_dir() and not (qdir.parent / "offload").exists()


def test_parameter_count_survives_quantization(chain):
    session, out, _ = chain
    by_kind = {s.kind: s for s in session.stages}
    width, gptq, eora = by_kind["width"], by_kind["gptq"], by_kind["eora"]
    # packed int4 buffers count as the weights they encode (they used to vanish: 365,632 -> 21,568)
    assert gptq.params_count == width.params_count == eora.params_count
    # nonzero: the width stage's zeros survive and a few kept weights round to zero
    assert 0.95 * width.params_nonzero < gptq.params_nonzero <= width.params_nonzero


def test_eora_adapter_produced_and_applied(chain):
    from frankenlab.pipeline import quant

    session, out, _ = chain
    st = next(s for s in session.stages if s.kind == "eora")
    adapter = Path(st.report["adapter_path"])
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()
    assert st.report["layers_with_adapter"] == 7 * 7
    manifest = json.loads((adapter.parent / "frankenlab-quant.json").read_text())
    assert manifest["adapter"] == "eora" and manifest["rank"] == 4  # relative: the run folder can move
    assert st.artifact == str(adapter.parent)  # the stage folder opens as model + adapter
    quantized = (adapter.parent / manifest["quantized"]).resolve()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    plain = quant.load_quantized(quantized).model
    with_eora = quant.load_quantized(quantized, adapter=adapter, rank=4).model
    a, b = plain(input_ids=ids).logits, with_eora(input_ids=ids).logits
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert not torch.allclose(a, b)
    reply = with_eora.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    assert reply.shape == (1, ids.shape[1] + 3)  # chat works on the quantized model with its adapter


@pytest.mark.parametrize(
    "stages, message",
    [
        ('[[stages]]\nkind = "eora"', "eora needs a gptq stage before it"),
        ('[[stages]]\nkind = "gptq"\n[[stages]]\nkind = "lora"', "LoRA after GPTQ is not supported"),
        ('[[stages]]\nkind = "gptq"\nbits = 5', "bits must be one of 2, 3, 4, 8"),
        ('[[stages]]\nkind = "gptq"\ngroup_size = 100', "group_size must be -1"),
        ('[[stages]]\nkind = "gptq"\n[[stages]]\nkind = "eora"\nrank = 0', "rank must be at least 1"),
        ('[[stages]]\nkind = "gptq"\ndesc_act = "yes"', "expected true or false"),
        ('[[stages]]\nkind = "lora"\nalpha = -1', "alpha must be positive"),
        ('[[stages]]\nkind = "gptq"\n[[stages]]\nkind = "eora"\ndataset = "imagenet"', "unknown calibration dataset"),
    ],
)
def test_recipe_validation(stages, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.loads(recipe_text("default", stages))


def test_full_chain_recipe_round_trips():
    r = Recipe.loads(recipe_text("default", CHAIN))
    assert Recipe.loads(r.dumps()).to_dict() == r.to_dict()
    assert [s.kind for s in r.stages] == ["depth", "width", "lora", "gptq", "eora"]


def test_eora_without_quantized_model_fails_clearly(tiny):
    from frankenlab.pipeline.context import StageContext
    from frankenlab.pipeline.stages import eora

    with pytest.raises(RecipeError, match="eora needs a gptq stage"):
        eora.run(tiny.model, StageContext(tiny.tokenizer, torch.device("cpu")), eora.Config())


def test_dequantized_weights_match_prequant_weights(chain):
    """Square projections (q_proj, o_proj) must not come back transposed."""
    from safetensors.torch import load_file

    from frankenlab.pipeline import quant

    session, out, _ = chain
    st = next(s for s in session.stages if s.kind == "gptq")
    pre = Path(st.report["quantized_path"]).parent / "prequant"
    original = {}
    for f in pre.glob("*.safetensors"):
        original.update(load_file(str(f)))
    loaded = quant.load_quantized(st.report["quantized_path"])
    checked = 0
    for name, mod in loaded.model.named_modules():
        if hasattr(mod, "qweight") and name.endswith(("q_proj", "o_proj")):
            w = dequantized_weight(mod)
            ref = original[name + ".weight"].float()
            assert w.shape == ref.shape
            err = (w - ref).norm() / ref.norm()
            assert err < 0.25, f"{name}: relative error {err:.3f} (transposed?)"
            checked += 1
    assert checked == 2 * 7


# -- CPU kernels: fused int4 for decoding, exact fp32 for many rows ---------------------------------------
def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _gptq_folder(chain) -> Path:
    session, _, _ = chain
    return Path(next(s for s in session.stages if s.kind == "gptq").report["quantized_path"])


@pytest.fixture
def auto_kernel(monkeypatch):
    """The default kernel ("auto") and a fresh count of forwards per path."""
    from frankenlab.pipeline import quant_cpu

    monkeypatch.delenv(quant_cpu.KERNEL_ENV, raising=False)
    quant_cpu.kernel_calls.clear()
    return quant_cpu


def test_fused_kernel_for_few_rows_exact_for_many(chain, auto_kernel):
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    from frankenlab.pipeline import quant

    quant_cpu = auto_kernel
    model = quant.load_quantized(_gptq_folder(chain)).model
    assert model.frankenlab_kernel == "auto"
    mods = quantized_linears(model)
    # read off the buffers, the quantized linears are exactly gptqmodel's own
    assert set(mods) == {n for n, m in model.named_modules() if isinstance(m, BaseQuantLinear)} and len(mods) == 49
    assert {m._frankenlab_kernel for m in mods.values()} == {"auto"}  # every tiny shape fits the kernel
    few = torch.tensor([[5, 6, 7, 8, 9, 10]])  # 6 rows: decoding-sized
    many = torch.randint(3, 300, (2, quant_cpu.FUSED_MAX_ROWS // 2 + 1))  # 2 x 17 = 34 rows: prefill-sized
    with torch.no_grad():
        model(input_ids=few)
        assert dict(quant_cpu.kernel_calls) == {"int4": len(mods)}
        quant_cpu.kernel_calls.clear()
        model(input_ids=many)
        assert dict(quant_cpu.kernel_calls) == {"exact": len(mods)}
        quant_cpu.kernel_calls.clear()
        model.generate(few, attention_mask=torch.ones_like(few), max_new_tokens=3, do_sample=False)
    # the 6-token prompt and the 2 decoding steps after it (the last token needs no forward)
    assert dict(quant_cpu.kernel_calls) == {"int4": 3 * len(mods)}


def test_fused_output_close_to_exact(chain, auto_kernel):
    from frankenlab.pipeline import quant

    quant_cpu = auto_kernel
    model = quant.load_quantized(_gptq_folder(chain)).model
    g = torch.Generator().manual_seed(0)
    for name, mod in quantized_linears(model).items():
        x = torch.randn(3, mod.in_features, generator=g)
        with torch.no_grad():
            fused = mod(x)
            exact = torch.nn.functional.linear(x, dequantized_weight(mod))
        assert fused.dtype == torch.float32 and fused.shape == exact.shape
        assert _rel(fused, exact) < 2e-2, name  # bf16 activations and scales: ~3 significant digits
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    with torch.no_grad():
        fused = model(input_ids=ids).logits
        quant_cpu.set_kernel(model, "exact")
        exact = model(input_ids=ids).logits
    assert quant_cpu.kernel_calls["int4"] > 0 and quant_cpu.kernel_calls["exact"] > 0
    assert _rel(fused, exact) < 3e-2
    assert (fused.argmax(-1) == exact.argmax(-1)).float().mean() >= 0.75


def test_exact_kernel_is_todays_dequantized_path(chain, auto_kernel, monkeypatch):
    """Forced exact (by the environment): every call is fp32 F.linear on the dequantized weight, bit
    for bit, whatever the row count; "auto" on many rows is that same path."""
    from frankenlab.pipeline import quant

    quant_cpu = auto_kernel
    monkeypatch.setenv(quant_cpu.KERNEL_ENV, "exact")
    exact_model = quant.load_quantized(_gptq_folder(chain)).model
    monkeypatch.delenv(quant_cpu.KERNEL_ENV)
    auto_model = quant.load_quantized(_gptq_folder(chain)).model
    mods = quantized_linears(exact_model)
    assert {m._frankenlab_kernel for m in mods.values()} == {"exact"}
    assert not any(getattr(m, "_frankenlab_int4", None) is not None for m in mods.values())  # nothing packed
    with torch.no_grad():
        for name, mod in mods.items():
            x = torch.randn(1, 2, mod.in_features)
            assert torch.equal(mod(x), torch.nn.functional.linear(x, dequantized_weight(mod))), name
        ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
        monkeypatch.setattr(quant_cpu, "FUSED_MAX_ROWS", 0)  # auto: every call has "many" rows
        assert torch.equal(exact_model(input_ids=ids).logits, auto_model(input_ids=ids).logits)
    assert quant_cpu.kernel_calls["int4"] == 0
    monkeypatch.setenv(quant_cpu.KERNEL_ENV, "fast")
    with pytest.raises(ValueError, match="one of auto, exact, int4"):
        quant.load_quantized(_gptq_folder(chain))


def test_int4_kernel_frees_the_fp32_copy(chain, auto_kernel):
    from frankenlab.pipeline import quant

    quant_cpu = auto_kernel
    folder = _gptq_folder(chain)
    model = quant.load_quantized(folder, kernel="int4").model
    reference = quant.load_quantized(folder, kernel="exact").model
    mods = quantized_linears(model)
    assert all(m._frankenlab_weight is None for m in mods.values())
    ids = torch.randint(3, 300, (1, 2 * quant_cpu.FUSED_MAX_ROWS))
    with torch.no_grad():
        quant_cpu.kernel_calls.clear()
        fused = model(input_ids=ids).logits
        assert dict(quant_cpu.kernel_calls) == {"int4": len(mods)}  # many rows too
        assert _rel(fused, reference(input_ids=ids).logits) < 3e-2
    ref_mods = quantized_linears(reference)
    for name, mod in mods.items():  # still readable from the packed buffers (memory accounting, counts)
        assert torch.equal(dequantized_weight(mod), ref_mods[name]._frankenlab_weight), name


def test_eora_adapter_applied_on_the_fused_path(chain, auto_kernel):
    from frankenlab.pipeline import quant

    quant_cpu = auto_kernel
    session, _, _ = chain
    st = next(s for s in session.stages if s.kind == "eora")
    adapter = Path(st.report["adapter_path"])
    folder = _gptq_folder(chain)
    plain = quant.load_quantized(folder).model
    with_eora = quant.load_quantized(folder, adapter=adapter, rank=4).model
    mods = quantized_linears(with_eora)
    assert all(getattr(m, "adapter", None) for m in mods.values())
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        quant_cpu.kernel_calls.clear()
        fused_plain, fused_eora = plain(input_ids=ids).logits, with_eora(input_ids=ids).logits
        assert dict(quant_cpu.kernel_calls) == {"int4": 2 * len(mods)}
        quant_cpu.set_kernel(with_eora, "exact")
        exact_eora = with_eora(input_ids=ids).logits
    assert _rel(fused_eora, exact_eora) < 3e-2  # close to EoRA on the exact path ...
    assert _rel(fused_eora, exact_eora) < 0.5 * _rel(fused_plain, exact_eora)  # ... not to the model without it
    mod = next(iter(mods.values()))
    quant_cpu.set_kernel(with_eora, "auto")
    x = torch.randn(2, mod.in_features)
    with torch.no_grad():
        lora = (x @ mod.adapter.lora_A.float()) @ mod.adapter.lora_B.float()
        base = torch.nn.functional.linear(x, dequantized_weight(mod))
        assert _rel(mod(x), base + lora) < 2e-2


# -- masked GPTQ on its own ----------------------------------------------------------------------------
def _quantize_tiny(src, out, *, keep, desc_act=False):
    from frankenlab.pipeline import quant

    ids = torch.randint(3, 300, (8, 32), generator=torch.Generator().manual_seed(1))
    quant.quantize(
        src,
        out,
        ids,
        bits=4,
        group_size=32,
        desc_act=desc_act,
        sym=True,
        damp_percent=0.05,
        batch_size=4,
        device=torch.device("cpu"),
        work_dir=out.parent / (out.name + "-work"),
        keep_sparsity=keep,
    )
    if keep:  # every module went through the per-column patch; none needed zeros set afterwards
        from frankenlab.pipeline.quant_mask import stats

        assert stats()["modules"] == 8 * 7 and stats()["fixed_after"] == 0
    return quant.load_quantized(out).model


@pytest.fixture(scope="module")
def pruned_2to4(tiny_model_dir, tmp_path_factory):
    from frankenlab.pipeline.loading import load_model
    from tests.test_memory import prune_nm

    lm = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    model = prune_nm(lm.model, 2, 4)
    path = tmp_path_factory.mktemp("pruned") / "tiny-2of4"
    model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return path, {n: m.weight.detach().clone() for n, m in model.named_modules() if n.endswith("_proj")}


def _kept_errors(qmodel, reference):
    out = {}
    for name, mod in quantized_linears(qmodel).items():
        w, ref = dequantized_weight(mod), reference[name]
        keep = ref != 0
        out[name] = (bool(((w == 0) | keep).all()), float(((w - ref) * keep).norm() / (ref * keep).norm()))
    return out


@pytest.fixture(scope="module")
def masked_tiny(pruned_2to4, tmp_path_factory):
    """The 2:4 tiny model through masked GPTQ: (folder, loaded model)."""
    out = tmp_path_factory.mktemp("masked") / "quantized"
    return out, _quantize_tiny(pruned_2to4[0], out, keep=True)


def test_masked_gptq_keeps_every_zero(pruned_2to4, masked_tiny, tmp_path):
    src, reference = pruned_2to4
    masked = _kept_errors(masked_tiny[1], reference)
    plain = _kept_errors(_quantize_tiny(src, tmp_path / "plain", keep=False), reference)
    desc_model = _quantize_tiny(src, tmp_path / "desc", keep=True, desc_act=True)
    ordered = _kept_errors(desc_model, reference)
    assert len(masked) == len(plain) == len(ordered) == 8 * 7
    assert all(zeros_kept for zeros_kept, _ in masked.values())
    assert all(zeros_kept for zeros_kept, _ in ordered.values())  # the mask follows desc_act's permutation
    assert not all(zeros_kept for zeros_kept, _ in plain.values())  # unmasked GPTQ refills zeros
    err_m = sum(e for _, e in masked.values()) / len(masked)
    err_p = sum(e for _, e in plain.values()) / len(plain)
    err_o = sum(e for _, e in ordered.values()) / len(ordered)
    assert all(math.isfinite(e) for _, e in [*masked.values(), *ordered.values()])
    # 4-bit rounding of the kept weights costs about the same with or without the mask
    assert 0.02 < err_m < 0.25 and 0.02 < err_o < 0.25
    assert err_m < 1.5 * err_p and err_p < 1.5 * err_m
    _fused_follows_act_order(desc_model)


def _fused_follows_act_order(model):
    """desc_act: the fused int4 kernel gathers the input channels in the order of their groups."""
    from frankenlab.pipeline import quant_cpu

    mods = quantized_linears(model)
    permuted = [m for m in mods.values() if m._frankenlab_int4[3] is not None]
    assert permuted, "desc_act should reorder some module's groups"
    for mod in permuted:
        x = torch.randn(4, mod.in_features)
        with torch.no_grad():
            assert _rel(quant_cpu._int4_forward(mod, x), torch.nn.functional.linear(x, dequantized_weight(mod))) < 2e-2


# -- quantized folders open everywhere -----------------------------------------------------------------
def test_loader_opens_all_three_folder_kinds(chain):
    from frankenlab.pipeline.loading import load_model

    session, out, _ = chain
    by_kind = {s.kind: s for s in session.stages}
    qdir = Path(by_kind["gptq"].artifact)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    logits = {}
    for label, ref, kind in (
        ("folder", qdir, "gptq"),
        ("stage", qdir.parent, "gptq"),
        ("eora", Path(by_kind["eora"].artifact), "gptq+eora"),
    ):
        lm = load_model(str(ref), device="cpu")
        assert lm.source.kind == kind and lm.dtype == torch.float32, label
        assert lm.model.frankenlab_quant["prequant"] == str(qdir.parent / "prequant")
        with torch.no_grad():
            logits[label] = lm.model(input_ids=ids).logits
        assert torch.isfinite(logits[label]).all()
    assert torch.equal(logits["folder"], logits["stage"])
    assert not torch.allclose(logits["folder"], logits["eora"])  # the adapter is applied


def test_broken_manifest_is_one_clear_line(tmp_path, capsys):
    from frankenlab.evals.errors import ModelLoadError
    from frankenlab.pipeline.loading import load_model
    from frankenlab.tui.cli.main import main

    (tmp_path / "frankenlab-quant.json").write_text(json.dumps({"quantized": "../gone", "adapter": "eora"}))
    with pytest.raises(ModelLoadError, match="holds no quantize_config.json"):
        load_model(str(tmp_path))
    assert main(["eval", "--model", str(tmp_path), "--ppl", "wikitext2-concat-64", "--limit", "1"]) == 2
    assert "Traceback" not in capsys.readouterr().out


def test_quantized_folders_in_eval_and_chat(chain, data_dir, capsys):
    from frankenlab.pipeline.loading import load_model
    from frankenlab.tui.chat import stream_reply
    from frankenlab.tui.cli.main import main

    session, out, _ = chain
    stage_dir = Path(next(s for s in session.stages if s.kind == "eora").artifact)
    rc = main(
        ["eval", "--model", str(stage_dir), "--ppl", "wikitext2-concat-64", "--limit", "2", "--data-dir", str(data_dir)]
    )
    printed = capsys.readouterr().out
    assert rc == 0 and "perplexity" in printed and "wikitext2-concat-64" in printed
    lm = load_model(str(Path(next(s for s in session.stages if s.kind == "gptq").artifact).parent))
    from frankenlab.pipeline import quant_cpu

    before = quant_cpu.kernel_calls["int4"]
    pieces = list(
        stream_reply(lm.model, lm.tokenizer, [{"role": "user", "content": "Who wrote Hamlet?"}], max_new_tokens=4)
    )
    assert pieces and all(isinstance(p, str) for p in pieces)
    if lm.model.frankenlab_kernel == "auto":  # decoding took the fused int4 kernel
        assert quant_cpu.kernel_calls["int4"] > before


def test_replay_resumes_after_gptq(chain, data_dir, tmp_path):
    from frankenlab.sessions import load_session, replay
    from frankenlab.sessions.replay import resume_problem

    session, out, _ = chain
    saved = load_session(out)
    assert resume_problem(saved, 5) is None  # after gptq: its quantized folder opens
    result = replay(saved, tmp_path / "again", from_stage=5, data_dir=data_dir, save_models=True)
    new = load_session(tmp_path / "again")
    assert new.status == "done" and new.stages[-1].kind == "eora" and new.stages[-1].status == "done"
    assert new.stages[-1].report["layers_with_adapter"] == 7 * 7
    assert {d.stage for d in result.diffs} == {5}


def test_compact_form_of_masked_2to4_gptq(masked_tiny, tmp_path, capsys):
    """`frankenlab memory --compact` on 2:4 + GPTQ: N:M-packed int4 codes, size = computed, same logits."""
    from frankenlab.pipeline.compact import load_compact
    from frankenlab.tui.cli.main import main

    folder, qmodel = masked_tiny
    assert (
        main(["memory", "--model", str(folder), "--target", "siracusa", "--compact", str(tmp_path / "c"), "--json"])
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    formats = out["footprints"]["as is"]["formats"]
    quantized = {k: v for k, v in formats.items() if k.endswith("int4 g32")}
    assert sum(quantized.values()) == 8 * 7 and all(
        k.split()[0] in ("2:4", "4:8", "8:16", "16:32") for k in quantized
    )  # the codes are found N:M half-sparse
    report = out["compact"]
    # tensor bytes equal the computed footprint up to byte rounding per packed tensor; the JSON header
    # (config, one layout per tensor) is a fixed ~40 KB that only a model this tiny notices
    # (the bundled model's file is within 5 % whole: benchmarks/bench_quant.py)
    assert abs(report["payload_bytes"] - report["computed_bytes"]) <= 8 * 56 * 4
    restored = load_compact(tmp_path / "c", dtype="float32")
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    from frankenlab.pipeline import quant_cpu

    quant_cpu.set_kernel(qmodel, "exact")  # 8 rows would take the fused kernel (bf16 activations)
    try:
        with torch.no_grad():
            assert torch.allclose(restored(input_ids=ids).logits, qmodel(input_ids=ids).logits, atol=1e-4)
    finally:
        quant_cpu.set_kernel(qmodel, "auto")


def test_lab_chat_targets_open_gptq_and_eora_stages(chain, tmp_path):
    """The lab's chat A/B offers every saved stage; the gptq and eora ones load as quantized models."""
    from frankenlab.pipeline.loading import load_model
    from frankenlab.sessions import load_session
    from frankenlab.tui.lab_state import LabState

    session, out, _ = chain
    lab = LabState(loader=load_model, runner=lambda *a, **k: None, runs_dir=tmp_path, device="cpu", dtype="float32")
    lab.session = load_session(out)
    targets = {t.key: t for t in lab.chat_targets().values()}
    assert {"stage4", "stage5"} <= set(targets)  # gptq, eora
    for key in ("stage4", "stage5"):
        model, tok = targets[key].resolve()
        assert getattr(model, "frankenlab_quant", None), key
    assert targets["stage5"].resolve()[0].frankenlab_quant.get("adapter")


CANCEL_CHILD = """
import sys, threading
from frankenlab.pipeline.recipe import Recipe
from frankenlab.sessions import record_run
recipe = Recipe.load(sys.argv[1])
cancel = threading.Event()
def listener(event):
    # cancel as GPTQ starts its second decoder layer (a pre-hook inside gptqmodel's layer loop)
    if "GPTQ layer 2/" in str(getattr(event, "message", "")):
        cancel.set()
s = record_run(recipe, sys.argv[2], listener=listener, cancel=cancel, data_dir=sys.argv[3])
print("STATUS", s.status, [st.status for st in s.stages])
"""


def test_cancel_inside_gptq_stops_cleanly(tiny_model_dir, tmp_path, data_dir):
    """A cancel raised inside gptqmodel's layer loop (where a worker error would os._exit the
    process) ends the run as cancelled with the earlier stages kept. The gptq stage runs in a worker
    process of its own (pipeline.child_stage), so the run's process exits cleanly; the run itself is
    in a child process here so that a hard exit would show as a failure instead of killing the tests."""
    import subprocess
    import sys

    recipe = tmp_path / "r.toml"
    recipe.write_text(recipe_text(tiny_model_dir, CHAIN.split('[[stages]]\nkind = "eora"')[0]))
    proc = subprocess.run(  # from a scratch folder: the child imports the installed package, not the checkout
        [sys.executable, "-c", CANCEL_CHILD, str(recipe), str(tmp_path / "out"), str(data_dir)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("STATUS")]
    assert lines, f"the run did not come back from the cancel (exit {proc.returncode}): {proc.stderr[-2000:]}"
    assert "cancelled" in lines[-1] and lines[-1].count("'done'") == 4, lines  # baseline, depth, width, lora
    saved = json.loads((tmp_path / "out" / "session.json").read_text())
    assert saved["status"] == "cancelled" and [st["status"] for st in saved["stages"]][:4] == ["done"] * 4
    assert not (tmp_path / "out" / "stages" / "04-gptq").exists()  # the half-written stage folder is removed
    # gptqmodel's threads could abort the interpreter at exit after a cancel (-6): they live in the worker now
    assert proc.returncode == 0, proc.stderr[-2000:]
