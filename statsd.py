"""statsd: a standalone statistics service for MONARC.

One module, read top to bottom in the order data flows through it:

    config -> storage -> query -> middleware (rate limit, errors, auth)
           -> handlers -> app factory -> command line

Statistics and organizations live in memory and in one TinyDB JSON file.
Every write is appended to a journal beside that file and fsynced before it
is acknowledged; the journal is folded into the file (atomically) when it
grows and when the server stops.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import fcntl
import functools
import hashlib
import hmac
import gc
import ipaddress
import itertools
import logging
import math
import operator
import os
import re
import secrets
import sys
import time
import tomllib
import uuid as uuidlib
import zlib
from dataclasses import dataclass, field, fields, replace
from datetime import date, datetime, timezone
from typing import Any, Callable, Iterable
from urllib.parse import quote, urlsplit

import limits
import orjson
import aiohttp
from aiohttp import web
from aiohttplimiter import Limiter
from tinydb.storages import Storage

__version__ = "0.1.0"

log = logging.getLogger("statsd")

API_PREFIX = "/api/v2"
V1_PREFIX = "/api/v1"  # the upstream API that the MONARC front office speaks
MISSING = object()  # a field a record does not have


def utcnow() -> str:
    """The current UTC time as ISO 8601 with microseconds and no offset."""
    return datetime.now(timezone.utc).replace(tzinfo=None).isoformat(timespec="microseconds")


# ---------------------------------------------------------------- config ---

class ConfigError(Exception):
    """A configuration value, file or variable that cannot be used."""


@dataclass
class Config:
    """Settings, from defaults < TOML file < STATSD_* environment < command line."""

    host: str = "127.0.0.1"
    port: int = 5000
    database: str = "statsd.json"
    api_key_authentication: bool = True
    rate_limit: str = "300/15minutes"
    trusted_proxies: list = field(default_factory=list)
    default_limit: int = 100
    max_limit: int = 1000
    max_body_size: int = 16 * 1024 * 1024

    @classmethod
    def load(cls, path: str | None = None, environ=None, overrides=None) -> "Config":
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        if path is None and os.path.exists("statsd.toml"):
            path = "statsd.toml"
        if path is not None:
            try:
                with open(path, "rb") as f:
                    values.update(tomllib.load(f))
            except OSError as e:
                raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
            except tomllib.TOMLDecodeError as e:
                raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
            unknown = sorted(set(values) - cls.keys())
            if unknown:
                raise ConfigError(f"unknown key(s) in {path}: {', '.join(unknown)}"
                                  f" (known keys: {', '.join(sorted(cls.keys()))})")
        for key in cls.keys():
            env = "STATSD_" + key.upper()
            if env in environ:
                values[key] = _from_env(env, environ[env], cls.kind(key))
        unknown_env = sorted(k for k in environ if k.startswith("STATSD_")
                             and k[7:].lower() not in cls.keys())
        if unknown_env:
            log.warning("ignoring environment variable(s) that name no setting: %s", ", ".join(unknown_env))
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        config = cls(**values)
        config.validate()
        return config

    @classmethod
    def keys(cls) -> set[str]:
        return {f.name for f in fields(cls)}

    @classmethod
    def kind(cls, key: str) -> type:
        return type(getattr(cls(), key))

    def validate(self) -> None:
        for key in self.keys():
            value, kind = getattr(self, key), self.kind(key)
            if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigError(f"{key} must be an integer, not {value!r}")
            if kind is not int and not isinstance(value, kind):
                raise ConfigError(f"{key} must be a {kind.__name__}, not {value!r}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be from 0 to 65535, not {self.port}")
        if not 1 <= self.max_limit:
            raise ConfigError(f"max_limit must be at least 1, not {self.max_limit}")
        if not 0 <= self.default_limit <= self.max_limit:
            raise ConfigError(f"default_limit must be from 0 to max_limit ({self.max_limit}),"
                              f" not {self.default_limit}")
        if self.max_body_size < 1024:
            raise ConfigError(f"max_body_size must be at least 1024 bytes, not {self.max_body_size}")
        if not self.database:
            raise ConfigError("database must be a file path")
        if self.rate_limit:
            self.rate_limit_item()
        for proxy in self.trusted_proxies:
            try:
                ipaddress.ip_network(str(proxy), strict=False)
            except ValueError:
                raise ConfigError(f"trusted_proxies: {proxy!r} is not an IP address or network") from None

    def rate_limit_item(self):
        """The parsed `limits` item, or None when rate limiting is off."""
        if not self.rate_limit:
            return None
        try:
            return limits.parse(self.rate_limit)
        except ValueError:
            raise ConfigError(f"rate_limit {self.rate_limit!r} is not in the limits notation,"
                              " e.g. '300/15minutes' (or \"\" to turn rate limiting off)") from None


def _from_env(name: str, raw: str, kind: type):
    """Convert one STATSD_* variable to the type of its key."""
    if kind is bool:
        word = raw.strip().lower()
        if word in ("true", "1", "yes"):
            return True
        if word in ("false", "0", "no"):
            return False
        raise ConfigError(f"{name} must be true/false/1/0/yes/no, not {raw!r}")
    if kind is int:
        try:
            return int(raw.strip())
        except ValueError:
            raise ConfigError(f"{name} must be an integer, not {raw!r}") from None
    if kind is list:
        return [item.strip() for item in raw.split(",") if item.strip()]
    return raw


# --------------------------------------------------------------- storage ---

class StorageError(Exception):
    """The database cannot be opened, read or written."""

    def __init__(self, message: str, errno_: int | None = None):
        super().__init__(message)
        self.errno = errno_


class DatabaseLocked(StorageError):
    """Another process holds the database."""


def write_atomically(path: str, data: bytes) -> None:
    """Replace `path` with `data`: temp file, fsync, rename, fsync of the folder.

    A crash at any instant leaves either the old file or the new one, whole.
    """
    folder = os.path.dirname(os.path.abspath(path))
    tmp = f"{path}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_folder(folder)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _fsync_folder(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicJSONStorage(Storage):
    """TinyDB storage that reads with orjson and never overwrites in place."""

    def __init__(self, path: str):
        self.path = path

    def read(self) -> dict | None:
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        try:
            data = orjson.loads(raw) if raw.strip() else {}
        except orjson.JSONDecodeError as e:
            raise StorageError(f"{self.path} is not valid JSON ({e}); it was left untouched:"
                               " restore it from a backup or move it away") from None
        if not isinstance(data, dict) or not all(isinstance(t, dict) for t in data.values()):
            raise StorageError(f"{self.path} is not a TinyDB database (an object of tables);"
                               " it was left untouched")
        return data

    def write(self, data: dict) -> None:
        write_atomically(self.path, orjson.dumps(data))


class Index:
    """Equality index of one field: value -> ids of the records holding it, in order."""

    def __init__(self, name: str):
        self.name = name
        self.ids: dict[Any, dict[int, None]] = {}
        self.unsorted: set = set()

    def add(self, doc_id: int, doc: dict) -> None:
        value = doc.get(self.name, MISSING)
        if value.__class__ not in INDEXABLE:
            return
        bucket = self.ids.get(value)
        if bucket is None:
            self.ids[value] = {doc_id: None}
            return
        if doc_id < next(reversed(bucket)):
            self.unsorted.add(value)
        bucket[doc_id] = None

    def remove(self, doc_id: int, doc: dict) -> None:
        value = doc.get(self.name, MISSING)
        bucket = self.ids.get(value) if _hashable(value) else None
        if bucket is not None:
            bucket.pop(doc_id, None)
            if not bucket:
                del self.ids[value]
                self.unsorted.discard(value)

    def lookup(self, value) -> dict[int, None]:
        """The ids holding `value`, in creation order."""
        if value in self.unsorted:
            self.ids[value] = dict.fromkeys(sorted(self.ids[value]))
            self.unsorted.discard(value)
        return self.ids.get(value, {})


INDEXABLE = (str, int, float)  # JSON values that an index holds (not bool: True == 1)


def _hashable(value) -> bool:
    return value.__class__ in INDEXABLE


class Table:
    """One table: its records in creation order, a primary key and indexes."""

    def __init__(self, name: str, key: str, unique: Iterable[str] = (), indexed: Iterable[str] = ()):
        self.name = name
        self.key = key
        self.docs: dict[int, dict] = {}
        self.next_id = 1
        self.by_key: dict[str, int] = {}
        self.unique = {f: {} for f in unique}
        self.indexes = {f: Index(f) for f in indexed}
        self.columns: dict[tuple, tuple[Callable, dict[int, Any]]] = {}
        self.intersections: dict[tuple, tuple[int, ...] | None] = {}
        self.intersection_ids = 0  # how many ids self.intersections holds

    MAX_COLUMNS = 8
    MAX_INTERSECTION_IDS = 1_000_000  # about 8 MB of references, at most
    MAX_INTERSECTIONS = 4096  # combinations kept or seen once, at most

    def load(self, pairs: list[tuple[int, dict]]) -> None:
        """Fill this empty table with (doc_id, doc) pairs, faster than apply one by one."""
        if any(a[0] >= b[0] for a, b in zip(pairs, pairs[1:])):
            pairs.sort(key=lambda pair: pair[0])
        key = self.key
        self.docs = dict(pairs)
        self.by_key = {doc[key]: doc_id for doc_id, doc in pairs}
        for name, ids in self.unique.items():
            ids.update({doc[name]: doc_id for doc_id, doc in pairs if name in doc})
        for name, index in self.indexes.items():
            canonical: dict = {}
            for doc_id, doc in pairs:
                value = doc.get(name, MISSING)
                if value.__class__ is str:
                    doc[name] = value = canonical.setdefault(value, value)  # one string object per value
                elif value.__class__ not in INDEXABLE:
                    continue
                bucket = index.ids.get(value)
                if bucket is None:
                    index.ids[value] = bucket = {}
                bucket[doc_id] = None
        for doc_id, doc in pairs:
            if doc.get("updated_at") == doc.get("created_at") and "created_at" in doc:
                doc["updated_at"] = doc["created_at"]
        self.next_id = max(self.docs, default=0) + 1

    def column(self, path: tuple) -> dict[int, Any]:
        """doc_id -> value at `path`, in creation order, kept up to date by apply.

        Scanning one compact column is several times faster than visiting
        every record; the most recently used MAX_COLUMNS paths are kept.
        """
        entry = self.columns.pop(path, None)
        if entry is None:
            get = _getter(path)
            entry = (get, {doc_id: get(doc) for doc_id, doc in self.docs.items()})
            if len(self.columns) >= self.MAX_COLUMNS:
                del self.columns[next(iter(self.columns))]
        self.columns[path] = entry
        return entry[1]

    def matching(self, key: tuple, id_sets: list, tests: list) -> tuple[Iterable[int], bool]:
        """The ids found in every one of `id_sets`, in creation order, and whether `tests` ran.

        `key` names the sets and the tests (the filters they answer; `tests` are
        record predicates). The first use since the last write runs lazily,
        leaving the tests to the caller, so a page stops early; the second keeps
        the ids that pass every test until the next write, so a repeated query
        then costs one lookup.
        """
        ids = self.intersections.get(key, MISSING)
        if ids.__class__ is tuple:
            return ids, True
        smallest, *others = sorted(id_sets, key=len)
        found = iter(smallest)
        for other in others:
            found = filter(other.__contains__, found)  # at C speed
        if ids is MISSING:
            if len(self.intersections) >= self.MAX_INTERSECTIONS:
                self.forget_intersections()
            self.intersections[key] = None  # seen once
            return found, False
        docs = self.docs
        for test in tests:
            found = filter(lambda doc_id, test=test: test(docs[doc_id]), found)
        ids = tuple(found)
        if self.intersection_ids + len(ids) > self.MAX_INTERSECTION_IDS:
            self.forget_intersections()
        self.intersections[key] = ids
        self.intersection_ids += len(ids)
        return ids, True

    def forget_intersections(self) -> None:
        self.intersections.clear()
        self.intersection_ids = 0

    def get(self, key) -> dict | None:
        doc_id = self.by_key.get(key)
        return None if doc_id is None else self.docs[doc_id]

    def doc_id(self, key) -> int | None:
        return self.by_key.get(key)

    def find_unique(self, name: str, value) -> dict | None:
        doc_id = self.unique[name].get(value)
        return None if doc_id is None else self.docs[doc_id]

    def new_doc_id(self) -> int:
        doc_id, self.next_id = self.next_id, self.next_id + 1
        return doc_id

    def apply(self, doc_id: int, doc: dict | None) -> None:
        """Put `doc` under `doc_id` (None deletes it), keeping every index true."""
        if self.intersections:
            self.forget_intersections()
        old = self.docs.get(doc_id)
        if old is not None:
            self.by_key.pop(old.get(self.key), None)
            for name, ids in self.unique.items():
                if ids.get(old.get(name)) == doc_id:
                    del ids[old[name]]
            for index in self.indexes.values():
                index.remove(doc_id, old)
        for get, column in self.columns.values():
            if doc is None:
                column.pop(doc_id, None)
            else:
                column[doc_id] = get(doc)
        if doc is None:
            self.docs.pop(doc_id, None)
            return
        self.docs[doc_id] = doc
        self.next_id = max(self.next_id, doc_id + 1)
        self.by_key[doc[self.key]] = doc_id
        for name, ids in self.unique.items():
            if name in doc:
                ids[doc[name]] = doc_id
        for index in self.indexes.values():
            index.add(doc_id, doc)

    def dump(self) -> dict:
        return {str(doc_id): doc for doc_id, doc in self.docs.items()}


STAT_INDEXED = ("organization", "type", "anr", "year", "quarter", "month", "week", "day")


class Store:
    """The database: tables in memory, a journal for durability, a TinyDB file as checkpoint.

    A write applies its changes in memory at once, then `commit` appends them
    to the journal as one line and waits for the fsync that covers it;
    concurrent writers share one fsync. When the journal outgrows the last
    checkpoint, new writes pause, the tables are written to the TinyDB file
    atomically, and the journal starts empty.
    """

    MIN_CHECKPOINT_BYTES = 8 * 1024 * 1024

    def __init__(self, path: str):
        self.path = path
        self.journal_path = path + ".journal"
        self.lock_path = path + ".lock"
        self._lock_fd: int | None = None
        self._journal_fd: int | None = None
        self._journal_size = 0
        self._checkpoint_at = self.MIN_CHECKPOINT_BYTES
        self._pending: list[tuple[bytes, asyncio.Future]] = []
        self._wake: asyncio.Event | None = None
        self._writable: asyncio.Event | None = None
        self._flusher: asyncio.Task | None = None
        self._extra_tables: dict = {}
        self._closing = False
        self._broken: str | None = None
        self.open_seconds = 0.0  # what the last open took
        self._new_tables()

    def _new_tables(self) -> None:
        self._use_tables(self._empty_tables())

    @staticmethod
    def _empty_tables() -> dict[str, Table]:
        return {"organizations": Table("organizations", key="name", unique=("token_sha256",), indexed=("is_admin",)),
                "stats": Table("stats", key="id", unique=("uuid",), indexed=STAT_INDEXED)}

    def _use_tables(self, tables: dict[str, Table]) -> None:
        self.tables = tables
        self.orgs, self.stats = tables["organizations"], tables["stats"]

    # opening and closing

    def lock(self) -> None:
        """Take the database for this process, or raise DatabaseLocked at once."""
        if not os.path.isdir(os.path.dirname(os.path.abspath(self.path))):
            raise StorageError(f"the folder of the database {self.path} does not exist")
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise StorageError(f"cannot create the lock file {self.lock_path}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise DatabaseLocked(f"the database {self.path} is in use by another statsd process"
                                 f" (pid {holder})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd

    def open(self) -> None:
        """Lock, load the file, replay and fold the journal, open a fresh journal."""
        if self._lock_fd is None:
            self.lock()
        folder = os.path.dirname(os.path.abspath(self.path))
        started = time.perf_counter()
        replayed = self._load()
        if replayed or not os.path.exists(self.path):
            self._write_checkpoint()
        if os.path.exists(self.journal_path):
            os.unlink(self.journal_path)
            _fsync_folder(folder)
        self._journal_fd = os.open(self.journal_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        _fsync_folder(folder)  # the journal's entry must survive a power cut too
        self._journal_size = 0
        self._checkpoint_at = max(self.MIN_CHECKPOINT_BYTES, os.path.getsize(self.path))
        self.open_seconds = time.perf_counter() - started  # load, journal replay and fold

    def _load(self) -> int:
        """Fill memory from the checkpoint and the journal; the number of journal lines.

        The tables in use are replaced only once everything was read.
        """
        tables = self._empty_tables()
        gc.disable()  # millions of new objects: collecting meanwhile triples the load time
        try:
            data = AtomicJSONStorage(self.path).read() or {}
            extra_tables = {k: v for k, v in data.items() if k not in tables}
            for name, table in tables.items():
                pairs = []
                for doc_id, doc in data.get(name, {}).items():
                    if not (doc_id.isdigit() and isinstance(doc, dict) and isinstance(doc.get(table.key), str)):
                        raise StorageError(f"{self.path}: table {name}, document {doc_id} is not a"
                                           f" statsd record; the file was left untouched")
                    pairs.append((int(doc_id), doc))
                table.load(pairs)
            replayed = self._replay(tables)
            self._extra_tables = extra_tables
            self._use_tables(tables)
            return replayed
        finally:
            gc.enable()
            gc.freeze()  # the records live long: keep them out of every later collection

    def _replay(self, tables: dict[str, Table]) -> int:
        """Apply the journal's transactions; cut a torn last line, refuse a corrupt middle."""
        try:
            with open(self.journal_path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return 0
        count, offset = 0, 0
        while offset < len(raw):
            end = raw.find(b"\n", offset)
            ops = _decode_journal_line(raw[offset:end]) if end != -1 else None
            if ops is None:
                rest = raw[offset:]
                if end == -1 or not rest[rest.find(b"\n") + 1:].strip():
                    log.warning("journal %s: dropping a torn last line (%d bytes) left by a crash",
                                self.journal_path, len(rest))
                    break
                raise StorageError(f"journal {self.journal_path} is corrupt at byte {offset};"
                                   " statsd refuses to guess: restore a backup, or move the journal"
                                   " away to start from the last checkpoint")
            for table, doc_id, doc in ops:
                tables[table].apply(doc_id, doc)
            count += 1
            offset = end + 1
        return count

    def _write_checkpoint(self) -> int:
        data = dict(self._extra_tables)
        data.update({name: table.dump() for name, table in self.tables.items()})
        AtomicJSONStorage(self.path).write(data)
        return os.path.getsize(self.path)

    async def start(self) -> None:
        """Open, then start the task that writes the journal."""
        self.open()
        self._wake = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self._closing = False
        self._flusher = asyncio.create_task(self._flush_forever())

    async def close(self) -> None:
        """Write what is pending, fold the journal into the file, release the lock."""
        if self._flusher is not None:
            self._closing = True  # the flusher finishes what it does, drains, and ends
            self._wake.set()
            await self._flusher
            self._flusher = None
        if self._journal_fd is not None and self._broken is not None:
            log.error("not folding the journal into %s: memory may be behind the disk since"
                      " %s; the journal is kept and replayed at the next start", self.path, self._broken)
            os.close(self._journal_fd)
            self._journal_fd = None
        if self._journal_fd is not None:
            try:
                if self._journal_size:  # else the file already holds everything
                    self._write_checkpoint()
                os.ftruncate(self._journal_fd, 0)
                os.close(self._journal_fd)
                os.unlink(self.journal_path)
            except OSError as e:
                log.error("could not fold the journal into %s (%s); it is kept and will be"
                          " replayed at the next start", self.path, e)
            self._journal_fd = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # writing

    async def writable(self) -> None:
        """Wait while a checkpoint is being written."""
        if not self._writable.is_set():
            await self._writable.wait()

    def apply(self, ops: list[tuple[str, int, dict | None]]) -> asyncio.Future:
        """Apply `ops` in memory now; the future is done when they are on disk.

        Call it with no await between the checks that justify the ops and this call.
        """
        if self._broken is not None:
            raise StorageError(f"the database cannot be written since an earlier failure"
                               f" ({self._broken}); restart statsd")
        line = _encode_journal_line(ops)
        for table, doc_id, doc in ops:
            self.tables[table].apply(doc_id, doc)
        future = asyncio.get_running_loop().create_future()
        self._pending.append((line, future))
        self._wake.set()
        return future

    async def commit(self, ops: list[tuple[str, int, dict | None]]) -> None:
        """Apply `ops` and return once they are durable (raises StorageError if not)."""
        await self.apply(ops)

    async def _flush_forever(self) -> None:
        """The only writer of the journal and the file: one flush or checkpoint at a time."""
        while not self._closing:
            await self._wake.wait()
            self._wake.clear()
            await self._flush_pending()
            if self._journal_size >= self._checkpoint_at and not self._closing:
                await self._checkpoint()
        await self._flush_pending()

    async def _flush_pending(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            batch, self._pending = self._pending, []
            data = b"".join(line for line, _ in batch)
            try:
                await loop.run_in_executor(None, self._append, data)
            except Exception as e:  # noqa: BLE001 - whatever it was, these writes are not on disk
                self._recover(batch, e)
                continue
            for _, future in batch:
                if not future.done():
                    future.set_result(None)

    def _append(self, data: bytes) -> None:
        try:
            _write_all(self._journal_fd, data)
            os.fdatasync(self._journal_fd)
        except OSError as error:
            try:
                os.ftruncate(self._journal_fd, self._journal_size)  # drop the partial line
            except OSError as e:
                self._broken = f"the journal could not be cut back after a failed write ({e})"
            raise error
        self._journal_size += len(data)

    def _recover(self, batch, error: Exception) -> None:
        """A journal write failed: fail every write not on disk and reload what is."""
        failed = batch + self._pending
        self._pending = []
        log.error("journal write failed (%s); %d write(s) refused, reloading from disk",
                  error, len(failed))
        try:
            self._load()
        except Exception as e:  # noqa: BLE001 - memory may now be ahead of the disk
            log.critical("reloading %s failed (%s): refusing every write until restart", self.path, e)
            self._broken = str(e)
        reason = getattr(error, "strerror", None) or error
        exc = StorageError(f"the database could not be written ({reason});"
                           " nothing of this request was stored", getattr(error, "errno", None))
        for _, future in failed:
            if not future.done():
                future.set_exception(exc)

    async def _checkpoint(self) -> None:
        """Pause writers, write the tables to the TinyDB file, empty the journal."""
        self._writable.clear()
        try:
            await self._flush_pending()
            loop = asyncio.get_running_loop()
            size = await loop.run_in_executor(None, self._write_checkpoint)
            os.ftruncate(self._journal_fd, 0)
            os.fsync(self._journal_fd)
            self._journal_size = 0
            self._checkpoint_at = max(self.MIN_CHECKPOINT_BYTES, size)
        except Exception as e:  # noqa: BLE001 - the journal still holds every write
            log.error("checkpoint of %s failed (%s); the journal is kept", self.path, e)
            self._checkpoint_at = self._journal_size + self.MIN_CHECKPOINT_BYTES
        finally:
            self._writable.set()


def _encode_journal_line(ops) -> bytes:
    body = orjson.dumps(ops)
    return b"%08x %s\n" % (zlib.crc32(body), body)


def _decode_journal_line(line: bytes):
    """The ops of one journal line, or None when it is torn or damaged."""
    if len(line) < 10 or line[8:9] != b" ":
        return None
    body = line[9:]
    try:
        if int(line[:8], 16) != zlib.crc32(body):
            return None
        ops = orjson.loads(body)
    except ValueError:
        return None
    return [(t, int(i), d) for t, i, d in ops]


class IdGenerator:
    """24-hex ids in the shape of MongoDB ObjectIds: time, process random, counter."""

    def __init__(self):
        self.random = secrets.token_hex(5)
        self.counter = secrets.randbelow(1 << 24)

    def __call__(self) -> str:
        self.counter = (self.counter + 1) & 0xFFFFFF
        return f"{int(time.time()) & 0xFFFFFFFF:08x}{self.random}{self.counter:06x}"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


# ----------------------------------------------------------------- query ---

class ApiError(Exception):
    """An error answered to the client as the JSON error object."""

    NAMES = {400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound",
             405: "MethodNotAllowed", 409: "Conflict", 413: "RequestEntityTooLarge",
             415: "UnsupportedMediaType", 426: "UpgradeRequired", 429: "TooManyRequests",
             500: "InternalServerError",
             503: "ServiceUnavailable", 507: "InsufficientStorage"}

    def __init__(self, status: int, message: str, errors=None, headers=None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.errors = errors
        self.headers = headers or {}


def bad_request(message: str, errors=None) -> ApiError:
    return ApiError(400, message, errors)


INT_RE = re.compile(r"[+-]?[0-9]{1,25}")
INT64 = (-(1 << 63), (1 << 63) - 1)


def parse_int(raw: str) -> int | None:
    """A query value as a 64-bit integer (the range a stat may hold), or None."""
    if not INT_RE.fullmatch(raw):
        return None
    number = int(raw)
    return number if INT64[0] <= number <= INT64[1] else None
STRING_OPS = ("contains", "icontains", "startswith", "istartswith", "endswith", "iendswith", "iexact")
COMPARE_OPS = ("lt", "lte", "gt", "gte")
OPERATORS = ("exact", "ne", "in", "nin", "exists") + COMPARE_OPS + STRING_OPS


def _kind(value) -> int:
    """Type rank used to compare and order values of mixed types."""
    if value is MISSING:
        return 0
    if value is None:
        return 1
    if isinstance(value, bool):
        return 2
    if isinstance(value, (int, float)):
        return 3
    if isinstance(value, str):
        return 4
    return 5


def parse_uuid(value: str) -> str | None:
    try:
        return str(uuidlib.UUID(value)) if isinstance(value, str) else None
    except ValueError:
        return None


def parse_datetime(value: str) -> str | None:
    """A date or date-time (any offset) as a naive UTC ISO string with microseconds."""
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    if moment.tzinfo is not None:
        moment = moment.astimezone(timezone.utc).replace(tzinfo=None)
    return moment.isoformat(timespec="microseconds")


DATE_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def parse_date(value) -> str | None:
    """A calendar date written YYYY-MM-DD, or None."""
    if not isinstance(value, str) or not DATE_RE.fullmatch(value):
        return None
    try:
        date.fromisoformat(value)
    except ValueError:
        return None
    return value


def parse_json_scalar(raw: str):
    """A query value inside `data`: a JSON number, true, false or null, else the string."""
    if raw in ("true", "false", "null") or re.fullmatch(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?", raw):
        try:
            value = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return raw
        if not (isinstance(value, float) and not math.isfinite(value)):
            return value
    return raw


def _convert_int(raw: str, name: str):
    number = parse_int(raw)
    if number is None:
        raise bad_request(f"{name}: {raw!r} is not a 64-bit integer")
    return number


def _convert_anr(raw: str, name: str):
    number = parse_int(raw)
    if number is not None:
        return number
    value = parse_uuid(raw)
    if value is None:
        raise bad_request(f"{name}: {raw!r} is neither an integer nor a UUID")
    return value


def _convert_uuid(raw: str, name: str):
    value = parse_uuid(raw)
    if value is None:
        raise bad_request(f"{name}: {raw!r} is not a UUID")
    return value


def _convert_datetime(raw: str, name: str):
    value = parse_datetime(raw)
    if value is None:
        raise bad_request(f"{name}: {raw!r} is not a date (2020-05-12) or date-time"
                          " (2020-05-12T22:29:42.362000)")
    return value


def _convert_date(raw: str, name: str):
    value = parse_date(raw)
    if value is None:
        raise bad_request(f"{name}: {raw!r} is not a date written YYYY-MM-DD (2020-05-12)")
    return value


def _convert_bool(raw: str, name: str):
    if raw not in ("true", "false"):
        raise bad_request(f"{name}: {raw!r} is not true or false")
    return raw == "true"


# field name -> (converter of a query value, whether string operators apply)
STAT_FIELDS = {
    "id": (lambda raw, name: raw, True),
    "uuid": (_convert_uuid, True),
    "organization": (lambda raw, name: raw, True),
    "anr": (_convert_anr, True),
    "type": (lambda raw, name: raw, True),
    "date": (_convert_date, True),
    "day": (_convert_int, False),
    "week": (_convert_int, False),
    "month": (_convert_int, False),
    "quarter": (_convert_int, False),
    "year": (_convert_int, False),
    "data": (lambda raw, name: parse_json_scalar(raw), True),
    "created_at": (_convert_datetime, True),
    "updated_at": (_convert_datetime, True),
}
ORG_FIELDS = {
    "id": (lambda raw, name: raw, True),
    "name": (lambda raw, name: raw, True),
    "is_admin": (_convert_bool, False),
    "created_at": (_convert_datetime, True),
    "updated_at": (_convert_datetime, True),
}


def _getter(path: tuple[str, ...]) -> Callable[[dict], Any]:
    """A function reading a field, or a path inside it, from a record (MISSING if absent)."""
    if len(path) == 1:
        name = path[0]
        return lambda doc: doc.get(name, MISSING)

    def get(doc):
        value = doc
        for part in path:
            if isinstance(value, dict):
                value = value.get(part, MISSING)
            elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
                value = value[int(part)]
            else:
                return MISSING
            if value is MISSING:
                return MISSING
        return value
    return get


def _same(stored, wanted) -> bool:
    """Equality that never confuses types (true is not 1, "1" is not 1)."""
    return stored == wanted and _kind(stored) == _kind(wanted)


NUMBER = (int, float)
COMPARE = {"lt": operator.lt, "lte": operator.le, "gt": operator.gt, "gte": operator.ge}


def _value_test(op: str, value) -> Callable[[Any], bool]:
    """The test of one filter on a stored value (MISSING when the record lacks it)."""
    if op == "exact":
        if value.__class__ is str:  # the common case, made fast
            return lambda s: s.__class__ is str and s == value
        return lambda s: _same(s, value)
    if op == "ne":
        exact = _value_test("exact", value)
        return lambda s: not exact(s)
    if op in ("in", "nin"):
        keyed = {(_kind(v), v) for v in value}
        hit = lambda s: s is not MISSING and _hashable_or_none(s) and (_kind(s), s) in keyed
        return hit if op == "in" else (lambda s: not hit(s))
    if op == "exists":
        return lambda s: (s is not MISSING) == value
    if op in COMPARE:
        compare = COMPARE[op]
        if value.__class__ is str:
            return lambda s: s.__class__ is str and compare(s, value)
        if value.__class__ in NUMBER:
            return lambda s: s.__class__ in NUMBER and compare(s, value)
        return lambda s: False  # only numbers and strings are ordered
    low = value.casefold()
    test = {"iexact": lambda s: s.casefold() == low,
            "contains": lambda s: value in s, "icontains": lambda s: low in s.casefold(),
            "startswith": lambda s: s.startswith(value), "istartswith": lambda s: s.casefold().startswith(low),
            "endswith": lambda s: s.endswith(value), "iendswith": lambda s: s.casefold().endswith(low)}[op]
    return lambda s: s.__class__ is str and test(s)


def _hashable_or_none(value) -> bool:
    return value is None or isinstance(value, (str, int, float))


def _number_comparison(name: str, op: str, value) -> Callable[[dict], bool]:
    """`record[name] OP value` for a number, in one call (period filters run on many records)."""
    if op == "lt":
        return lambda doc: (s := doc.get(name)).__class__ in NUMBER and s < value
    if op == "lte":
        return lambda doc: (s := doc.get(name)).__class__ in NUMBER and s <= value
    if op == "gt":
        return lambda doc: (s := doc.get(name)).__class__ in NUMBER and s > value
    return lambda doc: (s := doc.get(name)).__class__ in NUMBER and s >= value


@dataclass
class Filter:
    """One `field__operator=value` condition."""

    path: tuple
    op: str
    value: Any

    @functools.cached_property
    def key(self) -> tuple:
        """This filter as a dictionary key."""
        return self.path, self.op, tuple(self.value) if self.value.__class__ is list else self.value

    @functools.cached_property
    def test(self) -> Callable[[Any], bool]:
        """The test of a stored value."""
        return _value_test(self.op, self.value)

    @functools.cached_property
    def predicate(self) -> Callable[[dict], bool]:
        """The test applied to a whole record."""
        if len(self.path) == 1 and self.op in COMPARE and self.value.__class__ in NUMBER:
            return _number_comparison(self.path[0], self.op, self.value)
        test = self.test
        if len(self.path) == 1:
            name = self.path[0]
            return lambda doc: test(doc.get(name, MISSING))
        get = _getter(self.path)
        return lambda doc: test(get(doc))


@dataclass
class Query:
    """A parsed list request: filters, order, fields and page."""

    filters: list = field(default_factory=list)
    order_by: list = field(default_factory=list)  # (getter, descending)
    fields: list | None = None
    skip: int = 0
    limit: int = 100


PAGE_ALIASES = {"_skip": "_skip", "offset": "_skip", "_limit": "_limit", "limit": "_limit"}


def parse_query(params, schema: dict, config: Config, extra: Iterable[str] = (),
                stored_as: dict[str, str] | None = None) -> Query:
    """Turn query parameters into a Query; anything unknown or malformed is a 400.

    `stored_as` maps a field that answers carry to the record field holding it
    (an organization's `id` is its `name`).
    """
    stored_as = stored_as or {}
    query = Query(limit=config.default_limit)
    seen: dict[str, str] = {}
    for name, raw in params.items():
        canonical = PAGE_ALIASES.get(name, name)
        if canonical in seen:
            also = "" if seen[canonical] == name else f" (as {seen[canonical]})"
            raise bad_request(f"query parameter {name!r} is given more than once{also}")
        seen[canonical] = name
        if canonical in ("_skip", "_limit"):
            number = parse_int(raw)
            if number is None or number < 0:
                raise bad_request(f"{name}: {raw!r} is not a non-negative 64-bit integer")
            if canonical == "_limit" and number > config.max_limit:
                raise bad_request(f"{name}: {raw!r} is above the maximum of {config.max_limit}")
            setattr(query, canonical[1:], number)
        elif name == "_order_by":
            query.order_by = [_parse_order(part, schema, stored_as) for part in raw.split(",")]
        elif name == "_fields":
            query.fields = _parse_fields(raw, schema)
        elif name == "api_key" or name in extra:
            pass
        elif name.startswith("_"):
            raise bad_request(f"unknown query parameter {name!r}")
        else:
            _parse_filter(name, raw, schema, query, stored_as)
    return query


def _split_field(name: str, schema: dict, what: str, stored_as: dict[str, str]) -> tuple[str, ...]:
    """The path of a field (or of a place inside `data`) in the stored records."""
    path = tuple(name.split("__"))
    if path[0] not in schema or (len(path) > 1 and path[0] != "data") or "" in path:
        raise bad_request(f"unknown field {name!r} in {what}")
    return (stored_as.get(path[0], path[0]),) + path[1:]


def _parse_order(part: str, schema: dict, stored_as: dict[str, str]):
    descending = part.startswith("-")
    name = part[1:] if descending else part
    return _getter(_split_field(name, schema, "_order_by", stored_as)), descending


def _parse_fields(raw: str, schema: dict) -> list[str]:
    names = raw.split(",")
    for name in names:
        if name not in schema and name not in ("link", "links"):
            raise bad_request(f"unknown field {name!r} in _fields")
    return names


def _parse_filter(name: str, raw: str, schema: dict, query: Query, stored_as: dict[str, str]) -> None:
    path = name.split("__")
    op = "exact"
    if len(path) > 1 and path[-1] in OPERATORS:
        op = path.pop()
    elif path[0] != "data" and len(path) > 1:
        raise bad_request(f"unknown operator {path[-1]!r} in {name!r}"
                          f" (operators: {', '.join(OPERATORS)})")
    path = _split_field("__".join(path), schema, f"filter {name!r}", stored_as)
    convert, strings_ok = schema[path[0]]
    if op == "exists":
        value = _convert_bool(raw, name)
    elif op in STRING_OPS:
        if not strings_ok:
            raise bad_request(f"{name}: the string operator {op!r} does not apply to"
                              f" the integer field {path[0]!r}")
        value = raw
    elif op in ("in", "nin"):
        value = [convert(item, name) for item in raw.split(",")]
    else:
        value = convert(raw, name)
    query.filters.append(Filter(path, op, value))


def _order_key(getter):
    def key(doc):
        value = getter(doc)
        kind = _kind(value)
        if kind == 5:
            value = orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
        elif kind < 2:
            value = 0
        return kind, value
    return key


def _index_ids(table: Table, f: Filter) -> dict | None:
    """The ids an index gives for an equality filter, or None when no index applies."""
    if f.op != "exact" or len(f.path) != 1 or not _hashable(f.value):
        return None
    name = f.path[0]
    if name == table.key or name in table.unique:
        doc_id = table.doc_id(f.value) if name == table.key else table.unique[name].get(f.value)
        return {} if doc_id is None or not _same(table.docs[doc_id][name], f.value) else {doc_id: None}
    index = table.indexes.get(name)
    return None if index is None else index.lookup(f.value)


def _candidates(table: Table, filters: list[Filter]) -> tuple[Iterable[dict], list[Filter]]:
    """Records worth testing, in creation order, and the filters still to apply to them.

    Equality filters on indexed fields become an intersection of id sets (with
    the other filters on indexed fields, kept by Table.matching); else a filter
    inside `data` is run over that path's value column; else every record.
    """
    docs = table.docs
    indexed, narrowing, rest = [], [], []
    for f in filters:
        ids = _index_ids(table, f)
        if ids is not None:
            indexed.append((f, ids))
        elif len(f.path) == 1 and f.path[0] in table.indexes:
            narrowing.append(f)  # a cheap test of an indexed field, such as month__gte=6
        else:
            rest.append(f)
    if len(indexed) == 1 and not narrowing:
        return map(docs.__getitem__, indexed[0][1]), rest
    if indexed:
        key = tuple(f.key for f, _ in indexed) + tuple(f.key for f in narrowing)
        ids, tested = table.matching(key, [ids for _, ids in indexed], [f.predicate for f in narrowing])
        return map(docs.__getitem__, ids), rest if tested else narrowing + rest
    rest = narrowing + rest
    for position, f in enumerate(rest):
        if f.path[0] == "data":
            test, column = f.test, table.column(f.path)
            return (docs[i] for i, value in column.items() if test(value)), rest[:position] + rest[position + 1:]
    return docs.values(), rest


def run_query(table: Table, query: Query) -> tuple[list[dict], bool]:
    """The page of matching records and whether more follow it."""
    records, remaining = _candidates(table, query.filters)
    predicates = [f.predicate for f in remaining]
    if len(predicates) == 1:
        matches = filter(predicates[0], records)
    elif predicates:
        matches = (d for d in records if all(p(d) for p in predicates))
    else:
        matches = records
    if query.order_by:
        ordered = sorted(matches, key=lambda d: d[table.key])
        for getter, descending in reversed(query.order_by):
            ordered.sort(key=_order_key(getter), reverse=descending)
        page = ordered[query.skip:query.skip + query.limit + 1]
    else:
        page = list(itertools.islice(matches, query.skip, query.skip + query.limit + 1))
    return page[:query.limit], len(page) > query.limit


# ------------------------------------------------------ validation of bodies ---

STAT_CLIENT_FIELDS = ("uuid", "organization", "anr", "type", "date", "day", "week", "month", "quarter", "year",
                      "data")
STAT_READ_ONLY = ("id", "created_at", "updated_at", "link", "links")
PERIODS = {"day": (1, 366), "week": (1, 53), "month": (1, 12), "quarter": (1, 4)}
MAX_DATA_DEPTH = 64


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and INT64[0] <= value <= INT64[1]


CONTAINERS = (dict, list)


def _depth_ok(value, limit: int = MAX_DATA_DEPTH) -> bool:
    """Whether objects and arrays nest at most `limit` deep in `value` (parsed JSON)."""
    if value.__class__ is dict:
        children = value.values()
    elif value.__class__ is list:
        children = value
    else:
        return True
    if limit < 1:
        return False
    for child in children:
        if child.__class__ in CONTAINERS and not _depth_ok(child, limit - 1):
            return False
    return True


def check_stat_value(name: str, value) -> tuple[Any, str | None]:
    """(normalized value, None) or (None, what is wrong) for one client field."""
    if value.__class__ is float and value.is_integer() and (name in PERIODS or name in ("anr", "year")):
        value = int(value)  # JSON does not tell 1.0 from 1 (nor does the OpenAPI description)
    if name == "uuid":
        parsed = parse_uuid(value)
        return (parsed, None) if parsed else (None, "must be a UUID string")
    if name == "anr":
        if _is_int(value):
            return value, None
        parsed = parse_uuid(value)
        return (parsed, None) if parsed else (None, "must be an integer or a UUID string")
    if name == "type":
        if not isinstance(value, str) or not 1 <= len(value) <= 120 or not value.strip():
            return None, "must be a string of 1 to 120 characters, not only white space"
        return value, None
    if name == "date":
        parsed = parse_date(value)
        return (parsed, None) if parsed else (None, "must be a date written YYYY-MM-DD")
    if name in PERIODS:
        low, high = PERIODS[name]
        if not _is_int(value) or not low <= value <= high:
            return None, f"must be an integer from {low} to {high}"
        return value, None
    if name == "year":
        return (value, None) if _is_int(value) else (None, "must be an integer")
    if name == "data":
        return (value, None) if _depth_ok(value) else (None, f"is nested deeper than {MAX_DATA_DEPTH} levels")
    if name == "organization":
        return (value, None) if isinstance(value, str) else (None, "must be an organization name")
    raise AssertionError(name)


PERIOD_FIELDS = ("day", "week", "month", "quarter", "year")


def periods_of(day: str) -> dict:
    """The periods of a YYYY-MM-DD date: day of year, ISO week, month, quarter, year."""
    moment = date.fromisoformat(day)
    return {"day": moment.timetuple().tm_yday, "week": moment.isocalendar().week, "month": moment.month,
            "quarter": (moment.month - 1) // 3 + 1, "year": moment.year}


def derive_periods(clean: dict, body: dict) -> None:
    """A write that sets `date` and no period field gets the periods of that date."""
    if "date" in clean and not any(name in body for name in PERIOD_FIELDS):
        clean.update(periods_of(clean["date"]))


def _link_path_matches(value, path: str) -> bool:
    """Whether a link string sent back points at `path` (the host may differ)."""
    found = re.search(r"href='([^']*)'", value) if isinstance(value, str) else None
    return bool(found) and urlsplit(found.group(1)).path == path


# ------------------------------------------- auth and rate-limit middleware ---

@dataclass
class Caller:
    """Who is asking: an organization (or None with authentication off)."""

    organization: str | None
    is_admin: bool
    token_sha256: str | None = None  # to look the key up again after an await

    @property
    def sees_all(self) -> bool:
        return self.is_admin


CONFIG_KEY = web.AppKey("config", Config)
STORE_KEY = web.AppKey("store", Store)
IDS_KEY = web.AppKey("ids", IdGenerator)
RATE_LIMIT_KEY = web.AppKey("rate_limit", object)
TRUSTED_PROXIES_KEY = web.AppKey("trusted_proxies", list)
LIMITER_KEY = web.AppKey("limiter", Limiter)
CALLER_KEY = web.RequestKey("caller", Caller)
LIMIT_HEADERS_KEY = web.RequestKey("limit_headers", dict)  # for answers whose headers leave before the handler returns
STAT_VIEWS_KEY = web.AppKey("stat_views", object)
STAT_QUERIES_KEY = web.AppKey("stat_queries", object)


def client_address(request: web.Request) -> str:
    """The client's address; X-Forwarded-For is believed only from a trusted proxy.

    Walks the forwarded chain from the nearest hop outwards for as long as the
    hop that handed the request on is a trusted proxy.
    """
    address = peer_address(request)
    proxies = request.app[TRUSTED_PROXIES_KEY]
    if not proxies:
        return address
    forwarded = [hop.strip() for header in request.headers.getall("X-Forwarded-For", [])
                 for hop in header.split(",")]
    for hop in reversed(forwarded):
        if not _is_trusted(address, proxies):
            break
        try:
            address = str(ipaddress.ip_address(hop))
        except ValueError:
            break
    return address


def peer_address(request: web.Request) -> str:
    """The address of the other end of the connection."""
    peer = request.transport.get_extra_info("peername") if request.transport else None
    return peer[0] if isinstance(peer, tuple) else (request.remote or "unknown")


def _is_trusted(address: str, proxies: list) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in proxies)


def endpoint_of(request: web.Request) -> str:
    """Route and method, so the number of rate-limit counters stays bounded."""
    route = request.match_info.route
    resource = route.resource if route is not None else None
    if resource is None or request.match_info.http_exception is not None:
        return f"{request.method} <unknown route>"
    return f"{request.method} {resource.canonical.rstrip('/')}"


def error_response(request: web.Request, status: int, message: str, errors=None, headers=None) -> web.Response:
    """The JSON error object of both specs."""
    path = request.path
    prefix = V1_PREFIX if path.startswith(V1_PREFIX + "/") else API_PREFIX
    target = "stats" if path.startswith(prefix + "/stats") else \
        "organizations" if path.startswith(prefix + "/organizations") else path
    body = {"error": message, "status": "failed", "action": request.method, "target": target,
            "exception_msg": message, "status_code": status,
            "exception_cls": ApiError.NAMES.get(status, "HTTPException")}
    if prefix == V1_PREFIX:
        body["Error"] = message  # the key the upstream stats service answers with
    if errors:
        body["errors"] = errors
    return web.Response(body=orjson.dumps(body), status=status, headers=headers,
                        content_type="application/json")


RATE_LIMIT_MAX_COUNTERS = 10000  # bounds the rate-limit memory: at most this many (client, endpoint) counters


@web.middleware
async def api_middleware(request: web.Request, handler):
    """Every request, in order: the rate limit, the caller, and errors as the JSON error object.

    One middleware rather than three, since every request pays for each one.
    """
    limit_headers = None
    if request.app[RATE_LIMIT_KEY] is not None and request.path.startswith("/api/"):
        limit_headers, refusal = await count_request(request)
        if refusal is not None:
            return refusal
        request[LIMIT_HEADERS_KEY] = limit_headers
    try:
        authenticate(request)
        response = await handler(request)
    except ApiError as e:
        response = error_response(request, e.status, e.message, e.errors, e.headers)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        headers = {k: v for k, v in e.headers.items() if k in ("Allow",)}
        response = error_response(request, e.status, _http_message(request, e), headers=headers)
    except StorageError as e:
        status = 507 if e.errno in (errno.ENOSPC, errno.EDQUOT) else 503
        response = error_response(request, status, str(e))
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("internal error on %s %s", request.method, request.path)
        response = error_response(request, 500, "Internal Server Error: the failure was logged on the server")
    if limit_headers is not None and not response.prepared:
        response.headers.update(limit_headers)
    return response


async def count_request(request: web.Request) -> tuple[dict, web.Response | None]:
    """Count an /api/ request per client and endpoint: its X-Rate-Limit-* headers, and a 429 if over."""
    item = request.app[RATE_LIMIT_KEY]
    limiter: Limiter = request.app[LIMITER_KEY]
    key = (client_address(request), endpoint_of(request))
    counters = limiter.db.events  # limits' MemoryStorage frees a counter only when its window has passed
    if len(counters) >= RATE_LIMIT_MAX_COUNTERS and item.key_for(*key) not in counters:
        key = ("<too many clients>", key[1])  # new clients share one counter until old ones expire
    allowed = await limiter.moving_window.hit(item, *key)
    stats = await limiter.moving_window.get_window_stats(item, *key)
    headers = {"X-Rate-Limit-Limit": str(item.amount), "X-Rate-Limit-Remaining": str(stats.remaining),
               "X-Rate-Limit-Reset": str(math.ceil(stats.reset_time))}
    if allowed:
        return headers, None
    headers["Retry-After"] = str(max(1, math.ceil(stats.reset_time - time.time())))
    return headers, error_response(request, 429, f"Too Many Requests: at most {item} per client"
                                   " and endpoint; see Retry-After", headers=headers)


def _http_message(request: web.Request, e: web.HTTPException) -> str:
    if e.status == 404:
        return f"Not Found: no route {request.path}"
    if e.status == 405:
        return f"Method Not Allowed: {request.method} on {request.path} (allowed: {e.headers.get('Allow', '')})"
    if e.status == 413:
        return (f"Request Entity Too Large: the body exceeds max_body_size"
                f" ({request.app[CONFIG_KEY].max_body_size} bytes)")
    return e.reason or str(e)


def authenticate(request: web.Request) -> None:
    """Resolve the API key (X-API-KEY header or api_key argument) to the request's Caller."""
    path = request.path
    if not path.startswith("/api/") or path.startswith(V1_PREFIX + "/") or path in PUBLIC_PATHS:
        return  # /api/v1/ handlers authenticate as the upstream does
    if not request.app[CONFIG_KEY].api_key_authentication:
        request[CALLER_KEY] = Caller(None, True)
        return
    keys = sent_keys(request)
    caller = _caller_for(request.app[STORE_KEY], keys[0]) if len(keys) == 1 else None
    if caller is None:
        raise ApiError(401, "Unauthorized")
    request[CALLER_KEY] = caller


def sent_keys(request: web.Request) -> list[str]:
    """Every API key the request carries: X-API-KEY headers, then api_key arguments."""
    return request.headers.getall("X-API-KEY", []) + request.query.getall("api_key", [])


def _caller_for(store: Store, token: str) -> Caller | None:
    """The organization holding `token`; the hash is looked up, then compared in constant time."""
    digest = hash_token(token)
    org = store.orgs.find_unique("token_sha256", digest)
    if org is None or not hmac.compare_digest(org["token_sha256"], digest):
        return None
    return Caller(org["name"], bool(org.get("is_admin")), digest)


# -------------------------------------------------------------- handlers ---

JSON_HEADERS = {"Content-Type": "application/json"}


def json_response(body, status: int = 200, headers=None) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status,
                        headers={**JSON_HEADERS, **headers} if headers else JSON_HEADERS)


def _link(rel: str, title: str, url: str) -> str:
    return f"<link rel='{rel}' title='{title}' href='{url}'/>"


def stat_path(stat_id: str) -> str:
    return f"{API_PREFIX}/stats/{stat_id}/"


@functools.lru_cache(maxsize=4096)
def org_path(name: str) -> str:
    return f"{API_PREFIX}/organizations/{quote(name, safe='')}/"


@functools.lru_cache(maxsize=4096)
def _parent_links(base: str, organization: str) -> tuple[str]:
    return (_link("parent", "organization", base + org_path(organization)),)


def present_stat(base: str, doc: dict, only: list | None = None) -> dict:
    """A stat as answered: the record plus its hypermedia links (built inline: lists are hot)."""
    out = dict(doc)
    out["link"] = f"<link rel='self' title='stat' href='{base}{API_PREFIX}/stats/{doc['id']}/'/>"
    if "organization" in doc:
        out["links"] = _parent_links(base, doc["organization"])
    if only is not None:
        out = {name: out[name] for name in ("id", *only) if name in out}
    return out


class StatViews:
    """Each stat's answer, serialized once and reused while the stat is unchanged.

    Pages and single stats are then built from bytes. An entry keeps the record
    it was made from, so a changed or deleted stat never answers from it (stored
    records are replaced on write, never changed in place). At most MAX answers
    are kept; when full, it starts over. Answers for an unusually long host
    name are not kept.
    """

    MAX = 20000
    MAX_BASE = 256

    def __init__(self):
        self.entries: dict[str, tuple[dict, str, bytes]] = {}

    def of(self, base: str, doc: dict) -> bytes:
        """The JSON answer for `doc` (splice it into a page with orjson.Fragment)."""
        entry = self.entries.get(doc["id"])
        if entry is not None and entry[0] is doc and entry[1] == base:
            return entry[2]
        view = orjson.dumps(present_stat(base, doc))
        if len(base) > self.MAX_BASE:
            return view
        if len(self.entries) >= self.MAX:
            self.entries.clear()
        self.entries[doc["id"]] = (doc, base, view)
        return view


class ParsedQueries:
    """Parsed list queries by their raw query string: a repeated query is parsed once.

    A query that carries an API key is not kept (no key outlives its request),
    nor one longer than MAX_LENGTH. At most MAX queries are kept; when full, it
    starts over.
    """

    MAX = 512
    MAX_LENGTH = 2048

    def __init__(self, schema: dict, **options):
        self.schema, self.options = schema, options
        self.parsed: dict[str, Query] = {}

    def of(self, request: web.Request) -> Query:
        raw = request.rel_url.raw_query_string
        query = self.parsed.get(raw)
        if query is None:
            query = parse_query(request.query, self.schema, request.app[CONFIG_KEY], **self.options)
            if len(raw) <= self.MAX_LENGTH and "api_key" not in request.query:
                if len(self.parsed) >= self.MAX:
                    self.parsed.clear()
                self.parsed[raw] = query
        return query


def present_org(base: str, doc: dict, only: list | None = None, token: str | None = None) -> dict:
    """An organization as answered; its token only when it was just set."""
    out = {"id": doc["name"], "name": doc["name"], "is_admin": doc["is_admin"],
           "created_at": doc["created_at"], "updated_at": doc["updated_at"],
           "link": _link("self", "organization", base + org_path(doc["name"]))}
    if only is not None:
        out = {name: out[name] for name in ("id", *only) if name in out}
    if token is not None:
        out["token"] = token
    return out


def base_url(request: web.Request) -> str:
    """scheme://host as the client sees it; X-Forwarded-Proto/-Host only from a trusted proxy."""
    scheme, host = request.scheme, request.host
    headers, proxies = request.headers, request.app[TRUSTED_PROXIES_KEY]
    if proxies and ("X-Forwarded-Proto" in headers or "X-Forwarded-Host" in headers) \
            and _is_trusted(peer_address(request), proxies):
        proto = headers.get("X-Forwarded-Proto", scheme).split(",")[0].strip().lower()
        scheme = proto if proto in ("http", "https") else scheme
        host = headers.get("X-Forwarded-Host", host).split(",")[0].strip() or host
    return f"{scheme}://{host}"


def single_query(request: web.Request) -> dict[str, str]:
    """The query parameters, each given once (a repeated one is a 400)."""
    params: dict[str, str] = {}
    for name, raw in request.query.items():
        if name in params:
            raise bad_request(f"query parameter {name!r} is given more than once")
        params[name] = raw
    return params


def only_params(request: web.Request, *allowed: str) -> None:
    """Refuse query parameters a route does not take (the API key is always allowed)."""
    if not request.rel_url.raw_query_string:
        return
    for name in single_query(request):
        if name != "api_key" and name not in allowed:
            raise bad_request(f"unknown query parameter {name!r}")


async def read_json(request: web.Request):
    """The request body as JSON, or a 4xx a person can act on."""
    config: Config = request.app[CONFIG_KEY]
    if request.content_length is not None and request.content_length > config.max_body_size:
        raise ApiError(413, f"Request Entity Too Large: the body exceeds max_body_size"
                            f" ({config.max_body_size} bytes)")
    if request.content_type != "application/json":
        raise ApiError(415, f"Unsupported Media Type {request.content_type!r}: send JSON with"
                            " the header Content-Type: application/json"
                            " (curl: -H 'Content-Type: application/json')")
    raw = await request.read()
    if not raw.strip():
        raise bad_request("the request body is empty; send a JSON document")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise bad_request(f"the request body is not valid JSON: {e}") from None


def _fail(errors: dict, what: str) -> ApiError:
    return bad_request(f"invalid {what}: " + "; ".join(f"{k}: {v}" for k, v in errors.items()), errors)


def validated_fields(body: dict, allowed: Iterable[str], errors: dict, skip: Iterable[str] = ()) -> dict:
    """The normalized values of the `allowed` fields of a body; other fields (but `skip`) are errors."""
    clean = {}
    for name, value in body.items():
        if name in skip:
            continue
        if name not in allowed:
            errors[name] = "unknown field"
            continue
        value, problem = check_stat_value(name, value)
        if problem:
            errors[name] = problem
        else:
            clean[name] = value
    return clean


def stat_client_fields(body: dict, errors: dict) -> dict:
    """The validated, normalized client fields of a body (uuid and organization aside)."""
    return validated_fields(body, STAT_CLIENT_FIELDS, errors, skip=("uuid", "organization", *STAT_READ_ONLY))


def ordered_stat(values: dict) -> dict:
    """A stat record with its fields in one stable order."""
    order = ("uuid", "organization", "anr", "type", "date", "day", "week", "month", "quarter", "year",
             "data", "created_at", "updated_at", "id")
    return {name: values[name] for name in order if name in values}


def new_stat(request: web.Request, body, now: str) -> dict:
    """A new stat record from a POSTed object, or ApiError(400) naming what is wrong."""
    if not isinstance(body, dict):
        raise bad_request("a stat must be a JSON object")
    errors: dict[str, str] = {}
    for name in STAT_READ_ONLY:
        if name in body:
            errors[name] = "is set by the server"
    clean = stat_client_fields(body, errors)
    derive_periods(clean, body)
    for name in ("type", "data"):
        if name not in body:
            errors[name] = "is required"
    if "uuid" in body:
        clean["uuid"], problem = check_stat_value("uuid", body["uuid"])
        if problem:
            errors["uuid"] = problem
    else:
        clean["uuid"] = str(uuidlib.uuid4())
    organization = _stat_organization(request, body, errors)
    if organization is not None:
        clean["organization"] = organization
    if errors:
        raise _fail(errors, "stat")
    return ordered_stat({**clean, "id": new_stat_id(request), "created_at": now, "updated_at": now})


def new_stat_id(request: web.Request) -> str:
    """A fresh id no stored stat holds."""
    stats: Table = request.app[STORE_KEY].stats
    new_id = request.app[IDS_KEY]()
    while stats.doc_id(new_id) is not None:
        new_id = request.app[IDS_KEY]()
    return new_id


def _stat_organization(request: web.Request, body: dict, errors: dict) -> str | None:
    caller: Caller = request[CALLER_KEY]
    given = body.get("organization", MISSING)
    if request.app[CONFIG_KEY].api_key_authentication:
        if given is not MISSING and given != caller.organization:
            errors["organization"] = "must be your own organization (it comes from your API key)"
        return caller.organization
    if given is MISSING:
        return None
    if not isinstance(given, str) or request.app[STORE_KEY].orgs.get(given) is None:
        errors["organization"] = f"{given!r} is not an existing organization"
        return None
    return given


def visible_stat(request: web.Request) -> tuple[int, dict]:
    """The stat of the URL, if the caller may see it; 404 otherwise."""
    stat_id = request.match_info["id"]
    stats: Table = request.app[STORE_KEY].stats
    doc_id = stats.doc_id(stat_id)
    doc = stats.docs.get(doc_id) if doc_id is not None else None
    caller: Caller = request[CALLER_KEY]
    if doc is None or not (caller.sees_all or doc.get("organization") == caller.organization):
        raise ApiError(404, f"Not Found: no stat with id {stat_id!r}")
    return doc_id, doc


def _check_read_only(request: web.Request, body: dict, old: dict, names, path: str, parents=()) -> dict:
    """Read-only fields may come back unchanged; a change is an error naming the field."""
    errors = {}
    for name in names:
        if name not in body:
            continue
        value, ok = body[name], True
        if name == "link":
            ok = _link_path_matches(value, path)
        elif name == "links":
            ok = isinstance(value, list) and len(value) == len(parents) and \
                all(_link_path_matches(v, p) for v, p in zip(value, parents))
        elif name == "uuid":
            ok = parse_uuid(value) == old.get(name)
        else:
            ok = value == old.get(name, MISSING)
        if not ok:
            errors[name] = "is read-only (it may be sent back unchanged, not changed)"
    return errors


async def list_stats(request: web.Request) -> web.Response:
    query = request.app[STAT_QUERIES_KEY].of(request)  # shared: never changed here
    caller: Caller = request[CALLER_KEY]
    if not caller.sees_all:
        query = replace(query, filters=[Filter(("organization",), "exact", caller.organization), *query.filters])
    page, more = run_query(request.app[STORE_KEY].stats, query)
    base = base_url(request)
    if query.fields is None:
        views = request.app[STAT_VIEWS_KEY]
        data = [orjson.Fragment(views.of(base, d)) for d in page]
    else:
        data = [present_stat(base, d, query.fields) for d in page]
    return json_response({"data": data, "has_more": more})


async def create_stats(request: web.Request) -> web.Response:
    only_params(request)
    body = await read_json(request)
    config: Config = request.app[CONFIG_KEY]
    single = isinstance(body, dict)
    if not single and not (isinstance(body, list) and 1 <= len(body) <= config.max_limit):
        raise bad_request(f"the body must be a JSON object (one stat) or a list of 1 to"
                          f" {config.max_limit} stats")
    store: Store = request.app[STORE_KEY]
    await ready_to_write(request)
    now = utcnow()
    items = [body] if single else body
    docs, errors = [], {}
    for i, item in enumerate(items):
        try:
            docs.append(new_stat(request, item, now))
        except ApiError as e:
            if single:
                raise
            errors[str(i)] = e.errors or e.message
    if errors:
        raise bad_request(f"{len(errors)} of {len(items)} stats are invalid; nothing was stored", errors)
    conflicts, seen = {}, {}
    for i, doc in enumerate(docs):
        if doc["uuid"] in seen:
            conflicts[str(i)] = f"uuid {doc['uuid']} repeats item {seen[doc['uuid']]}"
        elif store.stats.find_unique("uuid", doc["uuid"]) is not None:
            conflicts[str(i)] = f"uuid {doc['uuid']} already exists"
        seen[doc["uuid"]] = i
    if conflicts:
        message = conflicts["0"] if single else \
            f"{len(conflicts)} of {len(items)} stats conflict with stored ones; nothing was stored"
        raise ApiError(409, f"Conflict: {message}", None if single else conflicts)
    await store.commit([("stats", store.stats.new_doc_id(), doc) for doc in docs])
    base = base_url(request)
    if single:
        return json_response(present_stat(base, docs[0]), 201,
                             {"Location": base + stat_path(docs[0]["id"])})
    return json_response({"data": [present_stat(base, d) for d in docs]}, 201)


async def ready_to_write(request: web.Request) -> Caller:
    """Wait out a checkpoint, then take the caller as its key stands now.

    Authentication ran before the body was read: meanwhile the key may have
    been rotated, its organization demoted or deleted. Call this after the
    handler's last await and before the checks that justify its write.
    """
    store: Store = request.app[STORE_KEY]
    await store.writable()
    caller: Caller = request[CALLER_KEY]
    if caller.token_sha256 is not None:
        org = store.orgs.find_unique("token_sha256", caller.token_sha256)
        if org is None:
            raise ApiError(401, "Unauthorized")
        caller = request[CALLER_KEY] = Caller(org["name"], bool(org.get("is_admin")), caller.token_sha256)
    return caller


async def get_stat(request: web.Request) -> web.Response:
    only_params(request)
    _, doc = visible_stat(request)
    return web.Response(body=request.app[STAT_VIEWS_KEY].of(base_url(request), doc), headers=JSON_HEADERS)


async def update_stat(request: web.Request) -> web.Response:
    """PUT replaces the client fields, PATCH merges the given ones."""
    only_params(request)
    body = await read_json(request)
    if not isinstance(body, dict):
        raise bad_request("the body must be a JSON object")
    store: Store = request.app[STORE_KEY]
    await ready_to_write(request)
    doc_id, old = visible_stat(request)
    parents = [org_path(old["organization"])] if "organization" in old else []
    errors = _check_read_only(request, body, old, ("id", "uuid", "organization", "created_at",
                                                   "updated_at", "link", "links"),
                              stat_path(old["id"]), parents)
    clean = stat_client_fields(body, errors)
    derive_periods(clean, body)
    if request.method == "PUT":
        for name in ("type", "data"):
            if name not in body:
                errors[name] = "is required (PUT replaces the stat; use PATCH to change some fields)"
    if errors:
        raise _fail(errors, "stat")
    kept = {name: old[name] for name in ("id", "uuid", "organization", "created_at") if name in old}
    values = {**kept, **clean} if request.method == "PUT" else {**old, **clean}
    new = ordered_stat({**values, "updated_at": utcnow()})
    await store.commit([("stats", doc_id, new)])
    return json_response(present_stat(base_url(request), new))


async def delete_stat(request: web.Request) -> web.Response:
    only_params(request)
    store: Store = request.app[STORE_KEY]
    await ready_to_write(request)
    doc_id, _ = visible_stat(request)
    await store.commit([("stats", doc_id, None)])
    return web.Response(status=204)


ORG_NAME_MAX = 120
TOKEN_RE = re.compile(r"[\x21-\x7e]{16,512}")


def check_org_name(name) -> str | None:
    """What is wrong with an organization name, or None."""
    if not isinstance(name, str) or not 1 <= len(name) <= ORG_NAME_MAX:
        return f"must be a string of 1 to {ORG_NAME_MAX} characters"
    if name != name.strip() or "/" in name or any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "must not contain '/', control characters, or leading or trailing white space"
    if name in (".", ".."):
        return "must not be '.' or '..' (its URL would point elsewhere)"
    return None


def check_token(token) -> str | None:
    """What is wrong with a token chosen by a person, or None."""
    if not isinstance(token, str) or not TOKEN_RE.fullmatch(token):
        return "must be 16 to 512 visible ASCII characters (no spaces)"
    return None


def require_admin(request: web.Request, what: str = "manage organizations") -> None:
    if not request[CALLER_KEY].is_admin:
        raise ApiError(403, f"Forbidden: only an admin organization may {what}")


def visible_org(request: web.Request) -> tuple[int, dict]:
    require_admin(request)
    name = request.match_info["name"]
    orgs: Table = request.app[STORE_KEY].orgs
    doc_id = orgs.doc_id(name)
    if doc_id is None:
        raise ApiError(404, f"Not Found: no organization named {name!r}")
    return doc_id, orgs.docs[doc_id]


def org_body(body, errors: dict, *, creating: bool) -> tuple[dict, str | None]:
    """Validated is_admin (and name when creating) plus a new token, if any."""
    clean, token = {}, None
    allowed = {"name", "token", "is_admin"} if creating else \
        {"token", "is_admin", "id", "name", "created_at", "updated_at", "link"}
    for name in body:
        if name not in allowed:
            errors[name] = "unknown field" if name not in ("id", "created_at", "updated_at", "link") \
                else "is set by the server"
    if creating:
        problem = check_org_name(body.get("name")) if "name" in body else "is required"
        if problem:
            errors["name"] = problem
        else:
            clean["name"] = body["name"]
    if "is_admin" in body:
        if isinstance(body["is_admin"], bool):
            clean["is_admin"] = body["is_admin"]
        else:
            errors["is_admin"] = "must be true or false"
    if "token" in body:
        token = body["token"]
        problem = check_token(token)
        if problem:
            errors["token"] = problem
    return clean, token


def _unused_token_hash(store: Store, token: str) -> str:
    """The hash to store for a new token; 409 if another organization holds it."""
    digest = hash_token(token)
    if store.orgs.find_unique("token_sha256", digest) is not None:
        raise ApiError(409, "Conflict: that token is already in use; choose another one")
    return digest


async def list_orgs(request: web.Request) -> web.Response:
    require_admin(request)
    query = parse_query(request.query, ORG_FIELDS, request.app[CONFIG_KEY], stored_as={"id": "name"})
    page, more = run_query(request.app[STORE_KEY].orgs, query)
    base = base_url(request)
    return json_response({"data": [present_org(base, d, query.fields) for d in page], "has_more": more})


async def create_org(request: web.Request) -> web.Response:
    require_admin(request)
    only_params(request)
    body = await read_json(request)
    if not isinstance(body, dict):
        raise bad_request("the body must be a JSON object: {\"name\": ..., \"token\"?: ..., \"is_admin\"?: ...}")
    store: Store = request.app[STORE_KEY]
    await ready_to_write(request)
    require_admin(request)
    errors: dict[str, str] = {}
    clean, token = org_body(body, errors, creating=True)
    if errors:
        raise _fail(errors, "organization")
    doc, token = new_organization(store, clean["name"], token, clean.get("is_admin", False))
    base = base_url(request)
    await store.commit([("organizations", store.orgs.new_doc_id(), doc)])
    return json_response(present_org(base, doc, token=token), 201,
                         {"Location": base + org_path(doc["name"])})


def new_organization(store: Store, name: str, token: str | None, is_admin: bool) -> tuple[dict, str]:
    """A new organization record (only its token's hash) and its clear token."""
    if store.orgs.get(name) is not None:
        raise ApiError(409, f"Conflict: an organization named {name!r} already exists")
    token = token or secrets.token_urlsafe(64)
    now = utcnow()
    doc = {"name": name, "token_sha256": _unused_token_hash(store, token), "is_admin": is_admin,
           "created_at": now, "updated_at": now}
    return doc, token


async def get_org(request: web.Request) -> web.Response:
    only_params(request)
    _, doc = visible_org(request)
    return json_response(present_org(base_url(request), doc))


async def update_org(request: web.Request) -> web.Response:
    """PUT sets is_admin (required) and maybe a new token; PATCH sets either."""
    only_params(request)
    body = await read_json(request)
    if not isinstance(body, dict):
        raise bad_request("the body must be a JSON object")
    store: Store = request.app[STORE_KEY]
    await ready_to_write(request)
    doc_id, old = visible_org(request)
    errors = _check_read_only(request, body, {**old, "id": old["name"]},
                              ("id", "name", "created_at", "updated_at", "link"), org_path(old["name"]))
    clean, token = org_body(body, errors, creating=False)
    if request.method == "PUT" and "is_admin" not in body:
        errors["is_admin"] = "is required (PUT replaces the organization; use PATCH to change one field)"
    if errors:
        raise _fail(errors, "organization")
    new = changed_organization(store, old, clean.get("is_admin"), token, keeps_admin(request))
    await store.commit([("organizations", doc_id, new)])
    return json_response(present_org(base_url(request), new, token=token))


def keeps_admin(request: web.Request) -> bool:
    """Whether the server must keep one admin organization: with authentication off anyone
    manages organizations, and turning it on takes a restart, when the CLI can make one."""
    return request.app[CONFIG_KEY].api_key_authentication


def changed_organization(store: Store, old: dict, is_admin: bool | None, token: str | None,
                         keep_admin: bool = True) -> dict:
    """The record of `old` with is_admin (unless None) and a new token (unless None) set.

    409 if that would demote the last admin (with `keep_admin`), or if another organization
    holds the token.
    """
    new = {**old, "updated_at": utcnow()}
    if is_admin is not None:
        if keep_admin and old.get("is_admin") and not is_admin:
            check_not_last_admin(store, old, "demoting")
        new["is_admin"] = is_admin
    if token is not None:
        new["token_sha256"] = _unused_token_hash(store, token)
    return new


def admin_names(store: Store) -> list[str]:
    """The names of the admin organizations (organizations are few: a scan is cheap)."""
    return [doc["name"] for doc in store.orgs.docs.values() if doc.get("is_admin")]


def check_not_last_admin(store: Store, doc: dict, doing: str) -> None:
    """409 if `doc` is the only admin organization: without one, nobody could manage the others."""
    if doc.get("is_admin") and admin_names(store) == [doc["name"]]:
        raise ApiError(409, f"Conflict: {doc['name']!r} is the last admin organization; {doing} it"
                            " would leave no one able to manage organizations: make another"
                            " organization admin first")


async def delete_org(request: web.Request) -> web.Response:
    only_params(request, "cascade")
    cascade = _convert_bool(request.query.get("cascade", "false"), "cascade")
    store: Store = request.app[STORE_KEY]
    await ready_to_write(request)
    doc_id, doc = visible_org(request)
    ops = delete_organization_ops(store, doc_id, doc, cascade, keeps_admin(request))
    await store.commit(ops)
    return web.Response(status=204)


def delete_organization_ops(store: Store, doc_id: int, doc: dict, cascade: bool, keep_admin: bool = True) -> list:
    """The ops deleting an organization (and its stats with cascade); 409 if it has stats, or
    is the last admin (with `keep_admin`)."""
    if keep_admin:
        check_not_last_admin(store, doc, "deleting")
    owned = list(store.stats.indexes["organization"].lookup(doc["name"]))
    if owned and not cascade:
        raise ApiError(409, f"Conflict: organization {doc['name']!r} still has {len(owned)} stat(s);"
                            " delete them first, or add ?cascade=true to delete them with it")
    return [("stats", i, None) for i in owned] + [("organizations", doc_id, None)]


async def export_all(request: web.Request) -> web.StreamResponse:
    """The `statsd export` document of the running server: a snapshot taken at once, then streamed.

    The snapshot is the current record objects (never changed in place), so it
    holds each write whole or not at all. It is answered once everything in it
    is on disk; then EXPORT_CHUNK records are serialized at a time, giving the
    loop back between chunks.
    """
    require_admin(request, "export the database")
    only_params(request)
    store: Store = request.app[STORE_KEY]
    orgs, stats = export_snapshot(store)
    exported_at = utcnow()
    await store.commit([])  # a barrier: every write in the snapshot is durable (else a 503 now)
    resp = web.StreamResponse(headers={
        **JSON_HEADERS, **request.get(LIMIT_HEADERS_KEY, {}),
        "Content-Disposition": f'attachment; filename="statsd-export-{exported_at[:10]}.json"',
        "X-Export-Organizations": str(len(orgs)), "X-Export-Stats": str(len(stats))})
    await resp.prepare(request)
    try:
        for chunk in export_chunks(orgs, stats, exported_at):
            await resp.write(chunk)
            await asyncio.sleep(0)  # write() returns at once while the socket takes it all
        await resp.write_eof()
    except ConnectionError:
        log.warning("export to %s stopped: the client went away", client_address(request))
    return resp


async def index(request: web.Request) -> web.Response:
    return json_response({"service": "statsd", "version": __version__,
                          "api": base_url(request) + API_PREFIX + "/",
                          "endpoints": [API_PREFIX + "/stats/", API_PREFIX + "/organizations/"]})


# ------------------------------------------------------------ OpenAPI ---
# GET /api/v2/openapi.json: an OpenAPI 3.1 description built from the app's own
# routes and from the tables the code runs on (STAT_FIELDS, ORG_FIELDS,
# OPERATORS, PERIODS, ApiError.NAMES, the v1 processors), so it cannot drift.
# It is public (no key), and counted by the rate limit like every /api/ request.

OPENAPI_PATH = API_PREFIX + "/openapi.json"
PUBLIC_PATHS = {OPENAPI_PATH}  # /api/ paths that need no key (v1 routes authenticate themselves)
UUID_PATTERN = "^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}$"
SAFE_DATE = "[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|1[0-9]|2[0-8])"  # always a real date


def _oa_ref(name: str, kind: str = "schemas") -> dict:
    return {"$ref": f"#/components/{kind}/{name}"}


def _oa_int(low: int = INT64[0], high: int = INT64[1]) -> dict:
    return {"type": "integer", "minimum": low, "maximum": high}


def _oa_query_values(convert) -> tuple[dict, str]:
    """(schema of one query value, pattern of one item of an in/nin list) for a field's converter."""
    if convert is _convert_int:
        return _oa_int(), "[+-]?[0-9]{1,18}"
    if convert is _convert_uuid:
        return {"type": "string", "pattern": UUID_PATTERN}, UUID_PATTERN[1:-1]
    if convert is _convert_anr:
        return {"anyOf": [_oa_int(), {"type": "string", "pattern": UUID_PATTERN}]}, \
            f"([+-]?[0-9]{{1,18}}|{UUID_PATTERN[1:-1]})"
    if convert is _convert_date:
        return {"type": "string", "format": "date"}, SAFE_DATE
    if convert is _convert_datetime:
        return {"anyOf": [{"type": "string", "format": "date"}, {"type": "string", "pattern": f"^{SAFE_DATE}$"},
                          {"type": "string", "pattern": f"^{SAFE_DATE}T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]"
                                                        r"(\.[0-9]{1,6})?(Z|[+-]0[0-9]:[0-5][0-9])?$"}]}, SAFE_DATE
    if convert is _convert_bool:
        return {"type": "string", "enum": ["true", "false"]}, "(true|false)"
    return {"type": "string"}, "[^,]*"


def _oa_filters(schema: dict) -> dict:
    """The filter parameters of a list route, from its field table and OPERATORS."""
    properties = {}
    for name, (convert, strings_ok) in schema.items():
        value, item = _oa_query_values(convert)
        properties[name] = value
        for op in OPERATORS:
            if op in STRING_OPS and not strings_ok:
                continue
            if op == "exists":
                properties[f"{name}__{op}"] = {"type": "string", "enum": ["true", "false"]}
            elif op in ("in", "nin"):
                properties[f"{name}__{op}"] = {"type": "string", "pattern": f"^{item}(,{item})*$"}
            elif op in STRING_OPS:
                properties[f"{name}__{op}"] = {"type": "string"}
            else:
                properties[f"{name}__{op}"] = value
    filters = {"type": "object", "properties": properties, "additionalProperties": False}
    if "data" in schema:
        ops = "|".join(op for op in OPERATORS if op != "exists")
        filters["patternProperties"] = {f"^data(__[A-Za-z0-9]+)*__({ops})$": {"type": "string"},
                                        "^data(__[A-Za-z0-9]+)*__exists$": {"type": "string", "enum": ["true", "false"]}}
    return {"name": "filters", "in": "query", "style": "form", "explode": True, "schema": filters,
            "description": "Filters, combined with AND: `field=value` (exact) or `field__OPERATOR=value`;"
                           f" operators: {', '.join(OPERATORS)}; `in`/`nin` take comma-separated values;"
                           " string operators apply to string fields only"
                           + ("; any path inside `data` is written with double underscores,"
                              " e.g. data__total__current__operational__gt=5" if "data" in schema else "")}


def _oa_list_params(schema: dict, config: Config) -> list:
    names = ", ".join(schema)
    params = [{"name": name, "in": "query", "schema": _oa_int(0) if "limit" not in name
               else _oa_int(0, config.max_limit), "description": text}
              for name, text in (("_skip", "records to skip (alias: offset)"),
                                 ("_limit", f"page size, default {config.default_limit}, at most"
                                            f" {config.max_limit} (alias: limit)"))]
    order = "-?(" + "|".join([*schema, *(["data(__[A-Za-z0-9]+)+"] if "data" in schema else [])]) + ")"
    shown = "(" + "|".join([*schema, "link", "links"]) + ")"
    params.append({"name": "_order_by", "in": "query", "schema": {"type": "string", "pattern": f"^{order}(,{order})*$"},
                   "description": f"comma-separated fields, `-` for descending ({names}; ties by id)"})
    params.append({"name": "_fields", "in": "query", "schema": {"type": "string", "pattern": f"^{shown}(,{shown})*$"},
                   "description": f"comma-separated fields to return (plus id): {names}, link, links"})
    return params + [_oa_filters(schema)]


def _oa_body(schema: dict, required: bool = True) -> dict:
    return {"required": required, "content": {"application/json": {"schema": schema}}}


def _oa_ok(status: int, description: str, schema: dict | None = None, headers=None) -> dict:
    out: dict[str, Any] = {"description": description}
    if schema is not None:
        out["content"] = {"application/json": {"schema": schema}}
    if headers:
        out["headers"] = headers
    return {str(status): out}


def _oa_errors(*statuses: int) -> dict:
    return {str(status): _oa_ref(ApiError.NAMES[status], "responses") for status in statuses}


def _oa_stat_schemas(config: Config) -> dict:
    """The Stat schemas, from the validation rules of check_stat_value and PERIODS."""
    uuid_s = {"type": "string", "format": "uuid"}
    client = {"uuid": uuid_s,
              "organization": {"type": "string", "description": "taken from the API key; with"
                               " authentication off, an existing organization's name"},
              "anr": {"anyOf": [_oa_int(), uuid_s]},
              "type": {"type": "string", "minLength": 1, "maxLength": 120, "pattern": r"\S"},
              "date": {"type": "string", "format": "date", "description": "sets the period fields"
                       " that are not given"},
              **{name: _oa_int(low, high) for name, (low, high) in PERIODS.items()},
              "year": _oa_int(),
              "data": {"description": f"any JSON value (null included), nested at most {MAX_DATA_DEPTH} levels"}}
    stamp = {"type": "string", "pattern": r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}$"}
    server = {"id": {"type": "string", "pattern": "^[0-9a-f]{24}$"}, "created_at": stamp, "updated_at": stamp,
              "link": {"type": "string"}, "links": {"type": "array", "items": {"type": "string"}}}
    stat = {"type": "object", "properties": {**client, **server}, "additionalProperties": False}
    no_org = {k: v for k, v in client.items() if k != "organization"}
    writable = {"type": "object", "properties": no_org, "additionalProperties": False}
    changeable = {**writable, "properties": {k: v for k, v in no_org.items() if k != "uuid"}}
    return {
        "Stat": {**stat, "required": ["id", "uuid", "type", "data", "created_at", "updated_at", "link"]},
        "StatFields": {**stat, "required": ["id"], "description": "a stat, with only the _fields asked for"},
        "NewStat": {**writable, "required": ["type", "data"]},
        "StatPut": {**changeable, "required": ["type", "data"],
                    "description": "replaces the client fields; read-only fields (id, uuid, organization,"
                                   " created_at, updated_at, link, links) may be sent back unchanged"},
        "StatPatch": {**changeable, "description": "merges the given fields; read-only fields may be sent"
                                                   " back unchanged"},
        "NewStats": {"type": "array", "minItems": 1, "maxItems": config.max_limit,
                     "items": _oa_ref("NewStat"), "description": "created all-or-nothing"},
    }


def _oa_org_schemas() -> dict:
    stamp = {"type": "string"}
    token = {"type": "string", "pattern": TOKEN_RE.pattern.join("^$")}
    name = {"type": "string", "minLength": 1, "maxLength": ORG_NAME_MAX,
            "pattern": "^[^/\\s\\x00-\\x1f\\x7f]([^/\\x00-\\x1f\\x7f]*[^/\\s\\x00-\\x1f\\x7f])?$"}
    org = {"type": "object", "additionalProperties": False,
           "properties": {"id": {"type": "string"}, "name": {"type": "string"}, "is_admin": {"type": "boolean"},
                          "created_at": stamp, "updated_at": stamp, "link": {"type": "string"},
                          "token": {"type": "string", "description": "only in the answer that set it"}}}
    return {
        "Organization": {**org, "required": ["id", "name", "is_admin", "created_at", "updated_at", "link"]},
        "OrganizationFields": {**org, "required": ["id"]},
        "NewOrganization": {"type": "object", "additionalProperties": False, "required": ["name"],
                            "properties": {"name": name, "token": token, "is_admin": {"type": "boolean"}}},
        "OrganizationPut": {"type": "object", "additionalProperties": False, "required": ["is_admin"],
                            "properties": {"token": token, "is_admin": {"type": "boolean"}}},
        "OrganizationPatch": {"type": "object", "additionalProperties": False,
                              "properties": {"token": token, "is_admin": {"type": "boolean"}}},
    }


def _oa_operation_schemas() -> dict:
    """The export document, and the options and reports of the retention calls."""
    dry_run = {"type": "boolean", "description": "true: only count, delete nothing (default false)"}
    count = {"type": "integer", "minimum": 0}
    report = {"type": "object", "required": ["dry_run", "matched", "deleted", "organizations"], "properties": {
        "dry_run": {"type": "boolean"}, "matched": count,
        "deleted": {**count, "description": "0 on a dry run; fewer than matched when some of them were"
                                            " changed or deleted by others meanwhile"},
        "organizations": {"type": "array", "items": {
            "type": "object", "required": ["organization", "matched", "deleted"],
            "properties": {"organization": {"type": ["string", "null"]}, "matched": count, "deleted": count}}}}}
    return {
        "Export": {"type": "object", "required": ["format", "version", "statsd", "exported_at", "organizations",
                                                  "stats"],
                   "properties": {"format": {"const": EXPORT_FORMAT}, "version": {"const": 1},
                                  "statsd": {"type": "string"}, "exported_at": {"type": "string"},
                                  "organizations": {"type": "array", "items": {
                                      "type": "object", "required": ["name", "token_sha256", "is_admin"],
                                      "properties": {name: {"type": "boolean"} if name.startswith("is_")
                                                     else {"type": "string"} for name in ORG_RECORD_FIELDS},
                                      "additionalProperties": False}},
                                  "stats": {"type": "array", "items": {
                                      "type": "object", "description": "a stat record as stored (no links)"}}}},
        "PurgeOptions": {"type": "object", "additionalProperties": False, "required": ["older_than"], "properties": {
            "older_than": {**_oa_int(0, MAX_MONTHS), "description": "months; a stat dated exactly that many months"
                                                                    " ago is kept"},
            "organization": {"type": ["string", "null"], "description": "only this (existing) organization's stats"},
            "dry_run": dry_run}},
        "RemoveDuplicatesOptions": {"type": "object", "additionalProperties": False, "properties": {
            "type": {"type": ["string", "null"], "minLength": 1, "maxLength": 120, "pattern": r"\S",
                     "description": "only stats of this type; a type no stat has matches none"},
            "dry_run": dry_run}},
        "PurgeReport": {**report, "required": [*report["required"], "older_than", "before", "organization"],
                        "properties": {**report["properties"], "older_than": {"type": "integer"},
                                       "before": {"type": "string", "format": "date",
                                                  "description": "stats dated before this day matched"},
                                       "organization": {"type": ["string", "null"]}}},
        "RemoveDuplicatesReport": {**report, "required": [*report["required"], "type", "groups"],
                                   "properties": {**report["properties"], "type": {"type": ["string", "null"]},
                                                  "groups": {"type": "integer", "description": "groups that had"
                                                             " duplicates (one stat of each is kept)"}}},
    }


def _oa_v1_params(schema: dict) -> dict:
    """A v1 parameters object: a null optional parameter counts as absent (as upstream)."""
    props = {name: value if name in schema["required"] else {"anyOf": [value, {"type": "null"}]}
             for name, value in schema["properties"].items()}
    return {**schema, "properties": props}


def _oa_v1_schemas(config: Config) -> dict:
    uuid_s = {"type": "string", "format": "uuid"}
    day = {"type": "string", "format": "date"}
    flag = {"anyOf": [{"type": "boolean"}, {"type": "integer", "enum": [0, 1]}]}
    zero_one = {"enum": [0, 1]}
    processed = []
    for name, func in V1_PROCESSORS.items():
        params: dict[str, Any] = {"type": "object", "additionalProperties": False, "properties": {}}
        if name == "risk_averages_on_date":
            params["properties"] = {name: {"anyOf": [{"type": "null"}, {"type": "string", "pattern": "^(({0})(,({0}))*)?$"
                                                                       .format("|".join(choices))}]}
                                    for name, choices in (("risks_type", RISK_KINDS), ("risks_state", RISK_STATES))}
        processed.append(_oa_v1_params({
            "type": "object", "additionalProperties": False, "required": ["type", "processor"],
            "description": " ".join(func.__doc__.split()),
            "properties": {"type": {"const": name.split("_")[0]}, "processor": {"const": name},
                           "processor_params": params, "date_from": day, "date_to": day,
                           "anrs": {"type": "array", "items": uuid_s}, "local_stats_only": zero_one}}))
    v1_stat = {"type": "object", "required": ["uuid", "anr", "type", "date", "data"],
               "properties": {"uuid": uuid_s, "anr": {"type": ["string", "null"]}, "type": {"type": "string"},
                              "date": day, "data": {}}}
    page = {"type": "object", "required": ["metadata", "data"],
            "properties": {"metadata": {"type": "object", "required": ["count", "offset", "limit"],
                                        "properties": {k: {"type": "string", "pattern": "^[0-9]+$"}
                                                       for k in ("count", "offset", "limit")}},
                           "data": {"type": "array", "items": _oa_ref("V1Stat")}}}
    return {
        "V1Stat": v1_stat,
        "V1Page": page,
        "V1Query": _oa_v1_params({
            "type": "object", "additionalProperties": False, "required": ["type"],
            "properties": {"type": {"enum": list(V1_TYPES)}, "anrs": {"type": "array", "items": uuid_s},
                           "anr": uuid_s, "date_from": day, "date_to": day, "get_last": flag,
                           "offset": _oa_int(0), "limit": _oa_int(0), "group_by_anr": zero_one}}),
        "V1Processed": {"oneOf": processed},
        "V1NewStats": {"type": "array", "maxItems": config.max_limit, "items": {
            "type": "object", "additionalProperties": False, "required": ["anr", "type", "date", "data"],
            "properties": {"uuid": uuid_s, "anr": uuid_s, "type": {"enum": list(V1_TYPES)}, "date": day,
                           "data": {"description": f"any JSON value nested at most {MAX_DATA_DEPTH} levels"}}}},
        "V1Created": {**page, "required": ["metadata", "data", "results"], "properties": {
            **page["properties"], "results": {"type": "array", "items": {
                "type": "object", "required": ["index", "status"],
                "properties": {"index": {"type": "integer"}, "status": {"enum": [201, 400, 409]}}}}}},
        "V1Client": {"type": "object", "required": ["name", "token", "role", "is_sharing_enabled"],
                     "properties": {"name": {"type": ["string", "null"]}, "token": {"type": ["string", "null"]},
                                    "role": {"enum": ["admin", "user"]}, "is_sharing_enabled": {"type": "boolean"}}},
        "V1ClientPatch": {"type": "object", "additionalProperties": False, "required": ["is_sharing_enabled"],
                          "properties": {"is_sharing_enabled": {"type": "boolean"}}},
    }


def _oa_operations(config: Config) -> dict:
    """(method, path) -> operation, for every route create_app registers (paths as documented)."""
    stat_id = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"},
               "description": "the stat's id (24 hex characters)"}
    org_name = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"},
                "description": "the organization's name (its id)"}
    cascade = {"name": "cascade", "in": "query", "schema": {"type": "string", "enum": ["true", "false"]},
               "description": "true: delete the organization's stats with it"}
    anr = {"name": "anr", "in": "path", "required": True, "schema": {"type": "string", "format": "uuid"}}
    location = {"Location": {"schema": {"type": "string"}, "description": "URL of the new object"}}
    read, write, item = (400, 401, 429, 500), (400, 401, 409, 413, 415, 429, 500, 503, 507), (404,)
    admin = (403,)
    v1 = (400, 401, 403, 426, 429, 500)
    v1_write = v1 + (413, 415, 503, 507)
    stats_page = {"type": "object", "required": ["data", "has_more"], "properties": {
        "data": {"type": "array", "items": _oa_ref("StatFields")}, "has_more": {"type": "boolean"}}}
    orgs_page = {"type": "object", "required": ["data", "has_more"], "properties": {
        "data": {"type": "array", "items": _oa_ref("OrganizationFields")}, "has_more": {"type": "boolean"}}}
    s, o, v = API_PREFIX + "/stats/", API_PREFIX + "/organizations/", V1_PREFIX
    ops = {
        ("GET", "/"): {"summary": "Service index", "security": [],
                       "responses": _oa_ok(200, "name, version and entry points", {"type": "object"})},
        ("GET", OPENAPI_PATH): {"summary": "This OpenAPI description", "security": [],
                                "responses": {**_oa_ok(200, "OpenAPI 3.1 document", {"type": "object"}),
                                              **_oa_errors(400, 429, 500)}},
        ("GET", s): {"summary": "List stats", "parameters": _oa_list_params(STAT_FIELDS, config),
                     "responses": {**_oa_ok(200, "a page of stats", stats_page), **_oa_errors(*read)}},
        ("POST", s): {"summary": "Create one stat (object) or 1 to max_limit stats (list, all-or-nothing)",
                      "requestBody": _oa_body({"oneOf": [_oa_ref("NewStat"), _oa_ref("NewStats")]}),
                      "responses": {"201": {"description": "created", "headers": location, "content": {
                          "application/json": {"schema": {"oneOf": [_oa_ref("Stat"), {
                              "type": "object", "required": ["data"], "additionalProperties": False, "properties": {
                                  "data": {"type": "array", "items": _oa_ref("Stat")}}}]}}}},
                                    **_oa_errors(*write)}},
        ("GET", s + "{id}/"): {"summary": "Get a stat", "parameters": [stat_id],
                               "responses": {**_oa_ok(200, "the stat", _oa_ref("Stat")), **_oa_errors(*read, *item)}},
        ("PUT", s + "{id}/"): {"summary": "Replace a stat's client fields", "parameters": [stat_id],
                               "requestBody": _oa_body(_oa_ref("StatPut")),
                               "responses": {**_oa_ok(200, "the stat", _oa_ref("Stat")), **_oa_errors(*write, *item)}},
        ("PATCH", s + "{id}/"): {"summary": "Change some of a stat's fields", "parameters": [stat_id],
                                 "requestBody": _oa_body(_oa_ref("StatPatch")),
                                 "responses": {**_oa_ok(200, "the stat", _oa_ref("Stat")),
                                               **_oa_errors(*write, *item)}},
        ("DELETE", s + "{id}/"): {"summary": "Delete a stat", "parameters": [stat_id],
                                  "responses": {**_oa_ok(204, "deleted"), **_oa_errors(400, 401, 404, 429, 500, 503, 507)}},
        ("GET", o): {"summary": "List organizations (admin)", "parameters": _oa_list_params(ORG_FIELDS, config),
                     "responses": {**_oa_ok(200, "a page of organizations", orgs_page), **_oa_errors(*read, *admin)}},
        ("POST", o): {"summary": "Create an organization (admin); its token is answered only now",
                      "requestBody": _oa_body(_oa_ref("NewOrganization")),
                      "responses": {**_oa_ok(201, "created", _oa_ref("Organization"), location),
                                    **_oa_errors(*write, *admin)}},
        ("GET", o + "{name}/"): {"summary": "Get an organization (admin)", "parameters": [org_name],
                                 "responses": {**_oa_ok(200, "the organization", _oa_ref("Organization")),
                                               **_oa_errors(*read, *admin, *item)}},
        ("PUT", o + "{name}/"): {"summary": "Set is_admin and maybe a new token (admin)", "parameters": [org_name],
                                 "requestBody": _oa_body(_oa_ref("OrganizationPut")),
                                 "responses": {**_oa_ok(200, "the organization", _oa_ref("Organization")),
                                               **_oa_errors(*write, *admin, *item)}},
        ("PATCH", o + "{name}/"): {"summary": "Set is_admin or a new token (key rotation) (admin)",
                                   "parameters": [org_name], "requestBody": _oa_body(_oa_ref("OrganizationPatch")),
                                   "responses": {**_oa_ok(200, "the organization", _oa_ref("Organization")),
                                                 **_oa_errors(*write, *admin, *item)}},
        ("DELETE", o + "{name}/"): {"summary": "Delete an organization (admin); 409 if it has stats, unless"
                                               " cascade=true", "parameters": [org_name, cascade],
                                    "responses": {**_oa_ok(204, "deleted"),
                                                  **_oa_errors(400, 401, 409, 429, 500, 503, 507, *admin, *item)}},
        ("GET", API_PREFIX + "/export/"): {
            "summary": "Online backup (admin): the `statsd export` document of this server, a snapshot taken"
                       " at one instant, streamed; `statsd import` restores it into a stopped database",
            "responses": {**_oa_ok(200, "the export document (chunked)", _oa_ref("Export"), {
                "X-Export-Organizations": {"schema": {"type": "string"}, "description": "organizations in it"},
                "X-Export-Stats": {"schema": {"type": "string"}, "description": "stats in it"}}),
                **_oa_errors(*read, *admin, 503)}},
        ("POST", API_PREFIX + "/purge/"): {
            "summary": "Retention (admin): delete the stats dated more than `older_than` months before today"
                       " (UTC), in chunks; `dry_run` only counts",
            "requestBody": _oa_body(_oa_ref("PurgeOptions")),
            "responses": {**_oa_ok(200, "what matched and what was deleted", _oa_ref("PurgeReport")),
                          **_oa_errors(*write, *admin, 404)}},
        ("POST", API_PREFIX + "/remove-duplicates/"): {
            "summary": "Retention (admin): of the stats with the same organization, anr, type and date, keep the"
                       " newest (latest created_at) and delete the others, in chunks; `dry_run` only counts",
            "requestBody": _oa_body(_oa_ref("RemoveDuplicatesOptions"), required=False),
            "responses": {**_oa_ok(200, "what matched and what was deleted", _oa_ref("RemoveDuplicatesReport")),
                          **_oa_errors(*write, *admin)}},
        ("GET", v + "/stats/"): {"summary": "MONARC: stats of one type (parameters in a JSON body or the query"
                                            " string)", "requestBody": _oa_body(_oa_ref("V1Query")),
                                 "responses": {**_oa_ok(200, "stats", _oa_ref("V1Page")), **_oa_errors(*v1, 413, 415)}},
        ("POST", v + "/stats/"): {"summary": "MONARC: send stats, each stored on its own",
                                  "requestBody": _oa_body(_oa_ref("V1NewStats")),
                                  "responses": {**_oa_ok(201, "all stored", _oa_ref("V1Created")),
                                                **_oa_ok(207, "some items failed", _oa_ref("V1Created")),
                                                **_oa_errors(*v1_write)}},
        ("DELETE", v + "/stats/{anr}/"): {"summary": "MONARC: delete the caller's stats of an analysis",
                                          "parameters": [anr],
                                          "responses": {**_oa_ok(204, "deleted (also when there were none)"),
                                                        **_oa_errors(*v1, 503, 507)}},
        ("GET", v + "/stats/processed/"): {"summary": "MONARC: a processor over the stats of every organization",
                                           "requestBody": _oa_body(_oa_ref("V1Processed")),
                                           "responses": {**_oa_ok(200, "processed", {
                                               "type": "object", "required": ["type", "processor", "data"]}),
                                               **_oa_errors(*v1, 413, 415)}},
        ("GET", v + "/stats/processed/list/"): {"summary": "MONARC: the processors (no key)", "security": [],
                                                "responses": {**_oa_ok(200, "processors", {
                                                    "type": "array", "items": {
                                                        "type": "object", "required": ["name", "description"]}}),
                                                    **_oa_errors(400, 429, 500)}},
        ("GET", v + "/client/me/"): {"summary": "MONARC: the caller's organization",
                                     "responses": {**_oa_ok(200, "the client", _oa_ref("V1Client")),
                                                   **_oa_errors(*v1)}},
        ("PATCH", v + "/client/me/"): {"summary": "MONARC: turn sharing on or off",
                                       "requestBody": _oa_body(_oa_ref("V1ClientPatch")),
                                       "responses": {**_oa_ok(200, "the client", _oa_ref("V1Client")),
                                                     **_oa_errors(*v1_write)}},
    }
    return ops


def openapi_path(canonical: str) -> str:
    """The documented form of a route's path: with one trailing slash (both forms answer)."""
    return canonical if canonical == "/" or canonical.endswith(".json") else canonical.rstrip("/") + "/"


def app_routes(app: web.Application) -> set[tuple[str, str]]:
    """(method, documented path) of every route of the app (HEAD, added by aiohttp with GET, aside)."""
    return {(r.method, openapi_path(r.resource.canonical)) for r in app.router.routes()
            if r.method != "HEAD" and r.resource is not None}


def openapi_document(app: web.Application, server: str = "") -> dict:
    """The OpenAPI 3.1 description of `app`: every route, with its parameters, bodies and answers."""
    config: Config = app[CONFIG_KEY]
    known = _oa_operations(config)
    rate_headers = {name: {"schema": {"type": "string", "pattern": "^[0-9]+$"}, "description": text}
                    for name, text in (("X-Rate-Limit-Limit", "requests allowed per window"),
                                       ("X-Rate-Limit-Remaining", "requests left in the window"),
                                       ("X-Rate-Limit-Reset", "UTC epoch second at which the window"
                                                              " frees a request"))}
    paths: dict[str, dict] = {}
    for method, path in sorted(app_routes(app), key=lambda pair: (pair[1], pair[0])):
        op = dict(known.get((method, path)) or {"summary": "UNDOCUMENTED", "responses": _oa_errors(500)})
        op["operationId"] = f"{method.lower()} {path}"
        if path.startswith("/api/") and config.rate_limit:
            op["responses"] = {status: ({**answer, "headers": {**answer.get("headers", {}), **rate_headers}}
                                        if "$ref" not in answer else answer)
                               for status, answer in op["responses"].items()}
        if not config.api_key_authentication:
            op["security"] = []
        paths.setdefault(path, {})[method.lower()] = op
    error = {"type": "object", "required": ["error", "status", "action", "target", "exception_msg",
                                            "status_code", "exception_cls"],
             "properties": {"error": {"type": "string"}, "status": {"const": "failed"},
                            "action": {"type": "string"}, "target": {"type": "string"},
                            "exception_msg": {"type": "string"}, "status_code": {"type": "integer"},
                            "exception_cls": {"enum": sorted(set(ApiError.NAMES.values()) | {"HTTPException"})},
                            "errors": {"type": "object", "description": "what is wrong, per field or item index"},
                            "Error": {"type": "string", "description": "/api/v1/ only: the upstream's key"}}}
    responses = {}
    for status, name in ApiError.NAMES.items():
        responses[name] = {"description": f"{status} {name}: the JSON error object",
                           "content": {"application/json": {"schema": _oa_ref("Error")}}}
        if config.rate_limit:
            responses[name]["headers"] = {**rate_headers, **({"Retry-After": {"schema": {"type": "string"}}}
                                                             if status == 429 else {})}
    return {
        "openapi": "3.1.0",
        "info": {"title": "statsd", "version": __version__,
                 "description": "Statistics service for MONARC: Stats API v2 (and the /api/v1/ the MONARC"
                                " front office speaks). Every path also answers without its trailing slash."},
        "servers": [{"url": server or "/"}],
        "security": [{"ApiKeyHeader": []}, {"ApiKeyQuery": []}] if config.api_key_authentication else [],
        "paths": paths,
        "components": {
            "securitySchemes": {"ApiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-KEY"},
                                "ApiKeyQuery": {"type": "apiKey", "in": "query", "name": "api_key"}},
            "schemas": {"Error": error, **_oa_stat_schemas(config), **_oa_org_schemas(), **_oa_v1_schemas(config),
                        **_oa_operation_schemas()},
            "responses": responses,
        },
    }


