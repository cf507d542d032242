"""localmim: a reproducible pipeline for LocalMIM (masked image modeling with local multi-scale reconstruction).

Layers, each importing only the ones before it:
``targets``/``models`` (pure torch) -> ``data`` -> ``train``/``eval`` -> ``stages`` -> ``cli``.
``config`` and ``utils`` are leaf helpers importable from any layer.
"""

__version__ = "0.1.0"
