"""Model loading against a hub that cannot be reached, in a fresh process (huggingface_hub reads
HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE at import). Run by test_offline_loading.py:

    python offline_loading.py closed|counting|offline CACHE_DIR

``closed``: HF_ENDPOINT is a local port nobody listens on. ``counting``: a local server that
records requests and drops each one without an answer (a hub behind a broken network), except
for repository ``ovss-test/answering`` which gets HTTP 404 (a hub that can be reached) and
``ovss-test/busy`` which gets HTTP 503 (a proxy or captive portal in the way: not a hub).
``offline``: the counting server, with HF_HUB_OFFLINE=1. Prints one JSON object: per scenario
the error message, the seconds it took and the request lines the server saw.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from pathlib import Path


class Server(threading.Thread):
    """Records each connection's request line; answers 404 to requests for ovss-test/answering
    and drops the rest without an answer."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.requests: list[str] = []  # first line of each connection's request

    def run(self) -> None:
        while True:
            connection, _ = self.socket.accept()
            with connection:
                connection.settimeout(5)
                try:
                    request = connection.recv(65536)
                except OSError:
                    request = b""
                self.requests.append(request.split(b"\r\n")[0].decode(errors="replace"))
                if b"ovss-test/answering" in request:
                    connection.sendall(
                        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    )
                elif b"ovss-test/busy" in request:  # a proxy or portal in the way, an outage
                    connection.sendall(
                        b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                        b"Connection: close\r\n\r\n"
                    )


def closed_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        return probe.getsockname()[1]  # closed when this returns: nobody listens there


def plant_cached_file(cache: Path, repo_id: str, filename: str, data: bytes) -> Path:
    """A file in huggingface_hub's cache layout (refs/main -> snapshots/<commit>/<file>)."""
    repo = cache / "hub" / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    path = repo / "snapshots" / commit / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def main() -> None:
    mode, cache = sys.argv[1], Path(sys.argv[2])
    os.environ["HF_HOME"] = str(cache)
    os.environ.pop("HF_HUB_OFFLINE", None)
    server = None
    if mode == "closed":
        os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{closed_port()}"
    else:
        server = Server()
        server.start()
        os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{server.port}"
        if mode == "offline":
            os.environ["HF_HUB_OFFLINE"] = "1"

    from ovss_ros.core.clip import hub_access
    from ovss_ros.core.clip.model_loading import load_clip, tag_files
    from ovss_ros.core.methods.dslo.sd2_attention import Sd2Attention
    from ovss_ros.core.methods.pnp_ovss.vlm_loading import load_vlm

    def planted_tag() -> str:
        repo_id, filenames = tag_files("ViT-B-16", "openai")
        return str(plant_cached_file(cache, repo_id, filenames[-1], b"not a checkpoint"))

    scenarios = {
        "clip_tag": lambda: load_clip("ViT-B-16", "laion2b_s34b_b88k", "cpu"),
        "clip_hf_hub": lambda: load_clip("hf-hub:ovss-test/no-such-clip", "", "cpu"),
        "vlm": lambda: load_vlm("blip_itm", "ovss-test/no-such-blip", "cpu"),
        "sd2": lambda: Sd2Attention.load("ovss-test/no-such-sd2", device="cpu"),
        "probe_answering": lambda: hub_access.probe("ovss-test/answering", "config.json"),
        "probe_busy": lambda: hub_access.probe("ovss-test/busy", "config.json"),
        "vlm_busy": lambda: load_vlm("blip_itm", "ovss-test/busy", "cpu"),
    }
    if mode == "counting":
        planted = planted_tag()
        scenarios["clip_tag_cached"] = lambda: load_clip("ViT-B-16", "openai", "cpu")
    if mode != "counting":
        scenarios = {"clip_tag": scenarios["clip_tag"]}
    results = {}
    for name, scenario in scenarios.items():
        before = len(server.requests) if server else 0
        start = time.monotonic()
        try:
            value = scenario()
            error = None
        except Exception as caught:  # the message is what the test checks
            value, error = None, f"{type(caught).__name__}: {caught}"
        results[name] = {
            "error": error,
            "value": value if isinstance(value, (str, type(None))) else repr(value),
            "seconds": time.monotonic() - start,
            "requests": server.requests[before:] if server else None,
        }
    if mode == "counting":
        results["planted"] = planted
    print(json.dumps(results))


if __name__ == "__main__":
    main()
