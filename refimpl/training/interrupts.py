"""Ctrl-C held back while files switch: the training checkpoints and generate's record writer use it."""

import contextlib
import signal
import threading


@contextlib.contextmanager
def interrupts_deferred():
    """Hold SIGINT (Ctrl-C) for the duration: its handler (KeyboardInterrupt) runs when the block ends, never
    halfway through the file switches inside it. Outside the main thread (which Python's handlers run in), a no-op.

    A Python-level handler rather than a signal mask: the signal may be delivered to any thread (BLAS threads
    included), and Python then raises in the main thread at once.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught and callable(previous):
            previous(signal.SIGINT, caught[0])  # Python's default handler raises KeyboardInterrupt here
        elif caught and previous == signal.SIG_DFL:
            signal.raise_signal(signal.SIGINT)
