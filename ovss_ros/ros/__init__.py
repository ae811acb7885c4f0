"""The ROS 2 adapter of ovss_ros (rclpy): the node, the managed node, their parameters, cameras,
frame accounting, worker and diagnostics, the launch plan, image conversion and the bag tool's
rosbag2 side. It holds no segmentation logic (that is ``ovss_ros.core``). Importing this package
imports nothing: ``ros.entry`` installs its signal handlers before rclpy and torch load.
"""
