"""Launch the ovss node on a camera, optionally with RViz2.

    ros2 launch ovss_ros ovss.launch.py namespace:=front_camera \
        image:=/camera/color/image_raw classes:="['person', 'cup; mug']" use_rviz:=true

Every decision (names, remappings, parameters, what runs) is made by ``ovss_ros.ros.launch_plan``,
which the tests exercise without ROS launch; this file only turns its plan into launch actions.

Large images: unless FASTDDS_DEFAULT_PROFILES_FILE is set already, the processes started here get
the package's config/fastdds_large_data.xml (Fast DDS's LARGE_DATA transports), so that the
overlay and labels reach RViz whole. The camera driver needs the same profile for the input
(README: "Large images and DDS"); with Cyclone DDS the variable is ignored.
"""

import os

from launch.actions import DeclareLaunchArgument, LogInfo, OpaqueFunction
from launch.launch_context import LaunchContext
from launch.launch_description import LaunchDescription
from launch_ros.actions import Node

from ovss_ros.ros import launch_plan

FASTDDS_PROFILE_VARIABLE = "FASTDDS_DEFAULT_PROFILES_FILE"


def _dds_environment() -> dict[str, str]:
    """The large-data Fast DDS profile for the started processes, unless one is set already."""
    if os.environ.get(FASTDDS_PROFILE_VARIABLE):
        return {}
    return {FASTDDS_PROFILE_VARIABLE: str(launch_plan.default_file("fastdds_large_data.xml"))}


def _start(context: LaunchContext, *args: object, **kwargs: object) -> list:
    """Resolve the arguments, plan, and start the processes the plan enables."""
    values = {name: context.launch_configurations[name] for name in launch_plan.ARGUMENTS}
    environment = _dds_environment()
    actions = []
    for spec in launch_plan.plan(values):
        if not spec.enabled:
            continue
        actions += [LogInfo(msg=f"{spec.name}: {warning}") for warning in spec.warnings]
        parameters = [*spec.params_files] + ([spec.parameters] if spec.parameters else [])
        actions.append(
            Node(
                package=spec.package,
                executable=spec.executable,
                name=spec.name,
                namespace=spec.namespace,
                remappings=list(spec.remappings),
                parameters=parameters,
                arguments=list(spec.arguments),
                ros_arguments=list(spec.ros_arguments),
                additional_env=environment or None,
                output="screen",
            )
        )
    return actions


def generate_launch_description() -> LaunchDescription:
    """Declare the plan's arguments; plan once their values are known (an OpaqueFunction)."""
    return LaunchDescription(
        [
            DeclareLaunchArgument(name, default_value=arg.default, description=arg.description)
            for name, arg in launch_plan.ARGUMENTS.items()
        ]
        + [OpaqueFunction(function=_start)]
    )
