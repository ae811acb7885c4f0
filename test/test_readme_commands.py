"""Every command README.md shows can be run as written: each flag is one its tool's ``--help``
lists, each ``-p name:=value`` and ``ros2 param set /ovss NAME`` names a parameter the node
declares, each ``ros2 launch`` argument is one the launch file declares, and each relative link
points to a file in the repository.

Commands are read from the fenced shell blocks of README.md and the docs it hands detail to
(``DOCUMENTS``; continuation lines joined, comments dropped, ``&&`` / ``;`` / ``|`` split) and
from code spans in their prose that start with one of our tools. Our tools are the console scripts
of setup.py (``ovss-*``, ``ovss_node``, ``ovss_lifecycle_node``, also as ``.venv/bin/...`` and
``ros2 run ovss_ros ...``), ``python -m ovss_ros...`` and ``python scripts/*.py``; each one's
``--help`` runs once, in a subprocess of this interpreter with this checkout first on the path.
``ovss-ctl``'s flags belong to its subcommands, so its help is its subcommand's.
"""

from __future__ import annotations

import functools
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from ovss_ros.ros import launch_plan
from ovss_ros.ros import parameters as node_parameters

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = ("README.md", "docs/methods.md", "docs/tools.md", "docs/development.md")
SHELL_BLOCK = re.compile(r"^```(?:bash|sh|shell|console)\s*$")
SEPARATORS = {"&&", "||", ";", "|"}
HELP_TIMEOUT_S = 120.0  # a tool's --help imports no model library, but the machine may be loaded


@dataclass(frozen=True)
class Command:
    """One command of a document: where it is (for the failure message) and its words."""

    document: str
    line: int
    text: str
    words: tuple[str, ...]

    def where(self) -> str:
        return f"{self.document}:{self.line}: {self.text}"


def commands_in(text: str, document: str) -> list[Command]:
    """The commands of ``text``'s fenced shell blocks, continuation lines joined, comments
    dropped, and split at ``&&``, ``||``, ``;`` and ``|``. Raises ValueError (naming the line)
    where a command is not valid shell quoting."""
    found: list[Command] = []
    in_block = False
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not in_block:
            in_block = bool(SHELL_BLOCK.match(stripped))
            continue
        if stripped.startswith("```"):
            in_block = False
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        line = pending + stripped
        pending = ""
        try:
            words = shlex.split(line, comments=True)
        except ValueError as error:
            raise ValueError(f"{document}:{start}: {line}: {error}") from error
        part: list[str] = []
        for word in [*words, ";"]:
            if word in SEPARATORS:
                if part:
                    found.append(Command(document, start, line, tuple(part)))
                part = []
            else:
                part.append(word)
    return found


INLINE = re.compile(r"`((?:\.venv/bin/)?(?:ovss[-_][\w-]+|ros2 (?:param|run|launch)) [^`]+)`")


def inline_commands_in(text: str, document: str) -> list[Command]:
    """Commands written inline in the prose (`` `ovss-demo --download` ``): a code span that
    starts with one of our tools or ``ros2 param|run|launch`` and has arguments."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        for span in INLINE.findall(line):
            try:
                words = tuple(shlex.split(span))
            except ValueError:
                continue  # a span cut by the line's end is read in the block check's way only
            found.append(Command(document, number, span, words))
    return found


def console_scripts() -> dict[str, str]:
    """setup.py's console scripts: name -> 'module:function'."""
    setup = (REPO / "setup.py").read_text()
    return dict(re.findall(r'"([\w-]+) = ([\w.]+:\w+)"', setup))


@dataclass(frozen=True)
class Tool:
    """A command of ours: how to run its --help (a key for the cache) and its arguments."""

    key: tuple[str, ...]  # ("script", name) | ("module", name) | ("file", path), + subcommand
    args: tuple[str, ...]


