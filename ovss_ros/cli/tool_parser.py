"""What every ovss_ros command-line tool shares about bad input: one line on stderr, status 2.

``ToolParser`` is ``argparse.ArgumentParser`` whose ``error`` prints ``prog: error: message`` alone
(argparse's default prints the usage block first: dozens of lines for the tools with every engine
flag; ``--help`` still shows it), that refuses a flag of an earlier release with the flag that
replaced it (``renamed_flags``: ``--crop was renamed --dense-crop``) and takes no abbreviated flags
(``--background`` must not silently mean ``--background-words``). ``bad_input`` is that same line
for a refusal found after parsing. ``not_an_input`` refuses an output path that is one of the
inputs, so no tool overwrites what it reads. ``--help`` (``ToolHelpFormatter``) shows the default
of every option that has one, and keeps the description and epilog as written.

Exit status of every tool (docs/tools.md): 0 done, 1 a failure while running (some inputs
skipped, a write failed, the node refused), 2 bad input (``BAD_INPUT``), 130 Ctrl-C
(``INTERRUPTED``), 143 SIGTERM where a tool handles it.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NoReturn

BAD_INPUT = 2  # the exit status of every tool for bad arguments, files or settings
FAILED = 1  # a failure while running: inputs skipped, an output not written, the node refused
# The files the tools take as images (a folder given is expanded to these).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), as a shell reports it


class ToolHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """``--help`` with each option's default (``(default: X)``, argparse's
    ``ArgumentDefaultsHelpFormatter`` rule) unless its help already says it (``(default``,
    ``%(default)``); none for options without a default (None) and for on/off switches
    (``store_true``: off unless given). Description and epilog keep their line breaks (the
    data-set layouts of ovss-eval, the exit statuses)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text.lower() or "%(default)" in text:
            return text
        return f"{text} {self._default_text(action)}".strip()

    def _format_action(self, action: argparse.Action) -> str:
        if action.help is None and self._default_text(action):  # argparse shows no help line
            action = copy.copy(action)
            action.help = self._default_text(action)
        return super()._format_action(action)

    @staticmethod
    def _default_text(action: argparse.Action) -> str:
        """``(default: X)`` for an option with a default to show, else ''."""
        if action.default is None or action.default is argparse.SUPPRESS:
            return ""
        switch = action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction)
        if switch or not (action.option_strings or action.nargs in ("?", "*")):
            return ""
        if isinstance(action.default, (list, tuple)):
            shown = " ".join(str(v) for v in action.default).replace("%", "%%") or "none"
        else:
            shown = "%(default)r" if isinstance(action.default, str) else "%(default)s"
        return f"(default: {shown})"


class ToolParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (``prog: error: ...``) and exit status 2,
    without abbreviated flags, that names the new flag of a renamed one (``renamed_flags``:
    old flag -> new flag, filled by ``engine_args.add_engine_arguments``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", ToolHelpFormatter)
        super().__init__(*args, **kwargs)
        self.renamed_flags: dict[str, str] = {}

    def parse_known_args(self, args=None, namespace=None):  # noqa: ANN001, ANN201 (argparse's)
        # Before argparse's own checks, so that an old flag is named even when a required
        # argument is missing too (argparse would only say what is missing).
        for token in sys.argv[1:] if args is None else args:
            if token == "--":
                break
            flag = str(token).split("=", 1)[0]
            if flag in self.renamed_flags and flag not in self._option_string_actions:
                self.error(f"{flag} was renamed {self.renamed_flags[flag]}")
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        bad_input(self.prog, message)


def bad_input(prog: str, message: object) -> NoReturn:
    """Print ``prog: error: message`` (one line: line breaks become spaces) and exit 2."""
    text = " ".join(str(message).split())
    print(f"{prog}: error: {text}", file=sys.stderr)
    sys.exit(BAD_INPUT)


def one_line(message: object) -> str:
    """An error's text on one line (tracebacks never reach the user; line breaks neither)."""
    return " ".join(str(message).split())


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def not_an_input(output: str | Path, inputs: Iterable[str | Path], flag: str) -> None:
    """Raise ValueError if the output file ``output`` could not be written where it is asked
    (a folder, or under a file) or exists and is (a link to) one of ``inputs``: writing it would
    destroy an input, or fail after all the work."""
    output = Path(output).expanduser()
    for parent in output.absolute().parents:
        if os.path.lexists(parent):
            if not parent.is_dir():
                raise ValueError(f"{flag} {str(output)!r}: {str(parent)!r} is not a folder")
            break
    target = _identity(output)
    if target is None:
        return
    if output.is_dir():
        raise ValueError(f"{flag} {str(output)!r} is a folder: give a file name")
    for path in inputs:
        if _identity(Path(path)) == target:
            raise ValueError(
                f"{flag} {str(output)!r} is the input {str(path)!r}: writing it would overwrite "
                "the input; choose another file"
            )


def writable_folder(folder: str | Path, flag: str) -> None:
    """Raise ValueError unless files can be made in ``folder``: its nearest existing ancestor
    (itself when it exists) is a folder this user may write in. Checked before the work, so a
    tool does not fail on its last step."""
    folder = Path(folder).expanduser().absolute()
    existing = next(p for p in (folder, *folder.parents) if os.path.lexists(p))
    if not existing.is_dir():
        raise ValueError(f"{flag}: {str(existing)!r} is not a folder")
    try:  # a real file, not os.access: root passes that check where nobody may write (/proc)
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise ValueError(f"{flag}: cannot write in {str(existing)!r} ({reason})") from None


class OncePerRun(logging.Filter):
    """Lets each distinct log message (logger, level, text) through once: the rounds rebuild a
    combo's method every time (and with it any warning its build logs), said once is enough.
    """

    def __init__(self) -> None:
        super().__init__()
        self._seen: set[tuple[str, int, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, record.getMessage())
        if key in self._seen:
            return False
        self._seen.add(key)
        return True


def log_once_to_stderr() -> logging.Handler:
    """A stderr handler on the root logger (warnings and up, ``LEVEL name: message``) that
    prints each distinct message once per run; the caller removes it when done."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(OncePerRun())
    logging.getLogger().addHandler(handler)
    return handler
