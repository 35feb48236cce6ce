"""How long a cancel takes to reach each long loop on the bundled model (printed, never asserted).

    FRANKENLAB_DATA_DIR=/work/shared/data .venv/bin/python -m benchmarks.bench_cancel [--only width,lora]

For each loop the lab can be waiting in (the baseline's perplexity evaluation, WANDA's per-layer
pruning, LoRA's optimizer steps, GPTQ inside gptqmodel's layer loop, the TriviaQA generation), a
one-stage run starts in a thread exactly as the lab and `frankenlab run` start it; `--after`
seconds after that stage (or evaluation) reports its first progress, the cancel event is set, as
Ctrl-C, SIGTERM and the lab's cancel key do. Printed: seconds from the cancel to the run's return,
the run's status and message, and whether session.json was written with the finished stages.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

HEAD = """name = "cancel-{label}"
[model]
source = "default"
[calibration]
dataset = "c4"
samples = 32
seq_len = 128
[evaluation]
{evaluation}
"""
NO_EVAL = "perplexity = []\n"
SCENARIOS = {
    # label: (evaluation table, stages, index of the stage whose progress starts the clock)
    "perplexity": ('perplexity = ["wikitext2-concat-512"]\nppl_limit = 64\n', "", 0),
    "triviaqa": ("perplexity = []\ntriviaqa_closed = 200\n", "", 0),
    "width": (NO_EVAL, '[[stages]]\nkind = "width"\npattern = "2:4"\nmethod = "wanda"\n', 1),
    "lora": (NO_EVAL, '[[stages]]\nkind = "lora"\ndataset = "wikitext2"\nsteps = 40\n', 1),
    "gptq": (NO_EVAL, '[[stages]]\nkind = "gptq"\nbits = 4\ngroup_size = 128\n', 1),
}


def one(label: str, after: float, data_dir: str | None) -> dict:
    from frankenlab.pipeline.events import Progress, StageStarted
    from frankenlab.pipeline.recipe import Recipe
    from frankenlab.sessions import record_run

    evaluation, stages, target = SCENARIOS[label]
    recipe = Recipe.loads(HEAD.format(label=label, evaluation=evaluation) + stages)
    cancel = threading.Event()
    started: list[float] = []
    out = Path(tempfile.mkdtemp(prefix=f"bench-cancel-{label}-"))

    def listen(event) -> None:
        if event.stage == target and isinstance(event, (Progress, StageStarted)) and not started:
            if isinstance(event, Progress) or target == 0:
                started.append(time.perf_counter())

    result: dict = {}

    def work() -> None:
        try:
            session = record_run(recipe, out, listener=listen, cancel=cancel, data_dir=data_dir)
            result["status"] = session.status
        except BaseException as exc:  # noqa: BLE001 - printed
            result["status"] = f"raised {type(exc).__name__}: {exc}"

    t = threading.Thread(target=work, daemon=True)
    t0 = time.perf_counter()
    t.start()
    while not started and t.is_alive():
        time.sleep(0.05)
    if not t.is_alive():
        return {"label": label, "error": f"finished before the clock started: {result}"}
    while time.perf_counter() < started[0] + after and t.is_alive():
        time.sleep(0.05)
    c = time.perf_counter()
    cancel.set()
    t.join()
    latency = time.perf_counter() - c
    saved = out / "session.json"
    stages_saved = None
    if saved.exists():
        data = json.loads(saved.read_text())
        stages_saved = [(s.get("kind"), s.get("status")) for s in data.get("stages", [])]
    shutil.rmtree(out, ignore_errors=True)  # a run folder per scenario, models included: not kept
    return {
        "label": label,
        "latency_s": latency,
        "ran_s": c - t0,
        "status": result.get("status"),
        "session_stages": stages_saved,
    }


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=",".join(SCENARIOS), help="comma-separated: " + ", ".join(SCENARIOS))
    ap.add_argument("--after", type=float, default=5.0, help="seconds of the loop's work before the cancel")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    import os

    from benchmarks.common import load_average
    from frankenlab.tui.cli.main import _quiet_libraries

    _quiet_libraries()
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    data_dir = os.environ.get("FRANKENLAB_DATA_DIR", str(ROOT.parent / "shared" / "data"))
    rows = []
    for label in args.only.split(","):
        row = one(label.strip(), args.after, data_dir)
        rows.append(row)
        if "error" in row:
            print(f"{label:<10} {row['error']}", flush=True)
            continue
        print(
            f"{label:<10} cancel -> return {row['latency_s']:5.2f} s (after {row['ran_s']:.0f} s of run); status "
            f"{row['status']}; session stages {row['session_stages']}; load {load_average()}",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
