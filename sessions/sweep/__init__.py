"""Sweeps: a grid of configurations run as one, sharing every common prefix (sessions/SCHEMA.md).

- `load_sweep(path_or_name) -> Sweep`, `parse_sweep(text)`; `Sweep.expand() -> [Configuration]`
  validates every configuration (SweepError names the configuration and the field);
- `build_tree(configs) -> (nodes, chains)`, `plan_jobs(nodes, done)`: shared prefixes and content keys;
- `run_sweep(sweep, out, executor=..., listener=..., cancel=...) -> record` (sweep.json); its events
  (`SweepStarted`, `NodeProgress`, ...: sessions.sweep.events);
- `LocalExecutor()`, `RayExecutor(address=None)`;
- `sweep_sessions(out)`, `thesis_tables(...)`, `pareto_front(...)`: the results (sessions.sweep.results).
"""

from frankenlab.sessions.sweep.events import (
    ConfigFinished,
    NodeFinished,
    NodeProgress,
    NodeStarted,
    SweepFinished,
    SweepStarted,
)
from frankenlab.sessions.sweep.executors import LocalExecutor, RayExecutor
from frankenlab.sessions.sweep.run import load_record, run_sweep
from frankenlab.sessions.sweep.spec import Configuration, Sweep, SweepError, bundled_sweeps, load_sweep, parse_sweep
from frankenlab.sessions.sweep.tree import Job, Node, build_tree, plan_jobs, prefix_key

__all__ = [
    "LocalExecutor",
    "RayExecutor",
    "run_sweep",
    "load_record",
    "SweepStarted",
    "NodeStarted",
    "NodeProgress",
    "NodeFinished",
    "ConfigFinished",
    "SweepFinished",
    "Configuration",
    "Sweep",
    "SweepError",
    "bundled_sweeps",
    "load_sweep",
    "parse_sweep",
    "Job",
    "Node",
    "build_tree",
    "plan_jobs",
    "prefix_key",
]
