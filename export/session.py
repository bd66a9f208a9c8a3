"""ONNX Runtime in one place: its import, sessions and the execution provider (its native output is silenced with
refimpl.io.silenced_native_output, the tokenizers library's too).

Every refformer module that runs a graph (verify, the runtime's steppers and Generator) opens it here, so that a
corrupt graph, a missing CUDA library or ONNX Runtime's C++ chatter reads the same everywhere.
"""

import functools
import os
import sys
from pathlib import Path

from refformer.refimpl.errors import RefformerError
from refformer.refimpl.io import silenced_native_output

from .contract import CPU_PROVIDER, CUDA_PROVIDER

PROVIDER_CHOICES = {"cuda": CUDA_PROVIDER, "cpu": CPU_PROVIDER}  # the CLI's --provider values (and "auto")
PROVIDER_OPTIONS = ("auto", *PROVIDER_CHOICES)  # Generator(provider=), generate and verify --provider
DEVICE_OF_PROVIDER = {CUDA_PROVIDER: "cuda", CPU_PROVIDER: "cpu"}  # the OrtValue device of a provider's tensors
CUDA_MISSING = "the CUDA execution provider cannot be loaded here (no GPU, or CUDA 13 / cuDNN 9 libraries missing)"


# ---------------------------------------------------------------------------- the module and sessions


def import_onnxruntime():
    """The onnxruntime module. Its first import runs with file descriptor 2 pointed at /dev/null: ONNX Runtime 1.31
    prints a colored telemetry warning there on import when it cannot write under XDG_CACHE_HOME or ~/.cache (a
    file, a read-only or foreign folder), a line no refformer command should print. Raises KeyboardInterrupt for a
    Ctrl-C during the import (ONNX Runtime turns it into "ImportError: initialization failed"), RefformerError when
    onnxruntime cannot be imported."""
    if "onnxruntime" in sys.modules:
        return sys.modules["onnxruntime"]
    try:
        with silenced_native_output():
            import onnxruntime
    except ImportError as error:  # a Ctrl-C inside the native module's initialization arrives as its cause
        if isinstance(error.__cause__ or error.__context__, KeyboardInterrupt):
            raise KeyboardInterrupt from None
        raise RefformerError(f"onnxruntime cannot be imported ({error}): reinstall refformer") from None
    return onnxruntime


def check_native_path(path):
    """Refuse a path the native libraries (ONNX Runtime, onnx) cannot take: one whose non-ASCII characters Python
    could not decode under an ASCII locale (LC_ALL=C with PYTHONUTF8=0), which it keeps as surrogate escapes.
    Raises RefformerError saying to run with a UTF-8 locale."""
    try:
        os.fspath(path).encode("utf-8")
    except UnicodeEncodeError:
        raise RefformerError(f"the path {os.fspath(path)!r} has characters this locale ({sys.getfilesystemencoding()}) "
                             "cannot pass to ONNX Runtime; run with a UTF-8 locale (LC_ALL=C.UTF-8, or "
                             "PYTHONUTF8=1)") from None


def make_session(path, provider=CPU_PROVIDER, threads=None, provider_options=None):
    """An onnxruntime.InferenceSession of the graph file at path on one provider (CPU_PROVIDER or CUDA_PROVIDER);
    path may also be a serialized graph (bytes: the runtime's small device graphs, runtime/stepper.py).

    threads: intra-op threads (None: ONNX Runtime's default). On CUDA, TF32 is off (use_tf32 "0") unless
    provider_options say otherwise, so fp32 graphs stay within the fp32 bound. Raises RefformerError for a path the
    locale cannot pass on, a missing file, a graph ONNX Runtime cannot load (corrupt, or an opset it lacks), or a
    provider it cannot use for the graph."""
    ort = import_onnxruntime()

    in_memory = isinstance(path, bytes)
    if not in_memory:
        check_native_path(path)
        path = Path(path)
        if not path.is_file():
            raise RefformerError(f"{path} is missing: run `refformer export`")
    options = ort.SessionOptions()
    options.log_severity_level = 4  # fatal only: a failing run is one RefformerError line, not ORT's log line too
    if threads:
        options.intra_op_num_threads = threads
    options_of_provider = {"use_tf32": "0", **(provider_options or {})} if provider == CUDA_PROVIDER else {}
    try:
        sess = ort.InferenceSession(path if in_memory else str(path), options, providers=[provider],
                                    provider_options=[options_of_provider])
    except Exception as error:  # onnxruntime raises its own exception types for bad files
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RefformerError(f"ONNX Runtime cannot load {'a device graph' if in_memory else path} ({reason[:200]}): "
                             "run `refformer export` again") from None
    if provider not in sess.get_providers():
        raise RefformerError(f"{provider} could not be used for {'a device graph' if in_memory else path.name}")
    return sess


