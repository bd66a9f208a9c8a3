"""refformer: a verified NumPy reference of the Transformer, exported to ONNX for fast generation.

The work lives in three subpackages: refformer.refimpl (the NumPy math), refformer.export (ONNX graphs and their
verification) and refformer.runtime (generation on ONNX Runtime and the `refformer` command).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("refformer")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "unknown"

__all__ = ["__version__"]
