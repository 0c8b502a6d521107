"""Where a sweep's files live: a local folder, or any fsspec URL (gs://, s3://, memory://, ...).

Both kinds keep the sweep's guarantees: an image is visible only when complete, the manifest survives a
kill at any moment, and workers never rewrite each other's files.

- A local folder (a path or file://): files are written to a temporary name, fsynced and renamed; a
  manifest part is one JSON-lines file per worker, `{part}.jsonl`, appended one record per write.
- An object store: every file is one whole-object upload (objects appear only complete); a manifest part is
  a prefix `{part}/` holding one object per batch of records, `{part}/{run}-{seq:05d}.jsonl`, where `run`
  is unique to each writer, so no object is ever rewritten and no two workers race.

A manifest part is named after its worker: `manifest` (one process), `manifest.{i}-of-{n}` (shard or
jax.distributed process i of n) or `manifest.{i}-of-{n}.{p}-of-{P}` (process p of P within shard i of n).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import secrets
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple, TypeVar

from sega_jax.sweep.spec import SpecError, check_url

# fsspec protocols served by an optional extra of ours: protocol -> (module, extra)
PART = re.compile(r"manifest(?:\.(\d+)-of-(\d+))?(?:\.(\d+)-of-(\d+))?")
SHARD_ENV = "SEGA_JAX_SHARD"
T = TypeVar("T")


def part_name(shard: tuple[int, int] = (0, 1), process: tuple[int, int] = (0, 1)) -> str:
    """The manifest part of shard `shard` = (i, n) and jax process `process` = (p, P) within it."""
    name = "manifest"
    for index, count in (shard, process):
        if count > 1:
            name += f".{index}-of-{count}"
    return name


def part_shard(name: str) -> tuple[int, int] | None:
    """(i, n) of a part written by worker i of n, (0, 1) for a single process; None for other names."""
    match = PART.fullmatch(name)
    if not match:
        return None
    return (int(match[1]), int(match[2])) if match[1] else (0, 1)


def parse_shard(text: str, argument: str = "--shard") -> tuple[int, int]:
    """'I/N' -> (I, N), with 0 <= I < N; a SpecError naming `argument` otherwise."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match:
        raise SpecError(f"{argument} {text!r}: expected I/N, worker I of N shards (0 <= I < N), e.g. 0/4")
    index, count = int(match[1]), int(match[2])
    if count < 1 or index >= count:
        raise SpecError(f"{argument} {text!r}: shard index {index} is out of range for {count} shard(s) "
                        f"(I/N needs 0 <= I < N)")
    return index, count


def shard_from(flag: str | None) -> tuple[int, int]:
    """The shard from `--shard`, else from $SEGA_JAX_SHARD, else (0, 1): all the work."""
    if flag is not None:
        return parse_shard(flag)
    env = os.environ.get(SHARD_ENV)
    return parse_shard(env, SHARD_ENV) if env else (0, 1)


class Worker(NamedTuple):
    """Who runs: shard (i, n) of a coordinator-free split, and jax process (p, P) within that shard."""

    shard: tuple[int, int] = (0, 1)
    process: tuple[int, int] = (0, 1)

    @property
    def part(self) -> str:
        """This worker's manifest part (see the module docstring)."""
        return part_name(self.shard, self.process)

    @property
    def alone(self) -> bool:
        return self.shard[1] == 1 and self.process[1] == 1

    @property
    def tag(self) -> str:
        """This worker's mark on its temporary files."""
        return "p0" if self.alone else "p" + self.part[len("manifest.") :]

    def share(self, work: Sequence[T]) -> list[T]:
        """This worker's share of `work`: every n-th item from i, then every P-th of those from p."""
        return list(work)[self.shard[0] :: self.shard[1]][self.process[0] :: self.process[1]]


def parse_records(data: bytes) -> list[dict]:
    """The complete JSON lines of a manifest file (a torn last line, if any, is left out)."""
    lines = data.split(b"\n")
    return [json.loads(line) for line in lines[:-1] if line.strip()]  # lines[-1]: b"" or torn


