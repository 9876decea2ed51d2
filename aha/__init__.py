"""aha: teach language models to reason by themselves with reinforcement learning from verifiable rewards."""

__version__ = "0.1.0"
