"""``phi-helpers predict`` on Ray Data: the same tasks, prompts and records, on one machine or a cluster.

    import ray
    from phi_helpers.cli.ray_engine import item_dataset, predict_dataset, start_ray, write_records

    start_ray()                                   # a local Ray; start_ray("ray://head:10001") joins a cluster
    items = item_dataset(["scans/"])              # folders, globs, PDFs, files; or "s3://bucket/scans/"
    records = predict_dataset(items, "ocr", model="microsoft/Phi-3.5-vision-instruct", replicas=2)
    write_records(records, "scans.jsonl")         # or "scans.parquet"
    ray.shutdown()

How the work is split:

* ``item_dataset`` makes a Ray Dataset with one row per image or page (of a PDF or a multi-page TIFF):
  ``{"source", "page", "path", "modified"}``, the same keys as ``collect_all`` (local paths, globs, PDFs
  and TIFFs are listed by ``collect_items`` itself). Sources on another filesystem (``s3://``, ``gs://``,
  ``file://``..., whatever ``pyarrow.fs`` opens) are listed here and their PDFs and TIFFs are split into
  pages by Ray tasks. Pixels are read inside the replicas.
* ``predict_dataset`` runs ``Replica`` in a pool of ``replicas`` Ray actors (one GPU each when the
  cluster has GPUs, else CPU). Each replica loads the model once and runs batches of ``batch_size``
  items through ``predict_items``, the function the in-process CLI uses, and builds each line with
  ``make_record``: the records are the CLI's by construction. A bad item gets its error record; a
  replica that dies is restarted by Ray (``REPLICA_RESTARTS`` times at most) and its batch is run again.
  A model that cannot load fails the replica at its start, and the run with the model's own message
  (the command line checks a local model folder's files before Ray starts: ``check_model``).
* ``write_records`` streams the records to the driver (with their progress and a ``failed:`` line per
  error, as the CLI shows them) and writes them there: a JSONL file (appended; the same file the CLI
  writes), or a Parquet folder of part files of ``ROWS_PER_PART`` records each.

Ray is an optional extra (``INSTALL_RAY``: ``pip install "ray[data]>=2.60,<2.64"``). This module imports without it; the
functions raise ``RayNotInstalledError`` when it is missing.
"""

import contextlib
import importlib.util
import json
import logging
import os
import secrets
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pypdfium2 as pdfium
from transformers.utils import logging as hf_logging

from ..api.images import WEB_SCHEMES, count_pages, load_image, load_page, url_scheme
from ..api.hardware import GIB, HALF_DTYPES
from ..api.loading import check_dtype, check_model_source, planned_memory_gib, requested_model_id
from ..api.quantization import check_quantize
from ..errors import (
    CommandLineError, DeviceUnavailableError, ImageLoadError, InvalidArgumentError, ModelLoadError, RayNotInstalledError,
    expand_home,
)
from .inputs import (
    UNREADABLE_SUFFIXES, Item, collect_all, is_pdf, is_supported, is_tiff, item_at, render_pdf_page, terminal_safe,
    warn_left_out,
)
from .outputs import (
    JsonlWriter, OutputLock, Progress, check_answers, check_output_path, failure_line, finish_run, input_files, make_record,
    model_info, nothing_left, resume, terminate_as_interrupt,
)
from .tasks import BATCH_MAX_NEW_TOKENS, BATCH_SIZE, ModelLoader, loaded_request, predict_items, request_fields

USAGE_STATS_VARIABLE = "RAY_USAGE_STATS_ENABLED"  # start_ray sets it to 0 for a local Ray
LOCAL_OBJECT_STORE_BYTES = 256 * 1024**2  # a local Ray's shared memory: items and records are small
# Ray hands out work by blocks: small blocks spread the items over the replicas (Ray Data joins blocks
# into batches of batch_size). Items are two small fields, so blocks stay cheap up to many thousands.
ITEMS_PER_BLOCK = 4
MAX_BLOCKS = 10_000
# A replica whose process dies (killed for memory: the model on a CPU takes ~15 GiB per replica) is
# restarted this many times at most; then the run fails (Ray's ActorDiedError) instead of reloading forever.
REPLICA_RESTARTS = 3
# A Parquet output is a folder of part files that the driver writes as the records arrive, one per this
# many records (the last one holds the rest): few files, none tiny, and no Ray task besides the replicas.
ROWS_PER_PART = 10_000