async def openapi_json(request: web.Request) -> web.Response:
    only_params(request)
    return json_response(openapi_document(request.app, base_url(request)))


# ------------------------------------------------- MONARC /api/v1 handlers ---
# The upstream stats service's API, as today's MONARC front office calls it,
# on the same store as /api/v2/: the v1 view of a stat is {uuid, anr, type, date, data}.

V1_TYPES = ("risk", "vulnerability", "threat", "cartography", "compliance")
V1_LIST_PARAMS = ("type", "anrs", "anr", "date_from", "date_to", "get_last", "offset", "limit", "group_by_anr")
V1_PROCESSED_PARAMS = ("type", "processor", "processor_params", "date_from", "date_to", "anrs",
                       "local_stats_only")
V1_UNAUTHORIZED = "Unauthorized - Authentication required."
V1_FORBIDDEN = "Forbidden - Authentication failed."
MONARC_MIN_VERSION = (2, 10, 2)
MONARC_AGENT_RE = re.compile(r"MONARC/([0-9]+(?:\.[0-9]+)*)")
V1_DEFAULT_MONTHS = 3


def check_monarc_version(request: web.Request) -> None:
    """A MONARC older than 2.10.2 (by its User-Agent) gets 426, as upstream."""
    found = MONARC_AGENT_RE.search(request.headers.get("User-Agent", ""))
    if found and tuple(int(part) for part in found.group(1).split(".")) < MONARC_MIN_VERSION:
        raise ApiError(426, "Upgrade Required - This service requires use of MONARC version >= 2.10.2.")


