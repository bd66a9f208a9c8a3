"""refformer.runtime: generation on ONNX Runtime (Generator), tokenizer glue and the `refformer` CLI."""


def __getattr__(name):  # keep `import refformer.runtime` light: onnxruntime loads on first use
    if name == "Generator":
        from .generator import Generator

        return Generator
    raise AttributeError(name)


__all__ = ["Generator"]
