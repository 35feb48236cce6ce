"""Evaluation speed: our `wikitext2-concat-512` beside lm-evaluation-harness on the same work, and QA speed.

    FRANKENLAB_DATA_DIR=/work/shared/data .venv/bin/python benchmarks/bench_eval.py --windows 16
    (lm-evaluation-harness comes with the optional extra: pip install -e '.[bench]')

Printed, not asserted (timings depend on the machine and its load; the load average is printed).

What is compared, on exactly equal forward work. lm-eval's `wikitext` task downloads
`EleutherAI/wikitext_document_level` from the hub, which this machine cannot reach, and its task
machinery adds nothing to the speed of the model work. So the harness is driven one level down,
where that task spends its time: `HFLM` (`max_length=512`, the same `batch_size`, the same
in-memory model and tokenizer object) and its `loglikelihood_rolling` request on one document.
Its rolling windows score every token once: the first window predicts 511 tokens from an EOT
prefix, each later one 512, so a document of `W * 512 - 1` tokens is exactly `W` forward passes of
512 tokens. Ours scores `W` non-overlapping 512-token windows of the first `W * 512` tokens, 511
predictions each. Both sides therefore run `W` forward passes of 512 tokens on the same text
(WikiText-2 test rows joined with "\\n\\n", read from the same local file); the script counts the
harness' windows and says so if they differ. Timings are end to end from the text (tokenization
included) and interleaved (ours, theirs, ours, theirs) so background load hits both alike. Each
side prints what it scored: their `W * 512 - 1` tokens, our `W * 511`; the perplexities differ
slightly for that reason (different window boundaries) and are a sanity check, not a comparison.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.common import load_average, machine_line  # noqa: E402
from evals.data import load_texts  # noqa: E402
from evals.perplexity import perplexity  # noqa: E402
from evals.qa import run_qa  # noqa: E402
from pipeline.models import load_model  # noqa: E402

SEQ_LEN = 512


def text_prefix(tokenizer, text: str, tokens: int) -> str:
    """The shortest prefix of `text` whose tokenization holds `tokens` tokens (cut at a token end)."""
    enc = tokenizer(text[: tokens * 12], return_offsets_mapping=True, verbose=False)
    if len(enc.input_ids) < tokens:
        raise ValueError("not enough text for that many tokens")
    return text[: enc.offset_mapping[tokens - 1][1]]


def ours(lm, text_file: Path, windows: int, batch_size: int) -> dict:
    r = perplexity(lm.model, lm.tokenizer, f"{text_file}-concat-{SEQ_LEN}", limit=windows, batch_size=batch_size)
    return {"ppl": r.value, "scored_tokens": r.tokens, "seconds": r.seconds, "protocol": r.protocol,
            "tokens_per_s": r.tokens / r.seconds, "input_tokens_per_s": r.sequences * SEQ_LEN / r.seconds}


def harness_windows(hf, text: str) -> int:
    """How many forward passes lm-eval's rolling loglikelihood makes on `text`."""
    from lm_eval import utils

    ids = hf.tok_encode(text)
    return len(list(utils.get_rolling_token_windows(token_list=ids, prefix_token=hf.prefix_token_id,
                                                    max_seq_len=hf.max_length, context_len=1)))