def presented_key(request: web.Request) -> str | None:
    """The one non-empty API key sent (X-API-KEY header or api_key argument), else None."""
    keys = [k for k in sent_keys(request) if k]
    return keys[0] if len(keys) == 1 else None


def v1_caller(request: web.Request) -> Caller:
    """The caller of a v1 route: 426 for an old MONARC, then 401 without a key, 403 with a wrong one.

    With api_key_authentication off everything is open; a known key still
    names the organization that new stats and client/me belong to.
    """
    check_monarc_version(request)
    store: Store = request.app[STORE_KEY]
    key = presented_key(request)
    known = _caller_for(store, key) if key is not None else None
    if not request.app[CONFIG_KEY].api_key_authentication:
        return Caller(known.organization if known else None, True)
    if key is None and not any(sent_keys(request)):
        raise ApiError(401, V1_UNAUTHORIZED)
    if known is None:
        raise ApiError(403, V1_FORBIDDEN)
    return known


async def v1_params(request: web.Request, allowed: tuple) -> dict:
    """The parameters of a v1 GET: a JSON object body and/or the query string (not both for one name)."""
    params: dict[str, Any] = {}
    if (await request.read()).strip():
        body = await read_json(request)
        if not isinstance(body, dict):
            raise bad_request("the body must be a JSON object of parameters, e.g. {\"type\": \"risk\"}")
        params.update({name: int(value) if value.__class__ is float and value.is_integer() else value
                       for name, value in body.items() if value is not None})  # 1.0 is 1 in JSON
    for name, raw in single_query(request).items():
        if name == "api_key":
            continue
        if name in params:
            raise bad_request(f"parameter {name!r} is given both in the body and in the query string")
        params[name] = _v1_query_value(name, raw)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise bad_request(f"unknown parameter(s): {', '.join(unknown)} (known: {', '.join(allowed)})")
    return params


