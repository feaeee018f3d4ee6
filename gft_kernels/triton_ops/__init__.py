"""The fused Triton engine: ``forward.py`` and ``backward.py`` hold the kernels,
``launch.py`` checks nothing (the API did), allocates, plans and launches them."""
