"""Footprint of the bundled model dense, 2:4, GPTQ 4-bit g128 and both, beside measured file sizes.

    FRANKENLAB_DATA_DIR=/work/shared/data python -m benchmarks.bench_memory [--out DIR] [--no-gptq] [--json F]

For each state it prints the computed weights footprint (pipeline.footprint), the size of the compact
file written by pipeline.compact (must be within 5 %), the plain `save_pretrained` safetensors size
(what a dense checkpoint costs, the thesis' "no saving" figure), the gptqmodel folder size where
there is one, the time `footprint_summary` takes, and the Siracusa verdict. 2:4 uses magnitude
pruning (the pattern, hence the size, is the same as WANDA's); GPTQ runs the lab's gptq stage on
the CPU with a small calibration set, so it takes minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import prune_2to4
from frankenlab.pipeline.compact import load_compact, save_compact
from frankenlab.pipeline.footprint import Assume, footprint, footprint_summary
from frankenlab.pipeline.loading import load_model
from frankenlab.pipeline.targets import load_targets
from frankenlab.pipeline.units import fmt_bytes


def dir_bytes(path: Path, pattern: str = "*.safetensors") -> int:
    return sum(p.stat().st_size for p in Path(path).rglob(pattern) if p.is_file())


def gptq(model, tokenizer, work: Path, data_dir: str | None):
    from frankenlab.pipeline.calibration import CalibrationConfig
    from frankenlab.pipeline.context import StageContext
    from frankenlab.pipeline.stages import gptq as stage

    ctx = StageContext(
        tokenizer,
        torch.device("cpu"),
        CalibrationConfig(samples=16, seq_len=128),
        Path(data_dir) if data_dir else None,
        work_dir=work,
    )
    result = stage.run(model, ctx, stage.Config(bits=4, group_size=128))
    return result.model, result.report


def measure(label: str, model, tokenizer, out: Path, ids, extra: dict | None = None) -> dict:
    t0 = time.perf_counter()
    footprint_summary(model)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    footprint_summary(model)
    repeat = time.perf_counter() - t0
    fp = footprint(model)
    row = {
        "state": label,
        "weights_bytes": fp.weights_bytes,
        "components": fp.components(),
        "formats": fp.formats(),
        "summary_seconds_first": first,
        "summary_seconds_repeat": repeat,
    }
    compact_dir = out / f"{label}-compact"
    t0 = time.perf_counter()
    report = save_compact(model, compact_dir)
    row["compact"] = {**report.to_dict(), "seconds": time.perf_counter() - t0}
    restored = load_compact(compact_dir, dtype="float32")
    with torch.no_grad():
        ref = model(input_ids=ids).logits.float()
        got = restored(input_ids=ids).logits.float()
    row["compact"]["max_logit_diff"] = float((ref - got).abs().max())
    if not any(n.endswith("qweight") for n, _ in model.named_buffers()):  # gptqmodel folders are measured apart
        hf = out / f"{label}-hf"
        model.save_pretrained(hf)
        row["save_pretrained_bytes"] = dir_bytes(hf)
    row.update(extra or {})
    siracusa = load_targets()["siracusa"]
    row["siracusa"] = [c.text for c in siracusa.verdict(fp)]
    print(
        f"{label:>14}: computed {fmt_bytes(fp.weights_bytes):>11}  compact file {fmt_bytes(report.file_bytes):>11} "
        f"({report.ratio - 1:+.2%})  save_pretrained {fmt_bytes(row.get('save_pretrained_bytes', 0)):>11}  "
        f"formats {fp.formats()}  summary {first:.2f}s/{repeat:.3f}s  logits diff {row['compact']['max_logit_diff']:.2g}",
        flush=True,
    )
    return row


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    p.add_argument("--no-gptq", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="bench-memory-"))
    out.mkdir(parents=True, exist_ok=True)
    data_dir = os.environ.get("FRANKENLAB_DATA_DIR")
    lm = load_model(device="cpu", dtype="float32")
    ids = torch.randint(0, 1000, (1, 32), generator=torch.Generator().manual_seed(0))
    rows = []
    model = lm.model
    dense = footprint(model)
    print("what-if from the dense model (weights only):")
    for spec in ("as is", "bf16", "2:4", "2:4+bf16", "int4-g128", "2:4+int4-g128"):
        fp = dense if spec == "as is" else dense.assuming(Assume.parse(spec))
        print(f"  {spec:>14}: {fmt_bytes(fp.weights_bytes)} ({fp.weights_bytes:,} B)")
    rows.append(measure("dense-fp32", model, lm.tokenizer, out, ids))
    if not args.no_gptq:
        qmodel, report = gptq(load_model(device="cpu", dtype="float32").model, lm.tokenizer, out / "gptq", data_dir)
        rows.append(
            measure(
                "gptq4",
                qmodel,
                lm.tokenizer,
                out,
                ids,
                {
                    "gptq_folder_bytes": report["disk_bytes"],
                    "gptq_dir_safetensors": dir_bytes(Path(report["quantized_path"])),
                },
            )
        )
    prune_2to4(model)
    rows.append(measure("2:4-fp32", model, lm.tokenizer, out, ids))
    bf16 = model.to(torch.bfloat16)
    rows.append(measure("2:4-bf16", bf16, lm.tokenizer, out, ids))
    if not args.no_gptq:
        pruned = prune_2to4(load_model(device="cpu", dtype="float32").model)
        qmodel, report = gptq(pruned, lm.tokenizer, out / "gptq-2to4", data_dir)
        rows.append(
            measure(
                "2:4+gptq4",
                qmodel,
                lm.tokenizer,
                out,
                ids,
                {
                    "gptq_folder_bytes": report["disk_bytes"],
                    "gptq_report": {
                        k: report.get(k) for k in ("density_before", "density_after", "zeros_kept_fraction")
                    },
                },
            )
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2, default=str))
    print(f"files under {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
