"""benchmarks/gpu_check.sh refuses clearly where no CUDA device is usable (exit status 2, one
line on stderr, nothing set up); its figures need a CUDA machine and are not tested here."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
BASH = shutil.which("bash")


def run(path: str, venv: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PATH": path, "OVSS_VENV": venv}
    return subprocess.run(
        [BASH, str(SCRIPT)], capture_output=True, text=True, env=environment, timeout=120
    )


def test_the_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


def test_without_nvidia_smi_it_refuses_in_one_line(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("dirname", "mktemp", "rm", "sort", "tail", "timeout"):  # what it may call
        (bin_dir / tool).symlink_to(f"/usr/bin/{tool}")
    result = run(str(bin_dir), str(tmp_path / "no-venv"))
    assert result.returncode == 2, result
    assert result.stderr == "gpu_check: no nvidia-smi: this check needs a CUDA machine\n"
    assert not (tmp_path / "no-venv").exists()  # refused before any set-up


@pytest.mark.skipif(
    subprocess.run(
        [sys.executable, "-c", "import torch, sys; sys.exit(torch.cuda.is_available())"]
    ).returncode
    != 0,
    reason="a CUDA device is usable here",
)
def test_with_a_gpu_listed_but_no_cuda_in_torch_it_refuses_in_one_line(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "nvidia-smi"  # lists a GPU: the driver side looks fine
    fake.write_text("#!/bin/sh\necho 'GPU 0: Fake (UUID: GPU-0)'\n")
    fake.chmod(0o755)
    venv = Path(sys.executable).parents[1]
    result = run(f"{bin_dir}:{os.environ['PATH']}", str(venv))
    assert result.returncode == 2, result
    assert result.stderr.splitlines()[-1] == (
        "gpu_check: torch in the venv sees no CUDA device (a CPU-only torch wheel?)"
    )
