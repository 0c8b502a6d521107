"""Sweeps into object stores and coordinator-free shards, against real local servers: a GCS emulator
(gcp-storage-emulator, read through gcsfs) and moto's S3 server (read through s3fs), both started here on
127.0.0.1 and stopped after. Killed and restarted sweeps, and shards run as separate processes, must end
with exactly what one uninterrupted local run writes."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from sega_jax.cli import generate as cli
from sega_jax.sweep import command as sweep
from sega_jax.sweep import store as sweep_store
from sega_jax.sweep.store import Worker

# The emulator has no storage-control (gRPC) API: without this gcsfs waits 60 s per bucket probing for one.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "sweeps"
SPEC = dict(
    model="tiny",
    prompts=["a photo of a woman", "a cat"],
    seeds="0:3",
    height=16,
    width=16,
    num_inference_steps=2,
    editing_prompt=["smiling"],
    edit=dict(edit_warmup_steps=1),
    grid=dict(edit_guidance_scale=[0, 3]),
    batch_per_device=2,
)
TOTAL = 12  # 2 prompts x 3 seeds x 2 settings: 6 work groups of 2 images
RUN = "import sys; from sega_jax import sweep; sys.exit(sweep.main(sys.argv[1:]))"
# Prepended to RUN by `stop_after`: the sweep stops itself (SIGSTOP) once it has uploaded STOP_AFTER images,
# either before its next image upload (STOP_AT=png) or before its next manifest upload (STOP_AT=manifest:
# images uploaded, their records not).
STOP_HOOK = """
import os, signal
from sega_jax.sweep import store as sweep_store

_after, _at, _pngs = int(os.environ["STOP_AFTER"]), os.environ["STOP_AT"], [0]
_write = sweep_store.ObjectStore.write


def _stopping_write(self, name, data, tag):
    png = name.startswith("p") and name.endswith(".png")
    if _pngs[0] >= _after and (png if _at == "png" else name.startswith("manifest")):
        os.kill(os.getpid(), signal.SIGSTOP)
    _pngs[0] += png
    _write(self, name, data, tag)


sweep_store.ObjectStore.write = _stopping_write
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def gcs_emulator():
    from gcp_storage_emulator.server import create_server

    server = create_server("127.0.0.1", 0, in_memory=True, default_bucket=BUCKET)
    server.start()
    try:
        yield f"http://127.0.0.1:{server._api._httpd.server_port}"
    finally:
        server.stop()


@contextlib.contextmanager
def s3_server():
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """Both servers, the variables that point gcsfs / s3fs at them (here and in subprocesses), a spec."""
    root = tmp_path_factory.mktemp("sweep-store")
    (root / "spec.json").write_text(json.dumps(SPEC))
    quiet = [logging.getLogger(name) for name in ("werkzeug", "gcp_storage_emulator")]  # a line per request
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.WARNING)
    with gcs_emulator() as gcs, s3_server() as s3, pytest.MonkeyPatch.context() as patch:
        servers = dict(
            STORAGE_EMULATOR_HOST=gcs,
            FSSPEC_GS_TOKEN="anon",
            FSSPEC_GS_PROJECT="test",
            AWS_ENDPOINT_URL=s3,
            AWS_ACCESS_KEY_ID="testing",
            AWS_SECRET_ACCESS_KEY="testing",
            AWS_DEFAULT_REGION="us-east-1",
        )
        for key, value in servers.items():
            patch.setenv(key, value)
        import fsspec

        patch.setitem(fsspec.config.conf, "gs", dict(token="anon", project="test"))
        fsspec.filesystem("s3").mkdir(BUCKET)
        env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", sweep_store.SHARD_ENV)}
        env.update(  # a shared persistent compilation cache: later processes skip XLA compilation
            JAX_PLATFORMS="cpu",
            JAX_COMPILATION_CACHE_DIR=str(root / "jax-cache"),
            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
            JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        )
        yield dict(root=root, spec=root / "spec.json", env=env)
    for logger, level in zip(quiet, levels, strict=True):
        logger.setLevel(level)


