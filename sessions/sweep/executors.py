"""Where sweep jobs run: this machine (threads, one job per device) or a Ray cluster (one task per job).

Both hand back `concurrent.futures.Future`s of `run_job`'s result, so the sweep's scheduler waits
on them the same way. The local executor runs one job at a time on CPU (a job already uses every
core through torch) and one job per GPU where there are several; it streams the runner's events
(progress bars in the CLI and the lab). Ray tasks report when they finish; each asks for one GPU
when the job wants CUDA. Workers import the `frankenlab` package installed on their node (install
it on every node), and the sweep folder must be on storage every node sees.
"""

from __future__ import annotations

import os
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor

from frankenlab.sessions.sweep.jobs import run_job


def local_devices(device: str) -> list[str | None]:
    """One slot per GPU when the recipe may use CUDA and there are several; otherwise one slot."""
    if device in ("auto", "cuda"):
        try:
            import torch

            n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        except Exception:  # noqa: BLE001 - no usable CUDA
            n = 0
        if n > 1:
            return [f"cuda:{i}" for i in range(n)]
    return [None]


class LocalExecutor:
    name = "local"

    def __init__(self, device: str = "auto"):
        self.devices = local_devices(device)
        self.slots = len(self.devices)
        self._free: queue.Queue = queue.Queue()
        for d in self.devices:
            self._free.put(d)
        self._pool = ThreadPoolExecutor(max_workers=self.slots, thread_name_prefix="sweep-job")
        self.streams_events = True

    def submit(self, spec: dict, listener=None, cancel: threading.Event | None = None) -> Future:
        def job():
            device = self._free.get()
            try:
                return run_job({**spec, "device": device} if device else spec, listener=listener, cancel=cancel)
            finally:
                self._free.put(device)

        return self._pool.submit(job)

    def cancel(self) -> None:
        """Running jobs stop at their next batch through the cancel event the scheduler holds."""

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def _ray_job(spec: dict) -> dict:
    return run_job(spec)


class RayExecutor:
    """Jobs as Ray tasks on a local instance (started here, stopped by `close`) or on `address`."""

    name = "ray"

    def __init__(self, address: str | None = None, device: str = "auto", num_cpus: int | None = None):
        try:
            import ray
        except ImportError:
            raise RuntimeError("Ray is not installed: re-run the README's set-up (it installs ray)") from None
        self.ray = ray
        env = {}  # workers import the installed frankenlab package, as this process does
        for var in ("FRANKENLAB_DATA_DIR", "FRANKENLAB_CACHE", "HF_HOME", "HF_HUB_OFFLINE"):
            if os.environ.get(var):
                env[var] = os.environ[var]
        self.started_here = not ray.is_initialized()
        if self.started_here:
            kwargs = {
                "runtime_env": {"env_vars": env},
                "include_dashboard": False,
                "log_to_driver": False,
                "logging_level": "ERROR",
            }
            if address:
                kwargs["address"] = address
            elif num_cpus:
                kwargs["num_cpus"] = num_cpus
            try:
                ray.init(**kwargs)
            except Exception as exc:  # noqa: BLE001 - connection refused, bad address, ...
                raise RuntimeError(
                    f"cannot start or reach Ray{f' at {address}' if address else ''}: "
                    f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                ) from None
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        self.wants_gpu = gpus > 0 and device in ("auto", "cuda") or device.startswith("cuda")
        self.slots = max(1, gpus if self.wants_gpu else int(resources.get("CPU", 1)))
        self._task = ray.remote(_ray_job).options(num_gpus=1 if self.wants_gpu else 0, num_cpus=1, max_retries=0)
        self._refs: list = []
        self.streams_events = False

    def submit(self, spec: dict, listener=None, cancel=None) -> Future:
        ref = self._task.remote(spec)
        self._refs.append(ref)
        return ref.future()

    def cancel(self) -> None:
        for ref in self._refs:
            try:
                self.ray.cancel(ref)
            except Exception:  # noqa: BLE001 - already finished
                pass

    def close(self) -> None:
        if self.started_here and self.ray.is_initialized():
            self.ray.shutdown()
