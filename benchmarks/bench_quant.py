"""GPTQ on CPU, side by side in one run: the lab's stage vs gptqmodel called directly, fp32 vs bf16
calibration, masked vs unmasked GPTQ on a 2:4 model, and greedy decoding speed fp32 vs GPTQ (fused
int4 decoding and exact dequantized fp32).

    FRANKENLAB_DATA_DIR=/work/shared/data python -m benchmarks.bench_quant [--layers K] [--samples 16]
        [--seq-len 128] [--tokens 32] [--ppl-windows 8] [--dtype-layers 6] [--parts stage,dtype,...] [--json OUT]

`--parts` picks what runs (default all): direct (gptqmodel directly and the unmasked stage), dtype
(fp32 vs bf16 calibration), ppl, compact, kernels (fused int4 vs exact fp32 per row count M: the
crossover behind pipeline.quant_cpu.FUSED_MAX_ROWS), speed (greedy tokens/s: fp32 baseline, GPTQ "auto",
GPTQ "exact", interleaved, and how many greedy tokens fused decoding shares with exact). The masked
stage always runs: it makes the GPTQ model the later parts use.

The bundled SmolLM2-135M-Instruct is 2:4 pruned by magnitude (the same pattern WANDA gives), then
quantized 4-bit g128 on the same calibration windows by, interleaved so machine load hits all alike:
(a) gptqmodel directly (`GPTQModel.load` + `quantize` + `save`, fp32), (b) the lab's gptq stage
without the mask, (c) the stage with the mask (keep_sparsity); then gptqmodel directly in fp32
and in bf16 on the first `--dtype-layers` layers (bf16 on the whole model takes too long here).
(a) vs (b) is the stage's overhead (saving prequant, reloading, measuring; target <= 1.05x).
`--layers K` keeps the first K decoder layers to make a loaded machine finish; perplexity is then only
comparable within the run. Every figure is printed
with CPU seconds (this process and its threads) beside wall seconds, and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

import torch

from benchmarks.common import load_average, machine_line, prune_2to4
from frankenlab.evals.packed import packed_linears
from frankenlab.pipeline.loading import load_model


class Timer:
    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu

    def text(self) -> str:
        return f"{self.wall:7.1f} s wall, {self.cpu:7.1f} s CPU (load {load_average()})"


def direct(src: Path, out: Path, ids, dtype) -> None:
    """gptqmodel as its README calls it, with the settings the stage uses."""
    from frankenlab.pipeline import quant

    gm = quant.gptqmodel()
    qc = gm.QuantizeConfig(
        bits=4,
        group_size=128,
        desc_act=False,
        sym=True,
        damp_percent=0.05,
        offload_to_disk=True,
        offload_to_disk_path=str(out.parent / (out.name + "-offload")),
    )
    with quant.logs_inside(out.parent / (out.name + "-work")):
        model = gm.GPTQModel.load(str(src), qc, device="cpu", dtype=dtype)
        model.quantize(quant.as_calibration(ids), batch_size=4)
        model.save(str(out))


def stage(model, tokenizer, work: Path, ids, keep: bool, data_dir):
    from frankenlab.pipeline.calibration import CalibrationConfig
    from frankenlab.pipeline.context import StageContext
    from frankenlab.pipeline.stages import gptq

    ctx = StageContext(
        tokenizer,
        torch.device("cpu"),
        CalibrationConfig(samples=ids.shape[0], seq_len=ids.shape[1]),
        Path(data_dir) if data_dir else None,
        work_dir=work,
    )
    ctx._calib_cache[ctx.calibration] = ids  # exactly the windows the direct call got (same config, same data)
    return gptq.run(model, ctx, gptq.Config(bits=4, group_size=128, keep_sparsity=keep))


def perplexity(model, tokenizer, data_dir, windows: int) -> float:
    from frankenlab.evals.perplexity import perplexity as ppl

    return ppl(model, tokenizer, "wikitext2-concat-512", limit=windows, data_dir=data_dir).value


@torch.inference_mode()
def tokens_per_second(model, tokenizer, tokens: int) -> tuple[float, Timer]:
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)  # warm-up
    with Timer() as t:
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False
        )
    return (out.shape[1] - ids.shape[1]) / t.wall, t


PARTS = ("direct", "dtype", "ppl", "compact", "kernels", "speed")
PROMPT = "The capital of France is"


def timed(fn, repeats: int) -> tuple[float, float]:
    """(wall, CPU) milliseconds per call of fn, after one warm-up call."""
    fn()
    w, c = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - w) / repeats * 1e3, (time.process_time() - c) / repeats * 1e3


@torch.inference_mode()
def kernel_crossover(model, rows=(1, 2, 4, 8, 16, 32, 64, 128)) -> dict:
    """All quantized linears of `model` once, fused int4 (bf16 activations) vs exact fp32 F.linear, at M rows.

    The two run interleaved (exact, int4, exact, int4) on the same inputs; weights come from memory as
    in decoding (a layer's weights are evicted from cache by the time it runs again)."""
    from frankenlab.pipeline import quant_cpu
    from frankenlab.pipeline.quant_linear import quantized_linears

    mods = [
        m
        for m in quantized_linears(model).values()
        if getattr(m, "_frankenlab_int4", None) is not None and getattr(m, "_frankenlab_weight", None) is not None
    ]
    table = {}
    for m_rows in rows:
        xs = {k: torch.randn(m_rows, k) for k in {int(m.in_features) for m in mods}}

        def exact(xs=xs):
            for m in mods:
                torch.nn.functional.linear(xs[int(m.in_features)], m._frankenlab_weight)

        def fused(xs=xs):
            for m in mods:
                quant_cpu._int4_forward(m, xs[int(m.in_features)])

        repeats = max(2, 16 // m_rows)
        e1, i1, e2, i2 = timed(exact, repeats), timed(fused, repeats), timed(exact, repeats), timed(fused, repeats)
        ew, ec = (e1[0] + e2[0]) / 2, (e1[1] + e2[1]) / 2
        iw, ic = (i1[0] + i2[0]) / 2, (i1[1] + i2[1]) / 2
        table[m_rows] = {"exact_ms": ew, "exact_cpu_ms": ec, "int4_ms": iw, "int4_cpu_ms": ic, "speedup": ew / iw}
        print(
            f"  M={m_rows:<4} {len(mods)} linears: exact fp32 {ew:7.1f} ms ({ec:7.1f} CPU), fused int4 {iw:7.1f} ms "
            f"({ic:7.1f} CPU) -> exact/int4 {ew / iw:5.2f}x  (load {load_average()})",
            flush=True,
        )
    return table


@torch.inference_mode()
def greedy_agreement(model, tokenizer, tokens: int) -> dict:
    """Greedy text from the exact kernel vs from auto (fused decoding) on the same quantized model:
    the identical prefix, the share of identical positions, and the share of next-token choices that
    agree when auto is fed the exact text one token at a time (teacher forcing, fused at every step)."""
    from frankenlab.pipeline import quant_cpu

    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    runs = {}
    for kernel in ("exact", "auto"):
        quant_cpu.set_kernel(model, kernel)
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False
        )
        runs[kernel] = out[0, ids.shape[1] :]
    a, b = runs["exact"], runs["auto"]
    n = min(len(a), len(b))
    same = a[:n] == b[:n]
    prefix = int(same.long().cumprod(0).sum())
    quant_cpu.set_kernel(model, "auto")
    calls = dict(quant_cpu.kernel_calls)
    out = model(input_ids=ids, use_cache=True)  # the prompt: a few rows, fused too
    pkv, agree = out.past_key_values, int(out.logits[0, -1].argmax() == a[0])
    with warnings.catch_warnings():  # transformers renames past_key_values (FutureWarning); both work here
        warnings.simplefilter("ignore", FutureWarning)
        for i in range(n - 1):
            out = model(input_ids=a[i].view(1, 1), past_key_values=pkv, use_cache=True)
            pkv = out.past_key_values
            agree += int(out.logits[0, -1].argmax() == a[i + 1])
    fused_calls = quant_cpu.kernel_calls["int4"] - calls.get("int4", 0)
    return {
        "tokens": n,
        "identical_prefix": prefix,
        "identical_share": float(same.float().mean()),
        "teacher_forced_agreement": agree / n,
        "fused_calls_teacher_forced": fused_calls,
        "exact_text": tokenizer.decode(a),
        "auto_text": tokenizer.decode(b),
    }


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=None, help="keep only the first K decoder layers")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--tokens", type=int, default=32, help="greedy tokens generated per speed measurement")
    p.add_argument("--ppl-windows", type=int, default=8)
    p.add_argument("--no-bf16", action="store_true", help="skip the bf16 calibration comparison (the slowest)")
    p.add_argument("--dtype-layers", type=int, default=6, help="layers quantized for the fp32 vs bf16 comparison")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--agree-tokens", type=int, default=64, help="greedy tokens compared between fused and exact")
    p.add_argument("--out", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    parts = {x.strip() for x in args.parts.split(",") if x.strip()}
    if parts - set(PARTS):
        p.error(f"unknown parts {sorted(parts - set(PARTS))}; choose from {', '.join(PARTS)}")
    data_dir = os.environ.get("FRANKENLAB_DATA_DIR")
    out = Path(args.out or tempfile.mkdtemp(prefix="bench-quant-"))
    out.mkdir(parents=True, exist_ok=True)

    from frankenlab.pipeline.calibration import CalibrationConfig, calibration_ids
    from frankenlab.pipeline.loading import decoder_layers

    lm = load_model(device="cpu", dtype="float32")
    print(machine_line(lm), flush=True)
    model = prune_2to4(lm.model)
    if args.layers:
        del decoder_layers(model)[args.layers :]
        model.config.num_hidden_layers = args.layers
    src = out / "pruned-2of4"
    model.save_pretrained(src)
    lm.tokenizer.save_pretrained(src)
    ids = calibration_ids(
        lm.tokenizer, CalibrationConfig(samples=args.samples, seq_len=args.seq_len), data_dir=data_dir
    )
    print(
        f"2:4 magnitude-pruned, {len(decoder_layers(model))} layers; calibration {tuple(ids.shape)} C4 tokens; "
        f"load {load_average()}",
        flush=True,
    )
    rows = {}

    def fresh():
        return load_model(str(src), device="cpu", dtype="float32").model

    plain = None
    if "direct" in parts:
        with Timer() as t:
            direct(src, out / "direct-fp32", ids, torch.float32)
        rows["gptqmodel direct, fp32"] = t
        print(f"gptqmodel direct, fp32 calibration : {t.text()}", flush=True)
        with Timer() as t:
            plain = stage(fresh(), lm.tokenizer, out / "stage-plain", ids, False, data_dir)
        rows["stage, unmasked"] = t
        ratio = rows["stage, unmasked"].wall / rows["gptqmodel direct, fp32"].wall
        print(
            f"gptq stage, unmasked               : {t.text()}  -> {ratio:.3f}x direct "
            f"(quantize call alone {plain.report['seconds_quantize']:.1f} s)",
            flush=True,
        )
    with Timer() as t:
        masked = stage(fresh(), lm.tokenizer, out / "stage-masked", ids, True, data_dir)
    rows["stage, masked"] = t
    versus = f"  -> {t.wall / rows['gptqmodel direct, fp32'].wall:.3f}x direct" if "direct" in parts else ""
    print(f"gptq stage, masked (keep_sparsity) : {t.text()}{versus}", flush=True)
    if (
        "dtype" in parts and not args.no_bf16
    ):  # on the first --dtype-layers layers: bf16 on the whole model takes too long here
        k = min(args.dtype_layers, len(decoder_layers(model)))
        small = out / f"pruned-2of4-{k}layers"
        sub = load_model(str(src), device="cpu", dtype="float32").model
        del decoder_layers(sub)[k:]
        sub.config.num_hidden_layers = k
        sub.save_pretrained(small)
        lm.tokenizer.save_pretrained(small)
        for dtype in (torch.float32, torch.bfloat16):
            name = f"gptqmodel direct, {k} layers, {str(dtype)[6:]}"
            with Timer() as t:
                direct(small, out / f"direct-{k}-{str(dtype)[6:]}", ids, dtype)
            rows[name] = t
            print(f"{name:<35}: {t.text()}", flush=True)
        fp32, bf16 = (rows[f"gptqmodel direct, {k} layers, {d}"] for d in ("float32", "bfloat16"))
        print(
            f"calibration dtype: bf16 / fp32 = {bf16.wall / fp32.wall:.2f}x wall, {bf16.cpu / max(fp32.cpu, 1e-9):.2f}x CPU",
            flush=True,
        )

    report = {k: {"wall_s": v.wall, "cpu_s": v.cpu} for k, v in rows.items()}
    for label, res in (("unmasked", plain), ("masked", masked)):
        if res is None:
            continue
        r = res.report
        print(
            f"{label:>9}: density {r['density_before']:.4f} -> {r['density_after']:.4f}, zeros kept "
            f"{r['zeros_kept_fraction']:.4%}, pattern_holds {r['pattern_holds']}",
            flush=True,
        )
        report[f"sparsity {label}"] = {
            k: r[k] for k in ("density_before", "density_after", "zeros_kept_fraction", "pattern_holds")
        }
    if data_dir and "ppl" in parts and plain is not None:
        base = perplexity(fresh(), lm.tokenizer, data_dir, args.ppl_windows)
        ppl_plain = perplexity(plain.model, lm.tokenizer, data_dir, args.ppl_windows)
        ppl_masked = perplexity(masked.model, lm.tokenizer, data_dir, args.ppl_windows)
        print(
            f"perplexity wikitext2-concat-512:first{args.ppl_windows}: 2:4 fp32 {base:.3f}, 2:4 + GPTQ unmasked "
            f"{ppl_plain:.3f}, 2:4 + GPTQ masked {ppl_masked:.3f} (load {load_average()})",
            flush=True,
        )
        report["perplexity"] = {"2:4 fp32": base, "unmasked": ppl_plain, "masked": ppl_masked}

    if "compact" in parts:
        from frankenlab.pipeline.compact import load_compact, save_compact

        with Timer() as t:
            compact = save_compact(masked.model, out / "compact-masked")
        restored = load_compact(out / "compact-masked", dtype="float32")
        probe = ids[:1, :64]  # 64 rows: the exact kernel under "auto"
        with torch.no_grad():
            diff = float((restored(input_ids=probe).logits - masked.model(input_ids=probe).logits).abs().max())
        print(
            f"compact 2:4 + int4 file {compact.file_bytes:,} B vs computed {compact.computed_bytes:,} B "
            f"({compact.ratio - 1:+.2%}), max logit diff after reload {diff:.2g}; {t.text()}",
            flush=True,
        )
        report["compact"] = {**compact.to_dict(), "max_logit_diff": diff}

    from frankenlab.pipeline import quant_cpu

    qmodel = masked.model
    if "kernels" in parts:
        print(
            f"quantized linears, fused int4 vs exact fp32 by rows M (auto: int4 up to M={quant_cpu.FUSED_MAX_ROWS}):",
            flush=True,
        )
        report["kernel_crossover"] = kernel_crossover(qmodel)
    if "speed" in parts:
        if data_dir:  # many rows: "auto" runs the exact kernel, so perplexity does not move
            with torch.inference_mode():
                quant_cpu.set_kernel(qmodel, "exact")
                ppl_exact = perplexity(qmodel, lm.tokenizer, data_dir, 2)
                quant_cpu.set_kernel(qmodel, "auto")
                ppl_auto = perplexity(qmodel, lm.tokenizer, data_dir, 2)
            print(
                f"perplexity wikitext2-concat-512:first2, GPTQ masked: exact {ppl_exact!r}, auto {ppl_auto!r} "
                f"(identical: {ppl_exact == ppl_auto})",
                flush=True,
            )
            report["perplexity_auto_vs_exact"] = {"exact": ppl_exact, "auto": ppl_auto}
        baseline = fresh()
        speeds, times = {}, {}
        for _ in range(2):  # interleaved, twice
            for label, m, kernel in (
                ("fp32 2:4 baseline", baseline, None),
                ("fp32 2:4 baseline, packed", baseline, "packed"),
                ("GPTQ auto (fused int4 decode)", qmodel, "auto"),
                ("GPTQ exact (fp32 dequantized)", qmodel, "exact"),
            ):
                if kernel == "packed":  # fp32 as the lab's chat and QA decode it (evals.packed)
                    with packed_linears(m):
                        tps, t = tokens_per_second(m, lm.tokenizer, args.tokens)
                else:
                    if kernel:
                        quant_cpu.set_kernel(m, kernel)
                    tps, t = tokens_per_second(m, lm.tokenizer, args.tokens)
                speeds.setdefault(label, []).append(tps)
                times.setdefault(label, []).append({"wall_s": t.wall, "cpu_s": t.cpu})
                print(f"greedy {args.tokens} tokens, {label:<30}: {tps:6.1f} tok/s  ({t.text()})", flush=True)
        base = max(speeds["fp32 2:4 baseline"])
        for label, v in speeds.items():
            print(f"  best of 2, {label:<30}: {max(v):6.1f} tok/s = {max(v) / base:.2f}x baseline", flush=True)
        report["tokens_per_second"] = speeds
        report["generate_seconds"] = times
        agree = greedy_agreement(qmodel, lm.tokenizer, args.agree_tokens)
        quant_cpu.set_kernel(qmodel, "auto")
        print(
            f"greedy agreement, fused (auto) vs exact over {agree['tokens']} tokens: identical prefix "
            f"{agree['identical_prefix']}, identical positions {agree['identical_share']:.1%}, next-token agreement "
            f"fed the exact text {agree['teacher_forced_agreement']:.1%}",
            flush=True,
        )
        print(f"  exact: {agree['exact_text']!r}\n  auto : {agree['auto_text']!r}", flush=True)
        report["greedy_agreement"] = agree
    report["load_average_end"] = load_average()
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
