"""Start-up on a machine without internet: weights that are not cached fail at once, with one
message that says what to do, after at most one request to the hub (no retry loop); cached
weights load without any request.

Each mode runs offline_loading.py in its own process (huggingface_hub reads HF_ENDPOINT,
HF_HOME and HF_HUB_OFFLINE at import) with an empty HF_HOME. Requests are counted by a local
server. No time is asserted (a loaded machine makes any bound flaky): that nothing retries is
shown by the request counts and by the absence of huggingface_hub's retry messages.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
REPO = HERE.parent
WEIGHTS_HINT = "pre-fetch the weights on a machine with internet and copy its Hugging Face cache"
# huggingface_hub's own once-a-day fetch when it builds its first user agent (not a retry).
REGISTRY = "GET /api/agent-harnesses"


def run_mode(mode: str, cache: Path) -> tuple[dict, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, str(HERE / "offline_loading.py"), mode, str(cache)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


@pytest.fixture(scope="module")
def counting(tmp_path_factory) -> dict:
    results, stderr = run_mode("counting", tmp_path_factory.mktemp("hf_home"))
    return results | {"stderr": stderr}


def hub_requests(result: dict) -> list[str]:
    return [line for line in result["requests"] if not line.startswith(REGISTRY)]


def test_closed_port_fails_at_once_with_one_clear_message(tmp_path):
    results, stderr = run_mode("closed", tmp_path)
    result = results["clip_tag"]
    message = result["error"]
    assert message.startswith("ModelLoadError: the weights of ViT-B-16 pretrained=")
    assert "not in the local Hugging Face cache and the hub cannot be reached" in message
    assert WEIGHTS_HINT in message and "or set pretrained to a local checkpoint file" in message
    assert "retry" not in stderr.lower(), stderr  # the retry loop took about 55 s


def test_unreachable_hub_gets_one_request_per_model_and_no_retry(counting):
    assert "retry" not in counting["stderr"].lower(), counting["stderr"]
    for scenario, repo in [
        ("clip_tag", "/laion/CLIP-ViT-B-16-laion2B-s34B-b88K/"),
        ("clip_hf_hub", "/ovss-test/no-such-clip/"),
        ("vlm", "/ovss-test/no-such-blip/"),
        ("sd2", "/ovss-test/no-such-sd2/"),
    ]:
        result = counting[scenario]
        requests = hub_requests(result)
        assert len(requests) == 1 and requests[0].startswith("HEAD " + repo), (scenario, result)
        assert "the hub cannot be reached" in result["error"], scenario


@pytest.mark.parametrize(
    ("scenario", "what_to_set"),
    [
        ("clip_tag", "set pretrained to a local checkpoint file"),
        ("vlm", "set pnp.vlm_pretrained to a local directory saved with save_pretrained"),
        ("sd2", "set dslo.sd.model to a local directory"),
    ],
)
def test_each_loader_says_what_to_set(counting, scenario, what_to_set):
    assert what_to_set in counting[scenario]["error"]


def test_a_hub_that_answers_counts_as_reachable(counting):
    result = counting["probe_answering"]
    assert result["error"] is None and result["value"] is None  # None: reachable
    assert hub_requests(result) == ["HEAD /ovss-test/answering/resolve/main/config.json HTTP/1.1"]


def test_a_server_error_counts_as_unreachable(counting):
    """A proxy or captive portal answering 503 made the download retry for 81 s (a reviewer's
    case): a 5xx or 429 answer is no hub, so one request and the one clear message."""
    probe = counting["probe_busy"]
    assert probe["error"] is None and "HTTP 503" in probe["value"], probe
    result = counting["vlm_busy"]
    assert len(hub_requests(result)) == 1, result
    assert "the hub cannot be reached" in result["error"] and "HTTP 503" in result["error"]
    assert "set pnp.vlm_pretrained to a local directory" in result["error"]


def test_cached_weights_load_from_the_cache_without_any_request(counting):
    result = counting["clip_tag_cached"]
    assert result["requests"] == []
    # The planted file is no checkpoint: the error proves the cached file is what was read.
    assert f"(cached file {counting['planted']})" in result["error"]
    assert "check that the checkpoint matches" in result["error"]


def test_offline_mode_fails_without_any_request(tmp_path):
    results, _ = run_mode("offline", tmp_path)
    result = results["clip_tag"]
    assert result["requests"] == []
    assert "not in the local Hugging Face cache and HF_HUB_OFFLINE is set" in result["error"]
    assert WEIGHTS_HINT in result["error"]
