"""`refformer batch` on Ray Data: the inputs of many JSONL files run through a pool of actors, each holding one
Generator (one ONNX Runtime session set, pinned intra-op threads), and written as JSONL shards.

The pipeline (one Ray Data dataset, streamed):

    files ──read_binary_files──▶ one row per file ──flat_map(file_lines: batch.read_inputs)──▶ one row per line
          ──map_batches(BatchWorker, ActorPoolStrategy(size=workers))──▶ one rendered record per line
          ──write_datasink(RecordsDatasink)──▶ OUT_DIR/part-NNNNNN.jsonl

A record is what `generate --json` writes for the same line (runtime/batch.py: "line", "id", "input", "output",
"ids", "seed", or "error"), with "file" (the input file as the command line named it) first. Records come out in no
fixed order across shards (each shard is sorted by file and line): sort by ("file", "line") to recover the input
order. The output goes to a staging folder beside OUT_DIR that replaces OUT_DIR when every record is written (an
--overwrite run leaves the old OUT_DIR as it was if it fails). A worker process that dies is restarted by Ray and its
batch run again (Ray Data's actor pools retry the tasks of dead actors): every line gives exactly one record.

Ray is imported lazily: this module imports without it, and import_ray says how to install it.
"""

import glob
import json
import os
import re
import shutil
import stat
import tempfile
import warnings
from pathlib import Path

from refformer.refimpl.errors import RefformerError
from refformer.runtime.errors import shown

INSTALL_HINT = 'refformer batch needs Ray Data: pip install "refformer[ray]"'
SHARD_PREFIX = "part-"
SHARD_SUFFIX = ".jsonl"
ROWS_PER_SHARD = 10_000  # Ray Data gathers at least this many records (or all that are left) into one shard


def import_ray():
    """The ray module, with ray.data imported. Raises RefformerError (INSTALL_HINT) when Ray Data is not installed."""
    try:
        import ray
        import ray.data  # noqa: F401  (ray without the data extra lacks pandas/pyarrow)
    except ImportError:
        raise RefformerError(INSTALL_HINT) from None
    return ray


# ---------------------------------------------------------------------------- inputs and output folder


def expand_inputs(patterns):
    """The input files of `refformer batch`: each pattern a file or a glob (expanded here: ray.data.read_* do not
    expand globs), sorted per pattern, each file once (the first spelling kept). Returns [(name as given or
    matched, absolute path)].

    Raises RefformerError for a pattern that matches nothing, a folder, a device or pipe, an unreadable file, or a
    file with a UTF-16/UTF-32 byte-order mark its contents do not match (batch.utf8_bytes; checked here so that the
    run fails before Ray starts, not in a worker).
    """
    from refformer.runtime.batch import BOMS, utf8_bytes

    found, seen = [], set()
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches or not os.path.lexists(matches[0]):
            what = "no file matches" if glob.has_magic(pattern) else "input file does not exist:"
            raise RefformerError(f"{what} {shown(pattern)}")
        for name in matches:
            path = Path(name)
            if path.is_dir():
                raise RefformerError(f"input {shown(name)} is a folder; give JSONL files or a glob such as "
                                     f"'{shown(name)}/*.jsonl'")
            if not path.exists():
                raise RefformerError(f"input {shown(name)} is a symbolic link that leads nowhere")
            if not stat.S_ISREG(path.stat().st_mode):
                raise RefformerError(f"input {shown(name)} is not a regular file (a device or a pipe)")
            try:
                with open(path, "rb") as file:
                    head = file.read(4)
                    if any(head.startswith(bom) for bom, encoding in BOMS if encoding != "utf-8"):
                        utf8_bytes(head + file.read())
            except OSError as error:
                raise RefformerError(f"cannot read input {shown(name)}: {error.strerror or error}") from None
            except RefformerError as error:
                raise RefformerError(str(error).replace("--input", f"input {shown(name)}", 1)) from None
            real = os.path.realpath(path)
            if real not in seen:
                seen.add(real)
                found.append((name, os.path.abspath(path)))
    return found


