"""The error a model loader raises (``ModelLoadError``), in a module without torch, so that the
ROS adapter and the tools can catch it before (or without) loading a model."""


class ModelLoadError(RuntimeError):
    """The model could not be loaded; ``str(error)`` says what to set."""