def harness(lm, text: str, batch_size: int) -> dict:
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    t0 = time.perf_counter()
    hf = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, max_length=SEQ_LEN, batch_size=batch_size,
              device=str(lm.device))
    req = Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)
    (ll,) = hf.loglikelihood_rolling([req], disable_tqdm=True)
    seconds = time.perf_counter() - t0
    n = len(hf.tok_encode(text))
    return {"ppl": math.exp(-ll / n), "scored_tokens": n, "seconds": seconds, "tokens_per_s": n / seconds,
            "windows": harness_windows(hf, text)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model reference (default: the bundled SmolLM2-135M-Instruct)")
    ap.add_argument("--windows", type=int, default=16, help="512-token windows scored per run")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2, help="interleaved runs of each (0: skip perplexity)")
    ap.add_argument("--qa", type=int, default=32, help="closed-book questions to time (0: skip)")
    ap.add_argument("--qa-open", type=int, default=16, help="open-book questions to time (0: skip)")
    ap.add_argument("--qa-batch-size", type=int, default=8)
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args(argv)

    lm = load_model(args.model)
    print(machine_line(lm))
    print(f"load average at start: {load_average()}")
    texts, source = load_texts("wikitext2")
    joined = "\n\n".join(texts)
    text = text_prefix(lm.tokenizer, joined, args.windows * SEQ_LEN)  # ours: W windows of 512
    their_text = text_prefix(lm.tokenizer, joined, args.windows * SEQ_LEN - 1)  # theirs: W rolling windows
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_eval_wikitext2_{os.getpid()}.txt"
    work.write_text(text, encoding="utf-8")  # the same characters for both, from the same file
    figures: dict = {"model": lm.source.name, "device": str(lm.device), "threads": torch.get_num_threads(),
                     "windows": args.windows, "batch_size": args.batch_size, "source": source, "runs": []}
    try:
        import lm_eval

        figures["lm_eval"] = lm_eval.__version__ if hasattr(lm_eval, "__version__") else "installed"
    except ImportError:
        figures["lm_eval"] = None
        print("lm-evaluation-harness is not installed (pip install -e '.[bench]'): printing our figures only")
    try:
        if args.repeats:
            perplexity(lm.model, lm.tokenizer, f"{work}-concat-{SEQ_LEN}", limit=1)  # warm-up
        for rep in range(args.repeats):
            a = ours(lm, work, args.windows, args.batch_size)
            print(f"[{rep}] ours     {a['protocol']}: ppl {a['ppl']:.3f}, {a['scored_tokens']} scored tokens in "
                  f"{a['seconds']:.1f} s = {a['tokens_per_s']:.0f} tok/s")
            run = {"ours": a}
            if figures["lm_eval"]:
                b = harness(lm, their_text, args.batch_size)
                print(f"[{rep}] lm_eval  HFLM.loglikelihood_rolling max_length=512: ppl {b['ppl']:.3f}, "
                      f"{b['scored_tokens']} scored tokens in {b['windows']} windows, {b['seconds']:.1f} s = "
                      f"{b['tokens_per_s']:.0f} tok/s")
                if b["windows"] != args.windows:
                    print(f"    lm_eval ran {b['windows']} windows, ours {args.windows}: the timings are NOT on equal "
                          "work (a tokenizer whose prefix tokenizes differently); do not read the ratio")
                run["lm_eval"] = b
            figures["runs"].append(run)
    finally:
        work.unlink(missing_ok=True)
    ours_s = sum(r["ours"]["seconds"] for r in figures["runs"])
    ours_tok = sum(r["ours"]["scored_tokens"] for r in figures["runs"])
    if ours_s:
        figures["ours_tokens_per_s"] = ours_tok / ours_s
        print(f"ours: {figures['ours_tokens_per_s']:.0f} scored tok/s over {args.repeats} runs")
    if figures["lm_eval"] and ours_s:
        h_s = sum(r["lm_eval"]["seconds"] for r in figures["runs"])
        h_tok = sum(r["lm_eval"]["scored_tokens"] for r in figures["runs"])
        figures["lm_eval_tokens_per_s"] = h_tok / h_s
        # the same 512-token forward passes on both sides: compare wall time for the same text
        figures["speed_ratio_time"] = h_s / ours_s
        figures["equal_work"] = all(r["lm_eval"]["windows"] == args.windows for r in figures["runs"])
        print(f"lm_eval: {figures['lm_eval_tokens_per_s']:.0f} scored tok/s; ours is {h_s / ours_s:.2f}x as fast "
              f"(lm_eval seconds / our seconds for {args.windows} forward passes of {SEQ_LEN} tokens each side"
              + ("" if figures["equal_work"] else "; NOT equal work, see above") + ")")
    for task, n in (("closed", args.qa), ("open", args.qa_open)):
        if not n:
            continue
        r = run_qa(lm.model, lm.tokenizer, task, n, batch_size=args.qa_batch_size)
        toks = sum(x["new_tokens"] for x in r.records)
        print(f"{r.protocol}: {r.n} questions in {r.seconds:.1f} s = {r.questions_per_second:.2f} q/s "
              f"({toks / r.seconds:.1f} new tok/s, batch {args.qa_batch_size}); accuracy {r.accuracy:.3f}, "
              f"EM {r.exact_match:.3f}")
        figures[f"qa_{task}"] = {"protocol": r.protocol, "n": r.n, "seconds": r.seconds,
                                 "questions_per_s": r.questions_per_second, "new_tokens_per_s": toks / r.seconds,
                                 "accuracy": r.accuracy, "exact_match": r.exact_match}
    print(f"load average at end: {load_average()}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
    return figures


if __name__ == "__main__":
    main()