def tool_of(words: tuple[str, ...]) -> Tool | None:
    """The tool a command runs, or None for a command that is not ours (git, sudo, export...)."""
    scripts = console_scripts()
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):  # VAR=value before a command
        words = words[1:]
    if not words:
        return None
    first = Path(words[0]).name if "/bin/" in words[0] else words[0]
    if words[:3] == ("ros2", "run", "ovss_ros") and len(words) > 3:
        first, words = words[3], words[3:]
    if first in scripts:
        key: tuple[str, ...] = ("script", first)
        args = words[1:]
        if first == "ovss-ctl" and args and not args[0].startswith("-"):
            key += (args[0],)  # its flags are its subcommand's
        return Tool(key, args)
    if re.fullmatch(r"python3?", first) and len(words) > 1:
        if words[1] == "-m" and len(words) > 2 and words[2].startswith("ovss_ros"):
            return Tool(("module", words[2]), words[3:])
        if re.fullmatch(r"scripts/[\w-]+\.py", words[1]):
            return Tool(("file", words[1]), words[2:])
    return None


def help_command(key: tuple[str, ...]) -> list[str]:
    """The command line that prints ``key``'s --help with this interpreter and this checkout."""
    kind, name, *sub = key
    if kind == "script":
        module, function = console_scripts()[name].split(":")
        code = f"import sys; sys.argv[0] = {name!r}; from {module} import {function} as f; f()"
        return [sys.executable, "-c", code, *sub, "--help"]
    if kind == "module":
        return [sys.executable, "-m", name, *sub, "--help"]
    return [sys.executable, str(REPO / name), *sub, "--help"]


@functools.cache
def help_text(key: tuple[str, ...]) -> str:
    """``key``'s --help output (run once per tool). Raises AssertionError if --help fails."""
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    )
    env["HF_HUB_OFFLINE"] = "1"
    result = subprocess.run(
        help_command(key),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=HELP_TIMEOUT_S,
    )
    assert result.returncode == 0, (
        f"{' '.join(key)} --help exited {result.returncode}: {result.stderr}"
    )
    return result.stdout


def parameter_known(name: str) -> bool:
    """True for a parameter the node declares (or a standard ``qos_overrides.`` one)."""
    return name in node_parameters.SPECS or name.startswith("qos_overrides.")


def flag_problems(tool: Tool, helper: Callable[[tuple[str, ...]], str]) -> list[str]:
    """Flags before ``--ros-args`` that the tool's help does not list; ``-p`` names after it
    that are no parameter."""
    problems = []
    args = list(tool.args)
    ros_args: list[str] = []
    if "--ros-args" in args:
        at = args.index("--ros-args")
        args, ros_args = args[:at], args[at + 1 :]
    for word in args:
        if word.startswith("--") and len(word) > 2:
            flag = word.split("=", 1)[0]
            text = helper(tool.key)  # --help itself: that it ran (exit 0) is the check
            if flag != "--help" and not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text):
                problems.append(f"{flag} is not a flag of {' '.join(tool.key[1:])}")
    for flag, value in zip(ros_args, ros_args[1:], strict=False):
        if flag == "-p":
            name = value.split(":=", 1)[0]
            if not parameter_known(name):
                problems.append(f"-p {name}: the node has no parameter {name}")
    return problems


def command_problems(
    command: Command, helper: Callable[[tuple[str, ...]], str] = help_text
) -> list[str]:
    """What is wrong with one command, each naming the document line; [] when nothing is."""
    words = command.words
    problems: list[str] = []
    if words[:3] == ("ros2", "param", "set") and len(words) > 4:
        if not parameter_known(words[4]):
            problems.append(f"ros2 param set: the node has no parameter {words[4]}")
    elif words[:2] == ("ros2", "launch") and words[2:4] == ("ovss_ros", "ovss.launch.py"):
        for word in words[4:]:
            name = word.split(":=", 1)[0]
            if ":=" in word and name not in launch_plan.ARGUMENTS:
                problems.append(f"ros2 launch: ovss.launch.py has no argument {name}")
    else:
        tool = tool_of(words)
        named = Path(words[0]).name
        if tool is None and re.match(r"ovss[-_]", named) and named not in console_scripts():
            problems.append(f"{named} is not one of the tools (setup.py's console scripts)")
        if tool is not None:
            problems += flag_problems(tool, helper)
            if tool.key[:2] == ("script", "ovss-ctl") and tool.key[2:] == ("set",):
                names = [w for w in tool.args[1::2] if not w.startswith("-")]
                problems += [
                    f"ovss-ctl set: no parameter {n}" for n in names if not parameter_known(n)
                ]
    return [f"{command.where()}\n    {problem}" for problem in problems]


