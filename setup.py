"""ament_python set-up of ovss_ros: builds with colcon (ROS from apt) or pip (standalone venv)."""

from glob import glob

from setuptools import find_packages, setup

package_name = "ovss_ros"

setup(
    name=package_name,
    version="0.1.0",
    packages=find_packages(exclude=["test", "test.*"]),
    package_data={
        "ovss_ros": ["data/*", "data/class_names/*.txt", "data/demo_images/*.jpg"]
    },
    data_files=[
        ("share/ament_index/resource_index/packages", ["resource/" + package_name]),
        ("share/" + package_name, ["package.xml"]),
        ("share/" + package_name + "/launch", glob("launch/*.py")),
        (
            "share/" + package_name + "/config",
            glob("config/*.yaml") + glob("config/*.rviz") + glob("config/*.xml"),
        ),
    ],
    install_requires=["setuptools", "numpy", "numba", "torch", "open_clip_torch"],
    zip_safe=False,
    maintainer="ovss_ros developers",
    maintainer_email="ovss_ros@example.com",
    description="Open-vocabulary semantic segmentation node for ROS 2 on training-free CLIP.",
    license="Apache-2.0",
    entry_points={
        "console_scripts": [
            "ovss_node = ovss_ros.ros.entry:ovss_node",
            "ovss_lifecycle_node = ovss_ros.ros.entry:ovss_lifecycle_node",
            "ovss-segment = ovss_ros.cli.segment:main",
            "ovss-eval = ovss_ros.cli.evaluate:main",
            "ovss-bench = ovss_ros.cli.bench:main",
            "ovss-bag = ovss_ros.cli.bag:main",
            "ovss-train-deop = ovss_ros.cli.train_deop:main",
            "ovss-tune = ovss_ros.cli.tune:main",
            "ovss-ctl = ovss_ros.cli.ctl:main",
            "ovss-demo = ovss_ros.cli.demo:main",
        ],
    },
)
