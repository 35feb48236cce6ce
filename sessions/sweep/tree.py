"""Configurations as a tree of shared prefixes, and the jobs that compute its missing nodes.

A node is the model after the first i stages of a configuration (i = 0: the model as loaded, its
baseline evaluation). Its content key is a sha256 over what determines that model and its
numbers: the weights' digest (not the path: a moved copy shares, a changed file does not), the
model spec, the calibration and evaluation settings, and the normalised specs of stages 1..i
(defaults filled in, so `k = 2` written or left to its default is the same). Two configurations
that agree on all of that share the node; any changed parameter makes a new one.

A job runs a chain of stages from the saved model of a node it can resume from: a parent whose
saved model a run cannot start from (a GPTQ model: its kind's `resume_problem`) is computed again
inside its child's job, together with it; a pending node of that kind that has a pending child is
computed inside the child's job, not twice.

The model spec in the key is the resolved one: the device kind (cpu, cuda) and the dtype the
recipe's "auto" settles to where the jobs run. Sweep folders written before keys held them (the
literal dtype, no device) stay readable: `find_node` takes a node finished under its old key
when the environment it recorded ran on the same device kind and dtype.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from frankenlab.pipeline.stages import known_kind
from frankenlab.sessions.sweep.spec import Configuration


@dataclass
class Node:
    key: str
    index: int  # 0 = baseline, i = after stage i
    kind: str  # "baseline" or the stage kind
    parent: str | None
    stage: dict  # the stage's spec as plain data ({} for the baseline)
    label: str  # "Depth 1 > Width 2:4"
    configs: list[int] = field(default_factory=list)  # configuration indices using this node
    legacy: str | None = None  # its key in the first sweep format (no device, literal dtype): `find_node`
    loads_as: dict = field(default_factory=dict)  # {"device": kind, "dtype": name} its jobs load the model as

    @property
    def resumable(self) -> bool:
        """Can a run start from this node's saved model?"""
        if self.index == 0:
            return True  # the source model itself
        stype = known_kind(self.kind)
        params = {k: v for k, v in self.stage.items() if k not in ("kind", "name")}
        return stype is None or stype.resume_problem({"kind": self.kind, "params": params}) is None


def model_identity(model: dict, resolved: dict | None = None) -> dict:
    """The model as content: its weights' sha256 when the source resolves here, else the reference;
    with `resolved` ({"device": "cpu" | "cuda", "dtype": "float32" | ...}: what the recipe's device and
    dtype, "auto" included, load as where the jobs run), the device kind and the actual dtype, so a
    sweep resumed on another machine never mixes fp32 and bf16 numbers under one key. Without it,
    the identity of the first sweep format (the literal dtype, no device): `legacy_key`."""
    from frankenlab.evals.errors import ModelLoadError
    from frankenlab.pipeline.loading import resolve_source
    from frankenlab.pipeline.weight_hashes import weights_digest

    spec = {k: v for k, v in model.items() if k not in ("source", "device")}
    try:
        digest = weights_digest(resolve_source(model.get("source")).path)
    except (ModelLoadError, OSError):
        digest = None
    identity = {
        "weights": digest["digest"] if digest else None,
        "source": None if digest else model.get("source"),
        **spec,
    }
    if resolved is not None:
        identity.update(dtype=resolved["dtype"], device=resolved["device"])
    return identity


def legacy_identity(identity: dict, model: dict) -> dict:
    """The identity as the first sweep format keyed it: the recipe's literal dtype, no device."""
    old = {k: v for k, v in identity.items() if k != "device"}
    old["dtype"] = model.get("dtype", "auto")
    return old


def prefix_key(identity: dict, recipe: dict, i: int) -> str:
    content = {
        "model": identity,
        "calibration": recipe.get("calibration"),
        "evaluation": recipe.get("evaluation"),
        "stages": [{k: v for k, v in s.items() if k != "name"} for s in recipe.get("stages", [])[:i]],
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:16]


def build_tree(configs: list[Configuration], identities: dict | None = None, resolve=None) -> tuple[dict, dict]:
    """(nodes by key, each configuration's chain of node keys from the baseline to its last stage).

    `resolve(device, dtype)` gives {"device", "dtype"} as the jobs will load the model
    (the executor's `resolve`; by default this machine's `pipeline.devices.resolved`)."""
    from frankenlab.sessions.compare import describe_stage

    if resolve is None:
        from frankenlab.evals.devices import resolved as resolve
    identities = {} if identities is None else identities
    nodes: dict[str, Node] = {}
    chains: dict[int, list[str]] = {}
    for c in configs:
        data = c.recipe.to_dict()
        src = (c.recipe.model.source, c.recipe.model.device, c.recipe.model.dtype)
        if src not in identities:
            settled = resolve(c.recipe.model.device, c.recipe.model.dtype)
            identity = model_identity(data["model"], settled)
            identities[src] = (identity, legacy_identity(identity, data["model"]), settled)
        identity, old_identity, settled = identities[src]
        chain, parent, labels = [], None, []
        for i in range(len(data["stages"]) + 1):
            key = prefix_key(identity, data, i)
            stage = data["stages"][i - 1] if i else {}
            if i:
                labels.append(describe_stage(stage["kind"], {k: v for k, v in stage.items() if k != "kind"}))
            if key not in nodes:
                nodes[key] = Node(
                    key, i, stage.get("kind", "baseline"), parent, stage, " > ".join(labels) or "Baseline"
                )
                nodes[key].legacy = prefix_key(old_identity, data, i)
                nodes[key].loads_as = settled
            nodes[key].configs.append(c.index)
            chain.append(key)
            parent = key
        chains[c.index] = chain
    return nodes, chains


@dataclass
class Job:
    keys: list[str]  # the nodes it computes, parent first
    start: str | None  # the node whose saved model it starts from (None: the source model)
    depends: str | None  # the job (by its last key) that must finish first, if any

    @property
    def id(self) -> str:
        return self.keys[-1]


def plan_jobs(nodes: dict[str, Node], done: set[str]) -> list[Job]:
    """The jobs that compute every node not in `done`, each starting from a resumable node."""
    pending = [k for k in nodes if k not in done]
    children: dict[str, list[str]] = {}
    for k, n in nodes.items():
        if n.parent is not None:
            children.setdefault(n.parent, []).append(k)
    jobs = []
    for key in pending:
        node = nodes[key]
        if not node.resumable and any(c not in done for c in children.get(key, [])):
            continue  # computed inside its pending child's job
        chain = [key]
        parent = node.parent
        while parent is not None and nodes[parent].index > 0 and not nodes[parent].resumable:
            chain.insert(0, parent)
            parent = nodes[parent].parent
        if node.index == 0:
            jobs.append(Job(chain, None, None))
            continue
        start = parent if parent is not None and nodes[parent].index > 0 else None
        jobs.append(Job(chain, start, start if start is not None and start not in done else None))
    return jobs


def find_node(sweep_dir, node: Node) -> dict | None:
    """The finished node's record under its key, or under its first-format key (`Node.legacy`) when
    that node's recorded environment ran on the device kind and dtype this node loads as."""
    from frankenlab.evals.devices import device_kind
    from frankenlab.sessions.sweep.jobs import read_node

    found = read_node(sweep_dir, node.key)
    if found is not None or not node.legacy or node.legacy == node.key:
        return found
    old = read_node(sweep_dir, node.legacy)
    if old is None:
        return None
    env = old.get("environment") or {}
    same = device_kind(env.get("device")) == node.loads_as.get("device") and env.get("dtype") == node.loads_as.get(
        "dtype"
    )
    return old if same else None
