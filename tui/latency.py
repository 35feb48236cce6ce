"""How smooth the screen stayed during a run: an event-loop latency probe.

The app calls `tick()` every `TICK` seconds from a Textual interval; when the loop was busy the
call comes late, and the extra delay is recorded with the last event the screen handled before
it, so a slow handler names itself in the run log. No Textual import: the app owns the timer.
"""

from __future__ import annotations

import time

TICK = 0.05  # seconds between probes


class LatencyProbe:
    def __init__(self, tick: float = TICK, clock=time.perf_counter):
        self.tick_s, self.clock = tick, clock
        self.active = False  # only a run's ticks are recorded
        self.gaps: list[float] = []  # extra seconds between probes while active
        self.last_event = ""  # what the screen handled last (named beside the worst gap)
        self._worst: tuple[float, str] = (0.0, "")
        self._last = clock()

    def start(self) -> None:
        self.active, self.gaps, self._worst = True, [], (0.0, "")

    def stop(self) -> None:
        self.active = False

    def tick(self) -> None:
        now = self.clock()
        if self.active:
            gap = now - self._last - self.tick_s
            self.gaps.append(gap)
            if gap > self._worst[0]:
                self._worst = (gap, self.last_event)
        self._last = now

    def text(self) -> str:
        if not self.gaps:
            return "event loop: no samples"
        gaps = sorted(self.gaps)
        p99 = gaps[min(len(gaps) - 1, int(len(gaps) * 0.99))]
        return (
            f"event loop during the run: {len(gaps)} ticks of {self.tick_s * 1000:.0f} ms; largest extra delay "
            f"{gaps[-1] * 1000:.0f} ms (after: {self._worst[1]}), p99 {p99 * 1000:.0f} ms, "
            f"median {gaps[len(gaps) // 2] * 1000:.0f} ms"
        )