# The columns of a Parquet output, in record order. ``answer`` is text: the answer of caption, ocr and
# vqa, the JSON text of an extract answer. Fields of a record not named here go to ``extra`` (JSON text).
PARQUET_COLUMNS = {
    "source": "string", "page": "int64", "path": "string", "modified": "int64", "task": "string", "schema": "string",
    "error": "string", "prompt": "string", "answer": "string", "valid": "bool", "errors": "list<string>", "raw": "list<string>",
    "attempts": "int64", "image_size": "list<int64>", "model": "string", "device": "string", "dtype": "string",
    "attention": "string", "num_crops": "int64", "prompt_tokens": "int64", "generated_tokens": "int64",
    "seconds_to_first_token": "double", "total_seconds": "double", "batch_size": "int64", "extra": "string",
}


# What the extra "ray" of pyproject.toml installs (phi_helpers is installed from its repository, not PyPI).
INSTALL_RAY = 'pip install "ray[data]>=2.60,<2.64"  (in the repository: pip install -e ".[ray]")'
INSTALL_RAY_CLIENT = 'pip install "ray[data,client]>=2.60,<2.64"'  # a ray://HEAD:10001 address: Ray Client (gRPC)


def require_ray():
    """Import and return ``ray`` (with Ray Data), or raise ``RayNotInstalledError`` saying what to install."""
    try:
        ray = importlib.import_module("ray")
        importlib.import_module("ray.data")
    except ImportError as error:
        raise RayNotInstalledError(
            f"The Ray engine needs Ray Data, which is not installed ({error}). Install it with: {INSTALL_RAY}"
        ) from None
    return ray


def start_ray(address: str | None = None, num_cpus: int | None = None, dashboard: bool | None = None):
    """Connect to the Ray cluster at ``address``, or start a local Ray on this machine (``None``).

    Returns Ray's context; ``dashboard_url(context)`` is where the Ray dashboard is. Reuses the Ray
    this process already started or joined. A local Ray gets ``num_cpus`` CPUs (default: this
    machine's count), a small object store, quiet logs and no usage statistics sent to Ray's servers
    (``RAY_USAGE_STATS_ENABLED=0`` unless set already); stop it with ``ray.shutdown()``.
    ``dashboard``: ``None`` starts the dashboard when its packages are installed
    (``pip install "ray[default]"``; ``INSTALL_RAY`` installs only Ray Data), ``False`` never.

    Logs: a local Ray keeps what its workers print (each replica's model line, Ray's own warnings and
    crash reports) out of this process's output, in files of its session folder:
    ``/tmp/ray/session_latest/logs`` (``worker-*.out`` and ``worker-*.err``; the dashboard shows them
    too). What a replica has to say about an item comes back in that item's record (``"error"``). A
    cluster joined with ``address`` sends its workers' lines here, as Ray does by default.

    Raises ``DeviceUnavailableError`` when Ray does not start (a busy machine: "timed out during
    startup") or the cluster at ``address`` cannot be reached, saying what to do.
    """
    ray = require_ray()
    if ray.is_initialized():
        return ray.get_runtime_context()
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # not a line per dataset execution
    if address:
        if address.startswith("ray://") and importlib.util.find_spec("grpc") is None:
            raise RayNotInstalledError(
                f"Joining a cluster at '{address}' goes through Ray Client, which needs gRPC, not installed here. "
                f"Install it with: {INSTALL_RAY_CLIENT} (or run on the cluster's head node with --address auto)."
            )
        try:
            return ray.init(address=address, logging_level="ERROR")
        except Exception as error:  # noqa: BLE001  (Ray raises ConnectionError, or a bare Exception)
            raise DeviceUnavailableError(
                f"Could not connect to the Ray cluster at '{address}' ({_error_text(error)}). Check the address "
                "(e.g. auto on the cluster's head node, or ray://HEAD:10001) and that the cluster is up."
            ) from None
    # A local Ray reports usage statistics to usage-stats.ray.io by default: off, unless the user set
    # RAY_USAGE_STATS_ENABLED themselves (a cluster joined with an address keeps its own setting). Ray's
    # dashboard process still probes the cloud metadata address once, whatever the setting: docs/scaling.md.
    os.environ.setdefault(USAGE_STATS_VARIABLE, "0")
    try:
        return ray.init(
            address="local",  # a new Ray, even when one runs on this machine already (or RAY_ADDRESS names one)
            num_cpus=num_cpus or os.cpu_count(),
            object_store_memory=LOCAL_OBJECT_STORE_BYTES,
            include_dashboard=dashboard,
            logging_level="ERROR",
            log_to_driver=False,  # workers' lines go to the session folder's files (see above)
        )
    except Exception as error:  # noqa: BLE001  (Ray's start-up timeout is a bare Exception)
        ray.shutdown()
        raise DeviceUnavailableError(
            f"Ray did not start on this machine ({_error_text(error)}). The machine is probably busy: run it again "
            "(start_ray(), or the same command); if it fails again, close other notebooks' kernels and programs "
            "that use much CPU or memory, or restart this kernel, which also ends the Ray processes this try left."
        ) from None


