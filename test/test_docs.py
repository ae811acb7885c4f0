"""The documentation travels with the code: every declared parameter is in docs/ with its
default, README points into the repository, and no file names a path of one machine."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from ovss_ros.core.config import RENAMED
from ovss_ros.ros import parameter_docs
from ovss_ros.ros import parameters as node_parameters

REPO = Path(__file__).resolve().parents[1]
CONTRACT = REPO / "docs" / "ros_interface.md"


def parameter_rows() -> dict[str, list[str]]:
    """Parameter name -> the cells of its row in the contract's parameter table."""
    text = CONTRACT.read_text()
    section = text.split("\n## Parameters\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        match = re.match(r"\| `([a-z0-9_.]+)` \| (.*) \|$", line)
        if match:
            rows[match[1]] = [cell.strip() for cell in re.split(r"(?<!\\)\|", match[2])]
    return rows


def test_every_declared_parameter_is_documented_with_its_default():
    rows = parameter_rows()
    for spec in node_parameters.PARAMETERS:
        assert spec.name in rows, f"{spec.name} is not in docs/ros_interface.md"
        assert rows[spec.name][0] == f"`{json.dumps(spec.default)}`", spec.name
        assert rows[spec.name][1] == ("start-up" if spec.read_only else "runtime"), spec.name


def test_the_contract_documents_no_parameter_the_node_lacks():
    assert set(parameter_rows()) <= set(node_parameters.SPECS)


def test_the_contracts_table_is_the_one_the_settings_make():
    """Names (grouped by namespace), defaults, ranges, choices, descriptions and the sources of
    the defaults, as the settings' definitions give them (python -m
    ovss_ros.ros.parameter_docs --write remakes it)."""
    documented = parameter_docs.documented_table(CONTRACT.read_text())
    assert documented == parameter_docs.markdown_table()
    rows = parameter_rows()
    assert rows["dense.crop"][:2] == ["`0`", "runtime"]
    assert (
        rows["dslo.sd.size"][2] == "[64, 1448] (the per-frame budget); the VAE's activation "
        "(size^2 x 128 x 4 bytes) within the per-frame budget"
    )
    assert rows["pnp.vlm_model"][1] == "start-up"
    assert "### `dslo.sd.*`" in documented and "### `pnp.*`" in documented


def test_the_contract_says_the_old_names_are_refused_with_their_new_ones():
    documented = parameter_docs.documented_table(CONTRACT.read_text())
    assert "crop was renamed dense.crop" in documented
    for old, new in RENAMED.items():
        assert f"`{old}` -> `{new}`" in documented
        assert old not in parameter_rows()


def test_readme_points_into_the_repository():
    readme = (REPO / "README.md").read_text()
    assert "docs/ros_interface.md" in readme and "docs/images/overlay_voc.png" in readme
    for target in re.findall(r"\]\(([^)#]+)\)", readme):
        assert (REPO / target).exists(), target
    assert "../" not in readme  # nothing outside the clone


def tracked_text_files() -> list[Path]:
    names = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    files = []
    for name in names:
        path = REPO / name
        if path.is_file() and path.suffix not in {".png", ".jpg", ".npy", ".bin"}:
            files.append(path)
    return files


def test_no_file_names_a_path_of_one_machine_or_notes_outside_the_repository():
    # Built from parts so that this file does not match itself.
    machine = re.compile("(?<![\\w.~-])/(" + "|".join(["work", "root", "home"]) + ")/")
    # The repository's own docs/methods.md may be named (as a path or a relative link).
    own = r"(?<!docs/)(?<![(\[])"
    outside = re.compile(
        "|".join(["shared" + "/docs", "platform" + r"\.md", own + "methods" + r"\.md"])
    )
    offenders = []
    for path in tracked_text_files():
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if machine.search(line) or outside.search(line):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
