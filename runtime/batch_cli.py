"""`refformer batch`: generate for every line of many JSONL files on a Ray cluster (Ray Data), writing JSONL shards.
This module parses the options, checks them and the output folder before Ray starts, and prints the summary; the
pipeline lives in runtime/ray_batch.py.
"""

import math
import os

import click

from refformer.export.contract import VARIANT_OPTIONS
from refformer.refimpl.errors import RefformerError
from refformer.runtime.errors import one_line_errors
from refformer.runtime.generate_cli import option_flags, without_tracebacks
from refformer.runtime.options import NonEmptyPath, dtype_option, model_option, provider_option

# export/quantize.py's int8 scales activations per tensor, so a line's output depends on the lines of its worker call;
# which lines share a call is Ray Data's choice (its blocks), so only one line per call gives each line what it gives
# alone (serve_cli's --max-batch 1 rule, for the same reason)
INT8_BATCHING = ("--dtype int8 needs --batch-size 1: its dynamic quantization scales activations per batch, and Ray "
                 "Data decides which lines share a batch, so a line's output would depend on the lines batched with "
                 "it; pass --batch-size 1, or use --dtype fp32")


@click.command("batch")
@click.argument("inputs", nargs=-1, required=True, metavar="FILES...")
@click.option("--out", "out_dir", type=NonEmptyPath(file_okay=False), required=True, metavar="OUT_DIR",
              help="Folder for the JSONL shards (part-NNNNNN.jsonl); written when the run has finished.")
@model_option
@click.option("--overwrite", is_flag=True, help="Replace the contents of an existing, non-empty OUT_DIR (at the end "
              "of the run).")
@click.option("--ray-address", default=None, metavar="ADDR",
              help="A running Ray cluster (host:port, or auto). Default: a local cluster for this run.")
@click.option("--workers", type=int, default=None,
              help="Actors, each with one Generator. Default: local, the CPUs // --threads; on a cluster, (its "
                   "CPUs - 1) // --threads.")
@click.option("--threads", type=int, default=1, show_default=True,
              help="ONNX Runtime intra-op threads per worker; each worker reserves as many Ray CPUs.")
@click.option("--gpus-per-worker", type=float, default=0.0, show_default=True,
              help="Ray GPUs per worker (num_gpus; 1 = one GPU each); with --provider auto the worker runs on CUDA.")
@provider_option
@dtype_option("fp32", "Graph precision (exported on first use). int8: int8 weights, on the CPU, with --batch-size 1.")
@click.option("--variant", type=click.Choice(list(VARIANT_OPTIONS)), default="auto", show_default=True,
              help="Decoder graph, as for generate.")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Lines per worker call.")
@click.option("--truncate", is_flag=True, help="Cut inputs longer than the model's positions (with a warning).")
@option_flags
def batch(inputs, out_dir, model_dir, overwrite, ray_address, workers, threads, gpus_per_worker, provider, dtype,
          variant, batch_size, truncate, **options):
    """Generate for every line of FILES (JSONL or plain lines, as generate --input; globs such as 'data/*.jsonl'
    expanded here) on Ray Data, and write JSONL shards to OUT_DIR.

    Each record is generate --json's for that line, with "file" (the input file) and "line": sort by them for the
    input order. Exit 1 when an input failed (reported in its record), 130 on Ctrl-C (OUT_DIR left as it was).

    \f
    Raises nothing to its caller: one_line_errors prints run's RefformerError (no Ray, a bad option, input or
    output, a failed job) as one line `error: ...` and exits 1.
    """
    one_line_errors(without_tracebacks(run))(inputs, out_dir, model_dir, overwrite, ray_address, workers, threads,
                                             gpus_per_worker, provider, dtype, variant, batch_size, truncate, options)


def check_counts(workers, threads, gpus_per_worker, batch_size):
    """Refuse --workers, --threads or --batch-size below 1 and a --gpus-per-worker that is negative, NaN or inf.
    Raises RefformerError naming the option."""
    if workers is not None and workers < 1:
        raise RefformerError(f"--workers must be >= 1, got {workers}")
    if threads < 1:
        raise RefformerError(f"--threads must be >= 1, got {threads}")
    if not (math.isfinite(gpus_per_worker) and gpus_per_worker >= 0):
        raise RefformerError(f"--gpus-per-worker must be a number >= 0, got {gpus_per_worker}")
    if batch_size < 1:
        raise RefformerError(f"--batch-size must be >= 1, got {batch_size}")