def start(setup: dict, out: str, *extra: str, stop: tuple[str, int] | None = None) -> subprocess.Popen:
    """The sweep CLI in a new process, its output in a log file; `stop` = (STOP_AT, STOP_AFTER) adds the
    hook that makes it stop itself there."""
    env, script = setup["env"], RUN
    if stop:
        env, script = {**env, "STOP_AT": stop[0], "STOP_AFTER": str(stop[1])}, STOP_HOOK + RUN
    log = open(setup["root"] / f"log-{time.monotonic_ns()}.txt", "w+")
    command = [sys.executable, "-c", script, str(setup["spec"]), "--out", out, "--no-progress", *extra]
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    proc.log = log
    return proc


def output(proc: subprocess.Popen) -> str:
    proc.log.seek(0)
    return proc.log.read()[-4000:]


def finish(*procs: subprocess.Popen) -> None:
    for proc in procs:
        assert proc.wait(timeout=600) == 0, output(proc)


def kill_when_stopped(*procs: subprocess.Popen) -> None:
    """Wait until each process has stopped itself (its STOP_HOOK point), then SIGKILL it there."""
    deadline = time.monotonic() + 600  # a guard against a hung sweep, not the kill's timing
    try:
        for proc in procs:
            status = 0
            while time.monotonic() < deadline:
                pid, status = os.waitpid(proc.pid, os.WUNTRACED | os.WNOHANG)
                if pid:
                    break
                time.sleep(0.05)
            assert os.WIFSTOPPED(status), f"the sweep did not stop (wait status {status}):\n{output(proc)}"
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGKILL)
    for proc in procs:
        assert proc.wait() == -signal.SIGKILL


def pngs(out: str) -> dict[str, bytes]:
    store = sweep_store.open_store(out)
    return {name: store.read(name) for name in store.names("*.png")}


def check_consistent(out: str) -> None:
    """Every PNG is whole and every manifest record names a PNG with its hash."""
    images = pngs(out)
    for data in images.values():
        Image.open(io.BytesIO(data)).verify()
    for record in sweep.read_manifest(out):
        assert hashlib.sha256(images[record["file"]]).hexdigest() == record["sha256"]


@pytest.fixture(scope="module")
def local_run(setup) -> dict:
    """One uninterrupted single-process run into a local folder: its PNGs (images, contact sheets) and
    records. It runs first and alone, so the compilation it caches serves every later process."""
    out = str(setup["root"] / "local")
    finish(start(setup, out))
    return dict(out=out, pngs=pngs(out), records=sweep.read_manifest(out))


def assert_same_as_local(out: str, local_run: dict) -> None:
    assert sweep.read_manifest(out) == local_run["records"]
    assert pngs(out) == local_run["pngs"]  # same image and contact-sheet bytes
    assert len(local_run["records"]) == TOTAL and len(local_run["pngs"]) == TOTAL + 2  # + 2 sheets


def test_object_store_sweeps_killed_twice_then_restarted_equal_a_local_run(setup, local_run):
    outs = [f"gs://{BUCKET}/killed", f"s3://{BUCKET}/killed"]  # the two run side by side
    # Killed after uploading its first 4 images, before the manifest object that records the last 2.
    kill_when_stopped(*(start(setup, out, stop=("manifest", 4)) for out in outs))
    for out in outs:
        check_consistent(out)
        assert (len(sweep.read_manifest(out)), len(pngs(out))) == (2, 4)  # 2 images with no record
    # Restarted: redoes the unrecorded group and one more, then is killed before its next image upload.
    kill_when_stopped(*(start(setup, out, stop=("png", 4)) for out in outs))
    for out in outs:
        check_consistent(out)
        assert (len(sweep.read_manifest(out)), len(pngs(out))) == (6, 6)
    finish(*(start(setup, out) for out in outs))
    for out in outs:
        assert_same_as_local(out, local_run)


