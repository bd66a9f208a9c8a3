"""refformer: a verified NumPy reference of the Transformer, exported to ONNX for fast generation.

The work lives in three subpackages: refformer.refimpl (the NumPy math), refformer.export (ONNX graphs and their
verification) and refformer.runtime (generation on ONNX Runtime and the `refformer` command).
"""

import os as _os
import signal as _signal
import sys as _sys


def _interrupted_while_starting(signum, frame):
    """Ctrl-C while the `refformer` program loads its modules (before its main runs, ~0.3 s): one line and exit 130,
    not an import traceback. Group.main puts Python's own handler back."""
    try:
        _sys.stderr.write("error: interrupted\n")
        _sys.stderr.flush()
    finally:
        _os._exit(130)


# only in the `refformer` program: a library or test process that imports refformer keeps its own Ctrl-C handling
if (_sys.argv and _os.path.basename(_sys.argv[0]) == "refformer"
        and _signal.getsignal(_signal.SIGINT) is _signal.default_int_handler):
    _signal.signal(_signal.SIGINT, _interrupted_while_starting)

from importlib.metadata import PackageNotFoundError, version  # noqa: E402

try:
    __version__ = version("refformer")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "unknown"

__all__ = ["__version__"]
