"""Every tool's ``--help`` shows the default of every option that has one (issue 20:
``ovss-train-deop --help`` showed none; ``ovss-segment --alpha``, ``ovss-tune --budget``,
``ovss-bench --iterations`` ... neither).

Each tool's ``--help`` runs as its console script does (``sys.exit(main())``, a fresh
interpreter); the options and their defaults come from the tool's own parser (``build_parser``),
so a new option without its default in the help fails here. An option "has a default" unless it
is None (nothing given means "not used", said in the help where it matters) or it is an on/off
switch (``store_true``: off unless given). ``ovss-ctl``'s sub-commands and ``ovss-eval`` with a
data set (the protocol's defaults) are checked as well.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOOLS = ("segment", "evaluate", "bench", "bag", "train_deop", "tune", "ctl", "demo")


def run_help(tool: str, *args: str) -> str:
    """The stdout of ``ovss-<tool> *args --help`` (status 0, nothing on stderr)."""
    script = f"import sys; from ovss_ros.cli.{tool} import main; sys.exit(main())"
    done = subprocess.run(
        [sys.executable, "-c", script, *args, "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr[-3000:]
    return done.stdout


def shows_default(action: argparse.Action) -> bool:
    """Whether ``--help`` must show this option's default."""
    if action.default is None or action.default is argparse.SUPPRESS:
        return False
    if action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction):
        return False  # store_true / store_false / help: a switch
    return bool(action.option_strings) or action.nargs in ("?", "*")


def default_texts(value: object) -> list[str]:
    """What the help may print for ``value`` (any one of them), without white space."""
    texts = [str(value).replace(" ", ""), repr(value).replace(" ", "")]
    if isinstance(value, (list, tuple)):
        texts += ["".join(str(v) for v in value) or "none", "".join(repr(v) for v in value)]
    if isinstance(value, float):
        texts.append(f"{value:g}")  # 300.0 as 300
    return texts


def option_block(help_text: str, action: argparse.Action) -> str:
    """The help text of ``action``'s entry (its option line and the indented lines after it),
    without white space."""
    lines = help_text.splitlines()
    first = action.option_strings[0] if action.option_strings else action.dest
    entry = re.compile(rf"  {re.escape(first)}(?=[\s,]|$)")  # its line, indented two
    start = next((i for i, line in enumerate(lines) if entry.match(line)), None)
    assert start is not None, f"{first} is not in the help:\n{help_text}"
    block = [lines[start]]
    for line in lines[start + 1 :]:
        if not line.strip() or re.match(r"\s{2}\S", line) or not line.startswith(" "):
            break  # the next option, a blank line or a group title
        block.append(line)
    return "".join("".join(block).split())


def parsers() -> list[tuple[str, list[str], argparse.ArgumentParser]]:
    """(tool, the arguments before --help, its parser): every tool, every ctl sub-command,
    ovss-eval before and after a data set is named."""
    from ovss_ros.cli import bag, bench, ctl, demo, evaluate, segment, train_deop, tune
    from ovss_ros.evaluation import get_protocol
    from ovss_ros.evaluation.protocol import method_protocol

    found = [
        ("segment", [], segment.build_parser()),
        ("evaluate", [], evaluate.build_parser(None)),
        (
            "evaluate",
            ["voc21", "/data"],
            evaluate.build_parser(get_protocol("voc21"), method_protocol(None, "naclip")),
        ),
        ("bench", [], bench.build_parser()),
        ("bag", [], bag.build_parser()),
        ("train_deop", [], train_deop.build_parser()),
        ("tune", [], tune.build_parser()),
        ("demo", [], demo.build_parser()),
    ]
    top = ctl.build_parser()
    found.append(("ctl", [], top))
    commands = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    for name, child in commands.choices.items():
        found.append(("ctl", [name], child))
    return found


CASES = parsers()


@pytest.mark.parametrize(
    ("tool", "before", "parser"), CASES, ids=[" ".join([t, *b]) for t, b, _ in CASES]
)
def test_help_shows_every_default(tool, before, parser):
    help_text = run_help(tool, *before)
    checked = [action for action in parser._actions if shows_default(action)]
    missing = []
    for action in checked:
        block = option_block(help_text, action)
        if "default" not in block.lower() or not any(
            text.replace(" ", "") in block for text in default_texts(action.default)
        ):
            missing.append(f"{action.option_strings or action.dest}: {action.default!r}: {block}")
    assert not missing, "\n".join(missing)
    if tool != "ctl":
        assert len(checked) >= 3, [a.option_strings for a in checked]  # the test saw options


def test_every_tool_is_checked():
    """Every console script of setup.py that is a tool (not the nodes) is in TOOLS."""
    scripts = re.findall(
        r'"(ovss-[\w-]+) = ovss_ros\.cli\.(\w+):main"', (REPO / "setup.py").read_text()
    )
    assert sorted(module for _, module in scripts) == sorted(TOOLS)
    assert {tool for tool, _, _ in CASES} == set(TOOLS)
