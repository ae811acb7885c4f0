"""What every method family uses from CLIP: loading (open_clip, hub access), text encoding,
the OpenCV-exact resize of the network input."""