def _v1_query_value(name: str, raw: str):
    """A query-string value in the type its JSON form would have."""
    if name == "anrs":
        return [item.strip() for item in raw.split(",") if item.strip()]
    if name in ("offset", "limit", "group_by_anr", "local_stats_only"):
        number = parse_int(raw)
        return raw if number is None else number
    if name == "get_last":
        return {"true": True, "1": True, "false": False, "0": False}.get(raw.lower(), raw)
    if name == "processor_params":
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise bad_request(f"processor_params: {raw!r} is not a JSON object") from None
    return raw


def v1_type(params: dict) -> str:
    value = params.get("type", MISSING)
    if value is MISSING:
        raise bad_request(f"type is required (one of {', '.join(V1_TYPES)})")
    if value not in V1_TYPES:
        raise bad_request(f"type: {value!r} is not one of {', '.join(V1_TYPES)}")
    return value


def v1_date(params: dict, name: str) -> str | None:
    value = params.get(name)
    if value is not None and parse_date(value) is None:
        raise bad_request(f"{name}: {value!r} is not a date written YYYY-MM-DD")
    return value


def v1_anrs(params: dict) -> set | None:
    """The anrs asked for (`anrs` list and/or `anr`), or None for every anr."""
    wanted = params.get("anrs", [])
    if not isinstance(wanted, list):
        raise bad_request("anrs must be a list of analysis UUIDs")
    if "anr" in params:
        wanted = [*wanted, params["anr"]]
    anrs = set()
    for value in wanted:
        parsed = parse_uuid(value)
        if parsed is None:
            raise bad_request(f"anrs: {value!r} is not a UUID")
        anrs.add(parsed)
    return anrs or None


