"""refformer.runtime: generation on ONNX Runtime (Generator) and the `refformer` CLI.

    generator.py    Generator: text in, text out; export sets found or made (ensure_export), the variant chosen
    stepper.py      OrtStepper / StaticOrtStepper: the decoder graphs behind refimpl.generate's Stepper interface
    batch.py        generate's batch loop: inputs read, batches run, records written as each batch finishes
    outputs.py      the one checker of a file a command writes (--output, --out)
    cli.py          the `refformer` click group; *_cli.py the commands (parse options, call a library, print)
    options.py      click pieces the commands share; errors.py one-line errors and message helpers
"""


def __getattr__(name):  # keep `import refformer.runtime` light: onnxruntime loads on first use
    if name == "Generator":
        from .generator import Generator

        return Generator
    raise AttributeError(name)


__all__ = ["Generator"]