def test_three_shards_then_two_without_a_coordinator_equal_one_process(setup, local_run, capsys):
    out = f"s3://{BUCKET}/shards"  # 6 work groups: shard i of 3 takes groups i and i + 3
    first = start(setup, out, "--shard", "0/3")
    second = start(setup, out, "--shard", "1/3", stop=("png", 2))  # killed after its first group
    third = start(setup, out, "--shard", "2/3", stop=("manifest", 2))  # killed before recording its first
    finish(first)
    kill_when_stopped(second, third)
    capsys.readouterr()
    assert cli.main(["sweep", "status", out]) == 1  # images still to do
    assert capsys.readouterr().out.splitlines() == [
        f"{out}: 12 images, 6 done, 6 to do",
        "  prompt 0 'a photo of a woman': 4 done, 2 to do",
        "  prompt 1 'a cat': 2 done, 4 to do",
        "  shard 0/3: 4 done, 0 to do; 4 records in its manifest part",
        "  shard 1/3: 2 done, 2 to do; 2 records in its manifest part",
        "  shard 2/3: 0 done, 4 to do; 0 records in its manifest part",
    ]
    kill_when_stopped(start(setup, out, "--shard", "2/3", stop=("png", 2)))  # rerun later, killed again
    finish(*(start(setup, out, env_shard) for env_shard in ("--shard=0/2", "--shard=1/2")))
    parts = sweep_store.open_store(out).manifest_parts()
    assert {name: len(records) for name, records in parts.items()} == {
        "manifest.0-of-3": 4,
        "manifest.1-of-3": 2,
        "manifest.2-of-3": 2,
        "manifest.0-of-2": 2,
        "manifest.1-of-2": 2,
    }  # nothing twice: 12 records in all
    assert_same_as_local(out, local_run)  # nothing missing, the same bytes, sheets drawn by the last worker
    assert cli.main(["sweep", "status", out]) == 0
    report = capsys.readouterr().out.splitlines()
    assert report[0] == f"{out}: 12 images, 12 done, 0 to do"
    assert "  shard 1/2: 6 done, 0 to do; 2 records in its manifest part" in report


def test_sheets_redraws_the_contact_sheets_once_everything_is_there(local_run, capsys):
    out, local = "memory://sheets/redraw", Path(local_run["out"])
    store = sweep_store.open_store(out)
    for name in ["spec.json", *(record["file"] for record in local_run["records"])]:
        store.write(name, (local / name).read_bytes(), "copy")
    halves = [[r for r in local_run["records"] if r["prompt_index"] == prompt] for prompt in (0, 1)]
    for index, records in enumerate(halves):
        writer = store.writer(f"manifest.{index}-of-2")
        for record in records:
            writer.append(record)
        writer.close()
        assert cli.main(["sweep", "sheets", out]) == (1 if index == 0 else 0)  # 0: prompt 1 still to do
        assert f"wrote {out}/contact-p000.png" in capsys.readouterr().out
    assert pngs(out) == local_run["pngs"]
    store.fs.rm(store.root, recursive=True)


# -- workers, manifests, bad input --------------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 2, 3, 7])
def test_shards_and_processes_partition_the_work_groups(count):
    work = list(range(13))
    for processes in (1, 2, 3):
        workers = [Worker((i, count), (p, processes)) for i in range(count) for p in range(processes)]
        assert sorted(x for worker in workers for x in worker.share(work)) == work
        assert len({worker.part for worker in workers}) == len(workers)
        # jax processes alone (no --shard) split the groups as shards of the same count would
        assert all(sweep_store.part_shard(w.part) == (w.shard if count > 1 else w.process) for w in workers)
    assert Worker((0, 1), (1, 2)).part == "manifest.1-of-2"  # jax.distributed alone: as before
    assert Worker((2, 3), (1, 2)).part == "manifest.2-of-3.1-of-2"


