"""Whether the Hugging Face hub can be asked at all: offline switches and a quick TCP probe.

Datasets (`evals.data`) and models (`pipeline.loading`) both fall back to local copies when the
hub cannot be reached; the probe lives here, in the lowest layer, so both can use it.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse


def offline(*variables: str) -> bool:
    """True when any of the environment switches (default HF_HUB_OFFLINE) is set to something truthy."""
    return any(os.environ.get(v, "") not in ("", "0", "false") for v in variables or ("HF_HUB_OFFLINE",))


def hub_endpoint_reachable(timeout: float = 3.0) -> bool:
    """A TCP connection to HF_ENDPOINT (default huggingface.co:443) opens within `timeout` seconds."""
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or 443
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False
