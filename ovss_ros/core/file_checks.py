"""What every file the product loads must pass before any of its data is read.

A loader trusts nothing in a file until these checks pass: the path is a regular file (a
directory, ``/dev/zero`` or a FIFO is refused as ``is not a regular file``, never read), a text
file (configuration JSON, params YAML, class lists) is small, and a weights file declares only
tensors that its own bytes hold:

- ``torch.save`` / TorchScript archives are zip files whose records PyTorch writes uncompressed
  (``PyTorchStreamWriter``); a compressed record can inflate far beyond the file (a 2.9 MB
  checkpoint whose one record inflates to 3 GB), so one is refused, from the zip's central
  directory alone (``check_torch_archive``);
- safetensors files declare every tensor's dtype, shape and byte range in their JSON header; the
  ranges must lie in the file and match the shapes (``check_safetensors``).

A model folder (``save_pretrained``) declares its architecture in ``config.json``: the parameter
bytes that architecture allocates (``parameter_bytes``, built on PyTorch's ``meta`` device, which
allocates nothing) must be held by its weight files (``weights_bytes``), or a small folder could
make the loader allocate a model of any size before reading one weight.

Every refusal is a :class:`FileCheckError` (a ValueError) naming the file, what is wrong and the
limit; loaders turn it into their own error type (ModelLoadError, CheckpointError).
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
import sys
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from ovss_ros.core.frame_budget import gigabytes

if TYPE_CHECKING:
    import torch

# Text a loader reads whole (model configs, params files, class lists, tokenizer files).
MAX_TEXT_FILE_BYTES = 64 << 20
# A safetensors header is JSON describing the tensors; the format's own reader caps it at 100 MB.
MAX_SAFETENSORS_HEADER = 100_000_000
SAFETENSORS_DTYPES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
    "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
# What a weights file may hold beyond its architecture's parameters in float32 (buffers, an
# optimiser's state or two copies of tied weights): refused above this factor.
WEIGHTS_SLACK = 4
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
# The largest model (float32 parameter bytes) a configuration may declare: ViT-bigG-14 is
# 10.2 GB, BLIP ITM large 1.9 GB, SD2's UNet 3.5 GB.
MAX_MODEL_BYTES = 16 << 30
# Integers of a model configuration (widths, vocabulary, positions) and its layer counts: a
# config is checked against these before a module is built from it, even on the meta device.
MAX_CONFIG_INT = 1 << 20
MAX_CONFIG_LAYERS = 1024


class FileCheckError(ValueError):
    """A file was refused before its data was read; ``str(error)`` names it and why."""


def _stat(path: Path, what: str) -> os.stat_result:
    try:
        return os.stat(path)  # follows symbolic links: the target is what would be read
    except FileNotFoundError:
        raise FileCheckError(f"{what} {str(path)!r} not found") from None
    except OSError as error:
        raise FileCheckError(
            f"{what} {str(path)!r} cannot be read ({error.strerror or error})"
        ) from None


def regular_file(path: str | Path, what: str) -> Path:
    """``path`` (user home expanded) if it is a regular file, or its target is.

    Raises FileCheckError: ``not found``, ``cannot be read``, or ``is not a regular file`` (a
    directory, a device such as /dev/zero, a FIFO or a socket: nothing is opened).
    """
    path = Path(path).expanduser()
    mode = _stat(path, what).st_mode
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "a device, pipe or socket"
        raise FileCheckError(f"{what} {str(path)!r} is not a regular file (it is {kind})")
    return path


def directory(path: str | Path, what: str) -> Path:
    """``path`` if it is a directory; FileCheckError ``not found`` / ``is not a directory``."""
    path = Path(path).expanduser()
    if not stat.S_ISDIR(_stat(path, what).st_mode):
        raise FileCheckError(f"{what} {str(path)!r} is not a directory")
    return path


def read_text(path: str | Path, what: str, limit: int = MAX_TEXT_FILE_BYTES) -> str:
    """The UTF-8 text of a regular file of at most ``limit`` bytes; FileCheckError otherwise."""
    path = regular_file(path, what)
    try:
        with path.open("rb") as stream:
            data = stream.read(limit + 1)
    except OSError as error:
        raise FileCheckError(f"{what} {str(path)!r} cannot be read ({error})") from None
    if len(data) > limit:
        raise FileCheckError(
            f"{what} {str(path)!r} is larger than {gigabytes(limit)}: not a file of this kind"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise FileCheckError(f"{what} {str(path)!r} is not UTF-8 text ({error.reason})") from None


def read_json(path: str | Path, what: str, limit: int = MAX_TEXT_FILE_BYTES) -> object:
    """A small JSON file, parsed; FileCheckError naming the file for anything wrong."""
    text = read_text(path, what, limit)
    try:
        return json.loads(text)
    except ValueError as error:
        raise FileCheckError(f"{what} {str(path)!r} is not valid JSON ({error})") from None
    except RecursionError:  # json's C decoder recurses per nesting level
        raise FileCheckError(
            f"{what} {str(path)!r} is nested too deeply (over Python's recursion limit, "
            f"{sys.getrecursionlimit()} levels): not a file of this kind"
        ) from None


def _limit(total: int, max_bytes: int | None, path: Path, what: str) -> None:
    if max_bytes is not None and total > max_bytes:
        raise FileCheckError(
            f"{what} {str(path)!r} declares {gigabytes(total)} of tensors; at most "
            f"{gigabytes(max_bytes)} for a file of this kind"
        )


def check_torch_archive(path: str | Path, what: str, max_bytes: int | None = None) -> int:
    """Bytes the records of a ``torch.save`` (or TorchScript) zip archive hold, from the zip's
    central directory alone (no record is read).

    Refused (FileCheckError): not a zip archive (``torch.save``'s format since PyTorch 1.6),
    a compressed record (PyTorch writes them stored: a compressed one inflates beyond the
    file), a record whose declared size is not its stored size, more than ``max_bytes``.
    """
    path = regular_file(path, what)
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError) as error:
        raise FileCheckError(
            f"{what} {str(path)!r} is not a torch.save archive (a zip file): {error}"
        ) from None
    total = 0
    for record in records:
        if record.compress_type != zipfile.ZIP_STORED or record.file_size != record.compress_size:
            raise FileCheckError(
                f"{what} {str(path)!r}: record {record.filename!r} declares "
                f"{gigabytes(record.file_size)} from {gigabytes(record.compress_size)} "
                "compressed; torch.save writes records uncompressed, so this file was made to "
                "inflate: refused before reading it"
            )
        total += record.file_size
    _limit(total, max_bytes, path, what)
    return total


def check_safetensors(path: str | Path, what: str, max_bytes: int | None = None) -> int:
    """Bytes of the tensors a safetensors file declares, checked against the file itself.

    Format (huggingface/safetensors ``docs``): an 8-byte little-endian header length, a JSON
    header ``name -> {dtype, shape, data_offsets: [begin, end]}`` (offsets into the data after
    the header), the data. Refused (FileCheckError): a header longer than the format allows or
    than the file, not JSON, an unknown dtype, a tensor whose byte range is not
    ``prod(shape) * itemsize`` or lies outside the file, more than ``max_bytes`` in all.
    """
    path = regular_file(path, what)
    size = path.stat().st_size
    try:
        with path.open("rb") as stream:
            (length,) = struct.unpack("<Q", stream.read(8).ljust(8, b"\xff"))
            if length > min(MAX_SAFETENSORS_HEADER, size - 8):
                raise FileCheckError(
                    f"{what} {str(path)!r} is not a safetensors file (header length {length} in "
                    f"a file of {size} bytes)"
                )
            header = json.loads(stream.read(length))
    except (OSError, ValueError) as error:
        if isinstance(error, FileCheckError):
            raise
        raise FileCheckError(f"{what} {str(path)!r} is not a safetensors file ({error})") from None
    if not isinstance(header, dict):
        raise FileCheckError(f"{what} {str(path)!r}: safetensors header is not a JSON object")
    data = size - 8 - length
    total = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        problem = _safetensors_problem(entry, data)
        if problem:
            raise FileCheckError(f"{what} {str(path)!r}: tensor {name!r} {problem}")
        begin, end = entry["data_offsets"]
        total += end - begin
    _limit(total, max_bytes, path, what)
    return total


def _safetensors_problem(entry: object, data: int) -> str | None:
    """Why a safetensors header entry is unusable in a file with ``data`` bytes of data."""
    if not isinstance(entry, dict):
        return "has no dtype, shape and offsets"
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in SAFETENSORS_DTYPES:
        return f"has an unknown dtype {dtype!r}"
    ints = (isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in shape or [None])
    if not isinstance(shape, list) or (shape and not all(ints)):
        return f"has a bad shape {shape!r}"
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= data
    ):
        return f"has byte range {offsets!r} outside the file's {data} bytes of data"
    declared = math.prod(shape) * SAFETENSORS_DTYPES[dtype]
    if offsets[1] - offsets[0] != declared:
        return (
            f"declares shape {shape} of {dtype} ({declared} bytes) in a range of "
            f"{offsets[1] - offsets[0]} bytes"
        )
    return None


def weights_bytes(path: str | Path, what: str, max_bytes: int | None = None) -> int:
    """Tensor bytes of a weights file, safetensors or a torch zip archive (by its first bytes),
    checked as ``check_safetensors`` / ``check_torch_archive``; FileCheckError otherwise."""
    path = regular_file(path, what)
    with path.open("rb") as stream:
        magic = stream.read(4)
    if magic == b"PK\x03\x04":
        return check_torch_archive(path, what, max_bytes)
    try:
        return check_safetensors(path, what, max_bytes)
    except FileCheckError as error:
        if "is not a safetensors file" not in str(error):
            raise
        raise FileCheckError(
            f"{what} {str(path)!r} is neither a torch.save archive (zip) nor a safetensors "
            "file: it is damaged or of another kind"
        ) from None


def folder_weights_bytes(folder: Path, what: str, names: Iterable[str] | None = None) -> int:
    """Tensor bytes of the weight files in a ``save_pretrained`` folder (not its subfolders):
    ``names`` (default: every file with a WEIGHT_SUFFIXES suffix). Each is checked."""
    files = (
        [folder / name for name in names]
        if names is not None
        else sorted(p for p in folder.iterdir() if p.name.endswith(WEIGHT_SUFFIXES))
    )
    return sum(weights_bytes(path, what) for path in files if os.path.lexists(path))


def check_folder_files(folder: Path, what: str) -> None:
    """Every entry of a model folder (recursively, at most 1000) is a regular file or folder:
    a FIFO or device (or a link to one) that a loader would read is refused by name."""
    seen = 0
    for root, folders, files in os.walk(folder):
        for name in files + folders:
            seen += 1
            if seen > 1000:
                raise FileCheckError(f"{what} {str(folder)!r} has more than 1000 entries")
            entry = Path(root) / name
            try:
                mode = os.stat(entry).st_mode
            except OSError:
                raise FileCheckError(
                    f"{what} {str(folder)!r}: {str(entry)!r} is a broken link or unreadable"
                ) from None
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise FileCheckError(
                    f"{what} {str(folder)!r}: {str(entry)!r} is not a regular file (a device, "
                    "pipe or socket)"
                )


def check_config_numbers(config: object, path: Path, what: str) -> None:
    """Every integer of a model configuration (nested in objects and lists) in
    [-MAX_CONFIG_INT, MAX_CONFIG_INT], layer counts (``layers``, ``num_hidden_layers``,
    ``layers_per_block``, ``depth``) at most MAX_CONFIG_LAYERS: a config cannot make even the
    meta-device build take forever."""

    def walk(value: object, key: str) -> None:
        if isinstance(value, dict):
            for name, item in value.items():
                walk(item, str(name))
        elif isinstance(value, list):
            for item in value:
                walk(item, key)
        elif isinstance(value, int) and not isinstance(value, bool):
            name = key.lower()
            layers = name.endswith("layers") or name.startswith("layers_per") or name == "depth"
            limit = MAX_CONFIG_LAYERS if layers else MAX_CONFIG_INT
            if abs(value) > limit:
                raise FileCheckError(
                    f"{what} {str(path)!r}: {key} is {value}, outside [-{limit}, {limit}]: "
                    "not a model configuration this loader builds"
                )

    walk(config, "")


def parameter_bytes(build: Callable[[], torch.nn.Module]) -> int:
    """Bytes in float32 of the parameters and buffers of the module ``build()`` returns, built
    on PyTorch's ``meta`` device: the sizes an architecture declares, nothing allocated."""
    import torch

    with torch.device("meta"):
        module = build()
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(4 * t.numel() for t in {id(t): t for t in tensors}.values())


def check_declared_model(declared: int, held: int, folder: Path, what: str, fix: str = "") -> None:
    """Refuse a model folder whose architecture (``declared`` parameter bytes in float32)
    needs more than WEIGHTS_SLACK times what its weight files hold (``held`` bytes): the
    loader would allocate the model before reading a weight."""
    if declared > WEIGHTS_SLACK * max(held, 1) + (16 << 20):
        raise FileCheckError(
            f"{what} {str(folder)!r}: its config declares a model of {gigabytes(declared)} "
            f"(float32) but its weight files hold {gigabytes(held)}: refused before "
            f"allocating it{fix}"
        )


__all__ = [
    "FileCheckError",
    "MAX_TEXT_FILE_BYTES",
    "check_config_numbers",
    "check_declared_model",
    "check_folder_files",
    "check_safetensors",
    "check_torch_archive",
    "directory",
    "folder_weights_bytes",
    "gigabytes",
    "parameter_bytes",
    "read_json",
    "read_text",
    "regular_file",
    "weights_bytes",
]
