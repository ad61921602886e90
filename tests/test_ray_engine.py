"""The Ray engine (phi_helpers.cli.ray_engine): a local Ray with 2 CPU replicas of the tiny checkpoint.

One local Ray is shared by the module (it takes seconds to start) and shut down at the end. The
records of a Ray run must equal the in-process CLI's item by item, except the fields that measure
the run (``seconds_to_first_token``, ``total_seconds``, ``batch_size``: Ray cuts batches differently).
"""

import importlib.util
import json
import logging
import os
import re
import sys
from pathlib import Path

import pytest
from PIL import Image

from cli_runner import run
from phi_helpers.cli import ray_engine
from phi_helpers.cli.inputs import collect_all
from phi_helpers.errors import InvalidArgumentError, RayNotInstalledError

FAST = ["--num-crops", "1", "--max-new-tokens", "4"]
RUN_FIELDS = ("seconds_to_first_token", "total_seconds", "batch_size")  # how long and in which batch: may differ
SCHEMA = {"type": "object", "required": ["total"], "properties": {"total": {"type": "number"}}}


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray for this module: 2 CPUs (as on CI's machines), held by the 2 replicas; no dashboard."""
    ray = pytest.importorskip("ray", reason='the Ray engine tests need pip install "ray[data]>=2.60,<2.64"')
    ray_engine.start_ray(num_cpus=2, dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    # The fault-injecting loader below lives in this test module, which Ray's workers cannot import.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> Path:
    """Ten items: 7 small images, a 2-page PDF and an image file that cannot be read (an error record)."""
    folder = tmp_path_factory.mktemp("scans")
    for index in range(7):
        Image.new("RGB", (48 + 8 * index, 40), (30 * index, 200 - 20 * index, 90)).save(folder / f"scan_{index}.png")
    pages = [Image.new("RGB", (120, 90), color) for color in ("white", "gray")]
    pages[0].save(folder / "doc.pdf", save_all=True, append_images=pages[1:])
    (folder / "broken.png").write_bytes(b"not a png")
    return folder


@pytest.fixture(scope="module")
def schema_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("schema") / "total.schema.json"
    path.write_text(json.dumps(SCHEMA))
    return path


def read_records(path: Path) -> dict:
    """JSONL records by item key ``(source, page)``."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return {(r["source"], r.get("page")): r for r in records}


def without_run_fields(record: dict) -> dict:
    return {key: value for key, value in record.items() if key not in RUN_FIELDS}


def test_ray_records_equal_the_single_process_run(capsys, monkeypatch, tmp_path, local_ray, scans, schema_file, tiny_checkpoint):
    monkeypatch.delenv("PHI_HELPERS_MODEL", raising=False)
    common = ["predict", "--image", scans, "--task", "extract", "--schema", schema_file, "--model", tiny_checkpoint,
              "--batch-size", "3", *FAST]
    code, _, _ = run(capsys, *common, "--output", tmp_path / "process.jsonl")
    assert code == 1  # broken.png
    import ray

    # Ray Data's console handler writes to the stderr of when ray.data was imported (pytest's): to this test's instead.
    for handler in logging.getLogger("ray.data").handlers:
        if type(handler).__module__.startswith("ray.") and hasattr(handler, "stream"):
            monkeypatch.setattr(handler, "stream", sys.stderr)
    ray.util.debug.reset_log_once("ray_data_progress_manager_disabled")  # Ray says it once a process: as a new one
    code, _, err = run(capsys, *common, "--output", tmp_path / "ray.jsonl", "--engine", "ray", "--replicas", "2")
    assert code == 1, err
    assert "1 of 10 items failed" in err
    # The CLI turns Ray Data's progress bars off (its own bar counts records): Ray's line that says how to
    # turn them back on is not shown.
    assert "Progress bars disabled" not in err, err

    alone, on_ray = read_records(tmp_path / "process.jsonl"), read_records(tmp_path / "ray.jsonl")
    assert len(alone) == 10 and (str(scans / "doc.pdf"), 2) in alone
    assert on_ray.keys() == alone.keys()
    for key, record in alone.items():
        assert list(on_ray[key]) == list(record), key  # same fields in the same order
        assert without_run_fields(on_ray[key]) == without_run_fields(record), key
    assert "error" in on_ray[(str(scans / "broken.png"), None)]

    # Run again: every item that worked is skipped, only the broken one is tried again. The inputs are
    # listed once (before: twice, so a warning about a folder that cannot be listed was printed twice).
    listings = []
    monkeypatch.setattr(ray_engine, "collect_all", lambda specs: listings.append(specs) or collect_all(specs))
    code, _, err = run(capsys, *common, "--output", tmp_path / "ray.jsonl", "--engine", "ray", "--replicas", "2")
    assert code == 1 and "9 of 10 items are already done" in err
    assert len(listings) == 1
    assert len((tmp_path / "ray.jsonl").read_text().splitlines()) == 11


def test_a_finished_re_run_does_not_start_ray(capsys, monkeypatch, tmp_path, schema_file, tiny_checkpoint):
    """Every item done already: "Nothing left to do." and the in-process engine's exit code, at once. Before,
    Ray was started first (a minute, or "Ray did not start" on a busy machine) to find nothing to run."""
    pytest.importorskip("ray")
    monkeypatch.delenv("PHI_HELPERS_MODEL", raising=False)
    folder = tmp_path / "scans"
    folder.mkdir()
    for index in range(2):
        Image.new("RGB", (48, 40), (90 * index, 120, 60)).save(folder / f"scan_{index}.png")
    command = ["predict", "--image", folder, "--task", "extract", "--schema", schema_file,
               "--model", tiny_checkpoint, "--output", tmp_path / "out.jsonl", *FAST]  # 4 tokens: answers cut off
    code, _, _ = run(capsys, *command)  # the in-process engine does the work
    assert code == 1  # the cut-off answers do not follow the schema
    in_process = run(capsys, *command)

    def no_ray(*args, **kwargs):
        raise AssertionError("start_ray was called for a run with nothing left to do")

    monkeypatch.setattr(ray_engine, "start_ray", no_ray)
    code, out, err = run(capsys, *command, "--engine", "ray")
    assert (code, out) == in_process[:2] == (1, "")
    assert "2 of 2 items are already done" in err and "Nothing left to do." in err, err
    assert err.strip().splitlines()[-1] == in_process[2].strip().splitlines()[-1]  # the same schema error
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 2


class DieOnce:
    """Loads the tiny model; the first replica to generate kills its own process (once: a marker file)."""

    def __init__(self, checkpoint: str, marker: Path):
        self.loader = ray_engine.ModelLoader(checkpoint, num_crops=1)
        self.marker = marker

    def __call__(self):
        model, processor = self.loader()
        generate, marker = model.generate, self.marker

        def generate_or_die(*args, **kwargs):
            if not marker.exists():
                marker.write_text(str(os.getpid()))
                os._exit(1)  # as if the machine went away: no exception, no cleanup
            return generate(*args, **kwargs)

        model.generate = generate_or_die
        return model, processor


def test_a_replica_killed_mid_run_still_yields_every_record(tmp_path, local_ray, scans, tiny_checkpoint):
    marker = tmp_path / "killed"
    items = ray_engine.item_dataset([str(scans)])
    records = ray_engine.predict_dataset(
        items, "ocr", DieOnce(str(tiny_checkpoint), marker), max_new_tokens=4, batch_size=2, replicas=2,
    )
    output = tmp_path / "ocr.parquet"
    written, failed = ray_engine.write_records(records, output)

    assert marker.exists()  # a replica did die
    assert (written, failed) == (10, 1)  # every item came back; only broken.png is an error
    import pyarrow.parquet as pq

    table = pq.ParquetDataset(output).read()
    assert table.schema == ray_engine.parquet_schema()
    keys = sorted(zip(table.column("source").to_pylist(), table.column("page").to_pylist()), key=str)
    expected = sorted(((str(p), None) for p in scans.iterdir() if p.suffix == ".png"), key=str)
    assert keys == sorted(expected + [(str(scans / "doc.pdf"), 1), (str(scans / "doc.pdf"), 2)], key=str)


def test_a_filesystem_uri_gives_the_same_items_as_the_local_path(local_ray, scans):
    """file:// goes through pyarrow.fs, the way s3:// and gs:// do; the PDF is split into pages by Ray."""
    uri_items = ray_engine.item_dataset([f"file://{scans}"]).take_all()
    local_items = ray_engine.item_dataset([str(scans)]).take_all()
    as_keys = lambda rows, prefix="": sorted((r["source"].removeprefix(prefix), r["page"] or 0) for r in rows)
    assert as_keys(uri_items, "file://") == as_keys(local_items)


def test_the_replica_reads_a_remote_pdf_page(scans):
    image = ray_engine.remote_item(f"file://{scans}/doc.pdf", 2).load()  # 120 x 90 points at 144 dpi
    assert image.size == (240, 180) and image.getpixel((5, 5)) == (128, 128, 128)


def test_a_local_ray_sends_no_usage_statistics(monkeypatch):
    """A local Ray would send usage statistics to usage-stats.ray.io and probe cloud metadata services:
    start_ray turns that off before ray.init (no Ray starts here), unless the user chose otherwise."""
    seen = []

    class FakeRay:
        def is_initialized(self):
            return False

        def init(self, **kwargs):
            seen.append(os.environ.get("RAY_USAGE_STATS_ENABLED"))

    monkeypatch.setattr(ray_engine, "require_ray", FakeRay)
    monkeypatch.delenv("RAY_USAGE_STATS_ENABLED", raising=False)
    monkeypatch.setattr(os, "environ", dict(os.environ))  # whatever start_ray sets goes with the test
    ray_engine.start_ray("head:6379")  # a cluster the user named keeps its own setting
    ray_engine.start_ray()
    os.environ["RAY_USAGE_STATS_ENABLED"] = "1"
    ray_engine.start_ray()
    assert seen == [None, "0", "1"]
    scaling = (Path(__file__).parents[1] / "docs" / "scaling.md").read_text()
    assert "RAY_USAGE_STATS_ENABLED=0" in scaling and "usage-stats.ray.io" in scaling


def test_without_ray_the_engine_says_what_to_install(capsys, monkeypatch, tmp_path, scans):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now fails, as when it is not installed
    with pytest.raises(RayNotInstalledError, match=re.escape('pip install "ray[data]>=2.60,<2.64"')):
        ray_engine.require_ray()
    code, _, err = run(capsys, "predict", "--image", scans, "--task", "ocr", "--output", tmp_path / "o.jsonl", "--engine", "ray")
    assert code == 1 and 'pip install "ray[data]>=2.60,<2.64"' in err
    assert not (tmp_path / "o.jsonl").exists()


def test_ray_options_need_the_ray_engine(capsys, tmp_path, scans):
    code, _, err = run(capsys, "predict", "--image", scans, "--task", "ocr", "--output", tmp_path / "o.jsonl", "--replicas", "2")
    assert code == 2 and "--engine ray" in err


def test_a_missing_input_fails_before_ray_starts(capsys, tmp_path):
    pytest.importorskip("ray")
    code, _, err = run(capsys, "predict", "--image", tmp_path / "missing", "--task", "ocr",
                       "--output", tmp_path / "o.jsonl", "--engine", "ray")
    assert code == 1 and "No file or folder" in err
    assert not (tmp_path / "o.jsonl").exists()


def test_items_made_before_ray_stopped_are_refused_with_what_to_do(monkeypatch, local_ray, scans):
    """Notebook 06 re-run after its "Stop Ray" cell: the old dataset's rows were gone with the old Ray, and
    Ray failed with a KeyError of its own (ObjectRef ...) while the progress bar stayed at 0."""
    import ray

    items = ray_engine.item_dataset(str(scans / "scan_0.png"))
    ray.shutdown()
    with pytest.raises(InvalidArgumentError, match="Ray is not running: start it with start_ray"):
        ray_engine.predict_dataset(items, "caption", "tiny")
    ray_engine.start_ray(num_cpus=2, dashboard=False)  # as the module's fixture started it
    ray.data.DataContext.get_current().enable_progress_bars = False
    with pytest.raises(InvalidArgumentError, match="made in a Ray that has stopped since: start it with start_ray"):
        ray_engine.predict_dataset(items, "caption", "tiny")
    ray_engine.predict_dataset(ray_engine.item_dataset(str(scans / "scan_0.png")), "caption", "tiny")  # made again: fine


class DieAlways(DieOnce):
    """A replica that dies at every batch, as one killed for memory would, restart after restart."""

    def __call__(self):
        self.marker.unlink(missing_ok=True)
        return super().__call__()


def test_a_replica_that_keeps_dying_fails_the_run_saying_why(capsys, monkeypatch, tmp_path, local_ray, scans,
                                                             tiny_checkpoint):
    """A replica killed for memory would be killed again after each restart: a few restarts, then the
    run fails with a message that names memory (Ray Data's default restarts it forever)."""
    loaders, dying = [], DieAlways(str(tiny_checkpoint), tmp_path / "killed")
    monkeypatch.setattr(ray_engine, "ModelLoader", lambda *args: loaders.append(args) or dying)
    code, _, err = run(capsys, "predict", "--image", scans, "--task", "ocr", "--output", tmp_path / "out.jsonl",
                       "--engine", "ray", "--batch-size", "2", *FAST)
    assert loaders and code == 1
    last = err.strip().splitlines()[-1]
    assert f"replica died {ray_engine.REPLICA_RESTARTS + 1} times" in last and "memory" in last, last


def test_sigterm_during_a_ray_run_ends_it_as_ctrl_c_does(capsys, monkeypatch, tmp_path, local_ray, scans):
    """timeout, scancel, docker stop: SIGTERM stops the run cleanly (exit 143, the interrupted message),
    not with Ray's abort; the handler that was there before comes back."""
    import signal

    before = signal.getsignal(signal.SIGTERM)

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return 0, 0

    monkeypatch.setattr(ray_engine, "write_records", terminated)
    code, _, err = run(capsys, "predict", "--image", scans, "--task", "ocr", "--output", tmp_path / "out.jsonl",
                       "--engine", "ray", *FAST)
    assert code == 143 and "error: interrupted by SIGTERM (everything written so far is kept" in err, err
    assert signal.getsignal(signal.SIGTERM) is before


def test_more_cpu_replicas_than_the_memory_holds_draw_a_warning(capsys, monkeypatch, local_ray, scans):
    """Each replica holds a whole model: 4 CPU replicas of Phi-3.5-vision in fp32 want about 70 GiB. Before,
    nothing said so; the system killed replicas and Ray restarted them until the run failed."""
    import ray

    items = ray_engine.item_dataset(str(scans / "scan_0.png"))
    ray_engine.predict_dataset(items, "caption", "tiny", replicas=2)  # a tiny model fits: no warning
    assert "Warning" not in capsys.readouterr().err
    cluster = ray.cluster_resources()["memory"] / 2**30
    monkeypatch.setattr(ray_engine, "planned_memory_gib", lambda *args: cluster / 1.5)  # one replica fits, two do not
    ray_engine.predict_dataset(items, "caption", "tiny", replicas=2)
    err = capsys.readouterr().err
    assert "Warning: 2 replicas each hold their own model" in err and "Use replicas=1 (command line: --replicas 1)" in err
    ray_engine.predict_dataset(items, "caption", "tiny", replicas=1)
    assert "Warning" not in capsys.readouterr().err


def test_the_memory_a_replica_plans_for_follows_its_load_model_arguments(tiny_checkpoint):
    from phi_helpers.api.loading import planned_memory_gib

    fp32 = planned_memory_gib("microsoft/Phi-3.5-vision-instruct", "cpu", "auto")  # the real sizes, nothing read
    assert 14 < fp32 < 20
    assert planned_memory_gib("microsoft/Phi-3.5-vision-instruct", "cpu", "bf16") < fp32 / 1.8
    assert planned_memory_gib(str(tiny_checkpoint), "cpu", "auto") < 0.1  # the folder's own config
    assert planned_memory_gib("/no/such/folder", "cpu", "auto") is None  # load_model will say why


class RecordRows:
    """Stands in for what ``predict_dataset`` returns, with the one method the driver consumes records by."""

    def __init__(self, records: list[dict]):
        self.records = records

    def iter_rows(self):
        return ({"record": json.dumps(record)} for record in self.records)


def test_parquet_is_written_by_the_driver_in_few_part_files_with_progress_and_failures(capsys, monkeypatch, tmp_path):
    """Before, a Parquet output took two Ray stages of unbounded light tasks: a 295-item run started 48
    worker processes (~450 MB each) and ran out of memory, 65 items made 16 part files of 8 KB, and no
    progress or failed: line was shown. The records now come to the driver, as for JSON lines."""
    pq = pytest.importorskip("pyarrow.parquet")
    monkeypatch.setattr(ray_engine, "ROWS_PER_PART", 4)
    records = [{"source": f"scan_{index}.png", "task": "ocr", "answer": "text"} for index in range(8)]
    records += [{"source": "broken.png", "task": "ocr", "error": "'broken.png' is empty (0 bytes)."},
                {"source": "doc.pdf", "page": 2, "task": "ocr", "error": "Could not render page 2 of 'doc.pdf'"}]
    output = tmp_path / "ocr.parquet"
    assert ray_engine.write_records(RecordRows(records), output, total=10, description="ocr") == (10, 2)

    parts = sorted(output.iterdir())
    assert [part.suffix for part in parts] == [".parquet"] * 3  # 4 + 4 + 2 records
    table = pq.read_table(output)
    assert table.schema == ray_engine.parquet_schema() and table.num_rows == 10
    err = capsys.readouterr().err
    assert "failed: broken.png: 'broken.png' is empty" in err and "failed: doc.pdf (page 2): Could not render" in err
    assert "ocr: 10/10 done, 2 failed" in err  # stderr is no terminal here: a progress line, not a bar
    assert ray_engine._failed_sources(str(output)) == ["broken.png", "doc.pdf"]
    assert ray_engine._parquet_retry(str(output)).endswith("into a new --output, with --image broken.png doc.pdf")
    assert ray_engine.write_records(RecordRows([]), tmp_path / "none.parquet") == (0, 0)
    assert pq.read_table(tmp_path / "none.parquet").num_rows == 0  # an empty run's folder still reads back


class FakeRay:
    """A Ray that records how ``start_ray`` calls ``ray.init`` (no Ray starts); ``failure`` is raised by init."""

    def __init__(self, failure: Exception | None = None):
        self.failure, self.calls, self.stopped = failure, [], 0

    def is_initialized(self):
        return False

    def init(self, **kwargs):
        self.calls.append(kwargs)
        if self.failure:
            raise self.failure

    def shutdown(self):
        self.stopped += 1


def test_a_local_ray_keeps_its_workers_lines_out_of_the_driver(monkeypatch):
    """Notebook 06 showed walls of red worker lines (a model banner per replica, Ray's dedup notices, a
    crash dump of one of Ray's own tasks): a local Ray's workers write to its session folder; a cluster
    joined by address keeps Ray's default. Replica errors reach the user in the records all the same."""
    fake = FakeRay()
    monkeypatch.setattr(ray_engine, "require_ray", lambda: fake)
    monkeypatch.setattr(os, "environ", dict(os.environ))
    ray_engine.start_ray(num_cpus=1, dashboard=False)
    ray_engine.start_ray("head:6379")
    assert fake.calls[0]["log_to_driver"] is False and "log_to_driver" not in fake.calls[1]
    assert "/tmp/ray/session_latest/logs" in ray_engine.start_ray.__doc__


def test_a_ray_that_does_not_start_is_a_typed_error_that_says_what_to_do(monkeypatch):
    from phi_helpers.errors import DeviceUnavailableError

    timeout = Exception("The current node timed out during startup. This could happen because some of the raylet "
                        "failed to startup or the GCS has become overloaded.")
    fake = FakeRay(timeout)
    monkeypatch.setattr(ray_engine, "require_ray", lambda: fake)
    monkeypatch.setattr(os, "environ", dict(os.environ))
    with pytest.raises(DeviceUnavailableError, match=r"Ray did not start on this machine \(The current node timed out "
                       r"during startup.*\)\. The machine is probably busy: run it again .*close other notebooks' kernels"):
        ray_engine.start_ray()
    assert fake.stopped == 1  # what the failed start left connected is let go
    monkeypatch.setattr(ray_engine, "require_ray", lambda: FakeRay(ConnectionError("Failed to connect to Ray cluster")))
    with pytest.raises(DeviceUnavailableError, match="Could not connect to the Ray cluster at 'head:6379'"):
        ray_engine.start_ray("head:6379")


def test_a_ray_client_address_without_grpc_says_what_to_install(monkeypatch):
    """Before: Ray's ValueError was shown as "Could not connect ... Check the address"; the address was right,
    only ray[client] (gRPC) was missing."""
    from phi_helpers.errors import RayNotInstalledError

    monkeypatch.setattr(ray_engine, "require_ray", lambda: FakeRay(AssertionError("ray.init was called")))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "grpc" else real_find_spec(name, *a))
    with pytest.raises(RayNotInstalledError, match=r'needs gRPC.*pip install "ray\[data,client\]>=2.60,<2.64"'):
        ray_engine.start_ray("ray://head:10001")


def test_items_before_start_ray_are_refused_instead_of_starting_a_default_ray(monkeypatch, scans):
    """item_dataset before start_ray() started Ray's default (a 6.4 GiB object store, another banner),
    which the later start_ray() then reused with none of its settings."""
    fake = FakeRay()
    monkeypatch.setattr(ray_engine, "require_ray", lambda: fake)
    with pytest.raises(InvalidArgumentError, match=r"Ray is not running: start it with start_ray\(\) first"):
        ray_engine.item_dataset(str(scans))
    assert fake.calls == []


def test_the_tiny_model_notice_comes_once_on_stderr_not_stdout(capsys, local_ray, scans):
    """stdout may carry results (| jq): under --engine ray the notice went there (the driver planned the
    replicas' memory with it printed); each replica's own copy stays in Ray's logs."""
    items = ray_engine.item_dataset(str(scans / "scan_0.png"))
    capsys.readouterr()
    ray_engine.predict_dataset(items, "caption", "tiny", gpus_per_replica=0)
    out, err = capsys.readouterr()
    assert out == "" and err.count("TINY RANDOM") == 1
    ray_engine.predict_dataset(items, "caption", "tiny", gpus_per_replica=1)  # GPU replicas: the notice all the same
    out, err = capsys.readouterr()
    assert out == "" and err.count("TINY RANDOM") == 1


def test_an_error_names_the_file_as_typed_in_both_engines(monkeypatch, tmp_path):
    """In-process 'docs/broken.pdf', under Ray '/abs/.../docs/broken.pdf': a replica reads the file at its
    absolute path (it runs in another folder), but the message names it as the user typed it."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "broken.pdf").write_bytes(b"%PDF-1.4\n garbage")
    (tmp_path / "docs" / "empty.png").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    items = collect_all(["docs"])

    def message(item):
        with pytest.raises(Exception) as error:
            item.load()
        return str(error.value)

    in_process = [message(item) for item in items]
    monkeypatch.chdir(tmp_path.parent)  # a replica's folder
    in_a_replica = [message(ray_engine.item_at(item.source, item.page, item.path, item.modified)) for item in items]
    assert in_process == in_a_replica
    assert "'docs/broken.pdf'" in in_process[0] and "'docs/empty.png' is empty" in in_process[1]


class ClusterOf:
    """A stand-in for the ``ray`` module with ``memory_gib`` of memory for tasks."""

    def __init__(self, memory_gib):
        self.memory = memory_gib * ray_engine.GIB

    def cluster_resources(self):
        return {"memory": self.memory, "CPU": 8}


@pytest.mark.parametrize("dtype, quantize, advice, not_advised", [
    ("auto", None, ["--replicas 2", "--dtype bf16", "--quantize int8"], []),
    ("bf16", None, ["--replicas 2", "--quantize int8"], ["--dtype"]),
    ("fp32", "int8", ["--replicas 2", "--quantize int4"], ["--dtype", "--quantize int8"]),
    ("bf16", "int4", ["--replicas 2"], ["--dtype", "--quantize"]),
])
def test_the_memory_warning_advises_only_savings_the_run_does_not_use(capsys, dtype, quantize, advice, not_advised):
    """4 replicas of 10 GiB on 25 GiB: fewer replicas, and only the dtype / quantization the user has not
    chosen already (before: bf16 and int8 were advised to a run already in bf16 with int8)."""
    ray_engine._warn_if_replicas_exceed_memory(ClusterOf(25), 4, 10.0, dtype, quantize)
    err = capsys.readouterr().err
    assert err.startswith("Warning: 4 replicas") and "40.0 GiB" in err
    assert all(part in err for part in advice), err
    assert not any(part in err for part in not_advised), err


def test_the_memory_warning_is_silent_when_the_replicas_fit(capsys):
    ray_engine._warn_if_replicas_exceed_memory(ClusterOf(50), 4, 10.0)
    assert capsys.readouterr().err == ""


def test_one_replica_too_large_for_the_cluster_is_told_to_use_more_memory(capsys):
    ray_engine._warn_if_replicas_exceed_memory(ClusterOf(5), 1, 10.0, "bf16", "int4")
    err = capsys.readouterr().err
    assert "--replicas" not in err and "Use a machine or cluster with more memory." in err, err