def _error_text(error: BaseException) -> str:
    """Ray's message on one line, ending without a full stop (it is put in brackets)."""
    return " ".join(str(error).split()).rstrip(".") or type(error).__name__


def dashboard_url(context) -> str | None:
    """The Ray dashboard's address as a link, or ``None`` when Ray runs without one."""
    url = getattr(context, "dashboard_url", None)
    if not url:
        return None
    return url if "://" in url else f"http://{url}"


# ----------------------------------------------------------------------------------------------
# Items
# ----------------------------------------------------------------------------------------------


def item_dataset(specs: list[str] | str, skip: set | None = None, local: list[Item] | None = None):
    """A Ray Dataset of the items that ``specs`` name: one row ``{"source", "page", "path", "modified"}`` per
    image or page of a PDF or multi-page TIFF (``path`` and ``modified``: see ``Item``; None for a remote file).

    Local files, folders, globs, PDFs and http(s) URLs give exactly the items of ``collect_all``
    (in the same order). A URI of another filesystem (``s3://bucket/scans/``, ``gs://...``,
    ``file:///...``) names a file or a folder (its files, not its sub-folders, sorted); its PDFs and
    TIFFs are split into pages by Ray tasks. ``skip``: keys ``(source, page)`` to leave out (finished items).
    ``local``: the local items when they are already collected (their folders are not listed again).
    Unlike ``collect_all``, says nothing about what folders and patterns left out (the command line does).

    Raises ``InvalidArgumentError`` when Ray is not running: call ``start_ray()`` first (Ray would
    otherwise start a default Ray of its own here, which a later ``start_ray()`` would reuse).
    """
    ray = require_ray()
    if not ray.is_initialized():
        raise InvalidArgumentError(
            "Ray is not running: start it with start_ray() first, then make the items with item_dataset(...)."
        )
    specs = [specs] if isinstance(specs, str) else list(specs)
    skip = skip or set()
    if local is None:
        local = collect_all([spec for spec in specs if not is_remote(spec)], report=False)
    rows = [{"source": item.source, "page": item.page, "path": item.path, "modified": item.modified}
            for item in local if item.key not in skip]
    blocks = min(-(-len(rows) // ITEMS_PER_BLOCK), MAX_BLOCKS)
    datasets = [ray.data.from_items(rows, override_num_blocks=blocks)] if rows else []
    remote_files = [uri for spec in specs if is_remote(spec) for uri in list_remote(spec)]
    if remote_files:
        files = ray.data.from_items([{"source": uri, "page": None, "path": None, "modified": None} for uri in remote_files])
        pages = files.flat_map(_RemotePages(frozenset(skip)), num_cpus=0)  # I/O: leave the CPUs to the replicas
        datasets.append(pages)
    if not datasets:
        datasets = [ray.data.from_items([{"source": "", "page": 0, "path": "", "modified": 0}]).limit(0)]
    dataset = datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]
    dataset._phi_helpers_ray = _ray_session(ray)  # its rows live in this Ray's object store (predict_dataset checks)
    return dataset


def _ray_session(ray) -> tuple | None:
    """Which Ray connection this process has, or None: the driver's node id (new when a local Ray starts
    again) and job id (new when the driver connects to a running cluster again)."""
    try:
        context = ray.get_runtime_context()
        return (context.get_node_id(), context.get_job_id()) if ray.is_initialized() else None
    except Exception:  # noqa: BLE001  (a client connection without it: no check)
        return None


def is_remote(spec: str) -> bool:
    """True for a URI that a filesystem opens (``s3://``...); http(s) URLs and local paths are not."""
    return url_scheme(spec) not in (None, *WEB_SCHEMES)  # http(s): fetched by the replicas (load_image)


def list_remote(uri: str) -> list[str]:
    """The image and PDF files at ``uri``: the file itself, or a folder's files (sorted by name)."""
    from pyarrow import fs  # installed with ray[data]

    filesystem, path = _filesystem(uri)
    scheme = uri.split("://", 1)[0]
    info = filesystem.get_file_info(path)
    if info.type == fs.FileType.NotFound:
        raise ImageLoadError(f"Nothing at '{uri}'. Check the bucket and path, and your credentials for {scheme}://.")
    if info.type == fs.FileType.File:
        return [uri]
    found = filesystem.get_file_info(fs.FileSelector(path, recursive=False))
    found = [f for f in found if f.type == fs.FileType.File and not f.base_name.startswith(".")]  # as local folders
    files = sorted(f.path for f in found if is_supported(f.path))
    if not files:
        raise ImageLoadError(f"The folder '{uri}' contains no image or PDF files.")
    warn_left_out(sorted(Path(f.path) for f in found if Path(f.path).suffix.lower() in UNREADABLE_SUFFIXES), uri)
    return [_uri(scheme, p) for p in files]


@dataclass(frozen=True)
class _RemotePages:
    """flat_map: a remote file -> its items (one per page for a PDF or a multi-page TIFF, the file itself
    otherwise, as ``collect_items`` does for local files)."""

    skip: frozenset = frozenset()

    def __call__(self, row: dict) -> list[dict]:
        uri = row["source"]
        return [{"source": uri, "page": page, "path": None, "modified": None}
                for page in _remote_pages(uri) if (uri, page) not in self.skip]


def _remote_pages(uri: str) -> list[int | None]:
    """The pages of a remote file, numbered as ``collect_items`` numbers a local file's: 1..n for a PDF or
    a multi-page TIFF (whose pixels are not decoded here); ``[None]`` for an image, a one-page TIFF, or a
    file whose pages cannot be counted (its error is reported when the replica loads it)."""
    if not (is_pdf(uri) or is_tiff(uri)):
        return [None]
    try:
        data = _read_uri(uri)
        count = len(pdfium.PdfDocument(data)) if is_pdf(uri) else count_pages(data)
    except Exception:  # noqa: BLE001  (reported as this item's error when the replica loads it)
        return [None]
    if count == 0 or (count == 1 and is_tiff(uri)):
        return [None]
    return list(range(1, count + 1))


def remote_item(uri: str, page: int | None) -> Item:
    """An item whose pixels are read from a filesystem URI (a PDF page is rendered from the file's bytes,
    a TIFF page decoded from them as ``load_page`` does)."""
    def load():
        data = _read_uri(uri)
        if page is not None and is_tiff(uri):
            return load_page(data, page)
        if page is None and not is_pdf(uri):
            return load_image(data)
        return render_pdf_page(uri, page or 1, data=data)  # with its checks: the pixel limit of images

    return Item(uri, page, loader=load)


def _read_uri(uri: str) -> bytes:
    filesystem, path = _filesystem(uri)
    try:
        with filesystem.open_input_stream(path) as stream:
            return stream.read()
    except OSError as error:
        raise ImageLoadError(f"Could not read '{uri}': {error}") from None


def _filesystem(uri: str):
    from pyarrow import fs

    try:
        return fs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as error:
        raise ImageLoadError(f"Cannot open '{uri}': {error}") from None


def _uri(scheme: str, path: str) -> str:
    return f"{scheme}://{path}"


# ----------------------------------------------------------------------------------------------
# Replicas
# ----------------------------------------------------------------------------------------------


@dataclass
class Replica:
    """A Ray Data callable class: one model replica that turns batches of items into records.

    ``load`` returns ``(model, processor)`` and is called once, when Ray starts the replica.
    """

    load: object
    task: str
    task_options: dict = field(default_factory=dict)
    schema_path: str | None = None
    request: dict | None = None

    def __post_init__(self):
        hf_logging.disable_progress_bar()  # a "Loading weights" bar per replica, all on the driver's stderr
        self.model, self.processor = self.load()
        self.info = model_info(self.model, self.processor)
        if self.request is not None and isinstance(self.load, ModelLoader):  # the commit this replica answers with
            self.request = loaded_request(self.request, requested_model_id(self.load.model))

    def __call__(self, batch):
        """``batch``: a pyarrow table of items ``{"source", "page", "path", "modified"}`` -> ``{"record": [JSON text, ...]}``."""
        rows = batch.to_pylist()
        items = [
            remote_item(row["source"], row["page"]) if is_remote(row["source"])
            else item_at(row["source"], row["page"], row.get("path"), row.get("modified"))
            for row in rows
        ]
        results = predict_items(self.model, self.processor, items, self.task, **self.task_options)
        records = [make_record(result, self.task, self.schema_path, self.info, self.request) for result in results]
        return {"record": [json.dumps(record, ensure_ascii=False) for record in records]}


def predict_dataset(
    items,
    task: str,
    model=None,
    *,
    question: str | None = None,
    schema: dict | None = None,
    schema_path: str | None = None,
    request: dict | None = None,
    max_new_tokens: int = BATCH_MAX_NEW_TOKENS,
    constrain: bool = True,
    batch_size: int = BATCH_SIZE,
    replicas: int = 1,
    gpus_per_replica: float | None = None,
    cpus_per_replica: float = 1,
    device: str = "auto",
    dtype: str = "auto",
    attn: str = "auto",
    num_crops: int | None = None,
    quantize: str | None = None,
):
    """Run ``task`` over a Ray Dataset of items (``item_dataset``); return a lazy Dataset of records.

    Each output row is ``{"record": JSON text}``: the line ``phi-helpers predict`` writes for that item
    (``write_records`` writes them; ``json.loads`` reads one). Nothing runs until the dataset is consumed.

    Args:
        items: a Ray Dataset with columns ``source`` and ``page``, e.g. from ``item_dataset``.
        task, question, schema, max_new_tokens, constrain: as in ``phi_helpers.cli.tasks.predict``.
        model: a hub id, a local folder every node can read, ``"tiny"``; or a function that returns
            ``(model, processor)``, called once in each replica (a model you load your own way).
            ``None``: what ``load_model()`` would load here (``$PHI_HELPERS_MODEL`` of this process,
            else Phi-3.5-vision).
        schema_path: how the schema is named in the records (the CLI's ``--schema``).
        request: the ``"request"`` of every record (the CLI's ``request_fields``, which a re-run
            compares to decide what is already done); ``None`` for records outside the CLI.
        batch_size: items per ``generate`` call inside a replica.
        replicas: model replicas (Ray actors) working in parallel; one GPU each by default.
        gpus_per_replica: ``None``: 1 when the cluster has GPUs, else 0 (CPU replicas).
        cpus_per_replica: CPUs Ray reserves for each replica (and the threads torch uses in it).
        device, dtype, attn, num_crops, quantize: passed to ``load_model`` in each replica (for a model id).
    """
    ray = require_ray()
    made_in = getattr(items, "_phi_helpers_ray", None)
    if not ray.is_initialized() or made_in not in (None, _ray_session(ray)):
        stopped = "Ray is not running" if not ray.is_initialized() else "The items were made in a Ray that has stopped since"
        raise InvalidArgumentError(
            f"{stopped}: start it with start_ray(), then make the items again with item_dataset(...) (a dataset's "
            "rows live in the Ray it was made in, and ray.shutdown() removes them)."
        )
    if gpus_per_replica is None:
        gpus_per_replica = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
    if model is None:
        model = requested_model_id()  # read here: a cluster's workers do not see this process's environment
    load = model if callable(model) else ModelLoader(model and str(model), device, dtype, attn, num_crops, quantize)
    if not callable(model):
        # Planned here, on the driver, where the tiny model's notice is printed once, on stderr (stdout may
        # carry results); the replicas' own lines stay in Ray's logs (start_ray).
        with contextlib.redirect_stdout(sys.stderr):
            need = planned_memory_gib(model, "cpu" if device == "auto" else device, dtype, num_crops, quantize)
        if gpus_per_replica == 0:
            _warn_if_replicas_exceed_memory(ray, replicas, need, dtype, quantize)
    options = {"question": question, "schema": schema, "max_new_tokens": max_new_tokens, "constrain": constrain}
    return items.map_batches(
        Replica,
        fn_constructor_kwargs={
            "load": load, "task": task, "task_options": options, "schema_path": schema_path, "request": request,
        },
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=replicas),
        num_cpus=cpus_per_replica,
        num_gpus=gpus_per_replica,
        # Ray Data's default, -1, would restart a replica that runs out of memory forever. (A **ray_remote_args
        # keyword: deprecated in Ray 2.60, removed in 2.64, hence pyproject's ray<2.64.)
        max_restarts=REPLICA_RESTARTS,
    )  # a replica that dies is restarted and its batch sent again (Ray Data's max_task_retries=-1)


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------


