"""The runtime raises the same exception type as refimpl."""

from refformer.refimpl.errors import RefformerError

__all__ = ["RefformerError"]