def check_resources(cluster, workers, threads, gpus_per_worker, local):
    """Refuse (on a local cluster) or announce (on a remote one, which an autoscaler may grow) a pool that needs
    more CPUs or GPUs than the cluster has now: Ray would wait for them. The pool needs workers x threads CPUs, and
    one more for Ray Data's tasks that read, split and write the lines (with none left they wait for ever).
    Raises RefformerError."""
    have = cluster.ray.cluster_resources()
    for resource, per_worker, spare, flag in (("CPU", threads, 1, "--threads"),
                                              ("GPU", gpus_per_worker, 0, "--gpus-per-worker")):
        need = workers * per_worker + spare if per_worker else 0
        if need and need > have.get(resource, 0) + 1e-9:
            message = (f"--workers {workers} x {flag} {per_worker:g}{' + 1 (reading and writing)' if spare else ''} "
                       f"needs {need:g} {resource}s; the Ray cluster has {have.get(resource, 0):g}")
            if local:
                raise RefformerError(f"{message}: lower --workers or {flag}")
            click.echo(f"notice: {message} now; the run waits until it has them", err=True)


def plural(count, noun):
    """"1 file", "2 files". Raises nothing."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def run(inputs, out_dir, model_dir, overwrite, ray_address, workers, threads, gpus_per_worker, provider, dtype,
        variant, batch_size, truncate, options):
    """The batch command's work: Ray's presence, every option, the inputs and OUT_DIR (and, for a local cluster, the
    model, loaded once) are checked before any cluster starts; then runtime/ray_batch.run_batch with no more workers
    than blocks of --batch-size lines, and the summary on stderr. Exits 1 when an input failed. Raises
    RefformerError (printed as one line by the caller)."""
    from refformer.runtime import ray_batch
    from refformer.runtime.batch import truncation_warning
    from refformer.runtime.errors import shown
    from refformer.runtime.generate_cli import check_fits_memory, check_threads, generation_options

    if dtype == "int8" and batch_size > 1:  # an option refused with or without the ray extra
        raise RefformerError(INT8_BATCHING)
    ray_batch.import_ray()
    generation = generation_options(options)  # its seed, when sampling without --seed, drawn once for every worker
    check_counts(workers, threads, gpus_per_worker, batch_size)
    local = ray_address is None
    if local:
        threads = check_threads(threads)
    files = ray_batch.expand_inputs(inputs)
    ray_batch.check_out_dir(out_dir, overwrite, files, model_dir)
    check_fits_memory(model_dir, generation, batch_size)
    cpus = os.cpu_count() or 1
    if local and workers is not None and workers * threads > cpus:
        raise RefformerError(f"--workers {workers} x --threads {threads} needs {workers * threads} CPUs; this "
                             f"machine has {cpus}: lower --workers or --threads")
    if local:  # a model that cannot load is one line before Ray starts (on a cluster, workers may differ)
        ray_batch.check_model_loads(model_dir, provider, dtype, threads, truncate, variant)
    # a local cluster: a logical CPU per worker thread, and one for the reading and writing tasks
    cluster = ray_batch.Cluster(ray_address, (workers or max(1, cpus // threads)) * threads + 1)
    try:
        if workers is None:
            workers = max(1, (cluster.cpus() - 1) // threads)
        # no more actors (each loads a Generator) than there are blocks of --batch-size lines to give them
        workers = max(1, ray_batch.input_blocks(files, batch_size, workers))
        check_resources(cluster, workers, threads, gpus_per_worker, local and cluster.owned)
        summary = ray_batch.run_batch(files, out_dir, generation=generation, workers=workers, threads=threads,
                                      gpus_per_worker=gpus_per_worker, batch_size=batch_size, model_dir=model_dir,
                                      provider=provider, dtype=dtype, variant=variant, truncate=truncate,
                                      cluster=cluster)
    finally:
        cluster.close()
    if summary["warnings"]:
        click.echo(truncation_warning(summary["warnings"]), err=True)
    click.echo(f"wrote {plural(summary['records'], 'record')} from {plural(len(files), 'file')} to {shown(out_dir)} "
               f"({plural(summary['files'], 'shard')}, {plural(workers, 'worker')})", err=True)
    if summary["failures"]:
        click.echo(f"error: {summary['failures']} of {summary['records']} inputs failed (reported in "
                   f"{shown(out_dir)})", err=True)
        raise SystemExit(1)
