"""The fused Triton engine: ``forward.py`` and ``backward.py`` hold the kernels,
``launch.py`` checks nothing (the API did), allocates, plans and launches them; its
``LaunchOptions`` choose the backward design, budgets and tiles. Importing this package imports
triton (which reads ``TRITON_INTERPRET`` then)."""

from .launch import LaunchOptions

__all__ = ["LaunchOptions"]
