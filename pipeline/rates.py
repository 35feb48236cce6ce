"""The measured rates the duration estimate (`pipeline.estimate`) is made of: their cache and the probes.

The rates, measured on the actual model on this machine:
- `load`: loading the model (and, once, converting the bundled GGUF);
- `shape`: the model's decoder layers, hidden and intermediate sizes and parameter count;
- `fwd`: seconds per token of a forward pass of the model (no gradient), scored as perplexity does;
- `gen:<batch>`: one greedy decoding step for a batch, and the cost of each call;
- `lora:<configuration>`: the LoRA stage's set-up and seconds per step, measured by running the
  real stage for `LORA_PROBE_STEPS` steps of the recipe's configuration on a copy of the model;
- `quant`: GPTQ's and EoRA's work on one decoder layer's linears.
Rates are cached in `$FRANKENLAB_CACHE/rates.json` (default ~/.cache/frankenlab) under a key made
of this machine (CPU model, capability and threads, or the GPU's name), the model (its
config.json and weight file sizes) and the dtype; a cold cache measures them with short probes
(`Prober`, which sums what they cost in `spent`). The cache also holds the per-kind corrections
that `estimate.record_outcome` moves after a run.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import platform
import time
from dataclasses import replace
from pathlib import Path

RATES_FILE = "rates.json"
RATES_VERSION = 3
LORA_PROBE_STEPS = 2
FWD_PROBE_TOKENS = 128  # the forward probe's sequence length; longer ones scale from it
GEN_PROBE_STEPS = 8


# -- the rate cache ---------------------------------------------------------------------------------
def rates_path() -> Path:
    from frankenlab.pipeline.loading import cache_dir

    return cache_dir() / RATES_FILE


@functools.lru_cache(maxsize=4)
def _machine(device: str) -> tuple:
    return tuple(sorted(machine_fingerprint(device).items()))


def machine_fingerprint(device: str = "cpu") -> dict:
    import torch

    if str(device).startswith("cuda") and torch.cuda.is_available():
        return {"gpu": torch.cuda.get_device_name(0), "count": torch.cuda.device_count()}
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return {"cpu": name, "capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}


def model_fingerprint(source: str | None) -> dict:
    """The model as the cache knows it: its config.json and its weight files' sizes (no hashing)."""
    from frankenlab.pipeline.loading import DEFAULT_MODEL, bundled_gguf_path

    ref = source or DEFAULT_MODEL
    if ref == DEFAULT_MODEL:
        gguf = bundled_gguf_path()
        return {"model": f"default:{gguf.name}:{gguf.stat().st_size if gguf.exists() else 0}"}
    p = Path(ref)
    if p.is_dir():
        config = p / "config.json"
        text = config.read_text() if config.is_file() else ""
        sizes = sorted((f.name, f.stat().st_size) for f in p.iterdir() if f.suffix in (".safetensors", ".bin", ".gguf"))
        return {"model": hashlib.sha256((text + json.dumps(sizes)).encode()).hexdigest()[:16]}
    if p.is_file():
        return {"model": f"{p.name}:{p.stat().st_size}"}
    return {"model": ref}


def _numbers(value) -> dict:
    """The entries of a cached mapping that are finite non-negative numbers, or lists or mappings of
    them (a damaged or hand-edited rates.json costs a probe, never a crash)."""

    def ok(v) -> bool:
        if isinstance(v, bool):
            return False
        if isinstance(v, (int, float)):
            return math.isfinite(v) and v >= 0
        if isinstance(v, dict):
            return all(isinstance(k, str) and ok(x) for k, x in v.items())
        return isinstance(v, list) and all(ok(x) for x in v)

    return {k: v for k, v in value.items() if isinstance(k, str) and ok(v)} if isinstance(value, dict) else {}


