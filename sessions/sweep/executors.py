"""Where sweep jobs run: this machine (one job per device) or a Ray cluster (one task per job).

Both hand back `concurrent.futures.Future`s of `run_job`'s result, so the sweep's scheduler waits
on them the same way. The local executor runs one job at a time on a CPU or one GPU, in this
process (a job already uses every core through torch), and with several GPUs one job per GPU, each
in its own process (`sessions.sweep.worker`) that sees only its GPU (`CUDA_VISIBLE_DEVICES`):
gptqmodel uses every GPU it sees, and patches and log folders are per process, so jobs never
share one. It streams the runner's progress (bars in the CLI and the lab) either way. Ray tasks
report when they finish; each asks for one GPU when the job wants CUDA and the cluster has GPUs
(a recipe that names CUDA on a cluster without any is refused at once), and inside a task the
recipe's `cuda:N` is the task's own GPU. Workers import the `frankenlab` package installed on
their node (install it on every node), and the sweep folder must be on storage every node sees.

Each executor's `resolve(device, dtype)` says what a recipe's device and dtype load as where its
jobs run: the sweep's node keys hold that, never "auto" (`pipeline.devices`).
"""

from __future__ import annotations

import os
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor

from frankenlab.evals import devices
from frankenlab.sessions.sweep.jobs import run_job


def local_devices(device: str) -> list[str | None]:
    """One slot per GPU when the recipe may use CUDA and there are several; otherwise one slot."""
    return devices.local_sweep_slots(device)


class LocalExecutor:
    name = "local"

    def __init__(self, device: str = "auto", process_per_job: bool | None = None):
        """`process_per_job`: None decides (several GPUs: yes; a CPU or one GPU: no), True or False forces."""
        self.devices = local_devices(device)
        self.slots = len(self.devices)
        self.own_process = devices.process_per_job(self.devices, process_per_job)
        self._free: queue.Queue = queue.Queue()
        for d in self.devices:
            self._free.put(d)
        self._pool = ThreadPoolExecutor(max_workers=self.slots, thread_name_prefix="sweep-job")
        self.streams_events = True

    @staticmethod
    def resolve(device: str, dtype: str) -> dict:
        return devices.resolved(device, dtype)

    def submit(self, spec: dict, listener=None, cancel: threading.Event | None = None) -> Future:
        def job():
            slot = self._free.get()
            try:
                device = devices.slot_device(slot, self.own_process)
                run = {**spec, "device": device} if device else spec
                if self.own_process:
                    from frankenlab.sessions.sweep.worker import run_in_process

                    return run_in_process(run, devices.job_environment(slot), listener=listener, cancel=cancel)
                return run_job(run, listener=listener, cancel=cancel)
            finally:
                self._free.put(slot)

        return self._pool.submit(job)

    def cancel(self) -> None:
        """Running jobs stop at their next batch through the cancel event the scheduler holds."""

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def _ray_job(spec: dict) -> dict:
    if spec.get("recipe", {}).get("model", {}).get("device"):  # Ray shows the task its one GPU as cuda:0
        model = spec["recipe"]["model"]
        spec = {
            **spec,
            "recipe": {**spec["recipe"], "model": {**model, "device": devices.task_device(model["device"])}},
        }
    return run_job(spec)


RAY_AUTH_MODE = "RAY_AUTH_MODE"
TOKEN_HINT = "set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN to its token (`ray get-auth-token` on the head node)"


def _ray_resolve(device: str, dtype: str) -> dict:
    return devices.resolved(device, dtype)


class RayExecutor:
    """Jobs as Ray tasks on a local instance (started here with token authentication, stopped by `close`)
    or on `address` (a cluster that requires a token: RAY_AUTH_MODE=token and RAY_AUTH_TOKEN set here)."""

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
            else:
                # The local instance listens on every interface: only holders of its token may use it. Ray
                # 2.59 and newer start a new local instance so (and write a token to ~/.ray/auth_token when
                # there is none) while RAY_AUTH_MODE is unset: a "disabled" there is dropped for it. (Setting
                # "token" here instead would not do: Ray reads its config once, at import.)
                if os.environ.get(RAY_AUTH_MODE, "").lower() != "token":
                    os.environ.pop(RAY_AUTH_MODE, None)
                if num_cpus:
                    kwargs["num_cpus"] = num_cpus
            try:
                ray.init(**kwargs)
            except Exception as exc:  # noqa: BLE001 - connection refused, bad address, wrong token, ...
                hint = ""
                if address and os.environ.get(RAY_AUTH_MODE, "").lower() != "token":
                    hint = f" (a cluster that requires a token: {TOKEN_HINT})"
                raise RuntimeError(
                    f"cannot start or reach Ray{f' at {address}' if address else ''}: "
                    f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}{hint}"
                ) from None
        if self.started_here and not address and os.environ.get(RAY_AUTH_MODE, "").lower() != "token":
            self.close()  # an older Ray: its instance would let anyone who reaches this machine run code here
            raise RuntimeError(
                f"Ray {getattr(ray, '__version__', '?')} started its local instance without token authentication: "
                "install ray>=2.59 (re-run the README's set-up)"
            )
        resources = ray.cluster_resources()
        num_gpus, problem = devices.ray_placement(device, resources)
        if problem:
            self.close()
            raise devices.DeviceError(problem)
        self.wants_gpu = num_gpus > 0
        gpus = int(resources.get("GPU", 0) or 0)
        self.slots = max(1, gpus if self.wants_gpu else int(resources.get("CPU", 1)))
        self._task = ray.remote(_ray_job).options(num_gpus=num_gpus, num_cpus=1, max_retries=0)
        self._resolver = ray.remote(_ray_resolve).options(num_gpus=num_gpus, num_cpus=1, max_retries=0)
        self._resolved: dict = {}
        self._refs: list = []
        self.streams_events = False

    def resolve(self, device: str, dtype: str) -> dict:
        """What the recipe loads as on the cluster's workers: asked of one task placed like the jobs."""
        if (device, dtype) not in self._resolved:
            self._resolved[(device, dtype)] = self.ray.get(self._resolver.remote(devices.task_device(device), dtype))
        return self._resolved[(device, dtype)]

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
