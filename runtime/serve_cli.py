"""`refformer serve`: parses the options and runs runtime/serve.py's server (which needs the serve extra: starlette
and uvicorn; without it, one line says how to install it)."""

import click

from refformer.export.contract import VARIANT_OPTIONS
from refformer.refimpl.errors import RefformerError
from refformer.runtime.errors import one_line_errors
from refformer.runtime.options import dtype_option, model_option, provider_option

# export/quantize.py's int8 is ONNX Runtime's dynamic quantization: one activation scale per tensor, so a row's
# output depends on the rows batched with it (checked on the bundled model: 1 of 16 sentences changed between its
# batch of 16 and alone); the server promises each text what it gives alone
INT8_BATCHING = ("--dtype int8 needs --max-batch 1: its dynamic quantization scales activations per batch, so a text's "
                 "output would depend on the texts batched with it; pass --max-batch 1, or use --dtype fp32")
INSTALL_HINT = 'refformer serve needs the serve extra (starlette, uvicorn): pip install "refformer[serve]"'


@click.command("serve")
@model_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every one).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="Port to listen on (0: one the system picks, printed at start).")
@click.option("--batch-window-ms", type=float, default=5.0, show_default=True,
              help="How long the oldest waiting text waits for others to batch with (milliseconds; 0: no wait).")
@click.option("--max-batch", type=int, default=16, show_default=True,
              help="The most texts in one batch, and in one request (1: no batching across requests).")
@click.option("--max-input-tokens", type=int, default=None,
              help="The most tokens a text may have. Default: what the model's positions hold.")
@click.option("--max-new-tokens", type=int, default=None,
              help="The most max_new_tokens a request may ask for; a request without one gets generate's default "
                   "budget, cut to this. Default: no limit but the model's positions.")
@click.option("--request-timeout", type=float, default=60.0, show_default=True,
              help="Seconds a request may wait and run before it is answered 504.")
@click.option("--max-body-bytes", type=int, default=1 << 20, show_default=True,
              help="The largest request body (bytes); a larger one is answered 413.")
@provider_option
@dtype_option("fp32", "Graph precision (exported on first use). int8: int8 weights, on the CPU, with --max-batch 1.")
@click.option("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (capped to the CPU count).")
@click.option("--variant", type=click.Choice(list(VARIANT_OPTIONS)), default="auto", show_default=True,
              help="Decoder graph, as for generate.")
def serve_command(model_dir, host, port, batch_window_ms, max_batch, max_input_tokens, max_new_tokens,
                  request_timeout, max_body_bytes, provider, dtype, threads, variant):
    """Serve the model over HTTP: POST /v1/generate (JSON records as generate --json; "stream": true for server-sent
    events), GET /health, GET /metrics (Prometheus). Requests arriving within --batch-window-ms with the same options
    run as one batch. Stops on SIGTERM or Ctrl-C after the running requests finish.

    \f
    Raises nothing to its caller: one_line_errors prints a RefformerError (a bad option, a port in use, a missing
    serve extra, a model that cannot load) as one line and exits 1; Ctrl-C exits 130.
    """
    one_line_errors(run)(model_dir, host, port, batch_window_ms, max_batch, max_input_tokens, max_new_tokens,
                         request_timeout, max_body_bytes, provider, dtype, threads, variant)


def run(model_dir, host, port, batch_window_ms, max_batch, max_input_tokens, max_new_tokens, request_timeout,
        max_body_bytes, provider, dtype, threads, variant):
    """The serve command's work: checks the extra and every option, binds the port, loads the Generator, serves.
    Raises RefformerError for a missing extra, a bad option, a port that cannot be bound or a model that cannot
    load."""
    if dtype == "int8" and max_batch > 1:  # an option refused with or without the serve extra
        raise RefformerError(INT8_BATCHING)
    try:
        from refformer.runtime import serve
    except ImportError as error:
        if (error.name or "").split(".")[0] not in ("starlette", "uvicorn", "anyio", "h11"):
            raise
        raise RefformerError(INSTALL_HINT) from None
    from refformer.runtime.generate_cli import check_threads
    from refformer.runtime.generator import Generator

    settings = serve.ServeSettings(batch_window_ms=batch_window_ms, max_batch=max_batch,
                                   max_input_tokens=max_input_tokens, max_new_tokens=max_new_tokens,
                                   request_timeout=request_timeout, max_body_bytes=max_body_bytes)
    check_max_batch(model_dir, max_batch)
    threads = check_threads(threads)
    sock = serve.listening_socket(host, port)
    try:
        generator = Generator(model_dir, provider=provider, dtype=dtype, threads=threads, variant=variant)
        serve.serve(generator, settings, sock, announce=lambda line: click.echo(line, err=True))
    finally:
        sock.close()


def check_max_batch(model_dir, max_batch):
    """Refuse a --max-batch whose batch would not fit in memory even for greedy search (a server that refuses every
    request), from the model's config.json before the model loads. Raises RefformerError."""
    from refformer.refimpl.generate import GenerationOptions, check_search_fits_memory
    from refformer.refimpl.io import load_config
    from refformer.runtime.options import resolve_model

    try:
        check_search_fits_memory(load_config(resolve_model(model_dir)), GenerationOptions(), max_batch)
    except RefformerError as error:
        reason = str(error).rsplit(": lower", 1)[0]
        raise RefformerError(f"--max-batch {max_batch} is too large: {reason}; lower --max-batch") from None
