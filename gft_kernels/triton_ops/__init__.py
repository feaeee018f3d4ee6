"""The fused Triton engine: ``forward.py`` and ``backward.py`` hold the kernels; ``launch.py`` is
the engine, which checks nothing (the API did) and picks a design; ``plans.py`` sizes it
(``LaunchOptions``: the designs, budgets and tiles) and ``runners.py`` allocates and launches.
Importing this package imports triton (which reads ``TRITON_INTERPRET`` then)."""

from .launch import LaunchOptions

__all__ = ["LaunchOptions"]