class RateCache:
    """The rates of one (machine, model, dtype), read from and written to the shared rates file."""

    def __init__(self, key: dict, path: Path | None = None):
        self.key = key
        self.id = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        self.path = path or rates_path()
        entry = self._read().get(self.id)
        entry = entry if isinstance(entry, dict) else {}
        self.rates: dict = _numbers(entry.get("rates"))
        self.corrections: dict = _numbers(entry.get("corrections"))

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict) or data.get("version") != RATES_VERSION:
            return {}
        return data.get("entries", {}) if isinstance(data.get("entries"), dict) else {}

    def save(self) -> None:
        from frankenlab.pipeline.atomic import atomic_write_text

        entries = self._read()
        entries[self.id] = {"key": self.key, "rates": self.rates, "corrections": self.corrections, "time": time.time()}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, json.dumps({"version": RATES_VERSION, "entries": entries}, indent=1))
        except OSError:
            pass  # an unwritable cache costs a probe next time, nothing else

    def correction(self, kind: str) -> float:
        c = self.corrections.get(kind)
        return min(4.0, max(0.25, float(c))) if isinstance(c, (int, float)) and c > 0 else 1.0


class _Clock:
    def __init__(self):
        self.w, self.c = time.perf_counter(), time.process_time()

    def split(self) -> list[float]:
        return [time.perf_counter() - self.w, time.process_time() - self.c]