def iter_records(records, total: int | None = None, description: str = "predict"):
    """Yield the record dicts of a ``predict_dataset`` result as they arrive, with their progress on stderr
    (``Progress``: a bar on a terminal, a line now and then elsewhere) and a ``failed:`` line per error."""
    with Progress(total, description) as progress:
        for row in records.iter_rows():
            record = json.loads(row["record"])
            if "error" in record:
                progress.failed(failure_line(record))
            progress.update(1)
            yield record


def write_records(records, path, total: int | None = None, description: str = "predict") -> tuple[int, int]:
    """Write a ``predict_dataset`` result; return ``(records written, records with an error)``.

    The records come to this process as the replicas finish them (``iter_records``: their progress,
    and a ``failed:`` line on stderr per item that failed) and are written here, so no other Ray work
    runs beside the replicas. ``*.parquet`` (a local path or a URI such as ``s3://bucket/out.parquet``):
    a folder of part files of ``ROWS_PER_PART`` records each, with the columns ``PARQUET_COLUMNS``
    (read it back with ``pandas.read_parquet(path)`` or ``ray.data.read_parquet(path)``). Anything
    else: JSON lines appended to the file as they arrive (``JsonlWriter``, like the CLI).
    """
    path = str(path)
    written = failed = 0
    with _writer(path) as writer:
        for record in iter_records(records, total, description):
            writer.write(record)
            written += 1
            failed += "error" in record
    return written, failed


