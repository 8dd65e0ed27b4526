"""The Ray Serve backend: the model tasks on a Ray cluster, the bot where it is."""

from adapters.ray.backend import RayBackend, RayExecutor, RemoteTask

__all__ = ["RayBackend", "RayExecutor", "RemoteTask"]
