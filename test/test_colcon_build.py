"""The package builds the way robots build it (issue 11, item 7): ``colcon build`` in a temporary
workspace, plain and ``--symlink-install``, installs what ``ros2 run`` and ``ros2 launch`` use,
and the installed ``ovss_node`` starts and answers over DDS. The same build makes the interface
package ovss_interfaces/ (its services), named with ``--base-paths`` because colcon never looks
for a package inside another package's folder.

colcon comes from PyPI (``colcon-common-extensions``, pinned in requirements.txt, installed into
the venv by scripts/setup.sh). Without it the module is skipped, saying how to install it.
"""

from __future__ import annotations

import filecmp
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import rclpy
from ros_harness import (
    EVENT_TIMEOUT_S,
    REPO_ROOT,
    STARTUP_TIMEOUT_S,
    STOP_TIMEOUT_S,
    TINY_NODE_PARAMETERS,
    OvssClient,
    camera_frame,
    isolate_dds,
    make_image,
    next_header,
    ros_argument,
)

PACKAGE = "ovss_ros"
INTERFACES = "ovss_interfaces"
BUILD_TIMEOUT_S = 600.0
# Not part of the package: what a build or a test run leaves in the source tree.
NOT_SOURCE = (
    ".git",
    ".venv",
    "build",
    "install",
    "log",
    "__pycache__",
    "*.pyc",
    ".cache",
    "*.egg-info",
    ".ruff_cache",
    ".pytest_cache",
)


def colcon_executable() -> str | None:
    beside = Path(sys.executable).parent / "colcon"  # the venv's, as pip installs it
    return str(beside) if beside.is_file() else shutil.which("colcon")


COLCON = colcon_executable()
pytestmark = pytest.mark.skipif(
    COLCON is None,
    reason="colcon is not installed: pip install colcon-common-extensions==0.3.0 "
    "(pinned in requirements.txt; scripts/setup.sh installs it)",
)


def underlay_environment() -> dict[str, str]:
    """What ``source /opt/ros/<distro>/setup.bash`` gives a robot's build, where the venv is the
    ROS installation (the PyPI wheels, vision_msgs built by scripts/setup.sh): its prefix for
    CMake and the ament index (rosidl's generators are found there), its python first on PATH."""
    prefix = sys.prefix
    paths = {}
    for name in ("AMENT_PREFIX_PATH", "CMAKE_PREFIX_PATH"):
        parts = [p for p in os.environ.get(name, "").split(os.pathsep) if p]
        if (Path(prefix) / "share" / "ament_index").is_dir() and prefix not in parts:
            parts.append(prefix)  # after a sourced ROS: the venv is only the fallback
        paths[name] = os.pathsep.join(parts)
    paths["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return paths


class Workspace:
    """A colcon workspace with a copy of this repository as src/ovss_ros, built once."""

    def __init__(self, root: Path, symlink: bool) -> None:
        self.root = root
        self.symlink = symlink
        self.source = root / "src" / PACKAGE
        shutil.copytree(REPO_ROOT, self.source, ignore=shutil.ignore_patterns(*NOT_SOURCE))
        # As docs/ovss_interfaces.md says: the workspace's packages and the nested interfaces.
        command = [COLCON, "build", "--base-paths", "src", f"src/{PACKAGE}/{INTERFACES}"]
        if symlink:
            command.append("--symlink-install")
        env = dict(os.environ, COLCON_HOME=str(root / ".colcon"))
        env.pop("PYTHONPATH", None)
        env.update(underlay_environment())
        self.build = subprocess.run(
            command,
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT_S,
        )
        self.install = root / "install" / PACKAGE

    def environment(self) -> dict[str, str]:
        """The environment after ``source install/setup.bash``, from a clean PYTHONPATH: the
        package is found in the workspace only, never in this repository."""
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)
        # The venv's bin first: setup.bash and the installed scripts run its python.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        dump = subprocess.run(
            ["bash", "-c", "source install/setup.bash && env -0"],
            cwd=self.root,
            env=env,
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout
        return dict(entry.split("=", 1) for entry in dump.decode().split("\0") if "=" in entry)


@pytest.fixture(scope="module", params=["plain", "symlink-install"])
def workspace(request, tmp_path_factory) -> Workspace:
    symlink = request.param == "symlink-install"
    workspace = Workspace(tmp_path_factory.mktemp(f"colcon_{request.param}"), symlink)
    assert workspace.build.returncode == 0, workspace.build.stdout + workspace.build.stderr
    assert f"Finished <<< {PACKAGE}" in workspace.build.stdout
    assert f"Finished <<< {INTERFACES}" in workspace.build.stdout
    return workspace