def relative_links(text: str) -> list[tuple[int, str, str]]:
    """(line, path, anchor) of every markdown link or image whose target is a path, not a URL."""
    links = []
    for number, line in enumerate(text.splitlines(), 1):
        for target in re.findall(r"\]\(([^)\s]+)\)", line):
            if not re.match(r"^[a-z]+:", target) and not target.startswith("#"):
                path, _, anchor = target.partition("#")
                links.append((number, path, anchor))
    return links


def anchors(markdown: str) -> set[str]:
    """GitHub's anchors of a document's headings: lower case, punctuation dropped, spaces as -."""
    found = set()
    for heading in re.findall(r"^#+ (.+)$", markdown, flags=re.MULTILINE):
        found.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
    return found


def link_problems(text: str, document: Path) -> list[str]:
    """A link to a file that does not exist, or to a heading its (markdown) file lacks."""
    problems = []
    for number, path, anchor in relative_links(text):
        target = document.parent / path
        if not target.exists():
            problems.append(f"{document.name}:{number}: link to {path}: no such file")
        elif anchor and target.suffix == ".md" and anchor not in anchors(target.read_text()):
            problems.append(f"{document.name}:{number}: link to {path}#{anchor}: no such heading")
    return problems


# The documents themselves.


def document_commands() -> list[Command]:
    commands = []
    for name in DOCUMENTS:
        path = REPO / name
        if path.exists():
            commands += commands_in(path.read_text(), name)
            commands += inline_commands_in(path.read_text(), name)
    return commands


def test_the_readme_has_commands_of_our_tools():
    """The extraction finds what the README shows (so the checks below check something)."""
    commands = document_commands()
    tools = {tool.key[1] for c in commands if (tool := tool_of(c.words))}
    assert {"ovss-demo", "ovss_node", "ovss-ctl", "ovss-segment", "ovss-bench"} <= tools
    assert any(c.words[:3] == ("ros2", "param", "set") for c in commands)
    assert any(c.words[:2] == ("ros2", "launch") for c in commands)
    assert any(c.words[:2] == ("bash", "scripts/test.sh") for c in commands)


def test_every_flag_and_parameter_in_the_readme_exists():
    problems = []
    for command in document_commands():
        problems += command_problems(command)
    assert not problems, "\n".join(problems)


def test_every_relative_link_in_the_readme_points_to_a_file():
    for name in DOCUMENTS:
        path = REPO / name
        assert not link_problems(path.read_text(), path), link_problems(path.read_text(), path)


def test_the_readme_says_the_set_up_and_test_commands():
    commands = [c.words for c in commands_in((REPO / "README.md").read_text(), "README.md")]
    assert ("bash", "scripts/setup.sh") in commands
    assert ("bash", "scripts/test.sh") in commands


# The checker: it finds made-up flags, parameters, launch arguments and links.

FAKE_HELP = {
    ("script", "ovss-segment"): "usage: ovss-segment [--classes C] [--dense-crop CROP] [-o OUT]",
    ("script", "ovss_node"): "usage: ovss_node [--help] [--ros-args ...]",
    ("script", "ovss-ctl", "diagnostics"): "usage: ovss-ctl diagnostics [--once] [--node NODE]",
}

