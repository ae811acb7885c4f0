"""YAML from files and arguments is read bounded (ovss_ros/safe_yaml.py; found by a reviewer of
issue 18): a 1 kB params file of nested aliases expanded to 8.4 GB in an error message and ended
in a MemoryError traceback; a file of 50,000 ``[`` ended in a RecursionError traceback. Both are
refused as bad YAML, by every reader: the tools' ``--params-file``, the launch plan's ``classes``
and its params-file check."""

from __future__ import annotations

import pytest
import yaml
from conftest import TINY_VIT, voc_image_paths
from tool_process import run_tool

from ovss_ros.ros.launch_plan import LaunchPlanError, params_file_matches, parse_classes
from ovss_ros.safe_yaml import MAX_YAML_DEPTH, load_yaml, short_repr


def alias_bomb(levels: int = 9) -> str:
    """``classes`` of nested aliases: 10**levels strings from about 1 kB, then ``short_side``
    (an int parameter) given the whole structure, so the refusal quotes it."""
    lines = ["/**:", "  ros__parameters:", '    x0: &a0 ["cat","cat","cat","cat","cat"]']
    for level in range(1, levels + 1):
        refs = ",".join([f"*a{level - 1}"] * 10)
        lines.append(f"    x{level}: &a{level} [{refs}]")
    lines.append(f"    classes: *a{levels}")
    lines.append(f"    short_side: *a{levels}")
    return "\n".join(lines) + "\n"


def test_aliases_are_refused_naming_the_line():
    with pytest.raises(yaml.YAMLError, match=r"alias \*a0 \(aliases are not allowed\)"):
        load_yaml(alias_bomb())
    assert yaml.safe_load("a: &x [1]\nb: *x\n") == {"a": [1], "b": [1]}  # what PyYAML allows
    with pytest.raises(yaml.YAMLError, match="aliases are not allowed"):
        load_yaml("a: &x [1]\nb: *x\n")


@pytest.mark.parametrize("opening", ["[", "{a: "])
def test_nesting_is_bounded(opening):
    closing = "]" if opening == "[" else "}"
    levels = MAX_YAML_DEPTH - 1  # collections around the innermost scalar: MAX_YAML_DEPTH nodes
    fits = opening * levels + "1" + closing * levels
    assert load_yaml(fits) is not None
    deeper = opening * (levels + 1) + "1" + closing * (levels + 1)
    with pytest.raises(yaml.YAMLError, match=f"nested deeper than {MAX_YAML_DEPTH} levels"):
        load_yaml(deeper)
    huge = opening * 50_000 + "1" + closing * 50_000
    with pytest.raises(RecursionError):
        yaml.safe_load(huge)  # PyYAML's own loader: the failure this guards against
    with pytest.raises(yaml.YAMLError, match="nested deeper"):
        load_yaml(huge)


def test_plain_params_files_load_as_before():
    text = "/**:\n  ros__parameters:\n    classes: ['cup; mug', 'door']\n    short_side: 336\n"
    assert load_yaml(text) == yaml.safe_load(text)


def test_short_repr_bounds_what_a_message_quotes():
    nested = [["x" * 1000] * 1000] * 1000
    assert len(short_repr(nested)) < 500
    assert short_repr("cat") == "'cat'"


def test_launch_plan_refuses_them_in_one_clear_error(tmp_path):
    with pytest.raises(LaunchPlanError, match="nested deeper than"):
        parse_classes("[" * 5000 + "]" * 5000)
    with pytest.raises(LaunchPlanError, match="aliases are not allowed"):
        parse_classes("[&a cat, *a]")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(alias_bomb())
    deep = tmp_path / "deep.yaml"
    deep.write_text("[" * 50_000 + "]" * 50_000)
    for path in (bomb, deep, tmp_path):  # not a params file this plan can read: no match
        assert params_file_matches(path, "/ovss") is False
    good = tmp_path / "good.yaml"
    good.write_text("/**:\n  ros__parameters:\n    short_side: 336\n")
    assert params_file_matches(good, "/ovss") is True


@pytest.mark.parametrize("kind", ["aliases", "nesting"])
def test_tools_refuse_them_with_one_line_and_status_2(tmp_path, kind):
    path = tmp_path / f"{kind}.yaml"
    path.write_text(alias_bomb() if kind == "aliases" else "[" * 50_000 + "]" * 50_000)
    tiny = ["--model", str(TINY_VIT), "--pretrained", "none", "--device", "cpu"]
    done = run_tool(
        "segment", str(voc_image_paths()[0]), "--classes", "cat", *tiny,
        "-o", str(tmp_path / "out"), "--params-file", str(path),
        timeout=120, address_space=8 << 30,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert "cannot be read" in done.stderr and str(path) in done.stderr, done.stderr[-2000:]


def test_a_key_given_twice_is_merged_as_rcl_reads_it_or_refused():
    """Two ``dense:`` blocks are one namespace (rcl merges them, so must the tools); one value
    twice is that value; two different values are refused, naming the key and the line."""
    from ovss_ros.safe_yaml import flatten_parameters

    text = "/**:\n  ros__parameters:\n    dense:\n      crop: 32\n    dense:\n      stride: 16\n"
    parameters = load_yaml(text)["/**"]["ros__parameters"]
    assert flatten_parameters(parameters) == {"dense.crop": 32, "dense.stride": 16}
    assert load_yaml("a: 1\na: 1\n") == {"a": 1}
    for text in ("a: 1\na: 2\n", "d:\n  x: 1\nd:\n  x: 2\n", "a: 1\na: 1.0\n"):
        with pytest.raises(yaml.YAMLError, match="given twice with different values"):
            load_yaml(text)
    with pytest.raises(ValueError, match=r"dense.crop is given twice .*\(64 and 32\)"):
        flatten_parameters({"dense.crop": 64, "dense": {"crop": 32}})
    assert flatten_parameters({"dense.crop": 32, "dense": {"crop": 32}}) == {"dense.crop": 32}
