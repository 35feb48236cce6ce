"""LoRA training: knowing when to stop, and never starting over.

The LoRA stage's training loop (`pipeline/lora_train.py`) calls these between its optimizer steps:

- **Validation.** `split_windows` holds out the last `val_windows` packed windows of the training
  text (the documents are shuffled per seed and packed first; the windows are held out before the
  training order is drawn, so they are never trained on; at most a quarter of the windows). It is
  a slice of the TRAINING split, never the evaluation data. `validation_loss` is their mean token
  loss, under no_grad in eval mode, checking the cancel flag between windows.
- **Stopping.** `plateau(curve, patience, min_delta)` is a pure function of the validation curve:
  it says why to stop when the last `patience` validations brought no loss `min_delta` (relative)
  below the best so far (the best only moves on such an improvement, as Keras' EarlyStopping
  does), else None. `steps = "auto"` stops on it, at the latest at the cap.
- **Remaining time.** `StepClock` turns the measured step times (validation and checkpoint time
  included) into "about 12 min left".
- **Checkpoints.** `save_checkpoint` writes one file, `<stage dir>/checkpoint/state.pt`, atomically
  (`pipeline.atomic`): adapter tensors, optimizer and grad-scaler state, the step (which gives the
  learning rate and the data cursor), the RNG state, the losses and validation curve so far, and a
  fingerprint of what the run depends on (`fingerprint`: the stage's config but `checkpoint_every`,
  a hash of the training windows, a signature of the input weights). `load_checkpoint` hands the
  state back only when all of it matches this run, else a one-line reason; nothing is applied to
  the model before every check passed. `carry_checkpoints` copies a run's checkpoints into a
  replay's run folder, so `frankenlab replay SESSION --from-stage N` continues where it stopped.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import time
from pathlib import Path

import torch

from frankenlab.evals.cancel import Cancelled

# documented defaults (docs/stages/lora.md); the Config fields take them
EVAL_EVERY = 16  # optimizer steps between validations (0: no validation)
VAL_WINDOWS = 16  # training windows held out for validation
PATIENCE = 4  # validations without a min_delta improvement before steps = "auto" stops
MIN_DELTA = 0.005  # relative improvement that counts (0.5 %)
CHECKPOINT_EVERY = 50  # optimizer steps between checkpoints (0: only when cancelled)

CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FILE = "state.pt"
FORMAT = 1
NOT_IN_FINGERPRINT = ("checkpoint_every",)  # how often to save does not change what is trained


# -- validation ------------------------------------------------------------------------------------
def held_out_count(n_windows: int, val_windows: int) -> int:
    """Windows held out for validation: `val_windows`, at most a quarter of them (0: no validation)."""
    return max(0, min(val_windows, n_windows // 4))


def split_windows(windows: torch.Tensor, val_windows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(training, validation): the last `held_out_count` windows are held out, before any shuffling."""
    held = held_out_count(windows.shape[0], val_windows)
    if not held:
        return windows, windows[:0]
    return windows[:-held], windows[-held:]


@torch.no_grad()
def validation_loss(model, val: torch.Tensor, micro: int, device, amp=None, cancelled=lambda: False) -> float:
    """Mean token loss over the held-out windows (equal length, so the mean of the batch means
    weighted by their size), in eval mode; Cancelled between batches when `cancelled()`. It is the
    plain LM loss (`pipeline.lora_loss`) whatever the training loss is (ce, kd, ce+kd)."""
    from frankenlab.pipeline.lora_loss import micro_batch_loss

    was_training = model.training
    model.eval()
    total = 0.0
    try:
        for b in range(0, val.shape[0], micro):
            if cancelled():
                raise Cancelled("cancelled by the user")
            batch = val[b : b + micro].to(device)
            with torch.autocast(torch.device(device).type, dtype=amp, enabled=amp is not None):
                loss = micro_batch_loss(model, batch).ce  # the LM loss, head in chunks: no full logits
            total += float(loss) * batch.shape[0]
    finally:
        model.train(was_training)
    return total / max(1, val.shape[0])


def plateau(curve: list, patience: int = PATIENCE, min_delta: float = MIN_DELTA) -> str | None:
    """Why training should stop, or None: a pure function of the validation curve [(step, loss), ...].

    An improvement counts when a loss is at least `min_delta` (relative) below the best counted
    so far (the first validation starts it); after `patience` validations without one: stop."""
    if patience < 1 or len(curve) <= patience:
        return None
    best, since = float(curve[0][1]), 0
    for _, loss in curve[1:]:
        if float(loss) < best - min_delta * abs(best):
            best, since = float(loss), 0
        else:
            since += 1
    if since >= patience:
        return f"plateau: no validation loss {100 * min_delta:g} % below {best:.4g} in the last {patience} validations"
    return None