def test_installs_what_ros2_run_and_launch_use(workspace):
    install = workspace.install
    for script in ("ovss_node", "ovss_lifecycle_node"):
        path = install / "lib" / PACKAGE / script
        assert path.is_file() and os.access(path, os.X_OK), f"{path} (what ros2 run starts)"
    share = install / "share" / PACKAGE
    index = install / "share" / "ament_index" / "resource_index" / "packages" / PACKAGE
    assert index.is_file(), "ament index entry (ros2 pkg prefix, ros2 run find the package)"
    assert (share / "package.xml").is_file()
    expected = {
        "launch": sorted(p.name for p in (REPO_ROOT / "launch").glob("*.py")),
        "config": sorted(p.name for p in (REPO_ROOT / "config").iterdir() if p.is_file()),
    }
    assert "ovss.launch.py" in expected["launch"]
    assert {"ovss.yaml", "ovss.rviz", "fastdds_large_data.xml"} <= set(expected["config"])
    for folder, names in expected.items():
        assert sorted(p.name for p in (share / folder).iterdir()) == names, folder
        for name in names:
            installed = share / folder / name
            assert filecmp.cmp(installed, REPO_ROOT / folder / name, shallow=False), installed
            if workspace.symlink:  # edits in src/ take effect without a build
                assert installed.resolve() == (workspace.source / folder / name).resolve()


def test_the_workspace_environment_imports_the_installed_package(workspace):
    env = workspace.environment()
    assert str(workspace.install) in env["AMENT_PREFIX_PATH"].split(os.pathsep)
    found = subprocess.run(
        [sys.executable, "-c", "import ovss_ros.ros.entry as m; print(m.__file__)"],
        cwd=workspace.root,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.strip()
    # Plain: a copy in install/; symlink-install: build/ovss_ros, links to src/ovss_ros.
    assert Path(found).is_relative_to(workspace.root), found
    assert Path(found).resolve().is_relative_to(workspace.root.resolve()), found


def test_installed_ovss_node_starts_and_answers_over_dds(workspace, tmp_path):
    env = workspace.environment()
    env.update(isolate_dds())
    env.update(PYTHONUNBUFFERED="1", RCUTILS_LOGGING_BUFFERED_STREAM="0")
    env.setdefault("OMP_NUM_THREADS", "1")  # as the tests: conftest.py
    params_file = workspace.install / "share" / PACKAGE / "config" / "ovss.yaml"
    command = [
        str(workspace.install / "lib" / PACKAGE / "ovss_node"),
        "--ros-args",
        "--params-file",
        str(params_file),  # the installed defaults, then the tiny model over them
    ]
    parameters = TINY_NODE_PARAMETERS | {"classes": ["cat", "dog"]}
    for name, value in parameters.items():
        command += ["-p", f"{name}:={ros_argument(value)}"]
    log_path = tmp_path / "ovss_node.log"
    own_context = not rclpy.ok()
    if own_context:
        rclpy.init()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT
        )
        client = OvssClient(name="colcon_test_client")
        try:
            client.spin_until(
                lambda: process.poll() is not None or client.ready(),
                STARTUP_TIMEOUT_S,
                message=lambda: (
                    f"installed node start-up:\n{log_path.read_text()}"
                    f"\nthe client:\n{client.describe()}"
                ),
            )
            assert process.poll() is None, log_path.read_text()
            rgb = camera_frame(64, 48)
            found = client.wait_for_output(
                make_image(rgb, "rgb8", next_header(client.node)), ("labels", "label_info")
            )
            labels = found["labels"]
            assert (labels.width, labels.height, labels.encoding) == (64, 48, "mono8")
            assert [c.class_name for c in found["label_info"].class_map] == ["cat", "dog"]
        finally:
            client.destroy()
            if own_context:
                rclpy.shutdown()
            process.send_signal(2)  # Ctrl-C
            try:
                status = process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                status = process.wait(EVENT_TIMEOUT_S)
    output = log_path.read_text()
    assert status == 0, output
    assert "2 classes" in output, output  # its start-up line: the tiny model and the vocabulary


INTERFACES_CHECK = """
import sys
from rclpy.serialization import deserialize_message, serialize_message
from ovss_interfaces.srv import Segment, SetVocabulary
from sensor_msgs.msg import Image

request = Segment.Request(image=Image(height=1, width=2, encoding="mono8", step=2,
                                      data=bytes([3, 4])), words=["cup; mug"])
assert deserialize_message(serialize_message(request), Segment.Request) == request
vocabulary = SetVocabulary.Request(classes=["tv | a screen"], set_background_words=True)
assert deserialize_message(serialize_message(vocabulary), SetVocabulary.Request) == vocabulary
print(sys.modules["ovss_interfaces"].__file__)
"""


def test_the_workspace_builds_and_imports_the_interface_package(workspace):
    """ovss_interfaces is built in the workspace, found through the workspace's environment
    (never the venv's copy that scripts/setup.sh installs), and its types serialize."""
    install = workspace.root / "install" / INTERFACES
    share = install / "share" / INTERFACES
    index = install / "share" / "ament_index" / "resource_index" / "packages" / INTERFACES
    assert index.is_file(), "ament index entry"
    for name in ("Segment", "SetVocabulary"):
        installed = share / "srv" / f"{name}.srv"
        assert installed.is_file(), installed
        source = REPO_ROOT / INTERFACES / "srv" / f"{name}.srv"
        assert installed.read_text() == source.read_text()
    env = workspace.environment()
    assert str(install) in env["AMENT_PREFIX_PATH"].split(os.pathsep)
    found = subprocess.run(
        [sys.executable, "-c", INTERFACES_CHECK],
        cwd=workspace.root,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert found.returncode == 0, found.stdout + found.stderr
    module = Path(found.stdout.strip())
    assert module.resolve().is_relative_to(workspace.root.resolve()), module
