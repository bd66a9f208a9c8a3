"""The tokenizer glue moved to refformer.refimpl.training.tokenizer; export/verify.py and tests/refimpl/test_io.py
still import these two names from here until they switch (then this file goes)."""

from refformer.refimpl.training.tokenizer import encode, load_tokenizer

__all__ = ["encode", "load_tokenizer"]
