"""DDL: Deep Delta Learning transformers (arXiv 2601.00417), faithful to the official code.

``DDLConfig`` and ``presets`` are torch-free; ``DDLModel`` is imported lazily so that the CLI can
answer ``--help`` or a bad flag without paying for ``import torch``.
"""

from ddl.config import DDLConfig, presets, with_overrides

__all__ = ["DDLConfig", "DDLModel", "presets", "with_overrides"]


def __getattr__(name: str):
    if name == "DDLModel":
        from ddl.model import DDLModel

        return DDLModel
    raise AttributeError(f"module 'ddl' has no attribute {name!r}")
