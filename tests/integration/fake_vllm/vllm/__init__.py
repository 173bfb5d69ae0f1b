"""A stand-in for an installed vLLM (tests only): the same module layout as vLLM 0.32 for the
worker's flag reading, and an API server that runs the simulated engine."""

__version__ = "0.32.0+fake"
