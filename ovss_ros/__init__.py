"""ovss_ros: open-vocabulary semantic segmentation for ROS 2 on training-free CLIP."""