def _writer(path: str):
    """Where ``write_records`` puts the records: a ``ParquetParts`` folder or a ``JsonlWriter`` file."""
    return ParquetParts(path) if path.lower().endswith(".parquet") else JsonlWriter(path)


class ParquetParts:
    """A Parquet output: a folder (made if missing) of part files ``part-RUN-00000.parquet``, ... with
    ``ROWS_PER_PART`` records each, written as they fill (the last one, with the rest, at the end; one
    with no rows when there were no records, so that the folder reads back). ``RUN`` is new for each
    writer, so a second run into the same folder adds its parts next to the first one's.

        with ParquetParts("out.parquet") as out:
            out.write(record)
    """

    def __init__(self, path: str):
        from pyarrow import fs  # installed with ray[data]

        self.filesystem, self.folder = _filesystem(path) if is_remote(path) else (fs.LocalFileSystem(), os.path.abspath(path))
        self.run = secrets.token_hex(4)
        self.rows, self.parts = [], 0

    def __enter__(self) -> "ParquetParts":
        self.filesystem.create_dir(self.folder)
        return self

    def write(self, record: dict) -> None:
        self.rows.append(parquet_row(record))
        if len(self.rows) >= ROWS_PER_PART:
            self._write_part()

    def _write_part(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        name = f"{self.folder}/part-{self.run}-{self.parts:05d}.parquet"
        pq.write_table(pa.Table.from_pylist(self.rows, schema=parquet_schema()), name, filesystem=self.filesystem)
        self.rows, self.parts = [], self.parts + 1

    def __exit__(self, exc_type, *exc_info) -> None:
        if exc_type is None and (self.rows or not self.parts):
            self._write_part()


def parquet_schema():
    """The pyarrow schema of ``PARQUET_COLUMNS``."""
    import pyarrow as pa

    types = {"string": pa.string(), "int64": pa.int64(), "bool": pa.bool_(), "double": pa.float64(),
             "list<string>": pa.list_(pa.string()), "list<int64>": pa.list_(pa.int64())}
    return pa.schema([(name, types[kind]) for name, kind in PARQUET_COLUMNS.items()])


def parquet_row(record: dict) -> dict:
    """A record as a row of ``PARQUET_COLUMNS`` (an extract answer as JSON text, unknown fields in ``extra``)."""
    row = {name: record.get(name) for name in PARQUET_COLUMNS}
    if not isinstance(row["answer"], (str, type(None))):
        row["answer"] = json.dumps(row["answer"], ensure_ascii=False)
    extra = {key: value for key, value in record.items() if key not in PARQUET_COLUMNS}
    row["extra"] = json.dumps(extra, ensure_ascii=False) if extra else None
    return row


def _failed_sources(path: str) -> list[str]:
    """The sources of the records with an ``error`` in a Parquet output, each once, in the order written."""
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["source", "error"])
    return list(dict.fromkeys(source for source, error in zip(table.column("source").to_pylist(),
                                                              table.column("error").to_pylist()) if error is not None))


