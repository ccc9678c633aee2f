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
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from typing import Any, Callable, Iterable
from urllib.parse import quote, urlsplit

import limits
import orjson
from aiohttp import web
from aiohttplimiter import Limiter
from tinydb.storages import Storage

__version__ = "0.1.0"

log = logging.getLogger("statsd")

API_PREFIX = "/api/v2"
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
        if value is MISSING or not _hashable(value):
            return
        bucket = self.ids.setdefault(value, {})
        if bucket and doc_id < next(reversed(bucket)):
            self.unsorted.add(value)
        bucket[doc_id] = None

    def remove(self, doc_id: int, doc: dict) -> None:
        value = doc.get(self.name, MISSING)
        bucket = self.ids.get(value) if value is not MISSING and _hashable(value) else None
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


def _hashable(value) -> bool:
    return isinstance(value, (str, int, float)) and not isinstance(value, bool)


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

    MAX_COLUMNS = 8

    def load(self, pairs: list[tuple[int, dict]]) -> None:
        """Fill this empty table with (doc_id, doc) pairs, faster than apply one by one."""
        if any(a[0] >= b[0] for a, b in zip(pairs, pairs[1:])):
            pairs.sort(key=lambda pair: pair[0])
        key = self.key
        self.docs = dict(pairs)
        self.by_key = {doc[key]: doc_id for doc_id, doc in pairs}
        for name, ids in self.unique.items():
            ids.update((doc[name], doc_id) for doc_id, doc in pairs if name in doc)
        for name, index in self.indexes.items():
            canonical: dict = {}
            for doc_id, doc in pairs:
                value = doc.get(name, MISSING)
                if value.__class__ in (str, int):
                    doc[name] = value = canonical.setdefault(value, value)  # one string object per value
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
        self._new_tables()

    def _new_tables(self) -> None:
        self.orgs = Table("organizations", key="name", unique=("token_sha256",), indexed=("is_admin",))
        self.stats = Table("stats", key="id", unique=("uuid",), indexed=STAT_INDEXED)
        self.tables = {"organizations": self.orgs, "stats": self.stats}

    # opening and closing

    def lock(self) -> None:
        """Take the database for this process, or raise DatabaseLocked at once."""
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise DatabaseLocked(
                f"the database {self.path} is in use by another statsd process (pid {holder});"
                " stop that server first, or make the change through its HTTP API"
                " (/api/v2/organizations/ with an admin key)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd

    def open(self) -> None:
        """Lock, load the file, replay and fold the journal, open a fresh journal."""
        if self._lock_fd is None:
            self.lock()
        folder = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(folder):
            raise StorageError(f"the folder of the database {self.path} does not exist")
        replayed = self._load()
        if replayed or not os.path.exists(self.path):
            self._write_checkpoint()
        if os.path.exists(self.journal_path):
            os.unlink(self.journal_path)
            _fsync_folder(folder)
        self._journal_fd = os.open(self.journal_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._journal_size = 0
        self._checkpoint_at = max(self.MIN_CHECKPOINT_BYTES, os.path.getsize(self.path))

    def _load(self) -> int:
        """Fill memory from the checkpoint and the journal; the number of journal lines."""
        self._new_tables()
        gc.disable()  # millions of new objects: collecting meanwhile triples the load time
        try:
            data = AtomicJSONStorage(self.path).read() or {}
            self._extra_tables = {k: v for k, v in data.items() if k not in self.tables}
            for name, table in self.tables.items():
                pairs = []
                for doc_id, doc in data.get(name, {}).items():
                    if not (doc_id.isdigit() and isinstance(doc, dict) and isinstance(doc.get(table.key), str)):
                        raise StorageError(f"{self.path}: table {name}, document {doc_id} is not a"
                                           f" statsd record; the file was left untouched")
                    pairs.append((int(doc_id), doc))
                table.load(pairs)
            return self._replay()
        finally:
            gc.enable()
            gc.freeze()  # the records live long: keep them out of every later collection

    def _replay(self) -> int:
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
                self.tables[table].apply(doc_id, doc)
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
        except OSError:
            os.ftruncate(self._journal_fd, self._journal_size)
            raise
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
             415: "UnsupportedMediaType", 429: "TooManyRequests", 500: "InternalServerError",
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


@dataclass
class Filter:
    """One `field__operator=value` condition."""

    path: tuple
    op: str
    value: Any

    def test(self) -> Callable[[Any], bool]:
        return _value_test(self.op, self.value)

    def predicate(self) -> Callable[[dict], bool]:
        """The test applied to a whole record."""
        test = self.test()
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
CONTROL_PARAMS = {"_order_by", "_fields", "api_key"}


def parse_query(params, schema: dict, config: Config, extra: Iterable[str] = ()) -> Query:
    """Turn query parameters into a Query; anything unknown or malformed is a 400."""
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
            query.order_by = [_parse_order(part, schema) for part in raw.split(",")]
        elif name == "_fields":
            query.fields = _parse_fields(raw, schema)
        elif name == "api_key" or name in extra:
            pass
        elif name.startswith("_"):
            raise bad_request(f"unknown query parameter {name!r}")
        else:
            _parse_filter(name, raw, schema, query)
    return query


def _split_field(name: str, schema: dict, what: str) -> tuple[str, ...]:
    path = tuple(name.split("__"))
    if path[0] not in schema or (len(path) > 1 and path[0] != "data") or "" in path:
        raise bad_request(f"unknown field {name!r} in {what}")
    return path


def _parse_order(part: str, schema: dict):
    descending = part.startswith("-")
    name = part[1:] if descending else part
    return _getter(_split_field(name, schema, "_order_by")), descending


def _parse_fields(raw: str, schema: dict) -> list[str]:
    names = raw.split(",")
    for name in names:
        if name not in schema and name not in ("link", "links"):
            raise bad_request(f"unknown field {name!r} in _fields")
    return names


def _parse_filter(name: str, raw: str, schema: dict, query: Query) -> None:
    path = name.split("__")
    op = "exact"
    if len(path) > 1 and path[-1] in OPERATORS:
        op = path.pop()
    elif path[0] != "data" and len(path) > 1:
        raise bad_request(f"unknown operator {path[-1]!r} in {name!r}"
                          f" (operators: {', '.join(OPERATORS)})")
    path = _split_field("__".join(path), schema, f"filter {name!r}")
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

    Equality filters on indexed fields become an intersection of id sets; else
    a filter inside `data` is run over that path's value column; else every record.
    """
    docs = table.docs
    indexed, rest = [], []
    for f in filters:
        ids = _index_ids(table, f)
        (rest if ids is None else indexed).append((f, ids))
    if indexed:
        sets = sorted((ids for _, ids in indexed), key=len)
        smallest, others = sets[0], sets[1:]
        ids = iter(smallest)
        for other in others:
            ids = filter(other.__contains__, ids)  # lazy, and at C speed
        return map(docs.__getitem__, ids), [f for f, _ in rest]
    for position, (f, _) in enumerate(rest):
        if f.path[0] == "data":
            test, column = f.test(), table.column(f.path)
            remaining = [g for g, _ in rest[:position] + rest[position + 1:]]
            return (docs[i] for i, value in column.items() if test(value)), remaining
    return docs.values(), [f for f, _ in rest]


def run_query(table: Table, query: Query) -> tuple[list[dict], bool]:
    """The page of matching records and whether more follow it."""
    records, remaining = _candidates(table, query.filters)
    predicates = [f.predicate() for f in remaining]
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

STAT_CLIENT_FIELDS = ("uuid", "organization", "anr", "type", "day", "week", "month", "quarter", "year", "data")
STAT_READ_ONLY = ("id", "created_at", "updated_at", "link", "links")
PERIODS = {"day": (1, 366), "week": (1, 53), "month": (1, 12), "quarter": (1, 4)}
MAX_DATA_DEPTH = 64


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and INT64[0] <= value <= INT64[1]


def _depth_ok(value, limit: int = MAX_DATA_DEPTH) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return False
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return True


def check_stat_value(name: str, value) -> tuple[Any, str | None]:
    """(normalized value, None) or (None, what is wrong) for one client field."""
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


def client_address(request: web.Request) -> str:
    """The client's address; X-Forwarded-For is believed only from a trusted proxy.

    Walks the forwarded chain from the nearest hop outwards for as long as the
    hop that handed the request on is a trusted proxy.
    """
    peer = request.transport.get_extra_info("peername") if request.transport else None
    address = peer[0] if isinstance(peer, tuple) else (request.remote or "unknown")
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
    target = "stats" if path.startswith(API_PREFIX + "/stats") else \
        "organizations" if path.startswith(API_PREFIX + "/organizations") else path
    body = {"error": message, "status": "failed", "action": request.method, "target": target,
            "exception_msg": message, "status_code": status,
            "exception_cls": ApiError.NAMES.get(status, "HTTPException")}
    if errors:
        body["errors"] = errors
    return web.Response(body=orjson.dumps(body), status=status, headers=headers,
                        content_type="application/json")


@web.middleware
async def rate_limit_middleware(request: web.Request, handler):
    """Count every /api/ request per client and endpoint; answer 429 over the limit."""
    item = request.app[RATE_LIMIT_KEY]
    if item is None or not request.path.startswith("/api/"):
        return await handler(request)
    limiter: Limiter = request.app[LIMITER_KEY]
    key = (client_address(request), endpoint_of(request))
    allowed = await limiter.moving_window.hit(item, *key)
    stats = await limiter.moving_window.get_window_stats(item, *key)
    reset = math.ceil(stats.reset_time)
    headers = {"X-Rate-Limit-Limit": str(item.amount), "X-Rate-Limit-Remaining": str(stats.remaining),
               "X-Rate-Limit-Reset": str(reset)}
    if not allowed:
        headers["Retry-After"] = str(max(1, math.ceil(stats.reset_time - time.time())))
        return error_response(request, 429, f"Too Many Requests: at most {item} per client"
                              " and endpoint; see Retry-After", headers=headers)
    response = await handler(request)
    response.headers.update(headers)
    return response


@web.middleware
async def error_middleware(request: web.Request, handler):
    """Every failure becomes the JSON error object; no traceback reaches a client."""
    try:
        return await handler(request)
    except ApiError as e:
        return error_response(request, e.status, e.message, e.errors, e.headers)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        headers = {k: v for k, v in e.headers.items() if k in ("Allow",)}
        return error_response(request, e.status, _http_message(request, e), headers=headers)
    except StorageError as e:
        status = 507 if e.errno in (errno.ENOSPC, errno.EDQUOT) else 503
        return error_response(request, status, str(e))
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("internal error on %s %s", request.method, request.path)
        return error_response(request, 500, "Internal Server Error: the failure was logged on the server")


def _http_message(request: web.Request, e: web.HTTPException) -> str:
    if e.status == 404:
        return f"Not Found: no route {request.path}"
    if e.status == 405:
        return f"Method Not Allowed: {request.method} on {request.path} (allowed: {e.headers.get('Allow', '')})"
    if e.status == 413:
        return (f"Request Entity Too Large: the body exceeds max_body_size"
                f" ({request.app[CONFIG_KEY].max_body_size} bytes)")
    return e.reason or str(e)


@web.middleware
async def auth_middleware(request: web.Request, handler):
    """Resolve the API key (X-API-KEY header or api_key argument) to a Caller."""
    if not request.path.startswith("/api/"):
        return await handler(request)
    if not request.app[CONFIG_KEY].api_key_authentication:
        request[CALLER_KEY] = Caller(None, True)
        return await handler(request)
    keys = request.headers.getall("X-API-KEY", []) + request.query.getall("api_key", [])
    caller = _caller_for(request.app[STORE_KEY], keys[0]) if len(keys) == 1 else None
    if caller is None:
        raise ApiError(401, "Unauthorized")
    request[CALLER_KEY] = caller
    return await handler(request)


def _caller_for(store: Store, token: str) -> Caller | None:
    """The organization holding `token`; the hash is looked up, then compared in constant time."""
    digest = hash_token(token)
    org = store.orgs.find_unique("token_sha256", digest)
    if org is None or not hmac.compare_digest(org["token_sha256"], digest):
        return None
    return Caller(org["name"], bool(org.get("is_admin")))


# -------------------------------------------------------------- handlers ---

def json_response(body, status: int = 200, headers=None) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, headers=headers,
                        content_type="application/json")


def _link(rel: str, title: str, url: str) -> str:
    return f"<link rel='{rel}' title='{title}' href='{url}'/>"


def stat_path(stat_id: str) -> str:
    return f"{API_PREFIX}/stats/{stat_id}/"


@functools.lru_cache(maxsize=4096)
def org_path(name: str) -> str:
    return f"{API_PREFIX}/organizations/{quote(name, safe='')}/"


def present_stat(base: str, doc: dict, only: list | None = None) -> dict:
    """A stat as answered: the record plus its hypermedia links."""
    out = dict(doc)
    out["link"] = _link("self", "stat", base + stat_path(doc["id"]))
    if "organization" in doc:
        out["links"] = [_link("parent", "organization", base + org_path(doc["organization"]))]
    if only is not None:
        out = {name: out[name] for name in ("id", *only) if name in out}
    return out


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
    return f"{request.scheme}://{request.host}"


def only_params(request: web.Request, *allowed: str) -> None:
    """Refuse query parameters a route does not take (the API key is always allowed)."""
    seen = set()
    for name in request.query:
        if name in seen:
            raise bad_request(f"query parameter {name!r} is given more than once")
        seen.add(name)
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


def stat_client_fields(body: dict, errors: dict) -> dict:
    """The validated, normalized client fields of a body (uuid and organization aside)."""
    clean = {}
    for name, value in body.items():
        if name in ("uuid", "organization") or name in STAT_READ_ONLY:
            continue
        if name not in STAT_CLIENT_FIELDS:
            errors[name] = "unknown field"
            continue
        value, problem = check_stat_value(name, value)
        if problem:
            errors[name] = problem
        else:
            clean[name] = value
    return clean


def ordered_stat(values: dict) -> dict:
    """A stat record with its fields in one stable order."""
    order = ("uuid", "organization", "anr", "type", "day", "week", "month", "quarter", "year",
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
    stats: Table = request.app[STORE_KEY].stats
    new_id = request.app[IDS_KEY]()
    while stats.doc_id(new_id) is not None:
        new_id = request.app[IDS_KEY]()
    return ordered_stat({**clean, "id": new_id, "created_at": now, "updated_at": now})


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
        elif name in ("uuid", "anr"):
            ok = parse_uuid(value) == old.get(name)
        else:
            ok = value == old.get(name, MISSING)
        if not ok:
            errors[name] = "is read-only (it may be sent back unchanged, not changed)"
    return errors


async def list_stats(request: web.Request) -> web.Response:
    query = parse_query(request.query, STAT_FIELDS, request.app[CONFIG_KEY])
    caller: Caller = request[CALLER_KEY]
    if not caller.sees_all:
        query.filters.insert(0, Filter(("organization",), "exact", caller.organization))
    page, more = run_query(request.app[STORE_KEY].stats, query)
    base = base_url(request)
    return json_response({"data": [present_stat(base, d, query.fields) for d in page], "has_more": more})


async def create_stats(request: web.Request) -> web.Response:
    only_params(request)
    body = await read_json(request)
    config: Config = request.app[CONFIG_KEY]
    single = isinstance(body, dict)
    if not single and not (isinstance(body, list) and 1 <= len(body) <= config.max_limit):
        raise bad_request(f"the body must be a JSON object (one stat) or a list of 1 to"
                          f" {config.max_limit} stats")
    store: Store = request.app[STORE_KEY]
    await store.writable()
    _caller_still_exists(request)
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


def _caller_still_exists(request: web.Request) -> None:
    caller: Caller = request[CALLER_KEY]
    if caller.organization is not None and request.app[STORE_KEY].orgs.get(caller.organization) is None:
        raise ApiError(401, "Unauthorized")


async def get_stat(request: web.Request) -> web.Response:
    only_params(request)
    _, doc = visible_stat(request)
    return json_response(present_stat(base_url(request), doc))


async def update_stat(request: web.Request) -> web.Response:
    """PUT replaces the client fields, PATCH merges the given ones."""
    only_params(request)
    body = await read_json(request)
    if not isinstance(body, dict):
        raise bad_request("the body must be a JSON object")
    store: Store = request.app[STORE_KEY]
    await store.writable()
    doc_id, old = visible_stat(request)
    parents = [org_path(old["organization"])] if "organization" in old else []
    errors = _check_read_only(request, body, old, ("id", "uuid", "organization", "created_at",
                                                   "updated_at", "link", "links"),
                              stat_path(old["id"]), parents)
    clean = stat_client_fields(body, errors)
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
    await store.writable()
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
    return None


def check_token(token) -> str | None:
    """What is wrong with a token chosen by a person, or None."""
    if not isinstance(token, str) or not TOKEN_RE.fullmatch(token):
        return "must be 16 to 512 visible ASCII characters (no spaces)"
    return None


def require_admin(request: web.Request) -> None:
    if not request[CALLER_KEY].is_admin:
        raise ApiError(403, "Forbidden: only an admin organization may manage organizations")


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
    query = parse_query(request.query, ORG_FIELDS, request.app[CONFIG_KEY])
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
    await store.writable()
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
    await store.writable()
    doc_id, old = visible_org(request)
    errors = _check_read_only(request, body, {**old, "id": old["name"]},
                              ("id", "name", "created_at", "updated_at", "link"), org_path(old["name"]))
    clean, token = org_body(body, errors, creating=False)
    if request.method == "PUT" and "is_admin" not in body:
        errors["is_admin"] = "is required (PUT replaces the organization; use PATCH to change one field)"
    if errors:
        raise _fail(errors, "organization")
    new = {**old, **clean, "updated_at": utcnow()}
    if token is not None:
        new["token_sha256"] = _unused_token_hash(store, token)
    await store.commit([("organizations", doc_id, new)])
    return json_response(present_org(base_url(request), new, token=token))


async def delete_org(request: web.Request) -> web.Response:
    only_params(request, "cascade")
    cascade = _convert_bool(request.query.get("cascade", "false"), "cascade")
    store: Store = request.app[STORE_KEY]
    await store.writable()
    doc_id, doc = visible_org(request)
    ops = delete_organization_ops(store, doc_id, doc, cascade)
    await store.commit(ops)
    return web.Response(status=204)


def delete_organization_ops(store: Store, doc_id: int, doc: dict, cascade: bool) -> list:
    """The ops deleting an organization (and its stats with cascade); 409 if it has stats."""
    owned = list(store.stats.indexes["organization"].lookup(doc["name"]))
    if owned and not cascade:
        raise ApiError(409, f"Conflict: organization {doc['name']!r} still has {len(owned)} stat(s);"
                            " delete them first, or add ?cascade=true to delete them with it")
    return [("stats", i, None) for i in owned] + [("organizations", doc_id, None)]


async def index(request: web.Request) -> web.Response:
    return json_response({"service": "statsd", "version": __version__,
                          "api": base_url(request) + API_PREFIX + "/",
                          "endpoints": [API_PREFIX + "/stats/", API_PREFIX + "/organizations/"]})


# ----------------------------------------------------------- app factory ---

def create_app(config: Config, store: Store | None = None) -> web.Application:
    """The aiohttp application; the store opens on startup and folds its journal on cleanup."""
    app = web.Application(client_max_size=config.max_body_size,
                          middlewares=[rate_limit_middleware, error_middleware, auth_middleware])
    app[CONFIG_KEY] = config
    app[STORE_KEY] = store or Store(config.database)
    app[IDS_KEY] = IdGenerator()
    app[RATE_LIMIT_KEY] = config.rate_limit_item()
    app[TRUSTED_PROXIES_KEY] = [ipaddress.ip_network(str(p), strict=False) for p in config.trusted_proxies]
    routes = [
        ("GET", "/stats", list_stats), ("POST", "/stats", create_stats),
        ("GET", "/stats/{id}", get_stat), ("PUT", "/stats/{id}", update_stat),
        ("PATCH", "/stats/{id}", update_stat), ("DELETE", "/stats/{id}", delete_stat),
        ("GET", "/organizations", list_orgs), ("POST", "/organizations", create_org),
        ("GET", "/organizations/{name}", get_org), ("PUT", "/organizations/{name}", update_org),
        ("PATCH", "/organizations/{name}", update_org), ("DELETE", "/organizations/{name}", delete_org),
    ]
    for method, path, handler in routes:
        for variant in (API_PREFIX + path, API_PREFIX + path + "/"):
            app.router.add_route(method, variant, handler)
    app.router.add_get("/", index)
    app.on_startup.append(_start_store)
    app.on_cleanup.append(_close_store)
    return app


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
    delete = command("delete-organization", cmd_delete_org, "Delete an organization.")
    delete.add_argument("name", metavar="NAME")
    delete.add_argument("--cascade", action="store_true", help="also delete its stats")
    return parser


def cmd_serve(config: Config, args) -> int:
    store = Store(config.database)
    store.lock()
    app = create_app(config, store)

    def announce(_aiohttp_banner: str) -> None:  # called once the database is loaded and the port open
        log.info("statsd %s serving %s (%d stats) on http://%s:%s%s/ (authentication %s, rate limit %s)",
                 __version__, config.database, len(store.stats.docs), config.host, config.port, API_PREFIX,
                 "on" if config.api_key_authentication else "OFF", config.rate_limit or "off")
    web.run_app(app, host=config.host, port=config.port, print=announce,
                access_log=logging.getLogger("statsd.access") if args.access_log else None)
    return 0


def _offline(config: Config, work) -> Any:
    """Run `work(store)` on the database, which no server may hold meanwhile."""
    async def run():
        store = Store(config.database)
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
    token = _offline(config, work)
    print(f"Created {'admin ' if args.admin else ''}organization {args.name!r} in {config.database}."
          " Its API key (shown only now; send it as the X-API-KEY header):")
    print(token)
    return 0


def cmd_list_orgs(config: Config, args) -> int:
    async def work(store: Store):
        return [(d["name"], d["is_admin"], len(store.stats.indexes["organization"].lookup(d["name"])),
                 d["created_at"]) for d in store.orgs.docs.values()]
    rows = _offline(config, work)
    print(f"{'NAME':30} {'ADMIN':5} {'STATS':>8}  CREATED_AT")
    for name, is_admin, count, created in rows:
        print(f"{name:30} {'yes' if is_admin else 'no':5} {count:>8}  {created}")
    return 0


def cmd_delete_org(config: Config, args) -> int:
    async def work(store: Store):
        doc_id = store.orgs.doc_id(args.name)
        if doc_id is None:
            raise ConfigError(f"no organization named {args.name!r} in {config.database}")
        ops = delete_organization_ops(store, doc_id, store.orgs.docs[doc_id], args.cascade)
        await store.commit(ops)
        return len(ops) - 1
    deleted = _offline(config, work)
    print(f"Deleted organization {args.name!r}" + (f" and its {deleted} stat(s)." if deleted else "."))
    return 0


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
    except ApiError as e:
        print(f"statsd: error: {e.message.removeprefix('Conflict: ')}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
