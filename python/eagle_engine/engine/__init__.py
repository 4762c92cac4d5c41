"""The engine: the EagleEngine facade, the runner that owns caches and runs rounds, sequences, inputs."""

from .engine import EagleEngine

__all__ = ["EagleEngine"]