def v1_count(params: dict, name: str, choices=None) -> int:
    value = params.get(name, 0)
    if not _is_int(value) or value < 0 or (choices and value not in choices):
        allowed = " or ".join(map(str, choices)) if choices else "a non-negative integer"
        raise bad_request(f"{name}: {value!r} is not {allowed}")
    return value


def v1_flag(params: dict, name: str) -> bool:
    value = params.get(name, False)
    if value in (0, 1) and not isinstance(value, float):
        return bool(value)
    raise bad_request(f"{name}: {value!r} is not true or false")


def stat_date(doc: dict) -> str:
    """A stat's date for v1: its `date`, else its year and day, else the day it was created (UTC)."""
    if "date" in doc:
        return doc["date"]
    if "year" in doc and "day" in doc:
        try:
            return date.fromordinal(date(doc["year"], 1, 1).toordinal() + doc["day"] - 1).isoformat()
        except (ValueError, OverflowError):
            pass
    return doc["created_at"][:10]


def months_before(day: date, months: int) -> date:
    """The same day `months` months earlier (the last day of a shorter month)."""
    index = day.year * 12 + day.month - 1 - months
    year, month = divmod(index, 12)
    for last in (31, 30, 29, 28):
        try:
            return date(year, month + 1, min(day.day, last))
        except ValueError:
            continue
    raise AssertionError(day)