def _warn_if_replicas_exceed_memory(ray, replicas: int, need: float | None, dtype="auto", quantize=None) -> None:
    """Print one line (on stderr) when ``replicas`` CPU replicas, each holding its own model (``need`` GiB,
    ``planned_memory_gib``), need more memory than the Ray cluster has for tasks: the system would kill
    replicas, which Ray restarts, slowly, until the run fails. A warning, not a refusal (the estimate
    leaves out what other programs free). The advice names only the savings the run does not use yet:
    fewer replicas, bf16 weights (``dtype``), int8 weights (``quantize``)."""
    cluster = ray.cluster_resources().get("memory", 0) / GIB  # Ray's memory for tasks, all nodes together
    if need is None or not cluster or replicas * need <= cluster:
        return
    fit = max(1, int(cluster // need))
    savings = []
    if fit < replicas:
        savings.append(f"replicas={fit} (command line: --replicas {fit})")
    quantize = check_quantize(quantize)
    if quantize is None:
        if check_dtype(dtype) not in HALF_DTYPES:
            savings.append("dtype='bf16' (--dtype bf16)")
        savings.append("quantize='int8' (--quantize int8)")
    elif quantize == "int8":
        savings.append("quantize='int4' (--quantize int4)")
    advice = f" Use {' or '.join(savings)}." if savings else " Use a machine or cluster with more memory."
    print(
        f"Warning: {replicas} replicas each hold their own model, about {need:.1f} GiB each ({replicas * need:.1f} GiB), "
        f"but the Ray cluster has {cluster:.1f} GiB of memory for tasks: replicas may be killed for memory.{advice}",
        file=sys.stderr,
    )


# ----------------------------------------------------------------------------------------------
# The command line: phi-helpers predict ... --engine ray [--address ADDR] [--replicas N]
# ----------------------------------------------------------------------------------------------


def run_ray(args, schema: dict | None, model: str) -> int:
    """``phi-helpers predict --engine ray``: the items of ``--image`` through Ray; the CLI's records and exit code.

    A JSONL ``--output`` is appended to and finished items are skipped, as with the in-process
    engine; a ``.parquet`` output is a new folder. Stops the Ray it started or joined when done (a Ray
    that this process had already started is left running).
    """
    ray = require_ray()  # before anything slow: say what to install
    output = args.output  # a string: a Parquet output may be a URI such as s3://bucket/out.parquet
    parquet = output.lower().endswith(".parquet")
    if parquet and not is_remote(output) and Path(output).exists():
        raise CommandLineError(f"--output '{output}' already exists; Parquet output is a new folder: choose another name.")
    request = request_fields(args, schema, model)
    # A missing file or an empty folder fails here, before Ray starts. A JSONL output is resumed like
    # the in-process engine's (items on a remote filesystem are always run).
    local = collect_all([spec for spec in args.image if not is_remote(spec)])
    if not parquet:
        check_output_path(Path(output), inputs=input_files(local, args.schema))
    if parquet:
        try:
            return _run_on_ray(ray, args, schema, model, request, local, finished=set())
        except KeyboardInterrupt:
            # A Parquet run cannot resume (its records are not read back): an interrupted run keeps nothing (the
            # message says so, app.main). Its folder, with the part files written so far, goes, so that the same
            # command can run again.
            if not is_remote(output):
                shutil.rmtree(output, ignore_errors=True)
            raise
    with OutputLock(output) as lock:  # a JSONL output: one run at a time
        finished = {item.key for item in local} - {item.key for item in resume(output, local, request).todo}
        lock.follow()
        return _run_on_ray(ray, args, schema, model, request, local, finished)


FILES_SHOWN = 10  # the retry advice of a Parquet run names this many failed files, then counts the rest


def check_model(model: str, num_crops: int | None, cluster: bool) -> None:
    """Refuse, before Ray starts, a model that ``load_model`` would refuse in every replica once Ray runs:
    a local folder's missing or broken files, and, on this machine's own Ray (not a ``cluster``, whose
    workers may see folders this machine does not), a path that is neither a folder nor a hub id
    (``check_model_source``). A hub id and the tiny model are left to the replicas (a replica that cannot
    load its model stops the run with its error)."""
    if cluster and not expand_home(model, "model folder", ModelLoadError).is_dir():
        return
    check_model_source(model, num_crops)


ERRORS_MODULE = "phi_helpers.errors."  # how Ray names the class of our own errors in its report


def replica_death_error(error) -> CommandLineError:
    """What the run says when a model replica died (Ray's ``ActorDiedError``).

    A replica that raised while it started (``actor_init_failed``: loading the model failed) died once and is
    not restarted: the message is the error it raised, read from the end of Ray's report of it (phi_helpers'
    own errors say what to do). A replica killed while it ran (most often by the system, for memory) was
    restarted ``REPLICA_RESTARTS`` times before the run gave up."""
    if error.actor_init_failed:
        raised = _raised_at_start(str(error)) or _error_text(error)
        if raised.startswith(ERRORS_MODULE):
            return CommandLineError(f"A model replica could not load the model: {raised.split(': ', 1)[-1]}")
        return CommandLineError(
            f"A model replica could not load the model ({raised}). The whole report is in Ray's worker logs "
            "(a local Ray's: /tmp/ray/session_latest/logs)."
        )
    return CommandLineError(
        f"A model replica died {REPLICA_RESTARTS + 1} times, so the run stopped ({_error_text(error)}). The likely "
        "cause is memory: the system kills a process that takes too much, and each replica holds a whole "
        "model (about 15 GiB for Phi-3(.5)-vision in fp32 on a CPU). Use fewer --replicas, --dtype bf16 or "
        "--quantize int8, or a machine with more memory; with a .jsonl --output the results written so "
        "far are kept and the same command goes on from there."
    )


def _raised_at_start(report: str) -> str:
    """``Type: message``, the exception at the end of Ray's report of a replica that failed to start: the lines
    after the traceback's last frame (its frames and their code are indented), on one line."""
    lines = report.strip().splitlines()
    start = len(lines)
    while start > 0 and not lines[start - 1].startswith(" "):
        start -= 1
    return " ".join(" ".join(lines[start:]).split())


def _parquet_retry(output: str) -> str:
    """How to run the failed items of a Parquet output again: the --image values that name their files."""
    sources = _failed_sources(output)
    named = terminal_safe(" ".join(shlex.quote(source) for source in sources[:FILES_SHOWN]))
    if len(sources) > FILES_SHOWN:
        named += f" (and {len(sources) - FILES_SHOWN} more files: the failed: lines above name them all)"
    return f"a Parquet output is written once: run them again into a new --output, with --image {named}"


def _run_on_ray(ray, args, schema: dict | None, model: str, request: dict, local: list[Item], finished: set) -> int:
    """The part of ``run_ray`` that starts (or joins) Ray, runs the items not ``finished`` and writes them."""
    output, parquet = args.output, args.output.lower().endswith(".parquet")
    remote = any(is_remote(spec) for spec in args.image)  # listed by Ray: how many is known only once it runs
    total = None if remote else sum(item.key not in finished for item in local)
    if total == 0:  # a finished re-run: said and checked as the in-process engine does, without starting Ray
        return nothing_left(output, local, args.max_new_tokens)
    if not (args.address or "").startswith("ray://"):  # a Ray Client's driver may not see the cluster's files
        check_model(model, args.num_crops, cluster=bool(args.address))  # said now, not by every replica later
    started_here = not ray.is_initialized()
    context = start_ray(args.address)
    # SIGTERM (timeout, scancel, docker stop, kill) ends the run as Ctrl-C does: Ray stopped, exit 143 (the
    # handler ray.init installed would abort the process and leave the local Ray's processes behind).
    try:
        with terminate_as_interrupt():
            url = dashboard_url(context)
            if url:
                print(f"Ray dashboard: {url}", file=sys.stderr)
            ray.data.DataContext.get_current().enable_progress_bars = False  # ours counts records, on stderr
            # ...and not Ray Data's warning that says how to turn its own back on ("Progress bars disabled. To
            # enable, ..."): the warnings of its progress module are dropped, its errors still show.
            logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
            items = item_dataset(args.image, skip=finished, local=local)
            records = predict_dataset(
                items, args.task, model, question=args.prompt, schema=schema, schema_path=args.schema,
                request=request, max_new_tokens=args.max_new_tokens, constrain=args.constrain, batch_size=args.batch_size,
                replicas=min(args.replicas or 1, total or sys.maxsize),
                device=args.device, dtype=args.dtype, attn=args.attn, num_crops=args.num_crops,
                quantize=args.quantize,
            )
            try:
                written, failed = write_records(records, output, total, args.task)
            except ray.exceptions.ActorDiedError as error:
                raise replica_death_error(error) from None
    finally:
        if started_here:
            ray.shutdown()
    if parquet:
        return finish_run(written, failed, output, retry=_parquet_retry(output) if failed else "")
    code = finish_run(written, failed, output)
    return max(code, check_answers(output, local, args.max_new_tokens))
