"""What every benchmark prints about the machine it ran on (imported as `benchmarks.common`)."""

from __future__ import annotations

import os
import platform
import resource


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, or "n/a" where the system has none."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def machine_line(lm) -> str:
    """Model, device, dtype, torch version, threads and CPU: the header line of a benchmark's output."""
    import torch

    return (
        f"model {lm.source.name}, {lm.device}, {lm.dtype}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {os.cpu_count()} cpus, {platform.processor() or platform.machine()}"
    )


def peak_rss_gib() -> float:
    """This process's peak resident memory so far, in GiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def prune_2to4(model):
    """2:4 by magnitude on every decoder projection, in place (a quick sparse model for benchmarks)."""
    import torch

    from frankenlab.pipeline.layerwise import linear_modules
    from frankenlab.pipeline.loading import decoder_layers
    from frankenlab.pipeline.stages.width import ALL_PROJECTIONS, nm_prune_mask

    with torch.no_grad():
        for layer in decoder_layers(model):
            for lin in linear_modules(layer, ALL_PROJECTIONS).values():
                lin.weight.mul_(nm_prune_mask(lin.weight.abs(), 2, 4))
    return model