def v1_stats_of_type(request: web.Request, kind: str, anrs: set | None, organization: str | None) -> list[dict]:
    """The stats of one type (of one organization when given, of the anrs when given), in creation order."""
    stats: Table = request.app[STORE_KEY].stats
    docs = (stats.docs[i] for i in stats.indexes["type"].lookup(kind))
    return [d for d in docs if (organization is None or d.get("organization") == organization)
            and (anrs is None or d.get("anr") in anrs)]


def present_v1_stat(doc: dict) -> dict:
    return {"uuid": doc["uuid"], "anr": str(doc["anr"]) if "anr" in doc else None, "type": doc["type"],
            "date": stat_date(doc), "data": doc["data"]}


def v1_page(items: list, count: int, offset: int = 0, limit: int = 0) -> dict:
    """The v1 list body; its metadata values are strings, as upstream."""
    return {"metadata": {"count": str(count), "offset": str(offset), "limit": str(limit)},
            "data": items}


async def v1_list_stats(request: web.Request) -> web.Response:
    """GET stats/: one type, by anrs, by date (default: the last 3 months) or only the latest per anr."""
    caller = v1_caller(request)
    params = await v1_params(request, V1_LIST_PARAMS)
    kind, anrs = v1_type(params), v1_anrs(params)
    date_from, date_to = v1_date(params, "date_from"), v1_date(params, "date_to")
    offset, limit = v1_count(params, "offset"), v1_count(params, "limit")
    v1_count(params, "group_by_anr", (0, 1))  # accepted and, as upstream, without effect
    docs = v1_stats_of_type(request, kind, anrs, None if caller.sees_all else caller.organization)
    if v1_flag(params, "get_last"):
        latest: dict = {}
        for doc in docs:
            latest[doc.get("anr")] = max(latest.get(doc.get("anr"), ""), stat_date(doc))
        found = [present_v1_stat(d) for d in docs if stat_date(d) == latest[d.get("anr")]]
        return json_response(v1_page(found, len(found)))
    today = date.today()
    date_from = date_from or months_before(today, V1_DEFAULT_MONTHS).isoformat()
    date_to = date_to or today.isoformat()
    matching = [d for d in docs if date_from <= stat_date(d) <= date_to]
    page = matching[offset:offset + limit] if limit else matching[offset:]
    return json_response(v1_page([present_v1_stat(d) for d in page], len(page), offset, limit))


def v1_new_stat(request: web.Request, caller: Caller, item, now: str) -> dict:
    """A stat record from one item of a v1 batch, or ApiError(400) naming what is wrong."""
    if not isinstance(item, dict):
        raise bad_request("a stat must be a JSON object {\"anr\", \"type\", \"date\", \"data\"}")
    errors: dict[str, str] = {}
    clean = validated_fields(item, ("uuid", "anr", "type", "date", "data"), errors)
    for name in ("anr", "type", "date", "data"):
        if name not in item:
            errors[name] = "is required"
    if "anr" in clean and not isinstance(clean["anr"], str):
        errors["anr"] = "must be a UUID string"
    if "type" in clean and clean["type"] not in V1_TYPES:
        errors["type"] = f"must be one of {', '.join(V1_TYPES)}"
    if errors:
        raise _fail(errors, "stat")
    clean.setdefault("uuid", str(uuidlib.uuid4()))
    derive_periods(clean, item)
    if caller.organization is not None:
        clean["organization"] = caller.organization
    return ordered_stat({**clean, "id": new_stat_id(request), "created_at": now, "updated_at": now})


async def v1_create_stats(request: web.Request) -> web.Response:
    """POST stats/ with a list: each item stored on its own; 201 if all went in, else 207 with per-item results."""
    caller = v1_caller(request)
    only_params(request)
    body = await read_json(request)
    config: Config = request.app[CONFIG_KEY]
    if not isinstance(body, list) or len(body) > config.max_limit:
        raise bad_request(f"the body must be a JSON list of at most {config.max_limit} stats"
                          " [{\"anr\", \"type\", \"date\", \"data\"}, ...]")
    store: Store = request.app[STORE_KEY]
    await store.writable()
    caller = v1_caller(request)  # the key as it stands after the body was read
    now = utcnow()
    docs, results, seen = [], [], set()
    for i, item in enumerate(body):
        try:
            doc = v1_new_stat(request, caller, item, now)
        except ApiError as e:
            results.append({"index": i, "status": 400, "error": e.message, "errors": e.errors})
            continue
        if doc["uuid"] in seen or store.stats.find_unique("uuid", doc["uuid"]) is not None:
            results.append({"index": i, "status": 409, "uuid": doc["uuid"],
                            "error": f"Conflict: uuid {doc['uuid']} already exists"})
            continue
        seen.add(doc["uuid"])
        docs.append(doc)
        results.append({"index": i, "status": 201, "uuid": doc["uuid"]})
    if docs:
        await store.commit([("stats", store.stats.new_doc_id(), doc) for doc in docs])
    answer = {**v1_page([present_v1_stat(d) for d in docs], len(docs)), "results": results}
    return json_response(answer, 201 if len(docs) == len(body) else 207)


async def v1_delete_stats(request: web.Request) -> web.Response:
    """DELETE stats/<anr>: the caller's stats of that analysis (204 even when there were none)."""
    caller = v1_caller(request)
    only_params(request)
    anr = parse_uuid(request.match_info["anr"])
    if anr is None:
        raise bad_request(f"{request.match_info['anr']!r} is not an analysis UUID")
    store: Store = request.app[STORE_KEY]
    await store.writable()
    caller = v1_caller(request)
    owned = [i for i in store.stats.indexes["anr"].lookup(anr)
             if caller.organization is None or store.stats.docs[i].get("organization") == caller.organization]
    if owned:
        await store.commit([("stats", i, None) for i in owned])
    return web.Response(status=204)


def client_me_body(org: dict | None, key: str | None) -> dict:
    """client/me as upstream answers it; the token is the key presented (only its hash is stored)."""
    if org is None:
        return {"name": None, "token": key, "role": "admin", "is_sharing_enabled": True}
    return {"name": org["name"], "token": key, "role": "admin" if org.get("is_admin") else "user",
            "is_sharing_enabled": org.get("is_sharing_enabled", True)}


async def v1_client_me(request: web.Request) -> web.Response:
    """GET client/me; PATCH client/me sets is_sharing_enabled."""
    caller = v1_caller(request)
    only_params(request)
    store: Store = request.app[STORE_KEY]
    key = presented_key(request)
    org = store.orgs.get(caller.organization) if caller.organization is not None else None
    if request.method == "GET":
        return json_response(client_me_body(org, key))
    body = await read_json(request)
    if not isinstance(body, dict):
        raise bad_request("the body must be a JSON object {\"is_sharing_enabled\": true|false}")
    current = client_me_body(org, key)
    errors = {name: "is read-only (only is_sharing_enabled may be changed)" for name in body
              if name != "is_sharing_enabled" and (name not in current or body[name] != current[name])}
    if not isinstance(body.get("is_sharing_enabled"), bool):
        errors["is_sharing_enabled"] = "is required, true or false"
    if errors:
        raise _fail(errors, "client")
    if org is None:
        raise bad_request("no organization to change: with api_key_authentication off, send the key"
                          " of an existing organization")
    await store.writable()
    caller = v1_caller(request)
    doc_id = store.orgs.doc_id(caller.organization) if caller.organization is not None else None
    if doc_id is None:
        raise ApiError(403, V1_FORBIDDEN)
    new = {**store.orgs.docs[doc_id], "is_sharing_enabled": body["is_sharing_enabled"], "updated_at": utcnow()}
    await store.commit([("organizations", doc_id, new)])
    return json_response(client_me_body(new, key))


# processors: (stats, processor_params) -> data; they aggregate over every organization

STAT_MEASURES = ("count", "maxRisk", "averageRate")
RISK_STATES = ("current", "residual")
RISK_KINDS = ("informational", "operational")
RISK_LEVELS = ("Low risks", "Medium risks", "High risks")


def _no_params(params: dict, processor: str) -> None:
    if params:
        raise bad_request(f"processor_params: {processor} takes no parameter, not {', '.join(params)}")


def _number(value) -> float | None:
    """A finite number, from a number or a numeric string (averageRate is sent as a string)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _means(rows: list[dict]) -> dict:
    return {name: sum(row[name] for row in rows) / len(rows) for name in STAT_MEASURES}


def threat_average_on_date(stats: list[dict], params: dict) -> list:
    """Averages of count, maxRisk and averageRate of each threat, per date and overall, across all analyses."""
    _no_params(params, "threat_average_on_date")
    objects: dict[str, dict] = {}
    for doc in stats:
        day = stat_date(doc)
        for item in doc["data"] if isinstance(doc["data"], list) else ():
            if not isinstance(item, dict) or "uuid" not in item:
                continue
            measures = {name: _number(item.get(name)) for name in STAT_MEASURES}
            if None in measures.values():
                continue
            entry = objects.setdefault(str(item["uuid"]), {
                "labels": {f"label{i}": item.get(f"label{i}", "") for i in range(1, 5)}, "dates": {}, "all": []})
            entry["dates"].setdefault(day, []).append(measures)
            entry["all"].append(measures)
    return [{"object": uuid, "labels": entry["labels"],
             "values": [{**_means(rows), "date": day} for day, rows in sorted(entry["dates"].items())],
             "averages": _means(entry["all"])} for uuid, entry in objects.items()]


def vulnerability_average_on_date(stats: list[dict], params: dict) -> list:
    """Averages of count, maxRisk and averageRate of each vulnerability, per date and overall, across all analyses."""
    _no_params(params, "vulnerability_average_on_date")
    return threat_average_on_date(stats, {})


def _risk_values(doc: dict):
    """(state, kind, level, value) of each level count in a risk stat's data.risks."""
    risks = doc["data"].get("risks") if isinstance(doc["data"], dict) else None
    for state in RISK_STATES:
        by_kind = risks.get(state) if isinstance(risks, dict) else None
        for kind in RISK_KINDS:
            levels = by_kind.get(kind) if isinstance(by_kind, dict) else None
            for level in levels if isinstance(levels, list) else ():
                value = _number(level.get("value")) if isinstance(level, dict) else None
                if value is not None and isinstance(level.get("level"), str):
                    yield state, kind, level["level"], value


def risk_averages(stats: list[dict], params: dict) -> dict:
    """Averages of the number of risks per level (current/residual, informational/operational, low/medium/high)."""
    _no_params(params, "risk_averages")
    sums: dict[tuple, list] = {}
    for doc in stats:
        for state, kind, level, value in _risk_values(doc):
            total = sums.setdefault((state, kind, level), [0.0, 0])
            total[0] += value
            total[1] += 1
    result = {state: {kind: dict.fromkeys(RISK_LEVELS, 0) for kind in RISK_KINDS} for state in RISK_STATES}
    for (state, kind, level), (total, count) in sums.items():
        result[state][kind][level] = total / count
    return result


def _risk_selection(params: dict, name: str, choices: tuple) -> tuple:
    """The comma-separated choices of a risk processor parameter (all when absent or empty)."""
    value = params.get(name)
    value = ",".join(choices) if value is None or value == "" else value
    parts = [part.strip() for part in value.split(",")] if isinstance(value, str) else None
    if not parts or not set(parts) <= set(choices):
        raise bad_request(f"processor_params: {name} must be {' or '.join(choices)} (or both, comma-separated),"
                          f" not {value!r}")
    return tuple(choice for choice in choices if choice in parts)


def risk_averages_on_date(stats: list[dict], params: dict) -> dict:
    """Averages of the number of risks per level and date. Parameters: risks_type (informational or
    operational), risks_state (current or residual)."""
    unknown = sorted(set(params) - {"risks_type", "risks_state"})
    if unknown:
        raise bad_request(f"processor_params: unknown parameter(s) {', '.join(unknown)}"
                          " (known: risks_type, risks_state)")
    kinds = _risk_selection(params, "risks_type", RISK_KINDS)
    states = _risk_selection(params, "risks_state", RISK_STATES)
    sums: dict[tuple, dict] = {}
    for doc in stats:
        day = stat_date(doc)
        for state, kind, level, value in _risk_values(doc):
            total = sums.setdefault((state, kind, level), {}).setdefault(day, [0.0, 0])
            total[0] += value
            total[1] += 1
    result = {state: {kind: {level: [] for level in RISK_LEVELS} for kind in kinds} for state in states}
    for (state, kind, level), by_day in sums.items():
        if state in result and kind in result[state]:
            result[state][kind][level] = [{"date": day, "value": total / count}
                                          for day, (total, count) in sorted(by_day.items())]
    return result


V1_PROCESSORS = {func.__name__: func for func in (threat_average_on_date, vulnerability_average_on_date,
                                                  risk_averages, risk_averages_on_date)}