# -- remaining time --------------------------------------------------------------------------------
def fmt_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


class StepClock:
    """Seconds per step from the steps this process ran (the first one, which warms caches up, is
    left out once there are others), validation and checkpoint time included."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.first: float | None = None  # when the first timed step ended
        self.steps = 0

    def tick(self) -> None:
        """One optimizer step (with whatever validation/checkpoint followed it) is done."""
        self.steps += 1
        if self.first is None:
            self.first = time.perf_counter()

    def per_step(self) -> float | None:
        if not self.steps:
            return None
        now = time.perf_counter()
        if self.steps == 1:
            return self.first - self.t0
        return (now - self.first) / (self.steps - 1)

    def left(self, done: int, total: int, at_most: bool = False) -> str:
        """ "about 12 min left" ("at most about ..." when the run may stop before `total`)."""
        rate = self.per_step()
        if rate is None or done >= total:
            return ""
        return ("at most " if at_most else "") + f"about {fmt_duration(rate * (total - done))} left"


# -- checkpoints -----------------------------------------------------------------------------------
def checkpoint_file(work_dir: str | Path | None) -> Path | None:
    return Path(work_dir) / CHECKPOINT_DIR / CHECKPOINT_FILE if work_dir else None


def model_signature(model, targets) -> dict:
    """A cheap signature of the input weights: parameter count and the float64 sum of every
    targeted projection's weight (a pruned, a different or a differently trained input differs)."""
    total, n = 0.0, 0
    for name, mod in model.named_modules():
        if name.rsplit(".", 1)[-1] in targets and getattr(mod, "weight", None) is not None:
            total += float(torch.sum(mod.weight.detach(), dtype=torch.float64))
            n += 1
    params = sum(p.numel() for p in model.parameters())
    return {"params": params, "targeted": n, "weight_sum": total}


def fingerprint(config_data: dict, windows: torch.Tensor, model, targets) -> dict:
    """What a checkpoint must match to be resumed: config (as plain data), data, input weights."""
    data = hashlib.sha256(windows.contiguous().numpy().tobytes()).hexdigest()[:20]
    cfg = {k: v for k, v in sorted(config_data.items()) if k not in NOT_IN_FINGERPRINT}
    return {"config": cfg, "data": f"{tuple(windows.shape)} sha256 {data}", "model": model_signature(model, targets)}


def _show(v) -> str:
    return "empty" if v is None else str(v)


def mismatch(saved: dict, now: dict) -> str | None:
    """What differs between a checkpoint's fingerprint and this run's, in a few words, or None."""
    diffs = []
    a, b = saved.get("config") or {}, now.get("config") or {}
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            diffs.append(f"{key} {_show(a.get(key))} then, {_show(b.get(key))} now")
    if saved.get("data") != now.get("data"):
        diffs.append("other training windows")
    ma, mb = saved.get("model") or {}, now.get("model") or {}
    same_model = (
        ma.get("params") == mb.get("params")
        and ma.get("targeted") == mb.get("targeted")
        and math.isclose(float(ma.get("weight_sum", 0.0)), float(mb.get("weight_sum", 1.0)), rel_tol=1e-6, abs_tol=1e-6)
    )
    if not same_model:
        diffs.append("other input weights")
    return "; ".join(diffs[:4]) + (f" (and {len(diffs) - 4} more)" if len(diffs) > 4 else "") if diffs else None


def save_checkpoint(path: Path, state: dict) -> None:
    """One file, replaced atomically: a kill at any instant leaves the previous checkpoint or this one."""
    from frankenlab.pipeline.atomic import atomic_path

    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, **state}, tmp)


def load_checkpoint(path: Path | None, expect: dict, params: dict) -> tuple[dict | None, str | None]:
    """(state, None) when the checkpoint at `path` belongs to this run; (None, why) when there is
    one that cannot be used; (None, None) when there is none. `params` (name -> trainable tensor)
    must match the saved adapter's names and shapes. Reads and checks only: applies nothing."""
    if path is None or not path.is_file():
        return None, None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a damaged file is refused with a line, never half-loaded
        return None, f"the checkpoint {path} cannot be read ({type(exc).__name__}); starting from step 0"
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        return None, f"the checkpoint {path} is of another format; starting from step 0"
    why = mismatch(state.get("fingerprint") or {}, expect)
    if why:
        return None, f"the checkpoint {path} is from a different run ({why}): not used, starting from step 0"
    saved = state.get("adapter") or {}
    bad = sorted(set(saved) ^ set(params)) or [n for n in params if tuple(saved[n].shape) != tuple(params[n].shape)]
    if bad:
        return None, f"the checkpoint {path} holds other adapter tensors ({bad[0]}, ...); starting from step 0"
    return state, None


