"""Malicious files for the loader tests: archives that inflate, and a memory-measuring runner.

``write_inflating_archive`` writes what ``torch.save`` writes (a zip with ``archive/data.pkl``
and one record per storage), except that the storage record is deflate-compressed: a file of
about 1/1000 of its tensor's size. ``torch.load`` inflates it in full (the issue's 2.9 MB DeOP
checkpoint whose one tensor costs 3 GB). ``peak_growth`` runs a loader in a process of its own and
reports its error and how much its peak resident memory grew while it ran.
"""

from __future__ import annotations

import collections
import io
import json
import pickle
import textwrap
import zipfile
from pathlib import Path

import torch
from tool_process import run_code

ROOT = Path(__file__).resolve().parent.parent


class _Storage:
    def __init__(self, key: str, numel: int) -> None:
        self.key, self.numel = key, numel


class InflatingTensor:
    """Pickled as a float32 tensor of ``numel`` zeros whose storage is record ``key``."""

    def __init__(self, numel: int, key: str = "0") -> None:
        self.storage, self.numel = _Storage(key, numel), numel

    def __reduce__(self):
        return (
            torch._utils._rebuild_tensor_v2,
            (self.storage, 0, (self.numel,), (1,), False, collections.OrderedDict()),
        )


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", torch.FloatStorage, obj.key, "cpu", obj.numel)
        return None


def write_inflating_archive(path: Path, content: object, tensor: InflatingTensor) -> Path:
    """A torch.save-style zip of ``content`` (which holds ``tensor`` somewhere) whose storage
    record is deflated zeros: ``4 * tensor.numel`` bytes from a file about 1000x smaller."""
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=2).dump(content)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", buffer.getvalue())
        archive.writestr("archive/byteorder", "little")
        info = zipfile.ZipInfo(f"archive/data/{tensor.storage.key}")
        info.compress_type = zipfile.ZIP_DEFLATED
        chunk = bytes(1 << 22)
        with archive.open(info, "w", force_zip64=True) as record:
            for _ in range(4 * tensor.numel // len(chunk)):
                record.write(chunk)
        archive.writestr("archive/version", "3")
    return path


# Address space of the measuring process: the imports (torch, transformers, diffusers) take about
# 4 GB of it; a loader that would allocate far more (code before issue 18 built any architecture
# a file declared) fails there with an allocation error instead of exhausting the machine.
ADDRESS_SPACE = 8 << 30


def peak_growth(setup: str, call: str, timeout: float = 300.0) -> dict:
    """Run ``setup`` then ``call`` in a process of its own (test/tool_process.py: forked from a
    process that has imported torch, transformers and diffusers; its address space capped at
    ADDRESS_SPACE); return ``{"error": "<type>: <message>" or None,
    "growth_mb": peak RSS growth during call}``.

    A call that neither returns nor raises within ``timeout`` (a loader blocked on a FIFO)
    fails the test that asked.
    """
    script = textwrap.dedent(
        """
        import json, resource, sys
        {setup}
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        error = None
        try:
            {call}
        except Exception as caught:
            error = f"{{type(caught).__name__}}: {{caught}}"
        growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        print("RESULT" + json.dumps({{"error": error, "growth_mb": growth}}))
        """
    ).format(setup=textwrap.dedent(setup).strip(), call=call)
    done = run_code("", script, timeout=timeout, cwd=ROOT, address_space=ADDRESS_SPACE)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT")]
    assert lines, f"no result (rc {done.returncode}):\n{done.stdout}\n{done.stderr[-3000:]}"
    return json.loads(lines[-1][len("RESULT") :])
