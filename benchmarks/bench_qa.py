"""QA generation throughput: our batched greedy loop against `model.generate` on the same batches and prompts.

    FRANKENLAB_DATA_DIR=/work/shared/data .venv/bin/python -m benchmarks.bench_qa --questions 32

Printed, not asserted (timings depend on the machine and its load; the load average is printed).
TriviaQA closed-book prompts ("Question: ...\\nAnswer:", a seeded sample) are batched exactly as
`evals.generate.generate_greedy` batches them (sorted by length, left padded). Each batch is
decoded three times, interleaved: by our loop, by our loop on oneDNN-reordered weights (what
`generate_greedy` runs on a CPU, `evals.packed`), (`evals.generate._decode`: a row leaves the batch, KV cache
rows included, as soon as it ends its line or emits end-of-sequence) and by Hugging Face's
`model.generate` (greedy, the same end-of-line rule as a per-row stopping criterion, the same
end-of-sequence ids, at least one new token), which keeps finished rows in the batch until the
last one ends. Both answers are compared token by token: the figures only count when they agree.
Wall and process CPU seconds are printed for both.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.common import load_average, machine_line
from frankenlab.evals.generate import _decode, eos_ids, prompt_batches, token_classes
from frankenlab.evals.packed import packed_linears
from frankenlab.evals.qa import MAX_NEW_TOKENS, build_prompt, load_items


def first_line_stop(width: int, classes: tuple[torch.Tensor, torch.Tensor]):
    """Our end-of-line rule as a `transformers` stopping criterion: per row, a newline after some text."""
    from transformers import StoppingCriteria

    newline, blank = classes

    class FirstLine(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):  # input_ids: (B, width + new)
            new = input_ids[:, width:]
            has_text = (~torch.isin(new, blank)).any(dim=1)
            return torch.isin(new[:, -1], newline) & has_text

    return FirstLine()


@torch.inference_mode()
def hf_generate(
    model, tokenizer, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, stop_at_newline: bool = True
) -> list[list[int]]:
    """`model.generate` on one left-padded batch, each row's new tokens cut where our loop stops."""
    from transformers import StoppingCriteriaList

    eos = eos_ids(model, tokenizer)
    classes = token_classes(tokenizer)
    stop = StoppingCriteriaList([first_line_stop(ids.shape[1], classes)]) if stop_at_newline else None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        min_new_tokens=1,
        eos_token_id=eos,
        pad_token_id=pad,
        stopping_criteria=stop,
        repetition_penalty=1.0,
    )
    rows = []
    newline, blank = classes
    for row in out[:, ids.shape[1] :].tolist():
        toks, has_text = [], False
        for t in row:
            toks.append(t)
            has_text = has_text or t not in blank
            if t in eos or (stop_at_newline and t in newline and has_text):
                break
        rows.append(toks)
    return rows


def main(argv=None) -> dict:
    from frankenlab.pipeline.loading import load_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model reference (default: the bundled SmolLM2-135M-Instruct)")
    ap.add_argument("--questions", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--match", default="first-line", choices=["first-line", "thesis"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    lm = load_model(args.model)
    print(machine_line(lm))
    print(f"load average at start: {load_average()}")
    items, source, _ = load_items("closed", args.questions, seed=0)
    prompts = [build_prompt(it) for it in items]
    newline_stop = args.match == "first-line"
    eos = torch.tensor(eos_ids(lm.model, lm.tokenizer), dtype=torch.long)
    classes = token_classes(lm.tokenizer) if newline_stop else None
    batches = prompt_batches(lm.tokenizer, prompts, batch_size=args.batch_size)
    _decode(lm.model, batches[0][1][:1], batches[0][2][:1], 2, eos, classes, None)  # warm-up
    t = {"ours": [0.0, 0.0], "ours+packed": [0.0, 0.0], "generate": [0.0, 0.0]}
    same, same_packed, tokens = 0, 0, 0
    for b, (idx, ids, mask) in enumerate(batches):
        w0, c0 = time.perf_counter(), time.process_time()
        ours = _decode(lm.model, ids, mask, MAX_NEW_TOKENS, eos, classes, None)
        w1, c1 = time.perf_counter(), time.process_time()
        with packed_linears(lm.model):  # what generate_greedy runs: weights reordered once for oneDNN
            packed = _decode(lm.model, ids, mask, MAX_NEW_TOKENS, eos, classes, None)
        w2, c2 = time.perf_counter(), time.process_time()
        ref = hf_generate(lm.model, lm.tokenizer, ids, mask, MAX_NEW_TOKENS, newline_stop)
        w3, c3 = time.perf_counter(), time.process_time()
        for k, (wa, ca, wb, cb) in {
            "ours": (w0, c0, w1, c1),
            "ours+packed": (w1, c1, w2, c2),
            "generate": (w2, c2, w3, c3),
        }.items():
            t[k][0] += wb - wa
            t[k][1] += cb - ca
        same += sum(a == r for a, r in zip(ours, ref, strict=False))
        same_packed += sum(a == r for a, r in zip(packed, ref, strict=False))
        tokens += sum(map(len, ours))
        print(
            f"  batch {b}: {len(idx)} prompts of {ids.shape[1]} tokens, new tokens per row "
            f"{[len(x) for x in ours]}: ours {w1 - w0:.2f} s (cpu {c1 - c0:.2f}), ours packed {w2 - w1:.2f} s "
            f"(cpu {c2 - c1:.2f}), generate {w3 - w2:.2f} s (cpu {c3 - c2:.2f}); identical rows "
            f"{sum(a == r for a, r in zip(ours, ref, strict=False))}/{len(idx)}, packed "
            f"{sum(a == r for a, r in zip(packed, ref, strict=False))}/{len(idx)}",
            flush=True,
        )
    n = len(prompts)
    figures = {
        "questions": n,
        "source": source,
        "match": args.match,
        "batch_size": args.batch_size,
        "identical": same,
        "identical_packed": same_packed,
        "new_tokens": tokens,
        **{f"{k}_s": v[0] for k, v in t.items()},
        **{f"{k}_cpu_s": v[1] for k, v in t.items()},
    }
    print(
        f"{n} questions, {tokens} new tokens, identical answers {same}/{n} (packed {same_packed}/{n}): ours "
        f"{n / t['ours'][0]:.2f} q/s ({t['ours'][1]:.1f} CPU s), ours packed {n / t['ours+packed'][0]:.2f} q/s "
        f"({t['ours+packed'][1]:.1f} CPU s), model.generate {n / t['generate'][0]:.2f} q/s "
        f"({t['generate'][1]:.1f} CPU s); generate took {t['generate'][0] / t['ours'][0]:.2f}x our plain loop's "
        f"wall time ({t['generate'][1] / t['ours'][1]:.2f}x CPU) and {t['generate'][0] / t['ours+packed'][0]:.2f}x "
        f"the packed loop's ({t['generate'][1] / t['ours+packed'][1]:.2f}x CPU)"
    )
    print(f"load average at end: {load_average()}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
    return figures


if __name__ == "__main__":
    main()