# -- probes ---------------------------------------------------------------------------------------
class Prober:
    """Measures missing rates on the loaded model, once each; what it cost is summed in `spent`."""

    def __init__(self, cache: RateCache, recipe, data_dir=None, loaded=None):
        self.cache, self.recipe, self.data_dir = cache, recipe, data_dir
        self.loaded = loaded
        self.spent = [0.0, 0.0]
        self.measured: list[str] = []
        self.lora_configs: dict = {}  # rate name -> the LoRA stage config it measures

    def _lm(self):
        if self.loaded is None:
            from frankenlab.pipeline.loading import load_model

            m = self.recipe.model
            with contextlib.suppress(Exception):  # a GGUF is converted once: the probe's cost, not the load rate's
                from frankenlab.pipeline.loading import resolve_source

                resolve_source(m.source)
            clock = _Clock()
            self.loaded = load_model(m.source, device=m.device, dtype=m.dtype, trust_remote_code=m.trust_remote_code)
            self._store("load", clock.split())
        return self.loaded

    def _store(self, name: str, value) -> None:
        self.cache.rates[name] = value
        if name.split(":")[0] not in self.measured:
            self.measured.append(name.split(":")[0])

    def rate(self, name: str):
        if name not in self.cache.rates:
            clock = _Clock()
            getattr(self, "_probe_" + name.split(":")[0])(name)
            spent = clock.split()
            self.spent = [a + b for a, b in zip(self.spent, spent, strict=True)]
            self.cache.save()
        return self.cache.rates[name]

    def _probe_load(self, name: str) -> None:
        if self.loaded is not None:  # loaded by the caller: its own load time
            self._store("load", [self.loaded.load_seconds, self.loaded.load_seconds])
        self._lm()

    def _probe_shape(self, name: str) -> None:
        from frankenlab.pipeline.loading import decoder_layers

        model = self._lm().model
        cfg = model.config
        self._store(
            name,
            {
                "layers": len(decoder_layers(model)),
                "hidden": int(getattr(cfg, "hidden_size", 0) or 0),
                "intermediate": int(getattr(cfg, "intermediate_size", 0) or 0),
                "params": sum(p.numel() for p in model.parameters()),
            },
        )

    def _probe_fwd(self, name: str) -> None:
        """Scoring sequences the way perplexity does (`evals.perplexity.score_sequences`: packed
        weights, blocked head, side-by-side batches): 2 rows of `FWD_PROBE_TOKENS` to warm up, then 6
        rows timed; the seconds per token, the packing of the weights included (a difference of two
        timings is too noisy on a shared machine)."""
        import torch

        from frankenlab.evals.perplexity import score_sequences

        lm = self._lm()
        vocab = int(getattr(lm.model.config, "vocab_size", 0) or 1000)
        gen = torch.Generator().manual_seed(0)
        row = torch.randint(min(100, vocab // 2), vocab, (FWD_PROBE_TOKENS,), generator=gen)
        score_sequences(lm.model, [(row, 0)] * 2, batch_size=2)
        clock = _Clock()
        score_sequences(lm.model, [(row, 0)] * 6, batch_size=2)
        self._store(name, [x / (6 * FWD_PROBE_TOKENS) for x in clock.split()])  # per token

    def _probe_gen(self, name: str) -> None:
        """A call of one token and one of `GEN_PROBE_STEPS` more: the seconds per decoding step of the
        batch, and per call (the weights are packed for the CPU's GEMM once per call: `evals.packed`)."""
        from frankenlab.evals.generate import generate_greedy

        lm = self._lm()
        batch = int(name.split(":")[1])
        prompts = ["The capital of France is"] * batch
        times, steps = [], []
        for n in (1, 1 + GEN_PROBE_STEPS):
            clock = _Clock()
            gens = generate_greedy(
                lm.model, lm.tokenizer, prompts, max_new_tokens=n, stop_at_newline=False, batch_size=batch
            )
            times.append(clock.split())
            steps.append(max(1, max((g.new_tokens for g in gens), default=1)))
        extra = max(1, steps[1] - steps[0])
        step = [max(0.0, (times[1][i] - times[0][i]) / extra) for i in (0, 1)]
        call = [max(0.0, times[0][i] - step[i]) for i in (0, 1)]
        self._store(name, {"step": step, "call": call})

    def _probe_lora(self, name: str) -> None:
        """The real LoRA stage for a few steps on a copy of the model: set-up and seconds per step."""
        import copy

        from frankenlab.pipeline import events as ev
        from frankenlab.pipeline.context import StageContext
        from frankenlab.pipeline.loading import decoder_layers
        from frankenlab.pipeline.stages import stage_kind

        lm = self._lm()
        config = self.lora_configs[name]
        marks: list[tuple[float, float]] = []

        def listen(e) -> None:
            if isinstance(e, ev.Progress) and e.message.startswith("LoRA step"):
                marks.append((time.perf_counter(), time.process_time()))

        ctx = StageContext(
            lm.tokenizer, lm.device, self.recipe.calibration, Path(self.data_dir) if self.data_dir else None
        )
        ctx = replace(ctx, listener=listen)
        model = copy.deepcopy(lm.model)
        t0 = (time.perf_counter(), time.process_time())
        try:
            quiet = {f: 0 for f in ("eval_every", "checkpoint_every") if hasattr(config, f)}  # counted apart
            stage_kind("lora").run(model, ctx, replace(config, steps=LORA_PROBE_STEPS, merge=False, **quiet))
        finally:
            del model
        if len(marks) >= 2:
            n = len(marks) - 1
            step = [(marks[-1][i] - marks[0][i]) / n for i in (0, 1)]
            setup = [max(0.0, marks[0][i] - t0[i] - step[i]) for i in (0, 1)]
        else:  # no step boundaries seen: the whole probe over its steps
            total = [time.perf_counter() - t0[0], time.process_time() - t0[1]]
            step, setup = [t / LORA_PROBE_STEPS for t in total], [0.0, 0.0]
        self._store(name, {"setup": setup, "step": step, "layers": len(decoder_layers(lm.model))})

    def _probe_quant(self, name: str) -> None:
        """GPTQ's and EoRA's work on one decoder layer's linears, as the libraries do it on this device."""
        import torch

        from frankenlab.pipeline.loading import decoder_layers

        lm = self._lm()
        layer = decoder_layers(lm.model)[0]
        linears = [m for m in layer.modules() if isinstance(m, torch.nn.Linear)]
        gptq, svd = [0.0, 0.0], [0.0, 0.0]
        for lin in linears:
            w = lin.weight.detach().float().clone()
            cols = w.shape[1]
            clock = _Clock()
            h = torch.eye(cols, device=w.device) + 0.01 * torch.randn(cols, cols, device=w.device).abs()
            h = h @ h.T
            hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
            scale = w.abs().amax(dim=1, keepdim=True) / 7 + 1e-8
            for j in range(cols):  # the column loop: quantise, spread the error over the rest
                q = torch.clamp(torch.round(w[:, j : j + 1] / scale), -8, 7) * scale
                err = (w[:, j : j + 1] - q) / hinv[j, j]
                w[:, j:] -= err @ hinv[j : j + 1, j:]
            gptq = [a + b for a, b in zip(gptq, clock.split(), strict=True)]
            clock = _Clock()
            torch.linalg.svd(lin.weight.detach().float(), full_matrices=False)
            svd = [a + b for a, b in zip(svd, clock.split(), strict=True)]
        self._store(name, {"gptq": gptq, "eora": svd})
