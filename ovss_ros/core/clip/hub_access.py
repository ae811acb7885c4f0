"""The Hugging Face cache first, then one quick look at the hub: fail fast on a robot offline.

Downloads through huggingface_hub retry a hub that cannot be reached (five times per file,
with back-off: about a minute and dozens of warnings before the error). Model loading here asks
the local cache first (``try_to_load_from_cache``: no network), and only when the files are
not cached and ``HF_HUB_OFFLINE`` is not set makes one request without retries (``probe``) to
tell "cannot be reached" (fail now, with a clear message) from "reachable" (download).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import huggingface_hub
from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
from huggingface_hub.errors import HfHubHTTPError

PROBE_TIMEOUT_S = 5.0  # one HEAD request; a reachable hub answers in well under a second


def offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` forbids the network (as huggingface_hub reads it)."""
    return bool(constants.HF_HUB_OFFLINE) or os.environ.get(
        "HF_HUB_OFFLINE", ""
    ).strip().lower() in ("1", "true", "yes", "on")


def cached_file(repo_id: str, filenames: Iterable[str]) -> str | None:
    """Path of the first of ``filenames`` in the local cache of ``repo_id`` (revision main),
    or None; never touches the network."""
    for filename in filenames:
        found = huggingface_hub.try_to_load_from_cache(repo_id, filename)
        if isinstance(found, str):
            return found
    return None


def probe(repo_id: str, filename: str) -> str | None:
    """None when the hub answers about ``repo_id/filename`` (a client status such as 404 or
    401: it can be reached, the download reports the rest); otherwise why not (connection
    refused, name resolution, timeout, or a server status 5xx / 429: a proxy, a captive portal
    or an outage, which the download would retry for a minute). One request, no retry, at
    most ``PROBE_TIMEOUT_S`` seconds."""
    try:
        get_hf_file_metadata(
            hf_hub_url(repo_id, filename), timeout=PROBE_TIMEOUT_S, retry_on_errors=False
        )
    except HfHubHTTPError as error:
        response = getattr(error, "response", None)
        status = getattr(response, "status_code", None)
        if status is not None and (status >= 500 or status == 429):
            return f"HTTP {status} from {constants.ENDPOINT}"
        return None
    except Exception as error:  # httpx transport errors and the like: not reachable
        return f"{type(error).__name__}: {error}"
    return None


def where() -> str:
    """The cache folder and hub address in force, for messages."""
    return f"cache {constants.HF_HUB_CACHE}, hub {constants.ENDPOINT}"


def unavailable(what: str, repo_id: str, filename: str, hint: str) -> str | None:
    """None when ``repo_id`` may be downloaded; else the one message to fail with: offline by
    ``HF_HUB_OFFLINE``, or the hub not reachable (``probe``). Call it after a cache miss."""
    if offline():
        return (
            f"{what}: not in the local Hugging Face cache and HF_HUB_OFFLINE is set "
            f"({where()}): {hint}"
        )
    reason = probe(repo_id, filename)
    if reason is None:
        return None
    return (
        f"{what}: not in the local Hugging Face cache and the hub cannot be reached "
        f"({where()}; {reason}): {hint}"
    )