def test_object_store_manifest_writers_never_overwrite_each_other():
    store = sweep_store.open_store("memory://manifests/writers")
    writers = [store.writer("manifest.0-of-2") for _ in range(2)]  # e.g. a shard run twice at once
    for n, writer in enumerate(writers * 2):
        writer.append({"file": f"p{n}.png"})
        writer.flush()
    writers[0].append({"file": "never-flushed.png"})  # a kill before the batch's upload: no record
    parts = store.manifest_parts()
    assert sorted(r["file"] for r in parts["manifest.0-of-2"]) == ["p0.png", "p1.png", "p2.png", "p3.png"]
    assert len(store.names("*")) == 0 and len(store.fs.find(store.root)) == 4  # one object per batch
    store.fs.rm(store.root, recursive=True)


@pytest.fixture
def spec_file(tmp_path, monkeypatch) -> Path:
    monkeypatch.setattr(sweep, "load_pipeline", lambda spec: pytest.fail("loaded the model"))
    monkeypatch.delenv(sweep_store.SHARD_ENV, raising=False)
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({**SPEC, "output": str(tmp_path / "out")}))
    return path


@pytest.mark.parametrize(
    "args, env, message",
    [
        (["--shard", "3/2"], None, r"--shard '3/2': shard index 3 is out of range for 2 shard\(s\)"),
        (["--shard", "0/0"], None, r"--shard '0/0': shard index 0 is out of range for 0 shard\(s\)"),
        (["--shard", "1"], None, r"--shard '1': expected I/N"),
        ([], "2/2", r"SEGA_JAX_SHARD '2/2': shard index 2 is out of range"),
        (["--out", "nosuch://b/x"], None, r"output \(--out\): nosuch://b/x: unknown URL scheme 'nosuch'"),
    ],
)
def test_bad_shard_or_output_url_is_a_clear_error_naming_it(spec_file, monkeypatch, capsys, args, env,
                                                            message):
    if env:
        monkeypatch.setenv(sweep_store.SHARD_ENV, env)
    assert sweep.main([str(spec_file), "--no-progress", *args]) == 2
    error = capsys.readouterr().err
    assert error.startswith("sega-jax sweep: error: ")
    assert re.search(message, error), error


@pytest.mark.parametrize("url, module, extra", [("gs://b/x", "gcsfs", "gcs"), ("s3://b/x", "s3fs", "s3")])
def test_object_store_url_without_its_package_names_the_extra(spec_file, monkeypatch, capsys, url, module,
                                                              extra):
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    assert sweep.main([str(spec_file), "--out", url]) == 2
    wanted = f"output (--out): {url} needs {module} (pip install 'sega-jax[{extra}]')"
    assert wanted in capsys.readouterr().err


def test_status_of_an_output_with_no_sweep_is_a_clear_error(capsys):
    assert cli.main(["sweep", "status", "memory://nothing/here"]) == 2
    wanted = "sega-jax sweep status: error: OUT: memory://nothing/here holds no sweep"
    assert wanted in capsys.readouterr().err


def test_distributed_flag_lets_jax_detect_the_processes(monkeypatch):
    import jax

    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    parse = sweep.build_parser().parse_args
    sweep._init_distributed(parse([]))
    sweep._init_distributed(parse(["--distributed"]))
    sweep._init_distributed(parse(["--coordinator", "h:1", "--num-processes", "2", "--process-id", "1"]))
    assert calls == [
        dict(coordinator_address=None, num_processes=None, process_id=None),
        dict(coordinator_address="h:1", num_processes=2, process_id=1),
    ]
    with pytest.raises(sweep.SpecError, match="needs all of --coordinator"):
        sweep._init_distributed(parse(["--distributed", "--num-processes", "2"]))
