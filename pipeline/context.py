"""What a stage gets besides the model: tokenizer, device, data, calibration, and a voice.

Stages talk through `ctx.progress`, `ctx.log` and `ctx.metric`, and call `ctx.check_cancel()`
between batches; the runner turns these into events for its listeners. Each stage gets its own
context (`for_stage`): its index, a folder of its own, and its input artifact (the folder of the
model it receives), so no stage needs to know how the runner names folders. Only the
calibration cache is shared between the contexts of one run.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from frankenlab.evals.cancel import Cancelled
from frankenlab.pipeline.calibration import CalibrationConfig, calibration_ids
from frankenlab.pipeline.events import Listener, LogLine, MetricMeasured, Progress, ignore


@dataclass
class StageResult:
    """A stage's output: the new model and a JSON-able report (scores, density, notes...)."""

    model: torch.nn.Module
    report: dict = field(default_factory=dict)
    artifacts: dict = field(default_factory=dict)  # name -> path written by the stage itself


@dataclass(frozen=True)
class StageContext:
    tokenizer: Any
    device: torch.device
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    data_dir: Path | None = None
    work_dir: Path | None = None  # a folder this stage may write into
    listener: Listener = ignore
    cancel_event: threading.Event = field(default_factory=threading.Event)
    index: int = 0
    input_artifact: Path | None = None  # the saved folder of the model this stage receives, when known
    # the run's model before its first stage, as the recipe loads it (LoRA's distillation teacher):
    # {"source", "device", "dtype", "trust_remote_code"}; None outside a run
    source_model: dict | None = None
    _calib_cache: dict = field(default_factory=dict, repr=False)

    def for_stage(self, index: int, work_dir: Path | None = None, input_artifact: Path | None = None) -> StageContext:
        """The context of stage `index`: same run (tokenizer, data, listener, cancel flag, calibration
        cache), its own index, folder and input."""
        return replace(self, index=index, work_dir=work_dir, input_artifact=input_artifact)

    # -- voice -------------------------------------------------------------------------------
    def progress(self, fraction: float, message: str = "") -> None:
        self.listener(Progress(self.index, max(0.0, min(1.0, fraction)), message))

    def log(self, message: str, level: str = "info") -> None:
        self.listener(LogLine(self.index, message, level))

    def metric(self, name: str, value: float, protocol: str = "", step: int | None = None) -> None:
        self.listener(MetricMeasured(self.index, name, float(value), protocol, step))

    # -- cancellation ------------------------------------------------------------------------
    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    def check_cancel(self) -> None:
        if self.cancel_event.is_set():
            raise Cancelled("cancelled by the user")

    # -- data --------------------------------------------------------------------------------
    def calibration_ids(self, config: CalibrationConfig | None = None) -> torch.Tensor:
        """(samples, seq_len) calibration token ids, tokenized once per config and reused."""
        config = config or self.calibration
        if config not in self._calib_cache:
            self._calib_cache[config] = calibration_ids(self.tokenizer, config, data_dir=self.data_dir)
        return self._calib_cache[config]