async def v1_processed(request: web.Request) -> web.Response:
    """GET stats/processed/: a processor applied to the stats of one type, over every organization."""
    v1_caller(request)
    params = await v1_params(request, V1_PROCESSED_PARAMS)
    kind, anrs = v1_type(params), v1_anrs(params)
    processor = params.get("processor", MISSING)
    if processor is MISSING:
        raise bad_request(f"processor is required (one of {', '.join(V1_PROCESSORS)})")
    if not isinstance(processor, str) or processor not in V1_PROCESSORS:
        raise bad_request(f"processor: {processor!r} is not one of {', '.join(V1_PROCESSORS)}")
    if not processor.startswith(kind + "_"):
        raise bad_request(f"Processor '{processor}' can not be used with type '{kind}'.")
    processor_params = params.get("processor_params", {})
    if not isinstance(processor_params, dict):
        raise bad_request("processor_params must be a JSON object")
    date_from, date_to = v1_date(params, "date_from"), v1_date(params, "date_to")
    v1_count(params, "local_stats_only", (0, 1))  # every stat here is local
    docs = [d for d in v1_stats_of_type(request, kind, anrs, None)
            if (date_from is None or stat_date(d) >= date_from) and (date_to is None or stat_date(d) <= date_to)]
    data = V1_PROCESSORS[processor](docs, processor_params)
    return json_response({"type": kind, "processor": processor, "data": data if docs else []})


async def v1_processors(request: web.Request) -> web.Response:
    """GET stats/processed/list (no key): the processors and what they compute."""
    return json_response([{"name": name, "description": " ".join(func.__doc__.split())}
                          for name, func in V1_PROCESSORS.items()])


# ------------------------------------------------------------- retention ---
# `statsd purge` / POST /api/v2/purge and `statsd remove-duplicates` /
# POST /api/v2/remove-duplicates, offline and online alike. They reach the data
# through stat_records and delete_stat_records only. The scan gives the loop
# back every SCAN_SLICE records; deletions commit RETENTION_CHUNK stats at a
# time, so other requests go on meanwhile.

RETENTION_CHUNK = 1000  # stats deleted per commit
SCAN_SLICE = 5000  # records examined between two yields to the loop
MAX_MONTHS = 1200  # the largest --older-than / older_than: 100 years


def stat_records(store: Store, organization: str | None = None, kind: str | None = None) -> list[dict]:
    """The stored stat records (of one organization, of one type, when given), in creation
    order, taken at one instant (records are replaced on write, never changed in place)."""
    stats = store.stats
    if organization is None and kind is None:
        return list(stats.docs.values())
    field, value = ("organization", organization) if organization is not None else ("type", kind)
    docs = [stats.docs[i] for i in stats.indexes[field].lookup(value)]
    if organization is not None and kind is not None:
        docs = [d for d in docs if d.get("type") == kind]
    return docs


async def delete_stat_records(store: Store, records: list[dict], still: Callable[[dict], bool] | None = None
                              ) -> list[dict]:
    """Delete those of `records` still stored unchanged (and, given `still`, for which it holds
    at that moment), RETENTION_CHUNK per commit; the records deleted."""
    deleted: list[dict] = []
    stats = store.stats
    for start in range(0, len(records), RETENTION_CHUNK):
        await store.writable()
        ops, chunk = [], []
        for doc in records[start:start + RETENTION_CHUNK]:  # no await from here to the commit
            doc_id = stats.doc_id(doc["id"])
            if doc_id is not None and stats.docs[doc_id] is doc and (still is None or still(doc)):
                ops.append(("stats", doc_id, None))
                chunk.append(doc)
        if ops:
            await store.commit(ops)
            deleted += chunk
        else:
            await asyncio.sleep(0)
    return deleted


def stored_unchanged(store: Store, doc: dict) -> bool:
    """Whether the stat record `doc` is still the one stored under its id."""
    return store.stats.get(doc["id"]) is doc


async def _scan(records: list[dict], keep: Callable[[dict], bool]) -> list[dict]:
    """The records for which `keep` holds, giving the loop back every SCAN_SLICE records."""
    out: list[dict] = []
    for start in range(0, len(records), SCAN_SLICE):
        out += filter(keep, records[start:start + SCAN_SLICE])
        await asyncio.sleep(0)
    return out


def utc_today() -> date:
    return datetime.now(timezone.utc).date()


def _per_organization(matched: list[dict], deleted: list[dict]) -> list[dict]:
    counts: dict[Any, list[int]] = {}
    for i, docs in enumerate((matched, deleted)):
        for doc in docs:
            counts.setdefault(doc.get("organization"), [0, 0])[i] += 1
    return [{"organization": name, "matched": m, "deleted": d} for name, (m, d) in counts.items()]


async def purge_stats(store: Store, older_than: int, organization: str | None, dry_run: bool) -> dict:
    """Delete the stats dated more than `older_than` months before today (UTC); the counts."""
    before = months_before(utc_today(), older_than).isoformat()
    matched = await _scan(stat_records(store, organization), lambda doc: stat_date(doc) < before)
    deleted = [] if dry_run else await delete_stat_records(store, matched)
    return {"older_than": older_than, "before": before, "organization": organization, "dry_run": dry_run,
            "matched": len(matched), "deleted": len(deleted), "organizations": _per_organization(matched, deleted)}


async def remove_duplicate_stats(store: Store, kind: str | None, dry_run: bool) -> dict:
    """Of the stats with the same organization, anr, type and date, keep the newest (latest
    created_at, then the latest stored) and delete the others; stats without an anr are no
    one's duplicates. The counts."""
    records = stat_records(store, kind=kind)
    newest: dict[tuple, dict] = {}
    duplicates: list[tuple[dict, tuple]] = []
    for start in range(0, len(records), SCAN_SLICE):
        for doc in records[start:start + SCAN_SLICE]:
            if "anr" not in doc:
                continue
            group = (doc.get("organization"), doc["anr"], doc["type"], stat_date(doc))
            kept = newest.get(group)
            if kept is None:
                newest[group] = doc
            elif doc["created_at"] >= kept["created_at"]:
                newest[group] = doc
                duplicates.append((kept, group))
            else:
                duplicates.append((doc, group))
        await asyncio.sleep(0)
    keeper = {doc["id"]: newest[group] for doc, group in duplicates}
    matched = [doc for doc, _ in duplicates]
    deleted = [] if dry_run else await delete_stat_records(
        store, matched, lambda doc: stored_unchanged(store, keeper[doc["id"]]))  # never the last of a group
    return {"type": kind, "dry_run": dry_run, "groups": len({group for _, group in duplicates}),
            "matched": len(matched), "deleted": len(deleted), "organizations": _per_organization(matched, deleted)}


async def read_options(request: web.Request) -> dict:
    """The JSON object of options of a POST; no body at all counts as {}."""
    if not request.body_exists:
        return {}
    body = await read_json(request)
    if not isinstance(body, dict):
        raise bad_request("the body must be a JSON object of options")
    return body


def _option_errors(body: dict, allowed: Iterable[str]) -> dict[str, str]:
    errors = {name: "unknown option" for name in body if name not in allowed}
    if "dry_run" in body and not isinstance(body["dry_run"], bool):
        errors["dry_run"] = "must be true or false"
    return errors


def check_older_than(value) -> tuple[int | None, str | None]:
    """(months, None) or (None, what is wrong); 12.0 is 12, as JSON does not tell them apart."""
    if value.__class__ is float and value.is_integer():
        value = int(value)
    if not _is_int(value) or not 0 <= value <= MAX_MONTHS:
        return None, f"must be a whole number of months from 0 to {MAX_MONTHS}"
    return value, None


async def purge_handler(request: web.Request) -> web.Response:
    """POST /api/v2/purge {"older_than": MONTHS, "organization"?: NAME, "dry_run"?: bool}."""
    require_admin(request, "purge stats")
    only_params(request)
    body = await read_options(request)
    store: Store = request.app[STORE_KEY]
    await ready_to_write(request)
    require_admin(request, "purge stats")
    errors = _option_errors(body, ("older_than", "organization", "dry_run"))
    older_than, problem = check_older_than(body["older_than"]) if "older_than" in body else (None, "is required")
    if problem:
        errors["older_than"] = problem
    if body.get("organization") is not None and not isinstance(body["organization"], str):
        errors["organization"] = "must be an organization name"
    if errors:
        raise _fail(errors, "purge options")
    if body.get("organization") is not None and store.orgs.get(body["organization"]) is None:
        raise ApiError(404, f"Not Found: no organization named {body['organization']!r}; nothing was deleted")
    return json_response(await purge_stats(store, older_than, body.get("organization"),
                                           body.get("dry_run", False)))


async def remove_duplicates_handler(request: web.Request) -> web.Response:
    """POST /api/v2/remove-duplicates {"type"?: TYPE, "dry_run"?: bool}."""
    require_admin(request, "remove duplicates")
    only_params(request)
    body = await read_options(request)
    store: Store = request.app[STORE_KEY]
    await ready_to_write(request)
    require_admin(request, "remove duplicates")
    errors = _option_errors(body, ("type", "dry_run"))
    if body.get("type") is not None:
        _, problem = check_stat_value("type", body["type"])
        if problem:
            errors["type"] = problem
    if errors:
        raise _fail(errors, "remove-duplicates options")
    return json_response(await remove_duplicate_stats(store, body.get("type"), body.get("dry_run", False)))


# ----------------------------------------------------------- app factory ---

# aiohttp refuses a longer request line or header with a plain-text 400 before the app runs;
# 256 KiB lets a query of 10,000 parameters reach the app, which answers it as JSON.
HTTP_LIMITS = {"max_line_size": 256 * 1024, "max_field_size": 16 * 1024}


def create_app(config: Config, store: Store | None = None) -> web.Application:
    """The aiohttp application; the store opens on startup and folds its journal on cleanup."""
    app = web.Application(client_max_size=config.max_body_size, handler_args=HTTP_LIMITS,
                          middlewares=[api_middleware])
    app[CONFIG_KEY] = config
    app[STORE_KEY] = store or Store(config.database)
    app[IDS_KEY] = IdGenerator()
    app[STAT_VIEWS_KEY] = StatViews()
    app[STAT_QUERIES_KEY] = ParsedQueries(STAT_FIELDS)
    app[RATE_LIMIT_KEY] = config.rate_limit_item()
    app[TRUSTED_PROXIES_KEY] = [ipaddress.ip_network(str(p), strict=False) for p in config.trusted_proxies]
    routes = [
        ("GET", "/stats", list_stats), ("POST", "/stats", create_stats),
        ("GET", "/stats/{id}", get_stat), ("PUT", "/stats/{id}", update_stat),
        ("PATCH", "/stats/{id}", update_stat), ("DELETE", "/stats/{id}", delete_stat),
        ("GET", "/organizations", list_orgs), ("POST", "/organizations", create_org),
        ("GET", "/organizations/{name}", get_org), ("PUT", "/organizations/{name}", update_org),
        ("PATCH", "/organizations/{name}", update_org), ("DELETE", "/organizations/{name}", delete_org),
        ("GET", "/export", export_all), ("POST", "/purge", purge_handler),
        ("POST", "/remove-duplicates", remove_duplicates_handler),
    ]
    add_routes(app, API_PREFIX, routes)
    v1_routes = [
        ("GET", "/stats/processed/list", v1_processors), ("GET", "/stats/processed", v1_processed),
        ("GET", "/stats", v1_list_stats), ("POST", "/stats", v1_create_stats),
        ("DELETE", "/stats/{anr}", v1_delete_stats),
        ("GET", "/client/me", v1_client_me), ("PATCH", "/client/me", v1_client_me),
    ]
    add_routes(app, V1_PREFIX, v1_routes)
    app.router.add_get("/", index)
    app.router.add_route("GET", OPENAPI_PATH, openapi_json)
    app.on_startup.append(_start_store)
    app.on_cleanup.append(_close_store)
    return app


def add_routes(app: web.Application, prefix: str, routes: list) -> None:
    """Each path with and without its trailing slash, as one resource holding all its methods
    (the router then tries one resource per path, and a wrong method is a 405).
    The slash form comes first: it is the one links and clients use."""
    resources: dict[str, web.Resource] = {}
    for method, path, handler in routes:
        for variant in (prefix + path + "/", prefix + path):
            if variant not in resources:
                resources[variant] = app.router.add_resource(variant)
            resources[variant].add_route(method, handler)


async def _start_store(app: web.Application) -> None:
    store: Store = app[STORE_KEY]
    await store.start()
    app[LIMITER_KEY] = Limiter(keyfunc=client_address)
    if app[CONFIG_KEY].api_key_authentication and not store.orgs.docs:
        log.warning("no organization yet, so every request will be refused: stop the server and"
                    " run `statsd create-organization NAME --admin` to get an admin key")


async def _close_store(app: web.Application) -> None:
    await app[STORE_KEY].close()


# ---------------------------------------------------------- command line ---

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="statsd", description="Statistics service for MONARC"
                                     " (Stats API v2 on one TinyDB JSON file).")
    parser.add_argument("--version", action="version", version=f"statsd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, func, help_: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_, description=help_)
        sub.add_argument("--config", metavar="FILE", help="TOML config file (default: ./statsd.toml if it exists)")
        sub.add_argument("--database", metavar="PATH", help="TinyDB JSON file (default: statsd.json)")
        sub.set_defaults(func=func)
        return sub

    serve = command("serve", cmd_serve, "Start the HTTP server.")
    serve.add_argument("--host", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default: 5000)")
    serve.add_argument("--access-log", action="store_true", help="log every request to stderr")
    create = command("create-organization", cmd_create_org,
                     "Create an organization and print its API key on the last line.")
    create.add_argument("name", metavar="NAME")
    create.add_argument("--token", help="the API key to use (at least 16 characters; default: a random one)")
    create.add_argument("--admin", action="store_true", help="may see all stats and manage organizations")
    command("list-organizations", cmd_list_orgs, "List the organizations and their number of stats.")
    update = command("update-organization", cmd_update_org, "Make an organization admin or not, or give it"
                     " a new API key (printed on the last line); the last admin cannot be demoted.")
    update.add_argument("name", metavar="NAME")
    role = update.add_mutually_exclusive_group()
    role.add_argument("--admin", dest="admin", action="store_const", const=True, default=None,
                      help="make it an admin organization")
    role.add_argument("--no-admin", dest="admin", action="store_const", const=False,
                      help="make it an ordinary organization")
    update.add_argument("--rotate-token", action="store_true",
                        help="give it a new random API key; the old one stops working")
    delete = command("delete-organization", cmd_delete_org, "Delete an organization.")
    delete.add_argument("name", metavar="NAME")
    delete.add_argument("--cascade", action="store_true", help="also delete its stats")
    export = command("export", cmd_export, "Write every organization (token hashes only) and stat as JSON:"
                     " from the stopped database, or with --url and --token from a running server.")
    export.add_argument("--output", metavar="FILE", help="file to write, atomically (default: stdout)")
    export.add_argument("--url", help="base URL of a running statsd: take its online backup (GET /api/v2/export)")
    export.add_argument("--token", help="an admin API key of that server (with --url)")
    purge = command("purge", cmd_purge, "Delete the stats dated more than MONTHS months before today (UTC),"
                    " and say how many per organization.")
    purge.add_argument("--older-than", metavar="MONTHS", type=int, required=True,
                       help=f"age in months, 0 to {MAX_MONTHS}: a stat dated exactly MONTHS months ago is kept")
    purge.add_argument("--organization", metavar="NAME", help="only this organization's stats")
    purge.add_argument("--dry-run", action="store_true", help="only count: delete nothing")
    dedupe = command("remove-duplicates", cmd_remove_duplicates, "Of the stats with the same organization,"
                     " analysis (anr), type and date, keep the newest (latest created) and delete the others.")
    dedupe.add_argument("--type", metavar="TYPE", help="only stats of this type (a type no stat has matches none)")
    dedupe.add_argument("--dry-run", action="store_true", help="only count: delete nothing")
    load = command("import", cmd_import, "Load an export file; organizations (by name) and stats (by uuid)"
                   " already there are kept, so importing twice changes nothing.")
    load.add_argument("file", metavar="FILE")
    push = command("push", cmd_push, "Send the stats to an upstream stats service through its /api/v1/ batch"
                   " POST, in chunks; a new run sends what the last one did not.")
    push.add_argument("--url", required=True, help="base URL of the remote service, e.g. https://dashboard.monarc.lu")
    push.add_argument("--token", required=True, help="the API key of this site on the remote service")
    push.add_argument("--date-from", metavar="YYYY-MM-DD", help="only stats dated from this day")
    push.add_argument("--date-to", metavar="YYYY-MM-DD", help="only stats dated up to this day")
    push.add_argument("--chunk-size", type=int, default=100, help="stats per request (default: 100)")
    push.add_argument("--all", action="store_true", help="send every stat again, not only those not yet sent"
                      " (the remote skips the ones it has)")
    return parser


def cmd_serve(config: Config, args) -> int:
    store = Store(config.database)
    with way_out(LOCK_HINTS["serve"]):
        store.lock()
    app = create_app(config, store)

    def announce(_aiohttp_banner: str) -> None:  # called once the database is loaded and the port open
        log.info("statsd %s serving %s (%d stats, loaded in %.2f s) on http://%s:%s%s/ (authentication %s,"
                 " rate limit %s)", __version__, config.database, len(store.stats.docs), store.open_seconds,
                 config.host, config.port, API_PREFIX,
                 "on" if config.api_key_authentication else "OFF", config.rate_limit or "off")
    web.run_app(app, host=config.host, port=config.port, print=announce,
                access_log=logging.getLogger("statsd.access") if args.access_log else None)
    return 0


# what each command tells a person whose database a server holds
LOCK_HINTS = {
    "serve": "stop that server first, or serve another database (--database)",
    "create-organization": "stop that server first, or create it through the server's API:"
                           " POST /api/v2/organizations/ with an admin key",
    "list-organizations": "stop that server first, or ask the server's API:"
                          " GET /api/v2/organizations/ with an admin key",
    "update-organization": "stop that server first, or change it through the server's API:"
                           " PATCH /api/v2/organizations/{name}/ with an admin key and the body"
                           " {{\"is_admin\": true|false}} or {{\"token\": \"NEW KEY\"}}",
    "delete-organization": "stop that server first, or delete it through the server's API:"
                           " DELETE /api/v2/organizations/{name}/ with an admin key"
                           " (add ?cascade=true to delete its stats with it)",
    "export": "take an online backup from the running server instead: statsd export --url URL"
              " --token ADMIN_KEY [--output FILE] (it calls GET /api/v2/export)",
    "import": "stop that server first: import restores into a stopped database only",
    "push": "stop that server first: push reads a stopped database only",
    "purge": "stop that server first, or ask the server's API: POST /api/v2/purge with an admin key",
    "remove-duplicates": "stop that server first, or ask the server's API:"
                         " POST /api/v2/remove-duplicates with an admin key",
}


@contextlib.contextmanager
def way_out(hint: str):
    """Add to a "database in use" error what this command's user can do instead."""
    try:
        yield
    except DatabaseLocked as e:
        raise DatabaseLocked(f"{e}; {hint}") from None


def _offline(config: Config, work, busy: str) -> Any:
    """Run `work(store)` on the database, which no server may hold meanwhile (else: `busy`)."""
    async def run():
        store = Store(config.database)
        with way_out(busy):
            await store.start()
        try:
            return await work(store)
        finally:
            await store.close()
    return asyncio.run(run())


def cmd_create_org(config: Config, args) -> int:
    for problem, what in ((check_org_name(args.name), "NAME"),
                          (args.token is not None and check_token(args.token), "--token")):
        if problem:
            raise ConfigError(f"{what} {problem}")

    async def work(store: Store):
        doc, token = new_organization(store, args.name, args.token, args.admin)
        await store.commit([("organizations", store.orgs.new_doc_id(), doc)])
        return token
    token = _offline(config, work, LOCK_HINTS["create-organization"])
    print(f"Created {'admin ' if args.admin else ''}organization {args.name!r} in {config.database}."
          " Its API key (shown only now; send it as the X-API-KEY header):")
    print(token)
    return 0


def cmd_list_orgs(config: Config, args) -> int:
    async def work(store: Store):
        return [(d["name"], d["is_admin"], len(store.stats.indexes["organization"].lookup(d["name"])),
                 d["created_at"]) for d in store.orgs.docs.values()]
    rows = _offline(config, work, LOCK_HINTS["list-organizations"])
    print(f"{'NAME':30} {'ADMIN':5} {'STATS':>8}  CREATED_AT")
    for name, is_admin, count, created in rows:
        print(f"{name:30} {'yes' if is_admin else 'no':5} {count:>8}  {created}")
    return 0


def cmd_update_org(config: Config, args) -> int:
    if args.admin is None and not args.rotate_token:
        raise ConfigError("nothing to change: give --admin, --no-admin or --rotate-token")
    token = secrets.token_urlsafe(64) if args.rotate_token else None

    async def work(store: Store):
        doc_id = store.orgs.doc_id(args.name)
        if doc_id is None:
            raise ConfigError(f"no organization named {args.name!r} in {config.database}")
        new = changed_organization(store, store.orgs.docs[doc_id], args.admin, token)
        await store.commit([("organizations", doc_id, new)])
        return new
    new = _offline(config, work, LOCK_HINTS["update-organization"].format(name=quote(args.name, safe="")))
    print(f"Updated organization {args.name!r} in {config.database}: {'admin' if new['is_admin'] else 'not admin'}"
          + ("." if token is None else "; its new API key (shown only now; the old one no longer works):"))
    if token is not None:
        print(token)
    return 0


def cmd_purge(config: Config, args) -> int:
    _, problem = check_older_than(args.older_than)
    if problem:
        raise ConfigError(f"--older-than {problem}")

    async def work(store: Store):
        if args.organization is not None and store.orgs.get(args.organization) is None:
            raise ConfigError(f"--organization: no organization named {args.organization!r} in {config.database}")
        return await purge_stats(store, args.older_than, args.organization, args.dry_run)
    report = _offline(config, work, LOCK_HINTS["purge"])
    print_retention_report(report, f"dated before {report['before']} (more than {args.older_than} month(s) ago)"
                           + (f" of organization {args.organization!r}" if args.organization else ""))
    return 0


def cmd_remove_duplicates(config: Config, args) -> int:
    if args.type is not None:
        _, problem = check_stat_value("type", args.type)
        if problem:
            raise ConfigError(f"--type {problem}")

    async def work(store: Store):
        return await remove_duplicate_stats(store, args.type, args.dry_run)
    report = _offline(config, work, LOCK_HINTS["remove-duplicates"])
    print_retention_report(report, f"duplicated in {report['groups']} group(s) of the same organization, anr,"
                                   " type and date (the newest of each is kept)"
                                   + (f", of type {args.type!r}" if args.type else ""))
    return 0


def print_retention_report(report: dict, what: str) -> None:
    done = "dry run, nothing deleted" if report["dry_run"] else f"{report['deleted']} deleted"
    print(f"{report['matched']} stat(s) {what}; {done}.")
    for row in report["organizations"]:
        name = row["organization"] if row["organization"] is not None else "(no organization)"
        print(f"  {name:30} {row['matched']:>8} matched {row['deleted']:>8} deleted")


def cmd_delete_org(config: Config, args) -> int:
    async def work(store: Store):
        doc_id = store.orgs.doc_id(args.name)
        if doc_id is None:
            raise ConfigError(f"no organization named {args.name!r} in {config.database}")
        ops = delete_organization_ops(store, doc_id, store.orgs.docs[doc_id], args.cascade)
        await store.commit(ops)
        return len(ops) - 1
    deleted = _offline(config, work, LOCK_HINTS["delete-organization"].format(name=quote(args.name, safe="")))
    print(f"Deleted organization {args.name!r}" + (f" and its {deleted} stat(s)." if deleted else "."))
    return 0


EXPORT_FORMAT = "statsd-export"
IMPORT_CHUNK = 1000  # stats per journal transaction
IMPORT_PROGRESS_MIN = 5000  # stats from which a terminal gets a progress bar
ORG_RECORD_FIELDS = ("name", "token_sha256", "is_admin", "is_sharing_enabled", "created_at", "updated_at")
SHA256_RE = re.compile(r"[0-9a-f]{64}")
STAT_ID_RE = re.compile(r"[0-9a-f]{24}")


EXPORT_CHUNK = 100  # records serialized between two writes of a streamed export (measured: 1000 made
# a cheap request wait ~25 ms at 100k MONARC-shaped stats, 100 about 3 ms)


def export_snapshot(store: Store) -> tuple[list[dict], list[dict]]:
    """Every organization and stat record, as stored, taken at one instant.

    Records are replaced on write, never changed in place, so these lists stay
    a consistent picture while the tables move on.
    """
    return list(store.orgs.docs.values()), list(store.stats.docs.values())


def export_chunks(orgs: list[dict], stats: list[dict], exported_at: str) -> Iterable[bytes]:
    """The export document (organizations with token hashes only, stats) in pieces of
    at most EXPORT_CHUNK records; joined, they are one JSON document and a newline."""
    head = orjson.dumps({"format": EXPORT_FORMAT, "version": 1, "statsd": __version__,
                         "exported_at": exported_at, "organizations": orgs})
    yield head[:-1] + b',"stats":['
    for start in range(0, len(stats), EXPORT_CHUNK):
        items = orjson.dumps(stats[start:start + EXPORT_CHUNK])[1:-1]  # without [ and ]
        yield b"," + items if start else items
    yield b"]}\n"


def cmd_export(config: Config, args) -> int:
    if (args.url is None) != (args.token is None):
        raise ConfigError("--url and --token go together: the address of a running statsd and an admin key")
    if args.url is not None:
        return export_remote(args)

    async def work(store: Store):
        orgs, stats = export_snapshot(store)
        return b"".join(export_chunks(orgs, stats, utcnow())), len(orgs), len(stats)
    data, orgs, stats = _offline(config, work, LOCK_HINTS["export"])
    if args.output is None:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    else:
        try:
            write_atomically(args.output, data)
        except OSError as e:
            raise ConfigError(f"cannot write {args.output}: {e.strerror}") from None
        print(f"Exported {orgs} organization(s) and {stats} stat(s) from {config.database} to {args.output}.")
    return 0


def export_endpoint(url: str) -> str:
    """The GET /api/v2/export address of a statsd given by its base URL (or by that address)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"--url {url!r} must be an http:// or https:// address")
    base = url.rstrip("/")
    for suffix in ("/export", API_PREFIX):
        base = base.removesuffix(suffix)
    return base + API_PREFIX + "/export"


def export_remote(args) -> int:
    """`statsd export --url --token`: the running server's export, atomically to --output or to stdout."""
    endpoint = export_endpoint(args.url)
    if args.output is None:
        asyncio.run(download_export(endpoint, args.token, sys.stdout.buffer.write))
        sys.stdout.flush()
        return 0
    folder = os.path.dirname(os.path.abspath(args.output))
    tmp = f"{args.output}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    except OSError as e:
        raise ConfigError(f"cannot write {args.output}: {e.strerror}") from None
    try:
        try:
            counts = asyncio.run(download_export(endpoint, args.token, lambda data: _write_all(fd, data)))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, args.output)
        _fsync_folder(folder)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise ConfigError(f"cannot write {args.output}: {e.strerror or e}") from None
        raise
    print(f"Exported {counts[0]} organization(s) and {counts[1]} stat(s) from {endpoint} to {args.output}.")
    return 0


