"""The LoRA stage's teacher for distillation: the run's uncompressed model.

The teacher is the model the recipe names (`[model] source`), loaded as the recipe loads it, i.e.
the model before the recipe's first stage, never the input of the LoRA stage (which a pruning stage
already changed). The runner hands it to every stage as `StageContext.source_model`; a replay or a
sweep node that starts from a saved stage still names the recipe's source there.

Two ways to get its next-token distribution (`pipeline.lora_loss` scores both):

- `teacher_top_k = 0`: on the fly. The teacher stays loaded beside the student and runs its decoder
  on each micro-batch (no gradient); its logits are computed chunk by chunk inside the loss. Exact
  KL; the teacher's forward costs about a third of a training step.
- `teacher_top_k = k`: the teacher runs once over every training window before training and keeps,
  per scored position, its k largest logits (fp16), their token ids and the logsumexp of logits / T
  over the full vocabulary (fp32, for the tail bucket). These are cached on disk under
  `<frankenlab cache>/teacher-topk/<key>.pt`, where the key hashes the teacher's weight digest, its
  dtype, the training windows themselves (so the data, seq_len and the seed's document order), k and
  T. Another configuration of a sweep with the same teacher and data reuses the file and never loads
  the teacher. The file is memory-mapped; windows are looked up by index, so the step order is free.

The report says which teacher was used (`teacher`: source, path, digest) and how (`teacher_logits`:
"on the fly", "top-k cached (computed now)" or "top-k cached (reused)").
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from frankenlab.evals.errors import RecipeError
from frankenlab.pipeline.lora_loss import CHUNK_TOKENS, TeacherBatch, causal_lm, chunked_head

CACHE_FOLDER = "teacher-topk"
CACHE_VERSION = 1
TOPK_KEYS = ("values", "indices", "lse")  # what a cached top-k file holds


def cache_folder() -> Path:
    from frankenlab.pipeline.loading import cache_dir

    return cache_dir() / CACHE_FOLDER


def windows_digest(windows: torch.Tensor) -> str:
    w = windows.detach().to("cpu", torch.int64).contiguous()
    return hashlib.sha256(str(tuple(w.shape)).encode() + w.numpy().tobytes()).hexdigest()


def load_model(*a, **k):  # the one place the teacher's weights load (tests count calls here)
    from frankenlab.pipeline.loading import load_model as load

    return load(*a, **k)


def _resolve(source: dict) -> tuple[str, str | None]:
    """(folder the teacher loads from, sha256 digest of its weights or None)."""
    from frankenlab.pipeline.loading import resolve_source
    from frankenlab.pipeline.weight_hashes import weights_digest

    path = resolve_source(source.get("source")).path
    digest = weights_digest(path) if path else None
    return str(path) if path else str(source.get("source")), (digest or {}).get("digest")


class Teacher:
    """The teacher's distribution for the training windows, micro-batch by micro-batch."""

    def __init__(self, source: dict | None, device: torch.device, windows: torch.Tensor, top_k: int, temperature):
        if not source or not source.get("source"):
            raise RecipeError(
                'loss = "kd" or "ce+kd" needs the run\'s source model as teacher: run the recipe through '
                'the runner (frankenlab run), or use loss = "ce"'
            )
        self.source, self.device, self.top_k, self.temperature = dict(source), device, int(top_k), float(temperature)
        self.windows = windows
        self.path, self.digest = _resolve(self.source)
        self.model = None
        self.head = None
        self.cache: dict | None = None
        self.cache_file: Path | None = None
        self.forwards = 0  # teacher forward passes run by this object (windows x batches)
        self.how = "on the fly"

    # -- the teacher model ---------------------------------------------------------------------
    def _load(self) -> None:
        if self.model is not None:
            return
        lm = load_model(
            self.source["source"],
            device=str(self.device),
            dtype=self.source.get("dtype") or "auto",
            trust_remote_code=bool(self.source.get("trust_remote_code")),
        )
        self.model = lm.model.eval().requires_grad_(False)
        self.dtype = str(lm.dtype).replace("torch.", "")
        self.head = chunked_head(self.model)

    def _hidden(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.nn.Module]:
        """(N, H) teacher states at the scored positions of `ids` (B, T) and the head that maps them
        to logits; a model whose logits are not a plain head of its states gives its logits instead."""
        self.forwards += 1
        with torch.no_grad():
            if self.head is not None:
                h = causal_lm(self.model).model(input_ids=ids, use_cache=False).last_hidden_state
                return h[:, :-1].reshape(-1, h.shape[-1]), self.head
            logits = self.model(input_ids=ids, use_cache=False).logits[:, :-1]
            return logits.reshape(-1, logits.shape[-1]), torch.nn.Identity()

    # -- preparing: load the teacher, or find its top-k on disk --------------------------------
    def cache_key(self, dtype: str) -> str:
        facts = {
            "version": CACHE_VERSION,
            "teacher": self.digest,
            "dtype": dtype,
            "windows": windows_digest(self.windows),
            "top_k": self.top_k,
            "temperature": self.temperature,
        }
        return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:32]

    def prepare(self, batch_size: int, amp: torch.dtype | None, log=lambda message: None) -> None:
        if self.top_k == 0:
            self._load()
            log(f"lora: teacher {self.path} (sha256 {str(self.digest)[:12]}) runs on the fly beside the student")
            return
        from frankenlab.evals.devices import pick_dtype

        dtype = str(pick_dtype(self.source.get("dtype") or "auto", self.device)).replace("torch.", "")
        amp_name = str(amp).replace("torch.", "") if amp else "none"
        key = self.cache_key(f"{dtype}/{amp_name}")
        self.cache_file = cache_folder() / f"{key}.safetensors" if self.digest else None
        if self.cache_file is not None and self.cache_file.is_file():
            try:
                cache = load_file(str(self.cache_file))  # tensors only: nothing in the file can run
                if self._fits(cache):
                    self.cache, self.how = cache, "top-k cached (reused)"
                    log(f"lora: teacher top-{self.top_k} logits reused from {self.cache_file}")
                    return
                log(f"lora: the teacher's cached logits in {self.cache_file} do not fit this run; computing them again")
            except (OSError, RuntimeError, ValueError, SafetensorError):  # unreadable: compute it again
                self.cache = None
        self._load()
        self.cache = self._compute_top_k(batch_size, amp)
        self.how = "top-k cached (computed now)" if self.cache_file else "top-k in memory (no weight digest)"
        if self.cache_file is not None:
            from frankenlab.pipeline.atomic import atomic_path

            try:
                with atomic_path(self.cache_file) as tmp:
                    save_file({k: v.contiguous() for k, v in self.cache.items()}, str(tmp))
                log(f"lora: teacher top-{self.top_k} logits cached in {self.cache_file}")
            except OSError as exc:  # a read-only cache only costs time
                log(f"lora: could not cache the teacher's logits ({exc}); they stay in memory")
                self.how = "top-k in memory (cache not writable)"
        self.release()

    def _fits(self, cache) -> bool:
        """A cache file read back has the tensors, shapes and token ids this run's windows need (a
        damaged or foreign file is computed again, never half-used)."""
        if not isinstance(cache, dict) or not all(isinstance(cache.get(k), torch.Tensor) for k in TOPK_KEYS):
            return False
        n, t = self.windows.shape
        values, indices, lse = (cache[k] for k in TOPK_KEYS)
        k = values.shape[-1] if values.dim() == 3 else -1
        if values.shape != (n, t - 1, k) or indices.shape != values.shape or lse.shape != (n, t - 1) or k < 1:
            return False
        if indices.is_floating_point() or values.dtype != torch.float16:
            return False
        vocab = self.model_vocab()
        top = int(indices.max()) if indices.numel() else -1
        return bool(indices.numel() == 0 or (int(indices.min()) >= 0 and (vocab is None or top < vocab)))

    def model_vocab(self) -> int | None:
        """The teacher's vocabulary size, from the loaded model or its config.json (None: unknown)."""
        if self.model is not None:
            return self._vocab()
        try:
            cfg = json.loads((Path(self.path) / "config.json").read_text())
            return int((cfg.get("text_config") or cfg)["vocab_size"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def _compute_top_k(self, batch_size: int, amp: torch.dtype | None) -> dict:
        n, t = self.windows.shape
        k, temp = self.top_k, self.temperature
        index_dtype = torch.int16 if self._vocab() <= 32767 else torch.int32
        values = torch.empty(n, t - 1, k, dtype=torch.float16)
        indices = torch.empty(n, t - 1, k, dtype=index_dtype)
        lse = torch.empty(n, t - 1, dtype=torch.float32)
        for b in range(0, n, batch_size):
            ids = self.windows[b : b + batch_size].to(self.device)
            rows = ids.shape[0] * (t - 1)
            with torch.autocast(self.device.type, dtype=amp, enabled=amp is not None):
                h, head = self._hidden(ids)
                v_out, i_out, l_out = [], [], []
                with torch.no_grad():
                    for s in range(0, rows, CHUNK_TOKENS):
                        z = head(h[s : s + CHUNK_TOKENS]).float()
                        top = z.topk(min(k, z.shape[-1]), dim=-1)
                        v_out.append(top.values)
                        i_out.append(top.indices)
                        l_out.append(torch.logsumexp(z / temp, dim=-1))
            values[b : b + batch_size] = torch.cat(v_out).view(-1, t - 1, k).half().cpu()
            indices[b : b + batch_size] = torch.cat(i_out).view(-1, t - 1, k).to(index_dtype).cpu()
            lse[b : b + batch_size] = torch.cat(l_out).view(-1, t - 1).cpu()
        return dict(zip(TOPK_KEYS, (values, indices, lse), strict=True))

    def _vocab(self) -> int:
        head = self.head if self.head is not None else getattr(self.model, "lm_head", None)
        if head is not None and getattr(head, "weight", None) is not None:
            return int(head.weight.shape[0])
        return int(self.model.config.vocab_size)

    # -- training --------------------------------------------------------------------------------
    def batch(self, window_idx: torch.Tensor, ids: torch.Tensor) -> TeacherBatch:
        """The teacher's side of the micro-batch `ids` (B, T), the windows `window_idx` (B,)."""
        if self.cache is not None:
            idx = window_idx.cpu()
            k = self.cache["values"].shape[-1]
            return TeacherBatch(
                values=self.cache["values"][idx].reshape(-1, k).to(ids.device),
                indices=self.cache["indices"][idx].reshape(-1, k).to(ids.device),
                lse=self.cache["lse"][idx].reshape(-1).to(ids.device),
            )
        hidden, head = self._hidden(ids)
        return TeacherBatch(hidden=hidden, head=head)

    def release(self) -> None:
        """Drop the teacher model (after the top-k pass, or after training)."""
        self.model, self.head = None, None

    def report(self) -> dict:
        return {
            "teacher": {"source": self.source.get("source"), "path": self.path, "digest": self.digest},
            "teacher_logits": self.how,
            "teacher_cache": str(self.cache_file) if self.cache_file and self.cache is not None else None,
            "teacher_forwards": self.forwards,
        }


def kl_full(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Reference T^2 * KL(teacher || student) per position over full logits (for tests and benchmarks)."""
    t = float(temperature)
    log_q = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1) * t * t