def due(done: int, every: int, total: int) -> bool:
    """A validation after step `done`: every `every` steps and after the last one."""
    return every > 0 and (done % every == 0 or done == total)


def state_of(*, expect: dict, step: int, per_step: int, named: dict, optim, scaler, rng, **so_far) -> dict:
    """Everything a resumed run needs to continue as if never stopped (`so_far`: losses, val_curve,
    tokens, micro, halvings, seconds)."""
    return {
        "fingerprint": expect,
        "step": step,
        "cursor": step * per_step,  # sequences taken from the seed's order; the order itself is the seed's
        "adapter": {n: p.detach().to("cpu", copy=True) for n, p in named.items()},
        "optimizer": optim.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": [rng[0], rng[1]],
        **so_far,
    }


def restore(state: dict, named: dict, optim, scaler, device) -> None:
    """Apply a checked checkpoint (`load_checkpoint`) to the adapter, optimizer, scaler and RNG."""
    with torch.no_grad():
        for n, p in named.items():
            p.copy_(state["adapter"][n])
    optim.load_state_dict(state["optimizer"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    cpu, cuda = state["rng"]
    torch.set_rng_state(cpu)
    if cuda is not None and torch.device(device).type == "cuda":
        torch.cuda.set_rng_state(cuda, torch.device(device))


def remove_checkpoint(path: Path | None) -> None:
    """A finished stage needs no checkpoint: its adapter is saved."""
    if path is not None and path.parent.is_dir():
        shutil.rmtree(path.parent, ignore_errors=True)


def carry_checkpoints(source_run: str | Path | None, out_run: str | Path, from_stage: int) -> list[str]:
    """Copy the checkpoints of stages >= `from_stage` of a saved run folder into a replay's run
    folder (a replay never writes into its source); each stage checks its fingerprint itself.
    Returns one line per stage folder carried over."""
    if source_run is None:
        return []
    stages = Path(source_run) / "stages"
    if not stages.is_dir():
        return []
    carried = []
    for src in sorted(stages.glob(f"*/{CHECKPOINT_DIR}/{CHECKPOINT_FILE}")):
        folder = src.parent.parent.name  # NN-kind, as the runner names it
        head = folder.split("-", 1)[0]
        if not head.isdigit() or int(head) < from_stage or src.is_symlink():
            continue
        dest = Path(out_run) / "stages" / folder / CHECKPOINT_DIR / CHECKPOINT_FILE
        if dest.exists():
            continue
        from frankenlab.pipeline.atomic import atomic_path

        with atomic_path(dest) as tmp:
            shutil.copyfile(src, tmp)
        carried.append(f"stage {int(head)}: its checkpoint in {src.parent} was carried over to continue from")
    return carried


# -- the curve in words ----------------------------------------------------------------------------
SPARKS = "▁▂▃▄▅▆▇█"


def sparkline(values: list, width: int = 24) -> str:
    """Block characters for `values` (resampled to at most `width`), low = ▁, high = █."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return ""
    if len(vals) > width:
        vals = [vals[round(i * (len(vals) - 1) / (width - 1))] for i in range(width)]
    lo, hi = min(vals), max(vals)
    span = hi - lo
    return "".join(SPARKS[0 if span <= 0 else min(7, int((v - lo) / span * 7 + 0.5))] for v in vals)


def curve_text(report: dict) -> str:
    """ "val loss ▇▆▅▄▃▃▃ 3.41 -> 3.02 (stopped at 96/512: plateau)" from a LoRA stage report, or ""."""
    curve = report.get("val_curve") or []
    if not curve:
        return ""
    losses = [p[1] for p in curve]
    text = f"val loss {sparkline(losses)} {losses[0]:.2f} -> {losses[-1]:.2f}"
    stop = report.get("stop") or {}
    word = str(stop.get("reason") or "").split(":", 1)[0]
    at = f"{stop.get('step')}/{stop.get('cap')}"
    if word == "plateau":
        text += f" (stopped at {at}: plateau)"
    elif word == "cap":
        text += f" (ran to the cap {at}: still improving)"
    elif word:
        text += f" ({at} steps)"
    elif curve[-1][0]:
        text += f" (step {curve[-1][0]})"  # live: the run goes on
    if report.get("resumed_from"):
        text += f" [resumed at step {report['resumed_from']}]"
    return text