# ---------------------------------------------------------------------------- the provider


@functools.cache
def cuda_usable():
    """True when onnxruntime's CUDA execution provider can actually be loaded here (probed once per process, silently:
    ONNX Runtime's loader messages go nowhere). Never raises for a failed probe (False)."""
    ort = import_onnxruntime()

    if CUDA_PROVIDER not in ort.get_available_providers():
        return False
    try:
        with silenced_native_output(stdout=True):  # a failed probe prints pages of CUDA loader errors from C++
            ort.set_default_logger_severity(4)
            if hasattr(ort, "preload_dlls"):  # onnxruntime-gpu >= 1.21 only
                ort.preload_dlls()
            return cuda_probe(ort)
    except Exception:
        return False
    finally:
        ort.set_default_logger_severity(2)


def cuda_probe(ort):
    """Whether a one-node float32 Identity graph gets a CUDA session from the onnxruntime module ort; raises what
    ONNX Runtime raises when CUDA's libraries cannot be loaded."""
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    options = ort.SessionOptions()
    options.log_severity_level = 4
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=[CUDA_PROVIDER])
    return CUDA_PROVIDER in sess.get_providers()


def gpu_present():
    """Whether this machine shows an NVIDIA GPU (its device node or driver), whatever ONNX Runtime can load.

    Raises nothing.
    """
    return any(os.path.exists(path) for path in ("/dev/nvidia0", "/proc/driver/nvidia", "/dev/dxg"))


def usable_providers():
    """[CPU_PROVIDER], plus CUDA_PROVIDER when it can be loaded here (cuda_usable): verify's providers by default.

    Raises nothing.
    """
    return [CPU_PROVIDER] + ([CUDA_PROVIDER] if cuda_usable() else [])


def resolve_providers(provider, checking=False):
    """A --provider value (PROVIDER_OPTIONS) -> the list of ONNX Runtime providers to run on.

    'cpu' -> [CPU_PROVIDER]; 'cuda' -> [CUDA_PROVIDER]; 'auto' -> [CUDA_PROVIDER] when it can be loaded, else
    [CPU_PROVIDER] (generate: one provider), or with checking=True (verify: every usable one) usable_providers().
    A one-line notice on stderr only when auto misses CUDA although a GPU is present (its libraries failed to load);
    on a machine without a GPU, auto is the CPU, silently. Raises RefformerError for provider cuda when CUDA cannot
    be loaded, or for an unknown provider. The texts of the error and the notice are generate's, or with
    checking=True verify's.
    """
    if provider not in PROVIDER_OPTIONS:
        raise RefformerError(f"provider must be auto, cuda or cpu, got {provider!r}")
    if provider == "cpu":
        return [CPU_PROVIDER]
    if cuda_usable():
        return [CUDA_PROVIDER] if provider == "cuda" or not checking else usable_providers()
    if provider == "cuda":
        raise RefformerError("the CUDA execution provider cannot be loaded here (no GPU, or CUDA libraries missing)"
                             if checking else f"{CUDA_MISSING}; use --provider cpu")
    if gpu_present() and sys.stderr is not None:  # print(file=None) would write to stdout
        print("notice: a GPU is present but ONNX Runtime's CUDA provider cannot be loaded; checking on the CPU only"
              if checking else "notice: a GPU is present but ONNX Runtime's CUDA provider cannot be loaded (CUDA 13 / "
              "cuDNN 9 libraries missing?); running on the CPU", file=sys.stderr)
    return [CPU_PROVIDER]


def resolve_provider(provider):
    """The one provider generate and Generator run on: resolve_providers(provider)'s (see there).

    Raises RefformerError for provider cuda when CUDA cannot be loaded, or for an unknown provider.
    """
    return resolve_providers(provider)[0]