class LocalStore:
    """A local folder: temporary file + fsync + rename; manifest parts appended with O_APPEND."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.url = str(root)

    def read(self, name: str) -> bytes:
        return (self.root / name).read_bytes()

    def exists(self, name: str) -> bool:
        return (self.root / name).exists()

    def names(self, pattern: str) -> list[str]:
        return sorted(path.name for path in self.root.glob(pattern))

    def write(self, name: str, data: bytes, tag: str) -> None:
        """Write to `.name.tag.tmp`, fsync, rename: readers and a later run see all of it or nothing."""
        path = self.root / name
        tmp = path.with_name(f".{path.name}.{tag}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def check_writable(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".probe-{secrets.token_hex(6)}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            raise SpecError(f"output folder {self.url} is not writable: {err}") from err

    def tidy(self, tag: str | None) -> None:
        """Remove temporary files left by a killed run: those of `tag`, or all when `tag` is None."""
        for leftover in self.root.glob(".*.tmp" if tag is None else f".*.{tag}.tmp"):
            leftover.unlink(missing_ok=True)

    def manifest_parts(self) -> dict[str, list[dict]]:
        parts = sorted(self.root.glob("manifest*.jsonl"))
        return {path.name[: -len(".jsonl")]: parse_records(path.read_bytes()) for path in parts}

    def writer(self, part: str) -> LocalManifestWriter:
        return LocalManifestWriter(self.root / f"{part}.jsonl")


class LocalManifestWriter:
    """Appends one JSON line per image with a single write (O_APPEND) and fsync."""

    def __init__(self, path: Path):
        data = path.read_bytes() if path.exists() else b""
        if data and not data.endswith(b"\n"):  # a torn last line (a run killed mid-append): cut it off
            with open(path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def append(self, record: dict) -> None:
        os.write(self.fd, (json.dumps(record, sort_keys=True) + "\n").encode())
        os.fsync(self.fd)

    def flush(self) -> None:
        pass  # every record is on disk when `append` returns

    def close(self) -> None:
        os.close(self.fd)


class ObjectStore:
    """An fsspec filesystem under a prefix: whole-object writes, one manifest object per batch."""

    def __init__(self, url: str, fs, root: str):
        self.url, self.fs, self.root = url, fs, root.rstrip("/")

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def read(self, name: str) -> bytes:
        self.fs.invalidate_cache()  # other workers write too: no listing cached here is to be trusted
        return self.fs.cat_file(self._path(name))

    def exists(self, name: str) -> bool:
        self.fs.invalidate_cache()
        return self.fs.exists(self._path(name))

    def _listing(self) -> list[str]:
        """Every object under the prefix, as names relative to it (fresh: no cached listing)."""
        self.fs.invalidate_cache()
        try:
            found = self.fs.find(self.root)
        except FileNotFoundError:
            return []
        start = len(self.root) + 1
        return sorted(path[start:] for path in found)

    def names(self, pattern: str) -> list[str]:
        return [name for name in self._listing() if "/" not in name and fnmatch.fnmatchcase(name, pattern)]

    def write(self, name: str, data: bytes, tag: str) -> None:
        self.fs.pipe_file(self._path(name), data)  # one upload: the object appears whole or not at all

    def check_writable(self) -> None:
        probe = f".probe-{secrets.token_hex(6)}"
        try:
            self.write(probe, b"", "probe")
            self.fs.rm_file(self._path(probe))
        except Exception as err:  # each filesystem raises its own errors (auth, missing bucket, ...)
            raise SpecError(f"output {self.url} is not writable: {type(err).__name__}: {err}") from err

    def tidy(self, tag: str | None) -> None:
        pass  # whole-object uploads leave no temporary objects

    def manifest_parts(self) -> dict[str, list[dict]]:
        batches = [n for n in self._listing() if n.startswith("manifest") and n.count("/") == 1]
        batches = [n for n in batches if n.endswith(".jsonl")]
        contents = self.fs.cat([self._path(n) for n in batches]) if batches else {}  # fetched concurrently
        parts: dict[str, list[dict]] = {}
        for name in batches:
            records = parse_records(contents[self._path(name)])
            parts.setdefault(name.split("/")[0], []).extend(records)
        return parts

    def writer(self, part: str) -> ObjectManifestWriter:
        return ObjectManifestWriter(self, part)


class ObjectManifestWriter:
    """Collects records and writes each batch as a new object `{part}/{run}-{seq:05d}.jsonl`."""

    def __init__(self, store: ObjectStore, part: str):
        self.store, self.part, self.pending, self.seq = store, part, [], 0
        self.run = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{secrets.token_hex(4)}"

    def append(self, record: dict) -> None:
        self.pending.append(json.dumps(record, sort_keys=True) + "\n")

    def flush(self) -> None:
        if self.pending:
            name = f"{self.part}/{self.run}-{self.seq:05d}.jsonl"
            self.store.write(name, "".join(self.pending).encode(), "")
            self.pending, self.seq = [], self.seq + 1

    def close(self) -> None:
        self.flush()


Store = LocalStore | ObjectStore
ManifestWriter = LocalManifestWriter | ObjectManifestWriter


def open_store(url: str | os.PathLike, argument: str = "output (--out)") -> Store:
    """The store at `url`: a local path / file:// URL, or an fsspec URL whose package is installed."""
    text = os.fspath(url)
    if check_url(text, argument) is None:
        return LocalStore(text.removeprefix("file://"))
    from fsspec.core import url_to_fs

    try:
        fs, root = url_to_fs(text)
    except ImportError as err:  # one of fsspec's own protocols whose package is missing
        raise SpecError(f"{argument}: {text} needs a package that is not installed: {err}") from err
    if not root.strip("/"):
        raise SpecError(f"{argument}: {text} names no bucket or prefix")
    return ObjectStore(text, fs, root)