def input_blocks(inputs, batch_size, enough):
    """How many blocks of batch_size lines the inputs (expand_inputs' pairs) make, counted no further than enough
    (each file's lines are blocked on their own; a file is read in 1 MiB chunks only until enough blocks are found,
    so a large corpus is not read twice). Lines are counted at \n, \r\n and \r, as batch.read_inputs splits
    them. Raises RefformerError for a file that cannot be read."""
    blocks = 0
    for name, path in inputs:
        lines, last = 0, b""
        try:
            with open(path, "rb") as file:
                while blocks + -(-lines // batch_size) < enough and (chunk := file.read(1 << 20)):
                    lines += chunk.count(b"\n") + chunk.count(b"\r") - chunk.count(b"\r\n")
                    last = chunk[-1:]
        except OSError as error:
            raise RefformerError(f"cannot read input {shown(name)}: {error.strerror or error}") from None
        lines += last not in (b"", b"\n", b"\r")  # a last line without a line break
        blocks += -(-lines // batch_size)
        if blocks >= enough:
            return enough
    return blocks


def check_model_loads(model_dir, provider, dtype, threads, truncate, variant):
    """Build the Generator each worker builds, once, on the driver before a local cluster starts: a model folder
    that cannot load or export is one line here, not a worker's traceback (repeated by Ray for each retry), and a
    missing export set is written once, not by every worker at the same time. Raises RefformerError as Generator
    does."""
    from refformer.runtime.generator import Generator

    Generator(model_dir, provider=provider, dtype=dtype, threads=threads, truncate=truncate, variant=variant)


def check_out_dir(out_dir, overwrite, inputs, model_dir):
    """Refuse --out before Ray starts: a file, a folder whose parent is missing or not writable, a folder inside
    refformer's package folder or the model folder (or holding it), one that holds an input file (--overwrite would
    delete it), or a folder that exists and is not empty without --overwrite. inputs: expand_inputs' pairs.

    Raises RefformerError.
    """
    from refformer.runtime.options import resolve_model
    from refformer.runtime.outputs import refuse_package_folder

    out = Path(out_dir)
    if not str(out_dir).strip():
        raise RefformerError("--out is empty; give a folder name")
    if out.is_symlink() and not out.exists():
        raise RefformerError(f"--out {shown(out_dir)} is a symbolic link that leads nowhere; remove it or give "
                             "another folder")
    if out.exists() and not out.is_dir():
        raise RefformerError(f"--out {shown(out_dir)} exists and is not a folder; give a folder name")
    real = Path(os.path.realpath(out))
    parent = real.parent
    if not parent.is_dir():
        raise RefformerError(f"--out {shown(out_dir)}: folder {shown(parent)} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise RefformerError(f"--out {shown(out_dir)}: folder {shown(parent)} is not writable (the output is "
                             "staged beside --out)")
    refuse_package_folder(out_dir, "--out")
    try:
        model = Path(os.path.realpath(resolve_model(model_dir)))
    except RefformerError:
        model = None
    if model is not None and (real == model or model in real.parents or real in model.parents):
        raise RefformerError(f"--out {shown(out_dir)} is or holds the model folder {shown(model)}; write the "
                             "results to another folder")
    for name, path in inputs:
        if real in Path(os.path.realpath(path)).parents:
            raise RefformerError(f"--out {shown(out_dir)} holds the input file {shown(name)} (--overwrite would "
                                 "delete it); write the results to another folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise RefformerError(f"--out {shown(out_dir)} exists and is not empty; pass --overwrite to replace its "
                             "contents (at the end of the run)")


def staging_folder(out_dir):
    """A new empty folder beside out_dir (.NAME.tmp-PID-XXXX) where the workers write the shards: on a cluster it
    lies on the same shared file system as out_dir. Raises OSError when it cannot be made."""
    import uuid

    real = Path(os.path.realpath(out_dir))
    stage = real.parent / f".{real.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    stage.mkdir()  # with the user's umask, as OUT_DIR itself would be
    return stage


def replace_out_dir(stage, out_dir):
    """Move the finished stage folder to out_dir; an existing out_dir (checked by check_out_dir: empty, or
    --overwrite given) is moved aside first and removed after. Raises OSError when a rename fails (out_dir is then
    as it was)."""
    real = Path(os.path.realpath(out_dir))
    if real.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{real.name}.old-{os.getpid()}-", dir=real.parent))
        os.rename(real, old / "out")
        try:
            os.rename(stage, real)
        except OSError:
            os.rename(old / "out", real)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(stage, real)


# ---------------------------------------------------------------------------- the pipeline's functions


def file_lines(row, names):
    """flat_map: one file's row {"bytes", "path"} (read_binary_files, include_paths) -> one row per line, as
    batch.read_inputs reads it: {"file": the name given, "line": N (from 1), "input": the JSON of [text or null,
    error or null, pass-through fields ("id")]}. One JSON string, not nullable columns: Ray Data turns a column of
    nulls into NaN. names: {absolute path: name given}.

    Raises RefformerError (batch.utf8_bytes) for a byte-order mark that does not match; expand_inputs checked it
    already.
    """
    from refformer.runtime.batch import read_inputs

    name = names.get(row["path"], row["path"])
    return [{"file": name, "line": number, "input": json.dumps([text, error, extra])}
            for number, text, error, extra in read_inputs(bytes(row["bytes"]))]


class RecordList:
    """The writer generate_records writes each batch's records to (batch.RecordWriter's write, kept in a list)."""

    file = None  # generate_records reads it to decide on a progress bar: none in a worker

    def __init__(self):
        self.records = []

    def write(self, records):
        """Keep one batch's records (dicts). Raises nothing."""
        self.records.extend(records)


TRUNCATED = re.compile(r"^warning: line (\d+) ")


class BatchWorker:
    """The map_batches callable of `refformer batch`: one Generator per actor (built once, in __init__), and per
    batch of line rows the records generate --json writes for them (batch.generate_records), rendered as JSON lines
    (batch.RecordWriter.render) with "file" added first.

    BatchWorker(...) raises RefformerError as Generator does (a bad model folder, an export that fails).
    """

    def __init__(self, model_dir, provider, dtype, threads, truncate, variant, generation):
        """generation: the run's GenerationOptions (its seed drawn once by the driver, so that every worker samples
        with the same seed); the rest as Generator's arguments."""
        from refformer.runtime.batch import RecordWriter
        from refformer.runtime.generator import Generator

        self.generator = Generator(model_dir, provider=provider, dtype=dtype, threads=threads, truncate=truncate,
                                   variant=variant)
        self.generation = generation
        self.renderer = RecordWriter(None, as_json=True)

    def __call__(self, batch):
        """batch: {"file", "line", "input"} (columns of N rows, from file_lines) -> {"file", "line", "record",
        "failed", "warning"} (N rows: the record's JSON line; whether the line failed; the truncation warning of
        the line, "" when none, naming the file). Rows keep their order within a file; each file's lines are
        generated together (a row's output does not depend on the other rows: refimpl/generate.py).

        Raises what generate_records raises (RefformerError for options this model refuses).
        """
        from refformer.runtime.batch import generate_records

        rows = [(str(file), int(line), *json.loads(text_error_extra))
                for file, line, text_error_extra in zip(batch["file"], batch["line"], batch["input"])]
        out = {"file": [], "line": [], "record": [], "failed": [], "warning": []}
        for name in dict.fromkeys(file for file, *_ in rows):
            lines = [(line, text, error, extra) for file, line, text, error, extra in rows if file == name]
            records, warnings = RecordList(), []
            self.generator.collected_warnings = warnings
            generate_records(self.generator, self.generation, lines, records, name, len(lines))
            by_line = {int(match[1]): f"warning: {name} {warning.removeprefix('warning: ')}"
                       for warning in warnings if (match := TRUNCATED.match(warning))}
            for record in records.records:
                out["file"].append(name)
                out["line"].append(record["line"])
                out["record"].append(self.renderer.render({"file": name, **record}))
                out["failed"].append("error" in record)
                out["warning"].append(by_line.get(record["line"], ""))
        return out


def records_datasink(path):
    """A Ray Data datasink writing the "record" column of each block as JSON lines to path/part-NNNNNN.jsonl (one
    file per write task, of ROWS_PER_SHARD records or the rest, its rows sorted by file and line); its write
    returns the counts that on_write_complete adds up in .summary ({"records", "failures", "warnings", "files"}) on
    the driver.

    Raises nothing; writing raises OSError for a file that cannot be written.
    """
    from ray.data.block import BlockAccessor
    from ray.data.datasource import BlockBasedFileDatasink, FilenameProvider

    class ShardNames(FilenameProvider):
        def get_filename_for_block(self, block, write_uuid, task_index, block_index):
            return f"{SHARD_PREFIX}{task_index:06d}-{block_index:03d}{SHARD_SUFFIX}"

        def get_filename_for_task(self, write_uuid, task_index):
            return f"{SHARD_PREFIX}{task_index:06d}{SHARD_SUFFIX}"

    class RecordsDatasink(BlockBasedFileDatasink):
        def __init__(self, path):
            super().__init__(path, filename_provider=ShardNames(), try_create_dir=False,
                             min_rows_per_file=ROWS_PER_SHARD)
            self.summary = {"records": 0, "failures": 0, "warnings": [], "files": 0}

        def write(self, blocks, ctx):
            import pyarrow

            tables = [BlockAccessor.for_block(block).to_arrow() for block in blocks]
            table = pyarrow.concat_tables(tables) if tables else None
            if table is None or table.num_rows == 0:
                return {"records": 0, "failures": 0, "warnings": [], "files": 0}
            self.write_block(BlockAccessor.for_block(table), 0, ctx)
            return {"records": table.num_rows, "failures": sum(table.column("failed").to_pylist()),
                    "warnings": [warning for warning in table.column("warning").to_pylist() if warning],
                    "files": 1}

        def write_block_to_file(self, block, file):
            table = block.to_arrow()
            rows = sorted(zip(table.column("file").to_pylist(), table.column("line").to_pylist(),
                              table.column("record").to_pylist()))
            file.write("".join(record + "\n" for _, _, record in rows).encode("utf-8"))

        def on_write_complete(self, write_result):
            for counts in write_result.write_returns:
                if counts:
                    for key in self.summary:
                        self.summary[key] += counts[key]

    return RecordsDatasink(path)


# ---------------------------------------------------------------------------- the cluster


def check_reachable(address, timeout=10.0):
    """A host:port address must accept a TCP connection within timeout seconds: ray.init retries an unreachable
    one for minutes. Other forms ("auto", "ray://host:port") are left to Ray. Raises RefformerError."""
    import socket

    host, colon, port = address.rpartition(":")
    if not colon or not port.isdigit() or "//" in address:
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as error:
        raise RefformerError(f"cannot connect to the Ray cluster at --ray-address {address}: "
                             f"{error.strerror or error}; start it with `ray start --head` there, or leave "
                             "--ray-address out for a local cluster") from None


class Cluster:
    """The Ray connection of one run: an existing one (ray.is_initialized(): a test's, a notebook's) used as it is;
    --ray-address ADDR connected to; else a local cluster of num_cpus logical CPUs with its session files in a new
    folder under the system temp folder. close() disconnects (ray.shutdown: a local cluster's processes stop) and
    removes that folder.

    Cluster(...) raises RefformerError when the cluster cannot be started or reached.
    """

    def __init__(self, address, num_cpus):
        import logging

        ray = import_ray()
        self.ray, self.owned, self.temp_dir = ray, False, None
        if address is not None:
            check_reachable(address)
        if ray.is_initialized():
            return
        self.owned = True  # from here on close() disconnects, also after a failed start
        quiet = dict(log_to_driver=False, logging_level=logging.WARNING, include_dashboard=False)
        try:
            if address is not None:
                ray.init(address=address, **quiet)
            else:
                os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local cluster: no token warning
                self.temp_dir = tempfile.mkdtemp(prefix="refformer-ray-")
                ray.init(num_cpus=num_cpus, _temp_dir=self.temp_dir, **quiet)
        except Exception as error:  # noqa: BLE001  (Ray raises ConnectionError, RuntimeError, ValueError ...)
            self.close()
            where = f"connect to the Ray cluster at {address}" if address else "start a local Ray cluster"
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise RefformerError(f"cannot {where}: {reason}") from None
        logging.getLogger("ray.data").setLevel(logging.ERROR)  # its INFO lines and the progress-bar notice

    def cpus(self):
        """The cluster's logical CPUs now (an autoscaling cluster may add more). Raises nothing."""
        return int(self.ray.cluster_resources().get("CPU", 0))

    def close(self):
        """Disconnect (and stop a local cluster) if this run connected; remove the local session folder. Raises
        nothing."""
        if self.owned and self.ray.is_initialized():
            self.ray.shutdown()
        self.owned = False
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self.temp_dir = None


def ray_failure(error):
    """A RefformerError of one line for an exception out of Ray: the RefformerError a worker raised when there is
    one (RayTaskError.cause, Ray Data's wrappers' __cause__), else the error's type and first line. Raises
    nothing."""
    seen = set()
    current = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, RefformerError):
            return RefformerError(str(current))
        # an actor whose __init__ raised (ActorDiedError) keeps its cause as text only: the traceback's last line
        raised = re.findall(r"^refformer\.refimpl\.errors\.RefformerError: (.+)$", str(current), re.MULTILINE)
        if raised:
            return RefformerError(raised[-1])
        current = getattr(current, "cause", None) or current.__cause__ or current.__context__
    reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return RefformerError(f"the Ray job failed: {type(error).__name__}{': ' + reason if reason else ''}")


def run_batch(inputs, out_dir, *, generation, workers, threads, gpus_per_worker=0.0, batch_size=16,
              model_dir=None, provider="auto", dtype="fp32", variant="auto", truncate=False, cluster=None,
              worker_class=BatchWorker):
    """Run every line of inputs (expand_inputs' pairs) on a pool of `workers` actors and write the records to a
    staging folder that replaces out_dir (checked by check_out_dir) at the end. Each actor reserves `threads` CPUs
    (its ONNX Runtime intra-op threads) and gpus_per_worker GPUs (Ray's num_gpus; with provider auto or cuda the
    Generator uses CUDA when it can load it). generation: a GenerationOptions; batch_size: lines per map_batches
    call. cluster: a connected Cluster. worker_class: BatchWorker or a subclass (the tests inject a worker that
    dies).

    Returns the datasink's summary {"records", "failures", "warnings", "files"}. Raises RefformerError when the job
    fails (ray_failure: a worker's RefformerError, or the Ray error's first line), KeyboardInterrupt on Ctrl-C; out_dir
    is then as it was and the staging folder removed.
    """
    ray = cluster.ray
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    names = {path: name for name, path in inputs}
    stage = staging_folder(out_dir)
    try:
        # reading, splitting and writing reserve no CPU: the actors hold them all (2 one-CPU workers on a 2-CPU
        # cluster), and a read task waiting for a CPU an actor holds would wait for ever
        dataset = ray.data.read_binary_files([path for _, path in inputs], include_paths=True, num_cpus=0)
        dataset = dataset.flat_map(file_lines, fn_kwargs={"names": names}, num_cpus=0)
        # blocks of batch_size lines (streamed, not shuffled): a file is one block after the read, which one actor
        # would take whole
        dataset = dataset.repartition(target_num_rows_per_block=batch_size)
        dataset = dataset.map_batches(
            worker_class, batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=threads, num_gpus=gpus_per_worker or None,
            fn_constructor_kwargs=dict(model_dir=None if model_dir is None else os.path.abspath(model_dir),
                                       provider=provider, dtype=dtype, threads=threads, truncate=truncate,
                                       variant=variant, generation=generation))
        sink = records_datasink(str(stage))
        try:
            with warnings.catch_warnings():  # Ray Data's notice that a pool has more actors than blocks to give them
                warnings.filterwarnings("ignore", message="The minimum number of concurrent actors",
                                        category=UserWarning)
                dataset.write_datasink(sink, ray_remote_args={"num_cpus": 0})
        except KeyboardInterrupt:
            raise
        except Exception as error:  # noqa: BLE001  (one line, not Ray's traceback)
            raise ray_failure(error) from None
        replace_out_dir(stage, out_dir)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return sink.summary