FAKE_README = """# x

```bash
ovss-segment photos/ --classes a b --dense-crop 224 -o out/     # fine
ovss-segment photos/ --classes a \\
    --made-up-flag 3
ovss_node --ros-args -p classes:="['a']" -p clases:="['a']" -r image:=/cam
ros2 param set /ovss crop 224 && ros2 param set /ovss dense.crop 224
ros2 launch ovss_ros ovss.launch.py namespace:=x camera:=y
ovss-ctl diagnostics --once --twice
ovss-ctl set dense.crop 224 score_treshold 0.1
ovss-segmnet photos/ --classes a
sudo sysctl -w net.core.rmem_max=67108864
```
"""


def fake_problems(text: str) -> list[str]:
    problems = []
    for command in commands_in(text, "README.md"):
        problems += command_problems(command, FAKE_HELP.__getitem__)
    return problems


def test_the_checker_names_each_made_up_flag_parameter_and_argument_with_its_line():
    problems = fake_problems(FAKE_README)
    expected = [
        ("README.md:5:", "--made-up-flag is not a flag of ovss-segment"),
        ("README.md:7:", "-p clases: the node has no parameter clases"),
        ("README.md:8:", "ros2 param set: the node has no parameter crop"),
        ("README.md:9:", "ros2 launch: ovss.launch.py has no argument camera"),
        ("README.md:10:", "--twice is not a flag of ovss-ctl diagnostics"),
        ("README.md:11:", "ovss-ctl set: no parameter score_treshold"),
        ("README.md:12:", "ovss-segmnet is not one of the tools (setup.py's console scripts)"),
    ]
    assert len(problems) == len(expected), "\n".join(problems)
    for problem, (where, what) in zip(problems, expected, strict=True):
        assert problem.startswith(where) and problem.endswith(what), problem


def test_the_checker_passes_the_same_commands_without_the_mistakes():
    fixed = (
        FAKE_README.replace(" \\\n    --made-up-flag 3", "")
        .replace(" -p clases:=\"['a']\"", "")
        .replace("/ovss crop", "/ovss dense.crop")
        .replace("camera:=y", "image:=/y")
        .replace(" --twice", "")
        .replace("score_treshold", "score_threshold")
        .replace("ovss-segmnet", "ovss-segment")
    )
    assert fake_problems(fixed) == []


def test_the_checker_runs_the_real_help_and_finds_a_made_up_flag():
    text = "```bash\novss-bench --pretrained none --combos naclip --no-such-flag\n```\n"
    (command,) = commands_in(text, "README.md")
    (problem,) = command_problems(command)
    assert problem.endswith("--no-such-flag is not a flag of ovss-bench")


def test_commands_in_the_prose_are_checked_too():
    text = "Real labels: `ovss-demo --download` once, then `ovss-demo --dowload`.\n"
    commands = inline_commands_in(text, "README.md")
    assert [c.words for c in commands] == [("ovss-demo", "--download"), ("ovss-demo", "--dowload")]
    help_of = {("script", "ovss-demo"): "usage: ovss-demo [--download] [--images DIR]"}
    problems = [p for c in commands for p in command_problems(c, help_of.__getitem__)]
    assert len(problems) == 1 and problems[0].startswith("README.md:1: ovss-demo --dowload")


def test_a_command_that_is_not_valid_shell_is_named_with_its_line():
    with pytest.raises(ValueError, match=r"README.md:2: .*quotation"):
        commands_in('```bash\novss-ctl classes "cup\n```\n', "README.md")


def test_the_link_check_finds_a_missing_file(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "here.md").write_text("# Here\n\n## A part: `x` (y)\n")
    document = tmp_path / "README.md"
    text = (
        "[a](docs/here.md#a-part-x-y) [b](docs/gone.md) [c](https://example.org/x) [d](#top)\n"
        "[e](docs/here.md#no-part)\n"
    )
    assert link_problems(text, document) == [
        "README.md:1: link to docs/gone.md: no such file",
        "README.md:2: link to docs/here.md#no-part: no such heading",
    ]