async def download_export(endpoint: str, token: str, sink) -> tuple[str, str]:
    """Stream GET `endpoint` into `sink`; (organizations, stats) as the server counted them.
    ConfigError when the server refuses or the document arrives incomplete."""
    headers = {"X-API-KEY": token, "User-Agent": f"statsd/{__version__}"}
    tail = b""
    try:
        async with aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(sock_read=300)) as session:
            async with session.get(endpoint) as resp:
                if resp.status != 200:
                    text = await resp.text(errors="replace")
                    try:
                        text = orjson.loads(text)["error"]
                    except (ValueError, KeyError, TypeError):
                        text = text[:300]
                    raise ConfigError(f"{endpoint} answered {resp.status}: {text}")
                first = True
                async for data in resp.content.iter_chunked(1 << 20):
                    if first and not data.startswith(b'{"format":"%s"' % EXPORT_FORMAT.encode()):
                        raise ConfigError(f"{endpoint} did not answer a statsd export")
                    first = False
                    sink(data)
                    tail = (tail + data)[-3:]
                counts = resp.headers.get("X-Export-Organizations", "?"), resp.headers.get("X-Export-Stats", "?")
    except (aiohttp.ClientError, TimeoutError) as e:
        raise ConfigError(f"{endpoint}: the export did not arrive whole ({e or type(e).__name__})") from None
    if tail != b"]}\n":
        raise ConfigError(f"{endpoint}: the export ended before its end")
    return counts


def read_export(path: str) -> tuple[list[dict], list[dict]]:
    """The organizations and stats of an export file, checked; ConfigError names what is wrong."""
    try:
        with open(path, "rb") as f:
            document = orjson.loads(f.read())
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    except orjson.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(document, dict) or document.get("format") != EXPORT_FORMAT \
            or not isinstance(document.get("organizations"), list) or not isinstance(document.get("stats"), list):
        raise ConfigError(f"{path} is not a statsd export (made by `statsd export`)")
    problems: list[str] = []
    orgs = [_checked_org_record(doc, i, problems) for i, doc in enumerate(document["organizations"])]
    stats = [_checked_stat_record(doc, i, problems) for i, doc in enumerate(document["stats"])]
    uuids: dict[str, int] = {}
    for i, doc in enumerate(stats):
        if doc.get("uuid") in uuids:
            problems.append(f"stats[{i}]: uuid {doc['uuid']} repeats stats[{uuids[doc['uuid']]}]")
        uuids.setdefault(doc.get("uuid"), i)
    if problems:
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise ConfigError(f"{path} was not imported, nothing was changed: " + "; ".join(problems[:10]) + more)
    return orgs, stats


def _checked_org_record(doc, i: int, problems: list) -> dict:
    where = f"organizations[{i}]"
    if not isinstance(doc, dict):
        problems.append(f"{where} is not an object")
        return {}
    for name in doc:
        if name not in ORG_RECORD_FIELDS:
            problems.append(f"{where}: unknown field {name!r}")
    problem = check_org_name(doc.get("name"))
    if problem:
        problems.append(f"{where}: name {problem}")
    if not isinstance(doc.get("token_sha256"), str) or not SHA256_RE.fullmatch(doc["token_sha256"]):
        problems.append(f"{where}: token_sha256 must be a SHA-256 hex digest")
    for name in ("is_admin", "is_sharing_enabled"):
        if name in doc and not isinstance(doc[name], bool):
            problems.append(f"{where}: {name} must be true or false")
    return _with_times(doc, where, problems)


def _checked_stat_record(doc, i: int, problems: list) -> dict:
    where = f"stats[{i}]"
    if not isinstance(doc, dict):
        problems.append(f"{where} is not an object")
        return {}
    clean = {}
    for name, value in doc.items():
        if name in ("id", "created_at", "updated_at"):
            continue
        if name not in STAT_CLIENT_FIELDS:
            problems.append(f"{where}: unknown field {name!r}")
            continue
        value, problem = check_stat_value(name, value)
        if problem:
            problems.append(f"{where}: {name} {problem}")
        clean[name] = value
    for name in ("uuid", "type", "data"):
        if name not in doc:
            problems.append(f"{where}: {name} is required")
    if "id" in doc and not (isinstance(doc["id"], str) and STAT_ID_RE.fullmatch(doc["id"])):
        problems.append(f"{where}: id must be 24 lowercase hex characters")
    return _with_times({**clean, **({"id": doc["id"]} if "id" in doc else {}),
                        **{k: doc[k] for k in ("created_at", "updated_at") if k in doc}}, where, problems)


def _with_times(doc: dict, where: str, problems: list) -> dict:
    """The record with valid created_at/updated_at (now when absent)."""
    now = utcnow()
    out = dict(doc)
    for name in ("created_at", "updated_at"):
        value = doc.get(name, now)
        parsed = parse_datetime(value) if isinstance(value, str) else None
        if parsed is None:
            problems.append(f"{where}: {name} {value!r} is not an ISO 8601 date-time")
        out[name] = parsed
    return out


async def import_records(store: Store, orgs: list[dict], stats: list[dict], progress) -> dict:
    """Add what is new (organizations by name, stats by uuid); what exists is kept as it is."""
    counts = {"orgs": 0, "orgs_kept": 0, "stats": 0, "stats_kept": 0}
    new_orgs = []
    for doc in orgs:
        if store.orgs.get(doc["name"]) is not None:
            counts["orgs_kept"] += 1
            continue
        holder = store.orgs.find_unique("token_sha256", doc["token_sha256"])
        if holder is not None or any(o["token_sha256"] == doc["token_sha256"] for o in new_orgs):
            raise ConfigError(f"organization {doc['name']!r} has the same API key as another one; nothing"
                              " was imported")
        new_orgs.append({"is_admin": False, **doc})  # no is_sharing_enabled means true
    known = set(store.orgs.by_key) | {o["name"] for o in new_orgs}
    orphans = sorted({d["organization"] for d in stats if "organization" in d and d["organization"] not in known})
    if orphans:
        raise ConfigError(f"stats belong to organization(s) that are neither in the file nor in the database:"
                          f" {', '.join(map(repr, orphans))}; nothing was imported")
    if new_orgs:
        await store.commit([("organizations", store.orgs.new_doc_id(), doc) for doc in new_orgs])
    counts["orgs"] = len(new_orgs)
    ids = IdGenerator()
    for start in range(0, len(stats), IMPORT_CHUNK):
        ops, taken = [], set()
        for doc in stats[start:start + IMPORT_CHUNK]:
            if store.stats.find_unique("uuid", doc["uuid"]) is not None:
                counts["stats_kept"] += 1
                continue
            stat_id = doc.get("id")
            while stat_id is None or stat_id in taken or store.stats.doc_id(stat_id) is not None:
                stat_id = ids()
            taken.add(stat_id)
            ops.append(("stats", store.stats.new_doc_id(), ordered_stat({**doc, "id": stat_id})))
        if ops:
            await store.commit(ops)
        counts["stats"] += len(ops)
        progress(min(start + IMPORT_CHUNK, len(stats)), len(stats))
    return counts


def progress_bar(done: int, total: int, width: int = 40) -> None:
    """A one-line progress bar on stderr, ended with a newline when done."""
    filled = width * done // max(total, 1)
    sys.stderr.write(f"\rimporting [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
    if done >= total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def cmd_import(config: Config, args) -> int:
    orgs, stats = read_export(args.file)
    show = sys.stderr.isatty() and len(stats) >= IMPORT_PROGRESS_MIN
    progress = progress_bar if show else (lambda done, total: None)

    async def work(store: Store):
        return await import_records(store, orgs, stats, progress)
    counts = _offline(config, work, LOCK_HINTS["import"])
    print(f"Imported {counts['orgs']} organization(s) and {counts['stats']} stat(s) from {args.file} into"
          f" {config.database}; kept {counts['orgs_kept']} organization(s) and {counts['stats_kept']} stat(s)"
          " already there (same name, same uuid).")
    return 0


class PushFailed(Exception):
    """The remote service refused or did not answer a chunk."""


def push_endpoint(url: str) -> str:
    """The v1 batch POST address of a stats service given by its base URL (or by that address)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"--url {url!r} must be an http:// or https:// address")
    base = url.rstrip("/")
    for suffix in ("/api/v1/stats", "/api/v1"):
        base = base.removesuffix(suffix)
    return base + V1_PREFIX + "/stats/"


def push_state_key(args) -> str:
    return f"{push_endpoint(args.url)} {args.date_from or ''} {args.date_to or ''}"


def read_push_state(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            state = orjson.loads(f.read())
    except FileNotFoundError:
        return {}
    except (OSError, orjson.JSONDecodeError) as e:
        raise ConfigError(f"the push state file {path} cannot be read ({e}); move it away to push"
                          " everything again (the remote skips stats it already has)") from None
    return state if isinstance(state, dict) else {}


def push_selection(store: Store, args, after: int, counts: dict) -> list[tuple[int, dict]]:
    """(doc_id, v1 item) of the stats to send: created after `after`, shared, in the dates, expressible in v1."""
    selected = []
    for doc_id, doc in store.stats.docs.items():
        if doc_id <= after:
            continue
        org = store.orgs.get(doc["organization"]) if "organization" in doc else None
        day = stat_date(doc)
        if org is not None and not org.get("is_sharing_enabled", True):
            counts["not_shared"] += 1
        elif (args.date_from and day < args.date_from) or (args.date_to and day > args.date_to):
            counts["outside_dates"] += 1
        elif not isinstance(doc.get("anr"), str) or doc["type"] not in V1_TYPES:
            counts["not_v1"] += 1
        else:
            selected.append((doc_id, {"uuid": doc["uuid"], "anr": doc["anr"], "type": doc["type"],
                                      "date": day, "data": doc["data"]}))
    return selected


async def post_chunk(session, endpoint: str, items: list[dict]) -> tuple[int, int, list[str]]:
    """Send one chunk: (created, already there, refusals); PushFailed when the chunk was not taken."""
    try:
        async with session.post(endpoint, data=orjson.dumps(items)) as resp:
            text = await resp.text()
            status = resp.status
    except (OSError, TimeoutError, aiohttp.ClientError) as e:
        raise PushFailed(f"{endpoint} did not answer ({e or type(e).__name__})") from None
    if status in (200, 201, 204):
        return len(items), 0, []
    if status != 207:
        raise PushFailed(f"{endpoint} answered {status}: {text[:300]}")
    try:
        body = orjson.loads(text)
    except orjson.JSONDecodeError:
        body = {}
    created = len(body.get("data", [])) if isinstance(body, dict) else 0
    results = body.get("results") if isinstance(body, dict) else None
    refused = [f"{items[r['index']]['uuid']}: {r.get('error')}" for r in results or []
               if isinstance(r, dict) and r.get("status") == 400]
    return created, len(items) - created - len(refused), refused


async def push_stats(store: Store, args, state_path: str) -> dict:
    """Send the selected stats in chunks; after each chunk taken, remember the last one sent."""
    endpoint, key = push_endpoint(args.url), push_state_key(args)
    state = {} if args.all else read_push_state(state_path)
    counts = {"sent": 0, "already": 0, "chunks": 0, "not_shared": 0, "outside_dates": 0, "not_v1": 0,
              "refused": []}
    selected = push_selection(store, args, int(state.get(key, 0)), counts)
    headers = {"X-API-KEY": args.token, "Content-Type": "application/json",
               "User-Agent": f"statsd/{__version__}"}
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(headers=headers, timeout=timeout) as session:
        for start in range(0, len(selected), args.chunk_size):
            chunk = selected[start:start + args.chunk_size]
            try:
                created, already, refused = await post_chunk(session, endpoint, [item for _, item in chunk])
            except PushFailed as e:
                counts["failure"] = str(e)
                break
            counts["sent"] += created
            counts["already"] += already
            counts["refused"] += refused
            counts["chunks"] += 1
            state = {**read_push_state(state_path), key: chunk[-1][0]}
            write_atomically(state_path, orjson.dumps(state))
    counts["left"] = len(selected) - counts["sent"] - counts["already"] - len(counts["refused"])
    return counts


def cmd_push(config: Config, args) -> int:
    for name in ("date_from", "date_to"):
        value = getattr(args, name)
        if value is not None and parse_date(value) is None:
            raise ConfigError(f"--{name.replace('_', '-')} {value!r} is not a date written YYYY-MM-DD")
    if args.date_from and args.date_to and args.date_from > args.date_to:
        raise ConfigError("--date-from must not be after --date-to")
    if args.chunk_size < 1:
        raise ConfigError("--chunk-size must be at least 1")
    if not args.token:
        raise ConfigError("--token must be the API key of this site on the remote service")
    push_endpoint(args.url)
    state_path = config.database + ".push.json"

    async def work(store: Store):
        return await push_stats(store, args, state_path)
    counts = _offline(config, work, LOCK_HINTS["push"])
    print(f"Pushed to {push_endpoint(args.url)}: {counts['sent']} stat(s) stored in {counts['chunks']}"
          f" chunk(s), {counts['already']} already there; not sent: {counts['not_shared']} of organizations"
          f" with sharing disabled, {counts['outside_dates']} outside the dates, {counts['not_v1']} that v1"
          " cannot carry (integer anr or a type other than " + "/".join(V1_TYPES) + ").")
    for refusal in counts["refused"][:10]:
        print(f"statsd: refused by the remote: {refusal}", file=sys.stderr)
    if "failure" in counts:
        print(f"statsd: error: push stopped, {counts['left']} stat(s) not sent: {counts['failure']}."
              " Run the same command again to resume where it stopped.", file=sys.stderr)
        return 1
    return 1 if counts["refused"] else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = {"database": args.database, "host": getattr(args, "host", None),
                 "port": getattr(args, "port", None)}
    try:
        config = Config.load(args.config, overrides=overrides)
        return args.func(config, args)
    except (ConfigError, StorageError) as e:
        print(f"statsd: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # e.g. the port is taken, or the disk refuses the start-up fold
        print(f"statsd: error: {e}", file=sys.stderr)
        return 1
    except ApiError as e:
        print(f"statsd: error: {e.message.removeprefix('Conflict: ')}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
