"""statsd: a standalone statistics service for MONARC.

One module, read top to bottom in the order data flows through it; its
sections (the `# --- name ---` banners) are:

    config -> query language -> stat fields -> bounded work
           -> storage: files, indexes, tables -> query engine
           -> storage: views and the store -> validation of bodies -> routes
           -> auth and rate-limit middleware -> handlers (/api/v2/) -> v1 processors
           -> MONARC /api/v1 handlers -> dashboard -> retention -> OpenAPI
           -> app factory -> command line

Nothing refers to a name of a later section (tests/test_design.py checks it).

Each route is declared once, on its handler (`@route`), with the facts its
OpenAPI operation is built from.

Statistics and organizations live in memory and in one TinyDB JSON file.
Every write is appended to a journal beside that file and fsynced before it
is acknowledged; the journal is folded into the file (atomically) when it
grows and when the server stops.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import ctypes
import errno
import fcntl
import functools
import hashlib
import heapq
import hmac
import bisect
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
import threading
import time
import tomllib
import uuid as uuidlib
import weakref
import zlib
from dataclasses import dataclass, field, fields, replace
from datetime import date, datetime, timezone
from typing import Any, Callable, Iterable, Iterator
from urllib.parse import quote, urlencode, urlsplit

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
OPENAPI_PATH = API_PREFIX + "/openapi.json"
MISSING = object()  # a field a record does not have


def utcnow() -> str:
    """The current UTC time as ISO 8601 with microseconds and no offset."""
    return datetime.now(timezone.utc).replace(tzinfo=None).isoformat(timespec="microseconds")


def _raw_json(value):
    """orjson's fallback: bytes are JSON already (a stat's `data` is kept serialized), spliced in as is."""
    if value.__class__ is bytes:
        return orjson.Fragment(value)
    if value.__class__ is PackedData:
        return orjson.Fragment(UNPACKED.of(value))
    if value.__class__ is memoryview:
        return orjson.Fragment(bytes(value))
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def dumps(value, option: int = 0) -> bytes:
    """JSON bytes of `value`, stored records included (their `data` is spliced, not re-encoded)."""
    return orjson.dumps(value, default=_raw_json, option=option)


class PackedData(bytes):
    """A stat's `data` JSON, zlib-compressed: how records settle in memory (a sixth to a third of the size).

    Its first byte is the preset dictionary it was compressed with (an index
    into PACK_DICTIONARIES, 0 for none), the rest is the zlib stream.
    """

    __slots__ = ()


# Preset zlib dictionaries, one per stat type, made by DataPacker from the first stats of that type:
# the same keys and the same catalog labels recur from stat to stat, so a threat list packs to a
# quarter of what it does alone. Only ever appended to (packed data name theirs by index), and kept
# in memory only: the database file holds plain JSON.
PACK_DICTIONARIES: list[bytes] = [b""]
PACK_DICTIONARY_SIZE = 32 * 1024  # zlib's window: a longer dictionary is not read


def unpack_data(packed: PackedData) -> bytes:
    """The JSON that `packed` holds."""
    dictionary, body = PACK_DICTIONARIES[packed[0]], memoryview(packed)[1:]
    if not dictionary:
        return zlib.decompress(body)
    unpacker = zlib.decompressobj(zdict=dictionary)
    return unpacker.decompress(body) + unpacker.flush()


class UnpackedAnswers:
    """The JSON of the packed data answered lately, so that the stats a front office keeps
    asking for are decompressed once; at most MAX_BYTES, then it starts over."""

    MAX_BYTES = 16 << 20

    def __init__(self):
        self.entries: dict[PackedData, bytes] = {}  # (bytes cache their hash: a lookup is cheap)
        self.size = 0

    def of(self, packed: PackedData) -> bytes:
        """The JSON of `packed`."""
        raw = self.entries.get(packed)
        if raw is None:
            raw = unpack_data(packed)
            if self.size + len(raw) > self.MAX_BYTES:
                self.entries.clear()
                self.size = 0
            self.entries[packed] = raw
            self.size += len(raw)
        return raw


UNPACKED = UnpackedAnswers()  # answers are built on the loop only


# A stat's `data` is kept serialized, in one of three forms: JSON bytes (as written), a
# memoryview of the loaded file (as loaded: no copy, so the file's memory goes back whole
# once every record is packed), or PackedData (as every record settles, see DataPacker).
SERIALIZED = (bytes, memoryview, PackedData)


PACK_LEVEL = 6  # zlib's default: against level 1, a tenth less memory for 40% more (background) time


_PRESET_PACKERS: dict[bytes, Any] = {}  # a preset dictionary -> a compressor with it set, copied for each stat


def pack_data(raw, dictionary: int = 0) -> bytes:
    """`raw` JSON compressed as PackedData (with that preset dictionary), or as plain bytes when that
    would not save a tenth."""
    if dictionary:
        preset = PACK_DICTIONARIES[dictionary]
        packer = _PRESET_PACKERS.get(preset)
        if packer is None:  # (setting a dictionary costs four compressions of a stat: done once, then copied)
            if len(_PRESET_PACKERS) >= 256:
                _PRESET_PACKERS.clear()
            packer = _PRESET_PACKERS[preset] = zlib.compressobj(PACK_LEVEL, zdict=preset)
        packer = packer.copy()
        packed = packer.compress(raw) + packer.flush()
    else:
        packed = zlib.compress(raw, PACK_LEVEL)
    return PackedData(bytes((dictionary,)) + packed) if len(packed) + 1 < len(raw) * 0.9 else bytes(raw)


def json_data(value) -> bytes:
    """A stat's `data` as JSON bytes, in whichever form it is kept (or not serialized yet)."""
    cls = value.__class__
    if cls is bytes:
        return value
    if cls is PackedData:
        return unpack_data(value)
    if cls is memoryview:
        return bytes(value)
    return orjson.dumps(value)


def parsed_data(doc: dict):
    """A stat's `data` as JSON values (MISSING when the record has none)."""
    value = doc.get("data", MISSING)
    return orjson.loads(json_data(value)) if value.__class__ in SERIALIZED else value


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
    dashboard: str = "key"

    @classmethod
    def load(cls, path: str | None = None, environ=None, overrides=None) -> "Config":
        """The settings from defaults, the TOML file (`path`, else ./statsd.toml), STATSD_* variables and `overrides`."""
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
        """The names of the settings."""
        return {f.name for f in fields(cls)}

    @classmethod
    def kind(cls, key: str) -> type:
        """The type of a setting (that of its default)."""
        return type(getattr(cls(), key))

    def validate(self) -> None:
        """Raise ConfigError for the first setting that cannot be used."""
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
        if self.dashboard not in ("key", "public", "off"):
            raise ConfigError(f"dashboard must be \"key\", \"public\" or \"off\", not {self.dashboard!r}")
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


TRUE_WORDS = ("true", "1", "yes", "on")
FALSE_WORDS = ("false", "0", "no", "off")
BOOL_WORDS_TEXT = "true/false, 1/0, yes/no or on/off"


def parse_bool(raw) -> bool | None:
    """A boolean written as a word, or None: the one reading of every boolean that comes as text
    (STATSD_* variables, query parameters such as cascade, /api/v1/ flags); any case."""
    word = raw.strip().lower() if isinstance(raw, str) else None
    return True if word in TRUE_WORDS else False if word in FALSE_WORDS else None


def _from_env(name: str, raw: str, kind: type):
    """Convert one STATSD_* variable to the type of its key."""
    if kind is bool:
        value = parse_bool(raw)
        if value is None:
            raise ConfigError(f"{name} must be {BOOL_WORDS_TEXT}, not {raw!r}")
        return value
    if kind is int:
        try:
            return int(raw.strip())
        except ValueError:
            raise ConfigError(f"{name} must be an integer, not {raw!r}") from None
    if kind is list:
        return [item.strip() for item in raw.split(",") if item.strip()]
    return raw


# ---------------------------------------------------------- query language ---

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
    """A 400 ApiError."""
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


RANK_MISSING, RANK_NULL, RANK_BOOL, RANK_NUMBER, RANK_STRING, RANK_OTHER = range(6)


def _rank(value) -> int:
    """The rank of a value's type, which orders and separates values of mixed types."""
    if value is MISSING:
        return RANK_MISSING
    if value is None:
        return RANK_NULL
    if isinstance(value, bool):
        return RANK_BOOL
    if isinstance(value, (int, float)):
        return RANK_NUMBER
    if isinstance(value, str):
        return RANK_STRING
    return RANK_OTHER


UUID_RE = re.compile("[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}")


CANONICAL_UUID_RE = re.compile("[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def parse_uuid(value: str) -> str | None:
    """A UUID (32 hex digits, hyphens where they belong or none) in its canonical form, or None.

    uuid.UUID alone also takes braces, "urn:uuid:" and hyphens anywhere (even "-1234...").
    """
    if not isinstance(value, str):
        return None
    if CANONICAL_UUID_RE.fullmatch(value):  # as MONARC sends them: already canonical
        return value
    if not UUID_RE.fullmatch(value):
        return None
    return str(uuidlib.UUID(value))


_RANDOM_DIGITS: list[str] = []  # 32 random hex digits each, from one os.urandom call per 256 (pop() is atomic)
if hasattr(os, "register_at_fork"):  # (POSIX; a child must not hand out its parent's uuids)
    os.register_at_fork(after_in_child=_RANDOM_DIGITS.clear)


def new_uuid() -> str:
    """A random (version 4) UUID in its canonical form, as str(uuid.uuid4()) but a tenth of the cost
    (os.urandom is a system call: it is asked for 256 at a time)."""
    try:
        digits = _RANDOM_DIGITS.pop()
    except IndexError:
        pool = os.urandom(16 * 256).hex()
        _RANDOM_DIGITS.extend(pool[i:i + 32] for i in range(32, len(pool), 32))
        digits = pool[:32]
    return (f"{digits[:8]}-{digits[8:12]}-4{digits[13:16]}-{'89ab'[int(digits[16], 16) & 3]}{digits[17:20]}"
            f"-{digits[20:]}")


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
DATE_RULE = "a date written YYYY-MM-DD"


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


def _converter(parse: Callable[[str], Any], problem: str) -> Callable[[str, str], Any]:
    """A reader of query values: `parse` one, else a 400 naming the parameter and the `problem`."""
    def convert(raw: str, name: str):
        value = parse(raw)
        if value is None:
            raise bad_request(f"{name}: {raw!r} {problem}")
        return value
    return convert


def parse_anr(raw: str) -> int | str | None:
    """An analysis: a 64-bit integer or a UUID (canonical), or None."""
    number = parse_int(raw)
    return number if number is not None else parse_uuid(raw)


_convert_int = _converter(parse_int, "is not a 64-bit integer")
_convert_anr = _converter(parse_anr, "is neither an integer nor a UUID")
_convert_uuid = _converter(parse_uuid, "is not a UUID")
_convert_datetime = _converter(parse_datetime, "is not a date (2020-05-12) or date-time (2020-05-12T22:29:42.362000)")
_convert_date = _converter(parse_date, f"is not {DATE_RULE} (2020-05-12)")
_convert_bool = _converter(parse_bool, f"is not a boolean ({BOOL_WORDS_TEXT})")


def _convert_text(raw: str, name: str):
    return raw


def _convert_json_scalar(raw: str, name: str):
    return parse_json_scalar(raw)


# field name -> (converter of a query value, whether string operators apply); the stats' table is
# STAT_FIELDS, made from the field table STAT_TABLE
ORG_FIELDS = {
    "id": (_convert_text, True),
    "name": (_convert_text, True),
    "is_admin": (_convert_bool, False),
    "created_at": (_convert_datetime, True),
    "updated_at": (_convert_datetime, True),
}


def _list_index(part: str) -> int:
    """The list index a path step names (ASCII digits, at most 18 of them past leading zeros), else -1.

    Longer steps cannot index any list, and int() refuses strings of over 4,300 digits."""
    digits = part.lstrip("0") or "0"
    return int(digits) if part.isascii() and part.isdigit() and len(digits) <= 18 else -1


def _getter(path: tuple[str, ...]) -> Callable[..., Any]:
    """A function reading a field, or a path inside it, from a record (MISSING if absent).

    It takes the record and, optionally, the record's `data` already parsed
    (a writer has it: no second parse).
    """
    if len(path) == 1 and path[0] != "data":
        name = path[0]
        return lambda doc, data=MISSING: doc.get(name, MISSING)
    first, in_data = path[0], path[0] == "data"
    steps = tuple((part, _list_index(part)) for part in path[1:])  # (key, list index or -1)

    def get(doc, data=MISSING):
        value = data if in_data and data is not MISSING else doc.get(first, MISSING)
        if value.__class__ in SERIALIZED:  # a stat's data
            value = orjson.loads(json_data(value))
        for key, index in steps:
            if isinstance(value, dict):
                value = value.get(key, MISSING)
                if value is MISSING:
                    return MISSING
            elif index >= 0 and isinstance(value, list) and index < len(value):
                value = value[index]
            else:
                return MISSING
        return value
    return get


def _same(stored, wanted) -> bool:
    """Equality that never confuses types (true is not 1, "1" is not 1)."""
    return stored == wanted and _rank(stored) == _rank(wanted)


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
        keyed = {(_rank(v), v) for v in value}
        hit = lambda s: s is not MISSING and _may_be_listed(s) and (_rank(s), s) in keyed
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


def _may_be_listed(value) -> bool:
    """Whether a stored value can equal an item of an in/nin list (null, a string or a number)."""
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
    def value_test(self) -> Callable[[Any], bool]:
        """The test of one stored value (MISSING when the record lacks it)."""
        return _value_test(self.op, self.value)

    @functools.cached_property
    def record_test(self) -> Callable[[dict], bool]:
        """The test of a whole record (its value at `path`)."""
        direct = len(self.path) == 1 and self.path[0] != "data"  # data is kept serialized
        if direct and self.op in COMPARE and self.value.__class__ in NUMBER:
            return _number_comparison(self.path[0], self.op, self.value)
        test = self.value_test
        if direct:
            name = self.path[0]
            return lambda doc: test(doc.get(name, MISSING))
        get = _getter(self.path)
        return lambda doc: test(get(doc))


@dataclass
class Query:
    """A parsed list request: filters, order, fields and page."""

    filters: list = field(default_factory=list)
    order_by: list = field(default_factory=list)  # (path, descending)
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
    for name, raw in single_params(params, PAGE_ALIASES).items():
        canonical = PAGE_ALIASES.get(name, name)
        if canonical in ("_skip", "_limit"):
            number = parse_int(raw)
            if number is None or number < 0:
                raise bad_request(f"{name}: {raw!r} is not a non-negative 64-bit integer")
            if canonical == "_limit" and number > config.max_limit:
                raise bad_request(f"{name}: {raw!r} is above the maximum of {config.max_limit}")
            setattr(query, canonical[1:], number)
        elif name == "_order_by":
            query.order_by = _parse_order_by(raw, schema, stored_as)
        elif name == "_fields":
            query.fields = _parse_fields(raw, schema)
        elif name == "api_key" or name in extra:
            pass
        elif name.startswith("_"):
            raise bad_request(f"unknown query parameter {name!r}")
        else:
            _parse_filter(name, raw, schema, query, stored_as)
            if len(query.filters) > MAX_FILTERS:
                raise bad_request(f"more than {MAX_FILTERS} filters in one query; narrow it in steps")
    return query


def single_params(params, aliases: dict[str, str] | None = None) -> dict[str, str]:
    """The query parameters, each given once, else a 400; `aliases` maps other names of a parameter to it."""
    seen: dict[str, str] = {}
    single: dict[str, str] = {}
    for name, raw in params.items():
        canonical = aliases.get(name, name) if aliases else name
        if canonical in seen:
            also = "" if seen[canonical] == name else f" (as {seen[canonical]})"
            raise bad_request(f"query parameter {name!r} is given more than once{also}")
        seen[canonical] = name
        single[name] = raw
    return single


def _split_field(name: str, schema: dict, what: str, stored_as: dict[str, str]) -> tuple[str, ...]:
    """The path of a field (or of a place inside `data`) in the stored records."""
    path = tuple(name.split("__"))
    if path[0] not in schema or (len(path) > 1 and path[0] != "data") or "" in path:
        raise bad_request(f"unknown field {name!r} in {what}")
    return (stored_as.get(path[0], path[0]),) + path[1:]


LINK_FIELDS = ("link", "links")  # an answer's hypermedia links, which _fields may name
MAX_ORDER_KEYS = 4  # fields in one _order_by
MAX_FILTERS = 20  # filters in one query
MAX_FIELDS = 32  # names in one _fields


def _parse_order_by(raw: str, schema: dict, stored_as: dict[str, str]) -> list[tuple[tuple, bool]]:
    """(path, descending) of each comma-separated _order_by field: at most MAX_ORDER_KEYS, each once."""
    order, seen = [], set()
    for part in raw.split(","):
        descending = part.startswith("-")
        path = _split_field(part[1:] if descending else part, schema, "_order_by", stored_as)
        if path in seen:
            raise bad_request(f"_order_by names {part.lstrip('-')!r} more than once")
        seen.add(path)
        order.append((path, descending))
    if len(order) > MAX_ORDER_KEYS:
        raise bad_request(f"_order_by takes at most {MAX_ORDER_KEYS} fields, not {len(order)}")
    return order


def _parse_fields(raw: str, schema: dict) -> list[str]:
    """The fields of a _fields list, each once: at most MAX_FIELDS names."""
    names = raw.split(",")
    if len(names) > MAX_FIELDS:
        raise bad_request(f"_fields takes at most {MAX_FIELDS} names, not {len(names)}")
    for name in names:
        if name not in schema and name not in LINK_FIELDS:
            raise bad_request(f"unknown field {name!r} in _fields")
    return list(dict.fromkeys(names))


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


# ------------------------------------------------------------- stat fields ---


PERIODS = {"day": (1, 366), "week": (1, 53), "month": (1, 12), "quarter": (1, 4)}
MAX_DATA_DEPTH = 64


def _is_int(value) -> bool:
    """Whether `value` is a JSON integer a stat may hold (64 bits; not a boolean)."""
    return isinstance(value, int) and not isinstance(value, bool) and INT64[0] <= value <= INT64[1]


class _NestedShell(threading.local):
    """Lists nested ORJSON_MAX_DEPTH - MAX_DATA_DEPTH deep, the innermost one holding a slot: a value
    put there and serialized fails exactly when it nests deeper than MAX_DATA_DEPTH (one per thread)."""

    def __init__(self):
        self.slot = [None]
        self.outer = self.slot
        for _ in range(ORJSON_MAX_DEPTH - MAX_DATA_DEPTH - 1):
            self.outer = [self.outer]
        self.depth = ORJSON_MAX_DEPTH - MAX_DATA_DEPTH


def _orjson_max_depth() -> int:
    """How deep orjson.dumps nests containers before it refuses with "Recursion limit reached" (254)."""
    value, depth = [], 1
    while depth < 4096:
        try:
            orjson.dumps([value])
        except orjson.JSONEncodeError:
            if depth <= MAX_DATA_DEPTH:
                raise RuntimeError(f"orjson.dumps nests at most {depth} deep: statsd's data may nest"
                                   f" {MAX_DATA_DEPTH}")
            return depth
        value, depth = [value], depth + 1
    raise RuntimeError("orjson.dumps has no nesting limit: statsd's data depth check relies on one")


ORJSON_MAX_DEPTH = _orjson_max_depth()
_SHELL = _NestedShell()


class CheckedData:
    """A body's `data` once checked: its parsed value (for the views) and its JSON (what is stored),
    both from one pass. It lives only until Store.apply, whose serialize_data keeps the JSON in the
    record and hands the value to the views: nothing reads a record's data before that."""

    __slots__ = ("value", "json")

    def __init__(self, value, json: bytes):
        self.value, self.json = value, json


def checked_json(value) -> bytes:
    """The JSON of `value` (parsed JSON), or ValueError(what is wrong), when objects and arrays nest
    in it deeper than MAX_DATA_DEPTH: the serialization that is stored is the depth check (in C)."""
    shell = _SHELL
    shell.slot[0] = value
    try:
        wrapped = orjson.dumps(shell.outer)
    except orjson.JSONEncodeError as e:
        if "recursion" in str(e).lower():
            raise ValueError(f"is nested deeper than {MAX_DATA_DEPTH} levels") from None
        raise ValueError(f"cannot be stored as JSON ({e})") from None
    finally:
        shell.slot[0] = None
    return wrapped[shell.depth:-shell.depth]


def _whole(value):
    """A whole float as an int: JSON does not tell 1.0 from 1 (nor does the OpenAPI description)."""
    return int(value) if value.__class__ is float and value.is_integer() else value


# The rules of the stat fields in a body: value -> (normalized value, None) or (None, what is wrong).

def _check_uuid(value) -> tuple[Any, str | None]:
    parsed = parse_uuid(value)
    return (parsed, None) if parsed else (None, "must be a UUID string")


def _check_organization(value) -> tuple[Any, str | None]:
    return (value, None) if isinstance(value, str) else (None, "must be an organization name")


def _check_anr(value) -> tuple[Any, str | None]:
    value = _whole(value)
    if _is_int(value):
        return value, None
    parsed = parse_uuid(value)
    return (parsed, None) if parsed else (None, "must be an integer or a UUID string")


def _check_type(value) -> tuple[Any, str | None]:
    if not isinstance(value, str) or not 1 <= len(value) <= 120 or not value.strip():
        return None, "must be a string of 1 to 120 characters, not only white space"
    return value, None


def _check_date(value) -> tuple[Any, str | None]:
    parsed = parse_date(value)
    return (parsed, None) if parsed else (None, f"must be {DATE_RULE}")


def _check_period(low: int, high: int) -> Callable[[Any], tuple[Any, str | None]]:
    def check(value):
        value = _whole(value)
        if not _is_int(value) or not low <= value <= high:
            return None, f"must be an integer from {low} to {high}"
        return value, None
    return check


def _check_year(value) -> tuple[Any, str | None]:
    value = _whole(value)
    return (value, None) if _is_int(value) else (None, "must be an integer")


def _check_data(value) -> tuple[Any, str | None]:
    try:
        return CheckedData(value, checked_json(value)), None
    except ValueError as e:
        return None, str(e)


def _oa_int(low: int = INT64[0], high: int = INT64[1]) -> dict:
    """The OpenAPI schema of an integer from `low` to `high`."""
    return {"type": "integer", "minimum": low, "maximum": high}


@dataclass(frozen=True)
class StatField:
    """One field of a stat record: who sets it, its rule in a body, its reading in a query, its OpenAPI schema."""

    name: str
    schema: dict  # the OpenAPI schema of its value
    convert: Callable = _convert_text  # a query value -> the value filters compare, or a 400
    strings_ok: bool = True  # whether the string operators apply
    check: Callable | None = None  # a body's value -> (normalized, None) or (None, what is wrong); None: the server sets it
    kept: bool = False  # set when the stat is created, then read-only (a PUT keeps it)
    index: str = ""  # how the store finds it: "key", "unique", "index" (built at load), "later" (built after it)
    shared: bool = False  # whether the store keeps one object per distinct value (few values, many records)


UUID_SCHEMA = {"type": "string", "format": "uuid"}
STAMP_SCHEMA = {"type": "string", "pattern": r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}$"}
STAT_TABLE = (  # in the order of a stored record's fields
    StatField("uuid", UUID_SCHEMA, _convert_uuid, check=_check_uuid, kept=True, index="unique"),
    StatField("organization", {"type": "string", "description": "taken from the API key; with authentication off,"
                               " an existing organization's name"}, check=_check_organization, kept=True,
              index="index"),
    StatField("anr", {"anyOf": [_oa_int(), UUID_SCHEMA]}, _convert_anr, check=_check_anr, index="index"),
    StatField("type", {"type": "string", "minLength": 1, "maxLength": 120, "pattern": r"\S"}, check=_check_type,
              index="index"),
    StatField("date", {"type": "string", "format": "date", "description": "sets the period fields that are not given"},
              _convert_date, check=_check_date, shared=True),
    *(StatField(name, _oa_int(low, high), _convert_int, False, check=_check_period(low, high),
                index="later")
      for name, (low, high) in PERIODS.items()),
    StatField("year", _oa_int(), _convert_int, False, check=_check_year, index="later"),
    StatField("data", {"description": f"any JSON value (null included), nested at most {MAX_DATA_DEPTH} levels"},
              _convert_json_scalar, check=_check_data),
    StatField("created_at", STAMP_SCHEMA, _convert_datetime, kept=True),
    StatField("updated_at", STAMP_SCHEMA, _convert_datetime),
    StatField("id", {"type": "string", "pattern": "^[0-9a-f]{24}$"}, kept=True, index="key"),
)
STAT_FIELD = {f.name: f for f in STAT_TABLE}
STAT_ORDER = tuple(STAT_FIELD)  # a stored record's fields, in order
STAT_CLIENT_FIELDS = tuple(f.name for f in STAT_TABLE if f.check)
STAT_READ_ONLY = (*(f.name for f in STAT_TABLE if not f.check), *LINK_FIELDS)  # a new stat may not set them
STAT_KEPT = tuple(f.name for f in STAT_TABLE if f.kept)
STAT_FIELDS = {f.name: (f.convert, f.strings_ok) for f in sorted(STAT_TABLE, key=lambda f: f.name != "id")}
STAT_KEY = next(f.name for f in STAT_TABLE if f.index == "key")
STAT_UNIQUE = tuple(f.name for f in STAT_TABLE if f.index == "unique")
STAT_PERIODS = tuple(f.name for f in STAT_TABLE if f.index == "later")  # indexed in the background after a load
STAT_INDEXED = tuple(f.name for f in STAT_TABLE if f.index in ("index", "later"))
STAT_SHARED = tuple(f.name for f in STAT_TABLE if f.shared)


def check_stat_value(name: str, value) -> tuple[Any, str | None]:
    """(normalized value, None) or (None, what is wrong) for one client field."""
    return STAT_FIELD[name].check(value)

# ------------------------------------------------------------ bounded work ---

class LoopBudget:
    """Gives the event loop back whenever `seconds` of work have passed: long work never stalls others.

    Long tasks then wait their turn (`Turns`): one slice of long work per
    turn of the loop, so that eight long requests delay a short one by one
    slice, not eight, at each of its awaits.
    """

    def __init__(self, seconds: float = 0.003):
        self.seconds = seconds
        self.since = time.perf_counter()

    async def spend(self) -> None:
        """Call between two small steps of a long task."""
        if time.perf_counter() - self.since >= self.seconds:
            await Turns.of(asyncio.get_running_loop()).wait()
            self.since = time.perf_counter()


class Turns:
    """The long tasks of one event loop, let go on one at a time, a turn of the loop apart, first come first."""

    _of: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.waiting: collections.deque = collections.deque()
        self.scheduled = False

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> "Turns":
        """The turns of `loop` (one set per event loop)."""
        turns = cls._of.get(loop)
        if turns is None:
            turns = cls._of[loop] = cls(loop)
        return turns

    async def wait(self) -> None:
        """Return at this task's turn (after every long task that waited before it)."""
        future = self.loop.create_future()
        self.waiting.append(future)
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self._next)
        await future

    def _next(self) -> None:
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():  # (a cancelled task left its place)
                future.set_result(None)
                break
        self.scheduled = bool(self.waiting)
        if self.scheduled:
            self.loop.call_soon(self._next)


STEP = 256  # records tested between two looks at the loop budget


def _steps(ids: Iterable[int]) -> Iterable[list[int]]:
    """`ids` in lists of STEP."""
    if isinstance(ids, (list, tuple)):
        return (ids[start:start + STEP] for start in range(0, len(ids), STEP))
    found = iter(ids)
    return iter(lambda: list(itertools.islice(found, STEP)), [])


def _live_steps(ids: dict) -> Iterator[list[int]]:
    """The ids of `ids` (record ids in creation order, which writes may change between two steps)
    in lists of STEP: the first step read now, in order; the rest (a page seldom needs it) only
    when asked for, then from the ids as they are, past the first step. A page of 10 thus never
    copies 20,000 ids."""
    first = list(itertools.islice(ids, STEP))
    return itertools.chain((first,), _steps_past(ids, first[-1]) if len(first) == STEP else ())


def _steps_past(ids: dict, last: int) -> Iterator[list[int]]:
    """The ids of `ids` above `last`, in order, in lists of STEP (read when the first is asked for)."""
    rest = sorted(ids)  # (at C speed, and in one pass where writes have not moved an id to the end)
    yield from _steps(rest[bisect.bisect_right(rest, last):])


# ----------------------------------------- storage: files, indexes, tables ---

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

    def open_raw(self):
        """The file, open for reading its bytes (raises FileNotFoundError when there is none)."""
        return open(self.path, "rb")

    def read_raw(self) -> bytes | None:
        """The file's bytes, or None when there is no file."""
        try:
            with open(self.path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def read(self) -> dict | None:
        """The database as TinyDB reads it (None when there is no file); StorageError if it is not one."""
        raw = self.read_raw()
        if raw is None:
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
        """Replace the file with `data`, atomically."""
        write_atomically(self.path, dumps(data))


class Index:
    """Equality index of one field: value -> ids of the records holding it, in order.

    A deferred index is filled after loading (`fill`, in the background), or by
    its first lookup if that comes sooner; until it is filled, `docs` is the
    table it will read.
    """

    def __init__(self, name: str):
        self.name = name
        self.ids: dict[Any, dict[int, None]] = {}
        self.unsorted: set = set()
        self.docs: dict[int, dict] | None = None  # while deferred: the records to read
        self.touched: set | None = None  # while filling: the ids written meanwhile

    FILL_STEP = 2048  # records read between two looks at the loop budget

    def add(self, doc_id: int, doc: dict) -> None:
        """Index a record under its value of the field (if an index holds that value)."""
        if self.docs is not None:  # deferred: the fill reads the records as they are then
            if self.touched is not None:
                self.touched.add(doc_id)
            return
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
        """Take a record out of the index."""
        if self.docs is not None:
            if self.touched is not None:
                self.touched.add(doc_id)
            return
        value = doc.get(self.name, MISSING)
        bucket = self.ids.get(value) if _indexable(value) else None
        if bucket is not None:
            bucket.pop(doc_id, None)
            if not bucket:
                del self.ids[value]
                self.unsorted.discard(value)

    def defer(self, docs: dict[int, dict]) -> None:
        """Leave this index empty until `fill` (or a lookup) reads `docs`."""
        self.ids, self.unsorted, self.docs = {}, set(), docs

    def fill_now(self) -> None:
        """Read every record at once (a lookup before the background fill ended)."""
        if self.docs is not None:
            self.ids = _index_buckets(self.name, list(self.docs.items()), {}, {})
            self.docs = self.touched = None

    async def fill(self) -> None:
        """Read the records a chunk at a time, giving the loop back; writes meanwhile are seen."""
        if self.docs is None or self.touched is not None:
            return
        docs, budget, ids, shared = self.docs, LoopBudget(), {}, {}
        doc_ids, self.touched = list(docs), set()
        for start in range(0, len(doc_ids), self.FILL_STEP):
            chunk = doc_ids[start:start + self.FILL_STEP]
            _index_buckets(self.name, [(doc_id, docs[doc_id]) for doc_id in chunk if doc_id in docs], ids, shared)
            await budget.spend()
            if self.docs is not docs:  # a lookup filled it meanwhile
                return
        touched, self.ids, self.docs, self.touched = self.touched, ids, None, None
        for doc_id in touched:  # written or deleted while filling: as they are now
            for value, bucket in list(ids.items()):
                if bucket.pop(doc_id, MISSING) is not MISSING and not bucket:
                    del ids[value]
            doc = docs.get(doc_id)
            if doc is not None:
                self.add(doc_id, doc)

    def lookup(self, value) -> dict[int, None]:
        """The ids holding `value`, in creation order."""
        if self.docs is not None:
            self.fill_now()
        if value in self.unsorted:
            self.ids[value] = dict.fromkeys(sorted(self.ids[value]))
            self.unsorted.discard(value)
        return self.ids.get(value, {})


INDEXABLE = (str, int, float)  # JSON values that an index holds (not bool: True == 1)


def _index_buckets(name: str, pairs: list[tuple[int, dict]], ids: dict, shared: dict) -> dict:
    """Add (doc_id, doc) pairs, in id order, to `ids` (value -> {doc_id: None}); returns `ids`.

    Each str or int value becomes the one object `shared` keeps for it: a
    hundred thousand copies of "risk" or of 2026 would cost memory.
    """
    for doc_id, doc in pairs:
        value = doc.get(name, MISSING)
        cls = value.__class__
        if cls is str or cls is int:
            doc[name] = value = shared.setdefault(value, value)
        elif cls is not float:
            continue
        bucket = ids.get(value)
        if bucket is None:
            ids[value] = bucket = {}
        bucket[doc_id] = None
    return ids


def _indexable(value) -> bool:
    """Whether an index holds `value` (a string or a number, not a boolean)."""
    return value.__class__ in INDEXABLE


class Column:
    """The values of one path of every record, doc_id -> value, filled a chunk at a time."""

    def __init__(self, get: Callable[[dict], Any]):
        self.get = get
        self.values: dict[int, Any] = {}
        self.ready = asyncio.Event()
        self.filling = False
        self.complete = False
        self.changed = False  # a write landed while filling: the order needs restoring

    def put(self, doc_id: int, doc: dict | None, data: Any = MISSING) -> None:
        """Keep the column true for a write (None deletes; `data`: the record's data parsed, if known)."""
        if doc is None:
            self.values.pop(doc_id, None)
        else:
            self.values[doc_id] = self.get(doc, data)
        self.changed = self.changed or self.filling

    PARSES = 16  # records read between two looks at the loop budget (a path inside data parses each one)

    async def fill(self, table: "RecordTable", path: tuple) -> None:
        """Read every record; if this is interrupted, the column is dropped, never left half full."""
        self.filling = True
        try:
            ids = list(table.docs)
            docs, values, get, budget = table.docs, self.values, self.get, LoopBudget()
            for start in range(0, len(ids), self.PARSES):
                for doc_id in ids[start:start + self.PARSES]:
                    doc = docs.get(doc_id)
                    if doc is not None and doc_id not in values:
                        values[doc_id] = get(doc)
                await budget.spend()
            if self.changed:
                ordered = sorted(values.items())
                values.clear()
                values.update(ordered)
            self.complete = True
        finally:
            self.filling = False
            if not self.complete and table.columns.get(path) is self:
                del table.columns[path]
            self.ready.set()


class RecordView:
    """What a RecordTable keeps true beside its records (`views`): date lists, aggregates, the packer.

    The table calls `load` once with every record read from disk, then
    `added` and `removed` in the same step as each write (a change is a
    removal of the old record, then an addition of the new one).
    """

    def load(self, pairs: list[tuple[int, dict]]) -> None:
        """Start from the loaded (doc_id, record) pairs."""
        raise NotImplementedError

    def added(self, doc_id: int, doc: dict, data: Any = MISSING) -> None:
        """A new record (`data`: its `data` parsed, when the writer has it)."""
        raise NotImplementedError

    def removed(self, doc_id: int, doc: dict) -> None:
        """A record gone (deleted, or replaced by a change)."""
        raise NotImplementedError


class RecordTable:
    """One table in memory: its records in creation order, a primary key and indexes (not TinyDB's RecordTable)."""

    def __init__(self, name: str, key: str, unique: Iterable[str] = (), indexed: Iterable[str] = (),
                 shared: Iterable[str] = (), deferred: Iterable[str] = ()):
        self.name = name
        self.deferred = tuple(deferred)  # indexes filled after loading (Index.fill), or when first looked up
        self.shared = tuple(shared)  # fields with few values, kept as one object per value (as indexed ones are)
        self.key = key
        self.docs: dict[int, dict] = {}
        self.next_id = 1
        self.by_key: dict[str, int] = {}
        self.unique = {f: {} for f in unique}
        self.indexes = {f: Index(f) for f in indexed}
        self.columns: dict[tuple, Column] = {}
        self.intersections: dict[tuple, tuple[int, ...] | None] = {}
        self.intersection_ids = 0  # how many ids self.intersections holds
        self.views: list[RecordView] = []  # kept true beside the records (date lists, aggregates, packer)

    NOT_ASKED = MISSING  # the states of an intersection: no query asked for it since the last write,
    ASKED_ONCE = None  # asked once (the next ask keeps its ids), else the tuple of ids kept
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
            if name in self.deferred:
                index.defer(self.docs)
            else:
                _index_buckets(name, pairs, index.ids, {})
        for name in self.shared:
            canonical = {}
            for doc_id, doc in pairs:
                value = doc.get(name)
                if value.__class__ is str:
                    doc[name] = canonical.setdefault(value, value)
        for doc_id, doc in pairs:
            if doc.get("updated_at") == doc.get("created_at") and "created_at" in doc:
                doc["updated_at"] = doc["created_at"]
        for view in self.views:
            view.load(pairs)
        self.next_id = max(self.docs, default=0) + 1

    async def column(self, path: tuple) -> dict[int, Any]:
        """doc_id -> value at `path`, in creation order, kept up to date by apply.

        Scanning one compact column is several times faster than visiting
        every record; the most recently used MAX_COLUMNS paths are kept. A new
        column is filled STEP records at a time, giving the loop back whenever
        its budget is spent (a path inside `data` parses each record's JSON).
        """
        while True:
            entry = self.columns.pop(path, None)
            if entry is None:
                entry = Column(_getter(path))
                if len(self.columns) >= self.MAX_COLUMNS:
                    del self.columns[next(iter(self.columns))]
            self.columns[path] = entry
            if entry.complete:
                return entry.values
            if entry.filling:
                await entry.ready.wait()  # another request fills it; if it gave up, start again
            else:
                await entry.fill(self, path)

    def matching(self, key: tuple, id_sets: list, tests: list) -> tuple[Iterable[int], bool]:
        """The ids found in every one of `id_sets`, in creation order, and whether `tests` ran.

        `key` names the sets and the tests (the filters they answer; `tests` are
        record predicates). The first use since the last write runs lazily,
        leaving the tests to the caller, so a page stops early; the second keeps
        the ids that pass every test until the next write, so a repeated query
        then costs one lookup.
        """
        ids = self.intersections.get(key, self.NOT_ASKED)
        if ids.__class__ is tuple:
            return ids, True
        smallest, *others = sorted(id_sets, key=len)
        found = iter(list(smallest))  # a snapshot: the caller may yield to writers while it reads
        for other in others:
            found = filter(other.__contains__, found)  # at C speed
        if ids is self.NOT_ASKED:
            if len(self.intersections) >= self.MAX_INTERSECTIONS:
                self.forget_intersections()
            self.intersections[key] = self.ASKED_ONCE
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
        """Drop every kept intersection (a write changed the records)."""
        self.intersections.clear()
        self.intersection_ids = 0

    def get(self, key) -> dict | None:
        """The record with primary key `key`, or None."""
        doc_id = self.by_key.get(key)
        return None if doc_id is None else self.docs[doc_id]

    def doc_id(self, key) -> int | None:
        """The doc_id of the record with primary key `key`, or None."""
        return self.by_key.get(key)

    def find_unique(self, name: str, value) -> dict | None:
        """The record whose unique field `name` holds `value`, or None."""
        doc_id = self.unique[name].get(value)
        return None if doc_id is None else self.docs[doc_id]

    def new_doc_id(self) -> int:
        """A doc_id no record has had."""
        doc_id, self.next_id = self.next_id, self.next_id + 1
        return doc_id

    def apply(self, doc_id: int, doc: dict | None, data: Any = MISSING) -> None:
        """Put `doc` under `doc_id` (None deletes it), keeping every index and view true.

        `data` is the new record's `data` parsed, when the caller has it (views then need not parse).
        """
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
        if old is not None:
            for view in self.views:
                view.removed(doc_id, old)
        for column in self.columns.values():
            column.put(doc_id, doc, data)
        if doc is None:
            self.docs.pop(doc_id, None)
            return
        self.docs[doc_id] = doc
        for view in self.views:
            view.added(doc_id, doc, data)
        self.next_id = max(self.next_id, doc_id + 1)
        self.by_key[doc[self.key]] = doc_id
        for name, ids in self.unique.items():
            if name in doc:
                ids[doc[name]] = doc_id
        for index in self.indexes.values():
            index.add(doc_id, doc)


# ------------------------------------------------------------ query engine ---

def _index_ids(table: RecordTable, f: Filter) -> dict | None:
    """The ids an index gives for an equality filter, or None when no index applies."""
    if f.op != "exact" or len(f.path) != 1 or not _indexable(f.value):
        return None
    name = f.path[0]
    if name == table.key or name in table.unique:
        doc_id = table.doc_id(f.value) if name == table.key else table.unique[name].get(f.value)
        return {} if doc_id is None or not _same(table.docs[doc_id][name], f.value) else {doc_id: None}
    index = table.indexes.get(name)
    return None if index is None else index.lookup(f.value)


async def _candidates(table: RecordTable, filters: list[Filter]) -> tuple[Iterable[list[int]], list[Filter]]:
    """Ids worth testing, in creation order and in lists of STEP, and the filters still to apply.

    Equality filters on indexed fields become an intersection of id sets (with
    the other filters on indexed fields, kept by RecordTable.matching); else a filter
    inside `data` is run over that path's value column; else every record.
    Each step is read at once (a snapshot, or _live_steps), so writes may land while the caller yields.
    """
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
        return _live_steps(indexed[0][1]), rest
    if indexed:
        key = tuple(f.key for f, _ in indexed) + tuple(f.key for f in narrowing)
        ids, tested = table.matching(key, [ids for _, ids in indexed], [f.record_test for f in narrowing])
        return _steps(ids), rest if tested else narrowing + rest
    rest = narrowing + rest
    for position, f in enumerate(rest):
        if f.path[0] == "data":
            column = await table.column(f.path)
            ids, values, hits = list(column), list(column.values()), _column_hits(f)
            steps = (hits(ids[start:start + STEP], values[start:start + STEP]) for start in range(0, len(ids), STEP))
            return steps, rest[:position] + rest[position + 1:]
    return _live_steps(table.docs), rest


def _column_hits(f: Filter) -> Callable[[list, list], list]:
    """(ids, their values in a column) -> the ids whose value passes `f`. An order comparison with a
    number or a string runs at C speed: the values of that kind, then the comparison (a full scan of
    100,000 values calls no Python function per value); any other filter tests each value."""
    if f.op in COMPARE and (f.value.__class__ is str or f.value.__class__ in NUMBER):
        kinds = frozenset((str,) if f.value.__class__ is str else NUMBER).__contains__
        compare, bound = COMPARE[f.op], itertools.repeat(f.value)

        def hits(ids: list, values: list) -> list:
            comparable = list(map(kinds, map(type, values)))  # (type(True) is bool: no boolean is a number)
            return list(itertools.compress(itertools.compress(ids, comparable),
                                           map(compare, itertools.compress(values, comparable), bound)))
        return hits
    test = f.value_test
    return lambda ids, values: list(itertools.compress(ids, map(test, values)))


def _sort_value(value):
    """A value as a sort key: by type rank, then value (objects and arrays by their JSON)."""
    rank = _rank(value)
    if rank == RANK_OTHER:
        value = orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
    elif rank < RANK_BOOL:
        value = 0
    return rank, value


async def _sort_values(table: RecordTable, order_by: list) -> Callable[[dict], tuple]:
    """A record's sort value per `order_by` field, then its primary key; paths inside `data` read their column."""
    getters = []
    for path, _ in order_by:
        if path[0] == "data":
            column, doc_id, key = await table.column(path), table.by_key.get, table.key
            getters.append(functools.partial(lambda column, doc: column.get(doc_id(doc[key]), MISSING), column))
        else:
            getters.append(_getter(path))
    key = table.key
    return lambda doc: (*(_sort_value(get(doc)) for get in getters), doc[key])


def _sort_run(run: list, order_by: list) -> None:
    """Order sort keys (values, then primary key): by primary key, then stably by each field from the last (C-level sorts).

    Runs hold the keys alone, never the records: tuples of plain values are
    soon untracked by the garbage collector, so a long sort does not make
    every collection walk it.
    """
    run.sort(key=lambda values: values[-1])
    for i in range(len(order_by) - 1, -1, -1):
        run.sort(key=lambda values, i=i: values[i], reverse=order_by[i][1])


def _merge_key(order_by: list):
    """The key that merges sorted runs: the same order as _sort_run, in one comparison."""
    directions = [descending for _, descending in order_by]

    def compare(a, b):
        for i, descending in enumerate(directions):
            x, y = a[i], b[i]
            if x != y:
                return (1 if x < y else -1) if descending else (-1 if x < y else 1)
        return -1 if a[-1] < b[-1] else (a[-1] > b[-1])
    return functools.cmp_to_key(compare)


RUN = 1024  # records sorted at once (a few passes of C sorts stay within the loop budget); more are merged


async def _merge_runs(table: RecordTable, found: list, runs: list, run: list, order_by: list, wanted: int,
                      budget: LoopBudget) -> None:
    """Add to `found`, up to `wanted` records in all, the records of the sorted keys `runs` and
    `run` (sorted here), in order: each record found again by its primary key, the last value."""
    _sort_run(run, order_by)
    merged = heapq.merge(*runs, run, key=_merge_key(order_by)) if runs else iter(run)
    while len(found) < wanted:
        keys = list(itertools.islice(merged, min(STEP, wanted - len(found))))
        if not keys:
            break
        found += [doc for doc in map(table.get, (values[-1] for values in keys)) if doc is not None]
        await budget.spend()
    merged = None
    while runs:  # a run at a time: freeing 100,000 sort keys at once would hold the loop for tens of ms
        runs.pop()
        await budget.spend()


async def run_query(table: RecordTable, query: Query, by_date: Callable | None = None) -> tuple[list[dict], bool]:
    """The page of matching records and whether more follow it.

    Records are tested STEP at a time and the loop is given back whenever its
    budget is spent. An ordered query sorts runs of RUN records and merges them
    only as far as the page (skip + limit) reaches; one ordered by date first
    walks the kept date order instead, when `by_date` (Store.stats_by_date)
    gives it and the walk cannot cost much more than the sort (_walk_by_date).
    """
    wanted = query.skip + query.limit + 1
    budget = LoopBudget()
    found = None
    if by_date is not None and query.order_by and query.order_by[0][0] == ("date",):
        found = await _walk_by_date(table, query, by_date, wanted, budget)
    if found is None:
        key = await _sort_values(table, query.order_by) if query.order_by else None
        found = await _sorted_matches(table, query, key, wanted, budget)
    page = found[query.skip:wanted]
    return page[:query.limit], len(page) > query.limit


async def _sorted_matches(table: RecordTable, query: Query, key, wanted: int, budget: LoopBudget) -> list[dict]:
    """The first `wanted` matching records in the query's order: every candidate tested, the matches sorted."""
    steps, remaining = await _candidates(table, query.filters)
    # a path inside data is read from its column (parsing each record's data would outlast any budget)
    columns = [(await table.column(f.path), f.value_test) for f in remaining if f.path[0] == "data"]
    predicates = [f.record_test for f in remaining if f.path[0] != "data"]
    docs = table.docs
    found, runs, run = [], [], []
    every_one = key is None and not columns and not predicates  # each record left is a match, in order
    for ids in steps:
        for values, test in columns:
            ids = [doc_id for doc_id in ids if test(values.get(doc_id, MISSING))]
        if every_one:  # (a page of 10 reads the 11 records it needs of the step, not 256)
            needed = min(wanted - len(found), sys.maxsize)
            records = list(itertools.islice(filter(None, map(docs.get, ids)), needed))
        else:
            records = [doc for doc in map(docs.get, ids) if doc is not None]
        for predicate in predicates:
            records = list(filter(predicate, records))
        if key is None:
            found += records
            if len(found) >= wanted:
                break
        else:
            run += map(key, records)
            if len(run) >= RUN:
                _sort_run(run, query.order_by)
                runs.append(run)
                run = []
        await budget.spend()
    if key is not None:
        await _merge_runs(table, found, runs, run, query.order_by, wanted, budget)
    return found


WALK_FACTOR = 4  # a walk by date reads at most this many times the entries of the smallest index set


def _walk_sources(table: RecordTable, filters: list[Filter]) -> tuple[dict, int] | None:
    """The arguments of Store.stats_by_date that narrow a walk for `filters`, and the size of the
    smallest id set an index gives for them (the candidates of _sorted_matches, at most); None when
    _sorted_matches would read a column of `data` (a walk would parse each record's data instead)."""
    narrow: dict[str, Any] = {}
    kinds = [f.record_test for f in filters if f.path == ("type",)]
    narrow["kinds"] = lambda kind: all(test({"type": kind}) for test in kinds)
    smallest = len(table.docs)
    indexed = False
    for f in filters:
        ids = _index_ids(table, f)
        if ids is not None:
            indexed = True
            smallest = min(smallest, len(ids))
        if f.op == "exact" and f.path == ("organization",) and f.value.__class__ is str:
            narrow["organization"] = f.value
        elif f.op == "exact" and f.path == ("anr",) and _indexable(f.value):
            narrow["anr"] = f.value
        elif f.path == ("date",) and f.value.__class__ is str and f.op in ("exact", "gt", "gte"):
            narrow["date_from"] = max(narrow.get("date_from", ""), f.value)
        if f.path == ("date",) and f.value.__class__ is str and f.op in ("exact", "lt", "lte"):
            narrow["date_to"] = min(narrow.get("date_to", "\uffff"), f.value)
    if not indexed and any(f.path[0] == "data" for f in filters):
        return None
    return narrow, smallest


async def _walk_by_date(table: RecordTable, query: Query, by_date: Callable, wanted: int,
                        budget: LoopBudget) -> list[dict] | None:
    """The first `wanted` matching stats of a query ordered by `date` or `-date` first, from the kept
    date order: a day's matches at a time, each day sorted by the later keys (then the primary key,
    as in the full sort), stopping at the first day that completes the page. None when the lists to
    walk hold more than WALK_FACTOR times the candidates that sorting would read.

    Stats with no `date` sort before every date (after, with -date): they come from their own list.
    A stat whose date changes while the walk gives the loop back is left out of that answer.
    """
    sources = _walk_sources(table, query.filters)
    if sources is None:
        return None
    narrow, smallest = sources
    lists, undated = by_date(**narrow)
    if sum(map(len, lists)) > WALK_FACTOR * max(smallest, STEP):
        return None
    predicates = [f.record_test for f in query.filters if f.path[0] != "data"] + \
        [f.record_test for f in query.filters if f.path[0] == "data"]  # cheap tests first
    docs, order_by, descending = table.docs, query.order_by[1:], query.order_by[0][1]  # within a day: the rest
    key = await _sort_values(table, order_by)
    found: list[dict] = []

    def matching(records: list) -> list:
        for predicate in predicates:
            records = list(filter(predicate, records))
        return records

    async def add_undated() -> None:  # they sort as one day, before (or after) every date
        runs, run = [], []
        for chunk in _steps(undated):
            records = [doc for doc in map(docs.get, chunk) if doc is not None and "date" not in doc]
            run += map(key, matching(records))
            if len(run) >= RUN:
                _sort_run(run, order_by)
                runs.append(run)
                run = []
            await budget.spend()
        await _merge_runs(table, found, runs, run, order_by, wanted, budget)

    if undated and not descending:
        await add_undated()
        if len(found) >= wanted:
            return found
    if len(lists) == 1:
        entries = reversed(lists[0]) if descending else iter(lists[0])
    else:
        entries = heapq.merge(*(reversed(entries) if descending else entries for entries in lists),
                              reverse=descending)
    day, runs, run = None, [], []  # the day being read and its matches, as in _sorted_matches
    for chunk in iter(lambda: list(itertools.islice(entries, STEP)), []):
        for entry_day, same_day in itertools.groupby(chunk, key=operator.itemgetter(0)):
            if entry_day != day:
                if runs or run:
                    await _merge_runs(table, found, runs, run, order_by, wanted, budget)
                    runs, run = [], []
                    if len(found) >= wanted:
                        break
                day = entry_day
            records = [doc for doc in map(docs.get, [doc_id for _, doc_id in same_day])
                       if doc is not None and doc.get("date") == day]  # (else deleted, undated or moved)
            run += map(key, matching(records))
            if len(run) >= RUN:
                _sort_run(run, order_by)
                runs.append(run)
                run = []
        if len(found) >= wanted:
            break
        await budget.spend()
    else:
        await _merge_runs(table, found, runs, run, order_by, wanted, budget)
        if undated and descending:
            await add_undated()
    return found


# -------------------------------------------- storage: views and the store ---

def stat_date(doc: dict) -> str:
    """A stat's day: its `date`, else its year and day of year, else the day it was created (UTC)."""
    if "date" in doc:
        return doc["date"]
    if "year" in doc and "day" in doc:
        day = _day_of_year(doc["year"], doc["day"])
        if day is not None:
            return day
    return doc["created_at"][:10]


@functools.lru_cache(maxsize=8192)  # (a load of undated stats asks for the same few hundred days)
def _day_of_year(year: int, day: int) -> str | None:
    """The YYYY-MM-DD of day `day` of `year` (1: January 1st), or None if there is none."""
    try:
        return date.fromordinal(date(year, 1, 1).toordinal() + day - 1).isoformat()
    except (ValueError, OverflowError):
        return None


class StatDates(RecordView):
    """The stats in (date, doc_id) order, per type and per type and organization or analysis.

    A list of one organization's stats of one type over some days then costs
    what it returns, whatever the size of the table.
    """

    def __init__(self):
        self.lists: dict[tuple, list[tuple[str, int]]] = {}
        self.anrs: dict[tuple, dict] = {}  # (type,) or (type, organization) -> {anr: number of stats}
        self.undated: dict[int, None] = {}  # the stats with no `date` field (listed by their stat_date)

    @staticmethod
    def _keys(doc: dict) -> tuple:
        kind = doc.get("type")
        return (kind,), (kind, "organization", doc.get("organization")), (kind, "anr", doc.get("anr"))

    def added(self, doc_id: int, doc: dict, data: Any = MISSING) -> None:
        """Put a new stat in its type's, organization's and analysis' date lists."""
        entry = (stat_date(doc), doc_id)
        for key in self._keys(doc):
            entries = self.lists.setdefault(key, [])
            if not entries or entries[-1] < entry:  # (today's new stat goes last: one comparison)
                entries.append(entry)
            else:
                bisect.insort(entries, entry)
        self._count_anr(doc, 1)
        if "date" not in doc:
            self.undated[doc_id] = None

    def removed(self, doc_id: int, doc: dict) -> None:
        """Take a stat out of its date lists."""
        entry = (stat_date(doc), doc_id)
        for key in self._keys(doc):
            entries = self.lists.get(key, [])
            at = bisect.bisect_left(entries, entry)
            if at < len(entries) and entries[at] == entry:
                del entries[at]
                if not entries:
                    del self.lists[key]
        self._count_anr(doc, -1)
        self.undated.pop(doc_id, None)

    def _count_anr(self, doc: dict, change: int) -> None:
        anr = doc.get("anr")
        for key in ((doc.get("type"),), (doc.get("type"), doc.get("organization"))):
            counts = self.anrs.setdefault(key, {})
            counts[anr] = counts.get(anr, 0) + change
            if not counts[anr]:
                del counts[anr]
                if not counts:
                    del self.anrs[key]

    def load(self, pairs: list[tuple[int, dict]]) -> None:
        """Fill the lists from the loaded (doc_id, record) pairs at once, then sort each.

        One pass puts each record in the list of its type, organization and analysis;
        the type's, organization's and analysis' lists are those lists joined.
        """
        groups: dict[tuple, list] = {}  # (type, organization, anr) -> its (date, doc_id) in load order
        undated = self.undated
        for doc_id, doc in pairs:
            key = (doc.get("type"), doc.get("organization"), doc.get("anr"))
            if "date" in doc:
                entry = (doc["date"], doc_id)
            else:
                entry = (stat_date(doc), doc_id)
                undated[doc_id] = None
            found = groups.get(key)
            if found is None:
                groups[key] = [entry]
            else:
                found.append(entry)
        lists = self.lists
        for (kind, organization, anr), entries in groups.items():
            for key in ((kind,), (kind, "organization", organization), (kind, "anr", anr)):
                found = lists.get(key)
                if found is None:
                    lists[key] = entries[:]
                else:
                    found += entries
            for key in ((kind,), (kind, organization)):
                counts = self.anrs.setdefault(key, {})
                counts[anr] = counts.get(anr, 0) + len(entries)
        for entries in lists.values():
            entries.sort()  # (runs in order already: timsort merges them)

    def between(self, kind: str, date_from: str | None, date_to: str | None, *,
                organization: str | None = None, anrs: Iterable | None = None) -> list[int]:
        """The doc ids of one type dated within the bounds (inclusive), in creation order."""
        return sorted(doc_id for entries in self.lists_of(kind, organization, anrs)
                      for _, doc_id in entries[slice(*self.span(entries, date_from, date_to))])

    def lists_of(self, kind: str, organization: str | None, anrs: Iterable | None) -> list[list]:
        """The lists holding one type's stats of the analyses, else of the organization, else all."""
        if anrs is not None:
            return [self.lists.get((kind, "anr", anr), []) for anr in anrs]
        return [self.lists.get((kind,) if organization is None else (kind, "organization", organization), [])]

    @staticmethod
    def span(entries: list, date_from: str | None, date_to: str | None) -> tuple[int, int]:
        """Where the entries dated within the bounds (inclusive) start and end."""
        return (bisect.bisect_left(entries, (date_from or "",)),
                bisect.bisect_right(entries, (date_to or "\uffff", math.inf)))

    def any_between(self, kind: str, date_from: str | None, date_to: str | None, *,
                    organization: str | None = None, anrs: Iterable | None = None) -> bool:
        """Whether any stat of one type is dated within the bounds (of the organization, or the analyses)."""
        return any(start < end for start, end in (self.span(entries, date_from, date_to)
                                                  for entries in self.lists_of(kind, organization, anrs)))

    def walk(self, kinds: Callable[[Any], bool], organization: str | None, anr: Any,
             date_from: str | None, date_to: str | None) -> list[list[tuple[str, int]]]:
        """Copies of the parts of the lists, each in (date, doc_id) order, that together hold every
        stat dated within the bounds whose type passes `kinds` (of the analysis `anr` unless it is
        MISSING, else of the organization unless it is None)."""
        found = []
        for key in [key for key in self.lists if len(key) == 1]:
            if not (key[0].__class__ is str and not kinds(key[0])):  # (other types: only from a loaded file)
                anrs = None if anr is MISSING else [anr]
                for entries in self.lists_of(key[0], organization, anrs):
                    start, end = self.span(entries, date_from, date_to)
                    if start < end:
                        found.append(entries[start:end])
        return found

    def latest_first(self, kind: str, anr) -> Iterable[tuple[str, int]]:
        """(date, doc_id) of one analysis's stats of this type, latest date first."""
        return reversed(self.lists.get((kind, "anr", anr), []))


STAT_MEASURES = ("count", "maxRisk", "averageRate")
RISK_STATES = ("current", "residual")
RISK_KINDS = ("informational", "operational")
RISK_LEVELS = ("Low risks", "Medium risks", "High risks")
OBJECT_TYPES = ("threat", "vulnerability")  # data: a list of objects, each with the STAT_MEASURES
EXACT = 1 << 1074  # every finite float is a whole multiple of 1/EXACT, so sums scaled by it are exact


_EXACT_CACHE: dict = {}  # value -> exact(value): measures repeat (counts, "2.35" rates)
CACHED_EXACT = frozenset((int, float, str))  # the classes whose exact() is cached (not bool: True == 1)


def exact(value) -> int | None:
    """A finite number, or a numeric string (averageRate is sent as one), times EXACT; else None."""
    cls = value.__class__
    if cls is str or cls is int or cls is float:
        found = _EXACT_CACHE.get(value, MISSING)
        if found is not MISSING:
            return found
    elif cls is bool or not isinstance(value, (int, float, str)):
        return None
    try:
        number = float(value)
    except (ValueError, OverflowError):
        return None
    if not math.isfinite(number):
        found = None
    elif cls is int:
        found = value * EXACT
    else:
        numerator, denominator = number.as_integer_ratio()
        found = numerator << (1075 - denominator.bit_length())  # denominator is a power of two
    if len(_EXACT_CACHE) >= 100_000:
        _EXACT_CACHE.clear()
    _EXACT_CACHE[value] = found
    return found


def risk_measures(data) -> Iterable[tuple[tuple[str, str, str], int]]:
    """((state, kind, level), exact value) of each of the RISK_LEVELS counted in a risk stat's data."""
    risks = data.get("risks") if isinstance(data, dict) else None
    for state in RISK_STATES:
        by_kind = risks.get(state) if isinstance(risks, dict) else None
        for kind in RISK_KINDS:
            levels = by_kind.get(kind) if isinstance(by_kind, dict) else None
            for level in levels if isinstance(levels, list) else ():
                if isinstance(level, dict) and level.get("level") in RISK_LEVELS:
                    value = exact(level.get("value"))
                    if value is not None:
                        yield (state, kind, level["level"]), value


def add_measures(days: dict, doc: dict, sign: int, labels: dict | None = None, data: Any = MISSING) -> None:
    """Add (sign 1) or take away (-1) a stat's measures in `days`: date -> key -> [number, sums...].

    Keys are object uuids (threats, vulnerabilities: an object counts when it
    has all STAT_MEASURES) or (state, kind, level) (risks). `labels` keeps, per
    object, the item of its latest stat (for its labels) and how many stats name it.
    """
    kind = doc.get("type")
    if kind not in OBJECT_TYPES and kind != "risk":
        return
    if data is MISSING:
        data = parsed_data(doc)
    day = stat_date(doc)
    bucket = days.get(day)
    if bucket is None:
        bucket = {}
    if kind == "risk":
        for key, value in risk_measures(data):
            _add_sums(bucket, key, sign, (value,))
    elif data.__class__ is list:  # (one loop, inlined: a threat or vulnerability stat has ~40 objects)
        cache, adding = _EXACT_CACHE.get, sign > 0
        for item in data:
            if item.__class__ is not dict:
                continue
            uuid = item.get("uuid", MISSING)
            if uuid is MISSING:
                continue
            c, m, r = item.get("count"), item.get("maxRisk"), item.get("averageRate")
            count = top = rate = MISSING
            if c.__class__ in CACHED_EXACT and m.__class__ in CACHED_EXACT and r.__class__ in CACHED_EXACT:
                count, top, rate = cache(c, MISSING), cache(m, MISSING), cache(r, MISSING)  # exact(), as seen before
            if count is MISSING or top is MISSING or rate is MISSING:
                count, top, rate = exact(c), exact(m), exact(r)
            if count is None or top is None or rate is None:
                continue
            if uuid.__class__ is not str:
                uuid = str(uuid)
            if labels is not None:  # an object's labels are those of its latest stat, kept while a stat names it
                entry = labels.get(uuid)
                if adding:
                    if entry is None:
                        labels[uuid] = [item, 1]
                    else:
                        entry[0] = item
                        entry[1] += 1
                elif entry is not None:
                    entry[1] -= 1
                    if not entry[1]:
                        del labels[uuid]
            sums = bucket.get(uuid)
            if sums is None:
                if adding:  # (a stat is taken away only after it was added)
                    bucket[uuid] = [1, count, top, rate]
            elif adding:
                sums[0] += 1
                sums[1] += count
                sums[2] += top
                sums[3] += rate
            elif sums[0] == 1:
                del bucket[uuid]
            else:
                sums[0] -= 1
                sums[1] -= count
                sums[2] -= top
                sums[3] -= rate
    if bucket:
        days[day] = bucket
    else:
        days.pop(day, None)


def _add_sums(bucket: dict, key, sign: int, measures: tuple) -> None:
    """Count one more (sign 1) or one less (-1) stat with `measures` under `key`."""
    sums = bucket.get(key)
    if sums is None:
        if sign > 0:  # (a stat is taken away only after it was added)
            bucket[key] = [1, *measures]
        return
    sums[0] += sign
    if not sums[0]:
        del bucket[key]
    elif sign > 0:
        for i, value in enumerate(measures, 1):
            sums[i] += value
    else:
        for i, value in enumerate(measures, 1):
            sums[i] -= value


def object_labels(labels: dict, uuid: str) -> dict:
    """label1..label4 of an object, from the item of its latest stat."""
    entry = labels.get(uuid)
    item = entry[0] if entry is not None else {}
    return {f"label{i}": item.get(f"label{i}", "") for i in range(1, 5)}


class StatAggregates(RecordView):
    """Per type and day, over every organization, the exact sums and counts that the processors average.

    Kept in the same step as every write, so a processor combines the days it
    covers instead of reading every stat's data. The first count, over the
    loaded records, runs in the background a chunk at a time (`count_all`);
    writes meanwhile are counted at once and the count skips them.
    """

    def __init__(self):
        self.days: dict[str, dict[str, dict]] = {kind: {} for kind in (*OBJECT_TYPES, "risk")}
        self.labels: dict[str, list] = {}  # object uuid -> [item of its latest stat, stats naming it]
        self.version = 0  # changes with every write that changes a sum
        self._sorted: dict[str, list[str]] = {}
        self.answers: dict[tuple, Any] = {}  # processor answers, valid while answers_version is version
        self.answers_version = 0  # the version every kept answer was computed at
        self.answer_bytes = 0  # the size of the JSON answers among them (bytes; the others are not counted)
        self.counted: set | None = set()  # while the first count runs: the doc ids counted so far
        self.loaded: list[int] = []  # the ids of what load gave, for the first count
        self.ready: asyncio.Event | None = None

    MAX_ANSWERS = 256
    MAX_ANSWER_BYTES = 64 << 20  # of JSON answers (a year of vulnerability lists is 2.6 MB at 100k stats)

    def kept(self, key: tuple) -> Any:
        """The answer kept under `key`, or None when a sum changed since it was kept."""
        return self.answers.get(key) if self.answers_version == self.version else None

    def keep(self, key: tuple, version: int, answer: Any) -> None:
        """Keep `answer`, computed at `version`, unless a sum changed meanwhile (or it is more than all may
        be); all are dropped when full."""
        size = len(answer) if answer.__class__ is bytes else 0
        if version != self.version or size > self.MAX_ANSWER_BYTES:
            return
        if version != self.answers_version:  # every kept answer is of an older version: none can match
            self.answers.clear()
            self.answer_bytes, self.answers_version = 0, version
        old = self.answers.pop(key, None)  # (two requests computed the same answer)
        if old.__class__ is bytes:
            self.answer_bytes -= len(old)
        if len(self.answers) >= self.MAX_ANSWERS or self.answer_bytes + size > self.MAX_ANSWER_BYTES:
            self.answers.clear()
            self.answer_bytes = 0
        self.answers[key] = answer
        self.answer_bytes += size

    def added(self, doc_id: int, doc: dict, data: Any = MISSING) -> None:
        """Add a new stat's measures to its day (from `data` parsed, when given)."""
        if self.counted is not None:
            self.counted.add(doc_id)
        self._change(doc, 1, data)

    def removed(self, doc_id: int, doc: dict) -> None:
        """Take a stat's measures out of its day (unless the first count has not reached it)."""
        if self.counted is None or doc_id in self.counted:
            self._change(doc, -1)
            if self.counted is not None:
                self.counted.discard(doc_id)

    def _change(self, doc: dict, sign: int, data: Any = MISSING) -> None:
        days = self.days.get(doc.get("type"))
        if days is not None:
            before = len(days)
            add_measures(days, doc, sign, self.labels, data)
            self.version += 1
            if len(days) != before:
                self._sorted.pop(doc["type"], None)

    def load(self, pairs: list[tuple[int, dict]]) -> None:
        """Keep the ids of the loaded stats for the first count (`count_all`), run after start."""
        self.loaded = [doc_id for doc_id, doc in pairs if doc.get("type") in self.days]

    async def count_all(self, docs: dict) -> None:
        """Count the loaded records (once), giving the loop back between chunks."""
        if self.ready is None:
            self.ready = asyncio.Event()
            budget, loaded, self.loaded = LoopBudget(), self.loaded, []
            for doc_id in loaded:
                doc = docs.get(doc_id)
                if doc is not None and doc_id not in self.counted:
                    self.added(doc_id, doc)
                await budget.spend()
            self.counted = None
            self.ready.set()
        await self.ready.wait()

    def dates(self, kind: str) -> list[str]:
        """The days that have sums for this type, in order."""
        found = self._sorted.get(kind)
        if found is None:
            found = self._sorted[kind] = sorted(self.days[kind])
        return found


def release_free_memory() -> None:
    """Hand the pages that freed records left inside the C heap back to the system (glibc only)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


class DataPacker(RecordView):
    """The stats whose `data` is still plain JSON bytes, waiting to be compressed (`pack_waiting`).

    Records arrive plain (loading and writing stay fast) and are packed later,
    in a thread: a stat then costs a third of the memory, and reading its
    data costs one decompression. `waiting_bytes` is about how much plain data waits.
    """

    CHUNK = 512
    PLAIN = (bytes, memoryview)
    SAMPLES = 8  # stats of a type whose data make its preset dictionary

    def __init__(self):
        self.waiting: list[dict] = []
        self.waiting_bytes = 0
        self.dictionaries: dict[str, int] = {}  # type -> its index in PACK_DICTIONARIES
        self.samples: dict[str, list[bytes]] = {}  # type -> the data seen so far, until its dictionary is made

    def added(self, doc_id: int, doc: dict, data: Any = MISSING) -> None:
        """Put a new stat whose data is plain JSON in the waiting list."""
        if doc.get("data").__class__ in self.PLAIN:
            self.waiting.append(doc)
            self.waiting_bytes += len(doc["data"])

    def removed(self, doc_id: int, doc: dict) -> None:
        """Nothing: a removed record is packed for nothing at worst."""
        pass  # a removed record is packed for nothing at worst

    def load(self, pairs: list[tuple[int, dict]]) -> None:
        """Every loaded stat waits to be packed."""
        self.waiting = [doc for _, doc in pairs if doc.get("data").__class__ in self.PLAIN]
        self.waiting_bytes = sum(len(doc["data"]) for doc in self.waiting)

    async def pack_waiting(self, keep_going: Callable[[], bool] = lambda: True) -> int:
        """Pack the waiting records, a chunk at a time in a thread, while `keep_going()`; the number packed."""
        loop, packed = asyncio.get_running_loop(), 0
        while self.waiting and keep_going():
            docs, self.waiting = self.waiting[:self.CHUNK], self.waiting[self.CHUNK:]
            docs = [doc for doc in docs if doc.get("data").__class__ in self.PLAIN]
            plain = [doc["data"] for doc in docs]
            self.waiting_bytes = max(0, self.waiting_bytes - sum(map(len, plain))) if self.waiting else 0
            presets = [self._dictionary(doc.get("type"), raw) for doc, raw in zip(docs, plain)]
            done = await loop.run_in_executor(None, lambda: [pack_data(raw, d) for raw, d in zip(plain, presets)])
            for doc, raw, value in zip(docs, plain, done):
                if doc.get("data") is raw:  # (the same record, not since rewritten)
                    doc["data"] = value
                    packed += 1
        return packed

    def _dictionary(self, kind, raw) -> int:
        """The preset dictionary for a stat of type `kind` (0: none yet); the first SAMPLES stats of
        a type make its dictionary, while there are indexes left (one byte)."""
        found = self.dictionaries.get(kind)
        if found is not None:
            return found
        if kind.__class__ is not str or len(PACK_DICTIONARIES) > 255 or \
                (kind not in self.samples and len(self.samples) >= 256):
            return 0
        samples = self.samples.setdefault(kind, [])
        samples.append(bytes(raw[-PACK_DICTIONARY_SIZE:]))
        if len(samples) < self.SAMPLES and sum(map(len, samples)) < PACK_DICTIONARY_SIZE:
            return 0
        del self.samples[kind]
        PACK_DICTIONARIES.append(b"".join(samples)[-PACK_DICTIONARY_SIZE:])
        self.dictionaries[kind] = len(PACK_DICTIONARIES) - 1
        return self.dictionaries[kind]


class Store:
    """The database: tables in memory, a journal for durability, a TinyDB file as checkpoint.

    A write applies its changes in memory at once, then `commit` appends them
    to the journal as one line and waits for the fsync that covers it;
    concurrent writers share one fsync. When the journal outgrows the last
    checkpoint, the journal is set aside and a fresh one takes new writes
    while a snapshot of the tables is written to the TinyDB file in a thread;
    the set-aside journal is deleted once that file is in place.

    Handlers, commands and the dashboard use only the methods under "reading"
    and "writing" (records by key, lists, aggregates, commit): the seam where a
    store on an SQL server could take this one's place.
    """

    MIN_CHECKPOINT_BYTES = 8 * 1024 * 1024

    def __init__(self, path: str):
        self.path = path
        self.journal_path = path + ".journal"
        self.folding_path = path + ".journal.folding"  # the journal a running checkpoint replaces
        self.lock_path = path + ".lock"
        self._lock_fd: int | None = None
        self._journal_fd: int | None = None
        self._journal_size = 0
        self._checkpoint_at = self.MIN_CHECKPOINT_BYTES
        self._pending: list[tuple[bytes, asyncio.Future]] = []
        self._wake: asyncio.Event | None = None
        self._writable: asyncio.Event | None = None
        self._flusher: asyncio.Task | None = None
        self._packer: asyncio.Task | None = None
        self._checkpointer: asyncio.Task | None = None
        self._extra_tables: dict = {}
        self._closing = False
        self._broken: str | None = None
        self.open_seconds = 0.0  # what the last open took
        self.last_checkpoint: str | None = None  # UTC time of the last checkpoint written
        # changes with every write to the organizations and every reload: a caller resolved at an
        # earlier version may have lost its key, its admin role or its organization since
        self.organizations_version = 0
        self.writes = 0  # transactions applied since start (the packer waits for a pause in them)
        self._new_tables()

    def _new_tables(self) -> None:
        self._use_tables(self._empty_tables())

    @staticmethod
    def _empty_tables() -> dict[str, RecordTable]:
        stats = RecordTable("stats", key=STAT_KEY, unique=STAT_UNIQUE, indexed=STAT_INDEXED, shared=STAT_SHARED,
                            deferred=STAT_PERIODS)
        stats.views = [StatDates(), StatAggregates(), DataPacker()]
        return {"organizations": RecordTable("organizations", key="name", unique=("token_sha256",), indexed=("is_admin",)),
                "stats": stats}

    def _use_tables(self, tables: dict[str, RecordTable]) -> None:
        self.tables = tables
        self.organizations_version += 1
        self.orgs, self.stats = tables["organizations"], tables["stats"]
        self.dates, self.aggregates, self.packer = self.stats.views

    # reading

    def stat(self, stat_id: str) -> dict | None:
        """The stat with this id."""
        return self.stats.get(stat_id)

    def stat_with_uuid(self, uuid: str) -> dict | None:
        """The stat with this uuid, or None."""
        return self.stats.find_unique("uuid", uuid)

    def organization(self, name: str) -> dict | None:
        """The organization named `name`, or None."""
        return self.orgs.get(name)

    def organization_with_token(self, token_sha256: str) -> dict | None:
        """The organization whose API key has this SHA-256."""
        return self.orgs.find_unique("token_sha256", token_sha256)

    def organizations(self) -> list[dict]:
        """Every organization, in creation order."""
        return list(self.orgs.docs.values())

    def admins(self) -> list[dict]:
        """The admin organizations."""
        return [doc for doc in self.orgs.docs.values() if doc.get("is_admin")]

    def count_stats(self, organization: str | None = None) -> int:
        """How many stats there are (of one organization)."""
        if organization is None:
            return len(self.stats.docs)
        return len(self.stats.indexes["organization"].lookup(organization))

    async def find(self, table: str, query: "Query") -> tuple[list[dict], bool]:
        """A page of the records of "stats" or "organizations" that match `query`, and whether more follow."""
        return await run_query(self.tables[table], query, self.stats_by_date if table == "stats" else None)

    def stats_of(self, *, organization: str | None = None, anr: Any = MISSING) -> list[dict]:
        """The stats of an organization and/or an analysis, in creation order."""
        id_sets = []
        if organization is not None:
            id_sets.append(self.stats.indexes["organization"].lookup(organization))
        if anr is not MISSING:
            id_sets.append(self.stats.indexes["anr"].lookup(anr) if _indexable(anr) else {})
        smallest, *others = sorted(id_sets, key=len) if id_sets else [self.stats.docs]
        return [self.stats.docs[i] for i in smallest if all(i in other for other in others)]

    def stats_between(self, kind: str, date_from: str | None = None, date_to: str | None = None, *,
                      organization: str | None = None, anrs: Iterable | None = None) -> list[dict]:
        """The stats of one type dated within the bounds, of one organization and/or some analyses, by date."""
        docs = self.stats.docs
        found = (docs[i] for i in self.dates.between(kind, date_from, date_to, organization=organization, anrs=anrs))
        if anrs is not None and organization is not None:
            return [doc for doc in found if doc.get("organization") == organization]
        return list(found)

    def stat_types(self) -> list[str]:
        """The types that stats have, sorted."""
        return sorted(key[0] for key in self.dates.lists if len(key) == 1 and isinstance(key[0], str))

    def count_between(self, kind: str, date_from: str | None = None, date_to: str | None = None, *,
                      organization: str | None = None) -> int:
        """How many stats of one type are dated within the bounds (of one organization)."""
        start, end = self.dates.span(self.dates.lists_of(kind, organization, None)[0], date_from, date_to)
        return end - start

    def activity(self, organization: str | None) -> dict:
        """{"analyses" (sorted by their text), "stats", "latest" (date or None)} of an organization
        (None: of the stats that belong to none)."""
        analyses, count, latest = set(), 0, None
        for kind in self.stat_types():
            entries = self.dates.lists.get((kind, "organization", organization))
            if entries:
                count += len(entries)
                latest = max(latest or "", entries[-1][0])
                analyses.update(anr for anr in self.dates.anrs.get((kind, organization), {}) if anr is not None)
        return {"analyses": sorted(analyses, key=str), "stats": count, "latest": latest}

    def stats_by_date(self, kinds: Callable[[Any], bool], *, organization: str | None = None, anr: Any = MISSING,
                      date_from: str | None = None, date_to: str | None = None) -> tuple[list[list], list[int]]:
        """What an ordered walk by date reads: lists of (date, doc_id), each in order, that together
        hold every stat dated within the bounds whose type passes `kinds` (of the analysis, else of
        the organization), and the doc ids of the stats with no `date` (in those lists by the day of
        stat_date). Both are copies: the caller may yield to writers while it reads them."""
        return self.dates.walk(kinds, organization, anr, date_from, date_to), list(self.dates.undated)

    def has_stats(self, kind: str, date_from: str | None = None, date_to: str | None = None, *,
                  organization: str | None = None, anrs: Iterable | None = None) -> bool:
        """Whether stats_between would find any (of another organization too, when anrs are given)."""
        return self.dates.any_between(kind, date_from, date_to, organization=organization, anrs=anrs)

    def latest_stats(self, kind: str, *, organization: str | None = None, anrs: Iterable | None = None) -> list[dict]:
        """Per analysis, its stat of this type with the latest date (the newest created on a tie), in creation order."""
        docs, found = self.stats.docs, []
        if anrs is None:
            anrs = list(self.dates.anrs.get((kind,) if organization is None else (kind, organization), {}))
        for anr in anrs:
            latest, best = None, None  # the analysis's latest date, and (created_at, doc_id, doc) on it
            for day, doc_id in self.dates.latest_first(kind, anr):
                if latest is not None and day < latest:
                    break
                doc = docs[doc_id]  # (an analysis uuid could be sent by another organization too)
                if organization is not None and doc.get("organization") != organization:
                    continue
                latest = day
                if best is None or (doc["created_at"], doc_id) > best[:2]:
                    best = (doc["created_at"], doc_id, doc)
            if best is not None:
                found.append(best[1:])
        return [doc for _, doc in sorted(found, key=operator.itemgetter(0))]

    async def measures_by_day(self, kind: str, date_from: str | None = None, date_to: str | None = None, *,
                              organization: str | None = None, anrs: Iterable | None = None) -> list[tuple[str, dict]]:
        """(day, key -> [count, exact sums...]) of the days with measures, in order (see add_measures).

        Over every organization these are the kept aggregates; for one
        organization or some analyses, the chosen stats are read, giving the
        loop back as they are.
        """
        await self.aggregates.count_all(self.stats.docs)
        if organization is None and anrs is None:
            days, dates = self.aggregates.days.get(kind, {}), self.aggregates.dates(kind)
            low = bisect.bisect_left(dates, date_from) if date_from else 0
            high = bisect.bisect_right(dates, date_to) if date_to else len(dates)
            return [(day, days[day]) for day in dates[low:high]]
        found: dict[str, dict] = {}
        budget = LoopBudget()
        for doc in self.stats_between(kind, date_from, date_to, organization=organization, anrs=anrs):
            add_measures(found, doc, 1)
            await budget.spend()
        return sorted(found.items())

    def stats_after(self, position: int) -> list[tuple[int, dict]]:
        """(position, stat) of the stats stored after `position` (0: all), in the order they were stored."""
        return [(doc_id, doc) for doc_id, doc in self.stats.docs.items() if doc_id > position]

    def snapshot(self) -> tuple[list[dict], list[dict]]:
        """Every organization and every stat as they are at this instant (records are never changed in place)."""
        return list(self.orgs.docs.values()), list(self.stats.docs.values())

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
        """Lock, load the file, replay and fold the journals, open a fresh journal."""
        if self._lock_fd is None:
            self.lock()
        folder = os.path.dirname(os.path.abspath(self.path))
        started = time.perf_counter()
        replayed = self._load()
        if replayed or not os.path.exists(self.path):
            self._write_checkpoint(self._snapshot_tables())
        for path in (self.folding_path, self.journal_path):
            if os.path.exists(path):
                os.unlink(path)
                _fsync_folder(folder)
        self._journal_fd = os.open(self.journal_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        _fsync_folder(folder)  # the journal's entry must survive a power cut too
        self._journal_size = 0
        self._checkpoint_at = max(self.MIN_CHECKPOINT_BYTES, os.path.getsize(self.path))
        self.open_seconds = time.perf_counter() - started  # load, journal replay and fold

    def _load(self) -> int:
        """Fill memory from the checkpoint and the journals; the number of journal lines.

        The tables in use are replaced only once everything was read.
        """
        tables = self._empty_tables()
        gc.disable()  # millions of new objects: collecting meanwhile triples the load time
        try:
            extra_tables = read_checkpoint(self.path, tables)
            replayed = sum(self._replay(tables, path) for path in (self.folding_path, self.journal_path))
            self._extra_tables = extra_tables
            self._use_tables(tables)
            return replayed
        finally:
            gc.enable()
            gc.freeze()  # the records live long: keep them out of every later collection

    def _replay(self, tables: dict[str, RecordTable], path: str) -> int:
        """Apply a journal's transactions; cut a torn last line, refuse a corrupt middle.

        Replaying a transaction that the checkpoint already holds changes
        nothing, so a journal may overlap the checkpoint.
        """
        try:
            with open(path, "rb") as f:
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
                                path, len(rest))
                    break
                raise StorageError(f"journal {path} is corrupt at byte {offset};"
                                   " statsd refuses to guess: restore a backup, or move the journal"
                                   " away to start from the last checkpoint")
            for table, doc_id, doc in ops:
                data = serialize_data(table, doc)
                tables[table].apply(doc_id, doc, data)
            count += 1
            offset = end + 1
        return count

    def _snapshot_tables(self) -> dict[str, list[tuple[int, dict]]]:
        """The tables at this instant, for a checkpoint: taken on the loop, written in a thread."""
        return {name: list(table.docs.items()) for name, table in self.tables.items()}

    def _write_checkpoint(self, snapshot: dict[str, list[tuple[int, dict]]]) -> int:
        write_atomically(self.path, b"".join(checkpoint_lines(self._extra_tables, snapshot)))
        self.last_checkpoint = utcnow()
        return os.path.getsize(self.path)

    def file_sizes(self) -> dict[str, int]:
        """Bytes of the database file and of its journals."""
        sizes = {}
        for name, path in (("database", self.path), ("journal", self.journal_path), ("folding", self.folding_path)):
            try:
                sizes[name] = os.path.getsize(path)
            except OSError:
                sizes[name] = 0
        return sizes

    async def start(self) -> None:
        """Open (in a thread: loading a large file takes seconds), then start the task that writes the journal."""
        await asyncio.get_running_loop().run_in_executor(None, self.open)
        self._wake = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self._closing = False
        self._flusher = asyncio.create_task(self._flush_forever())
        self._packer = asyncio.create_task(self._pack_forever())

    async def close(self) -> None:
        """Write what is pending, fold the journal into the file, release the lock."""
        if self._packer is not None:
            self._packer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._packer
            self._packer = None
        if self._flusher is not None:
            self._closing = True  # the flusher finishes what it does, drains, and ends
            self._wake.set()
            await self._flusher
            self._flusher = None
        if self._checkpointer is not None:
            await self._checkpointer
            self._checkpointer = None
        if self._journal_fd is not None and self._broken is not None:
            log.error("not folding the journal into %s: memory may be behind the disk since"
                      " %s; the journal is kept and replayed at the next start", self.path, self._broken)
            os.close(self._journal_fd)
            self._journal_fd = None
        if self._journal_fd is not None:
            try:
                if self._journal_size or os.path.exists(self.folding_path):  # else the file holds everything
                    self._write_checkpoint(self._snapshot_tables())
                os.ftruncate(self._journal_fd, 0)
                os.close(self._journal_fd)
                for path in (self.journal_path, self.folding_path):
                    if os.path.exists(path):
                        os.unlink(path)
            except OSError as e:
                log.error("could not fold the journal into %s (%s); it is kept and will be"
                          " replayed at the next start", self.path, e)
            self._journal_fd = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # writing

    async def writable(self) -> None:
        """Wait while the store reloads after a failed write."""
        if not self._writable.is_set():
            await self._writable.wait()

    def apply(self, ops: list[tuple[str, int, dict | None]]) -> asyncio.Future:
        """Apply `ops` (table, doc_id, record or None) in memory now; the future is done when they are on disk.

        Call it with no await between the checks that justify the ops and this call.
        """
        if self._broken is not None:
            raise StorageError(f"the database cannot be written since an earlier failure"
                               f" ({self._broken}); restart statsd")
        if not self._writable.is_set():
            raise StorageError("the database is reloading after a failed write; try again")
        parsed = [serialize_data(table, doc) for table, _, doc in ops]
        if any(table == "organizations" for table, _, _ in ops):
            self.organizations_version += 1  # (callers resolved before this write are resolved again)
        line = _encode_journal_line(ops)
        self.writes += 1
        for (table, doc_id, doc), data in zip(ops, parsed):
            self.tables[table].apply(doc_id, doc, data)
        future = asyncio.get_running_loop().create_future()
        self._pending.append((line, future))
        self._wake.set()
        return future

    async def commit(self, changes: list[tuple[str, str, dict | None]]) -> None:
        """Store `changes`, each (table, key, record or None to delete), as one transaction.

        The key is a stat's id or an organization's name. Returns once the
        changes are durable (raises StorageError if not): with no changes, once
        every earlier write is. Call it with no await between the checks that
        justify the changes and this call.
        """
        ops, new = [], {}
        for table_name, key, doc in changes:
            table = self.tables[table_name]
            doc_id = table.doc_id(key)
            if doc_id is None:
                doc_id = new.get((table_name, key))
            if doc_id is None:
                if doc is None:
                    continue
                doc_id = new[(table_name, key)] = table.new_doc_id()
            ops.append((table_name, doc_id, doc))
        await self.apply(ops)

    PACK_PAUSE = 1.0  # seconds between two passes of the packer
    PACK_BACKLOG = 64 << 20  # bytes of plain data that may wait for a pause in the writes

    async def _pack_forever(self) -> None:
        """Fill deferred indexes and compress new records' data in the background; give freed memory back.

        Packing beside a run of writes slows each write by a fifth (its thread, and the GIL passed
        back and forth), so new records wait for a pass with no write (PACK_PAUSE), unless
        PACK_BACKLOG bytes wait; the loaded records are packed at once.
        """
        loop, first, seen = asyncio.get_running_loop(), True, -1
        while True:
            for index in self.stats.indexes.values():
                await index.fill()  # the deferred ones; the others return at once
            quiet = self.writes

            def keep_going() -> bool:
                return first or self.writes == quiet or self.packer.waiting_bytes >= self.PACK_BACKLOG // 2

            if first or quiet == seen or self.packer.waiting_bytes >= self.PACK_BACKLOG:
                packed = await self.packer.pack_waiting(keep_going)
                if first or packed >= 10_000:
                    gc.freeze()  # the packed records live long too: out of every later collection
                    await loop.run_in_executor(None, release_free_memory)
                    first = False
            seen = self.writes
            await asyncio.sleep(self.PACK_PAUSE)

    async def _flush_forever(self) -> None:
        """The only writer of the journal: one flush at a time; checkpoints run beside it."""
        while not self._closing:
            await self._wake.wait()
            self._wake.clear()
            await self._flush_pending()
            if self._journal_size >= self._checkpoint_at and self._checkpointer is None and not self._closing:
                self._start_checkpoint()
        await self._flush_pending()

    async def _flush_pending(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            batch, self._pending = self._pending, []
            data = b"".join(line for line, _ in batch)
            try:
                await loop.run_in_executor(None, self._append, data)
            except Exception as e:  # noqa: BLE001 - whatever it was, these writes are not on disk
                await self._recover(batch, e)
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

    async def _recover(self, batch, error: Exception) -> None:
        """A journal write failed: fail every write not on disk and reload what is (in a thread)."""
        failed = batch + self._pending
        self._pending = []
        log.error("journal write failed (%s); %d write(s) refused, reloading from disk",
                  error, len(failed))
        self._writable.clear()  # no write may land in tables about to be replaced
        try:
            if self._checkpointer is not None:
                await asyncio.shield(self._checkpointer)
            await asyncio.get_running_loop().run_in_executor(None, self._load)
        except Exception as e:  # noqa: BLE001 - memory may now be ahead of the disk
            log.critical("reloading %s failed (%s): refusing every write until restart", self.path, e)
            self._broken = str(e)
        finally:
            self._writable.set()
        reason = getattr(error, "strerror", None) or error
        exc = StorageError(f"the database could not be written ({reason});"
                           " nothing of this request was stored", getattr(error, "errno", None))
        for _, future in failed:
            if not future.done():
                future.set_exception(exc)

    def _start_checkpoint(self) -> None:
        """Set the journal aside, start a fresh one, and write a snapshot of the tables in the background.

        Runs between two flushes, so every line is in one journal or the other;
        the snapshot holds at least what the set-aside journal holds.
        """
        try:
            if os.path.exists(self.folding_path):  # the last checkpoint failed: add to what it left
                with open(self.journal_path, "rb") as f:
                    lines = f.read()
                fd = os.open(self.folding_path, os.O_WRONLY | os.O_APPEND)
                try:
                    _write_all(fd, lines)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.ftruncate(self._journal_fd, 0)  # a crash before this replays the lines twice: harmless
                os.fsync(self._journal_fd)
                fd = None
            else:
                os.replace(self.journal_path, self.folding_path)
                fd = os.open(self.journal_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                _fsync_folder(os.path.dirname(os.path.abspath(self.path)))
        except OSError as e:
            log.error("checkpoint of %s not started (%s); the journal is kept", self.path, e)
            self._checkpoint_at = self._journal_size + self.MIN_CHECKPOINT_BYTES
            return
        if fd is not None:
            os.close(self._journal_fd)
            self._journal_fd = fd
        self._journal_size = 0
        snapshot = self._snapshot_tables()
        self._checkpointer = asyncio.create_task(self._checkpoint(snapshot))

    async def _checkpoint(self, snapshot: dict) -> None:
        """Write `snapshot` to the TinyDB file, then drop the set-aside journal."""
        try:
            size = await asyncio.get_running_loop().run_in_executor(None, self._write_checkpoint, snapshot)
            os.unlink(self.folding_path)
            self._checkpoint_at = max(self.MIN_CHECKPOINT_BYTES, size)
        except Exception as e:  # noqa: BLE001 - both journals still hold every write
            log.error("checkpoint of %s failed (%s); the journals are kept", self.path, e)
            self._checkpoint_at = self._journal_size + self.MIN_CHECKPOINT_BYTES
        finally:
            self._checkpointer = None
            if self._wake is not None:
                self._wake.set()


def as_record(table: str, doc: dict | None) -> dict | None:
    """A record read from JSON as it is kept in memory (a stat's `data` serialized)."""
    serialize_data(table, doc)
    return doc


def serialize_data(table: str, doc: dict | None):
    """Keep a new stat's `data` as JSON bytes, in place; the parsed value it had (MISSING if none).

    The parsed value goes to the table's views, so a write parses nothing twice.
    """
    if table == "stats" and isinstance(doc, dict) and "data" in doc and doc["data"].__class__ not in SERIALIZED:
        parsed = doc["data"]
        if parsed.__class__ is CheckedData:  # (checked in a body: serialized already)
            doc["data"] = parsed.json
            return parsed.value
        doc["data"] = orjson.dumps(parsed)
        return parsed
    return MISSING


CHECKPOINT_MARK = b'{"_statsd":{"1":{"layout":"one record per line, data last"}},\n'


def checkpoint_lines(extra_tables: dict, snapshot: dict[str, list[tuple[int, dict]]]) -> Iterable[bytes]:
    """The TinyDB file, one record per line with its `data` last, so that loading reads a line at a time."""
    yield CHECKPOINT_MARK
    for name, table in extra_tables.items():
        if name != "_statsd":
            yield b"%s:%s,\n" % (orjson.dumps(name), dumps(table))
    for t, (name, pairs) in enumerate(snapshot.items()):
        yield b"%s:{\n" % orjson.dumps(name)
        for i, (doc_id, doc) in enumerate(pairs):
            if "data" in doc:
                data = json_data(doc["data"])
                head = orjson.dumps({k: v for k, v in doc.items() if k != "data"})
                line = head[:-1] + (b',"data":' if len(head) > 2 else b'"data":') + data + b"}"
            else:
                line = dumps(doc)
            yield b'"%d":%s%s\n' % (doc_id, line, b"," if i + 1 < len(pairs) else b"")
        yield b"}}\n" if t + 1 == len(snapshot) else b"},\n"


def read_checkpoint(path: str, tables: dict[str, RecordTable]) -> dict:
    """Fill `tables` from the TinyDB file (any TinyDB JSON file; fastest in statsd's own layout).

    Returns the file's other tables, which are kept as they are.
    """
    storage = AtomicJSONStorage(path)
    keys = {name: table.key for name, table in tables.items()}
    try:
        with storage.open_raw() as f:
            rows = _checkpoint_rows(_blocks(f), keys) if f.read(len(CHECKPOINT_MARK)) == CHECKPOINT_MARK else None
    except FileNotFoundError:
        return {}
    if rows is None:
        data = storage.read() or {}
        rows = {name: _plain_pairs(path, name, table, keys[name]) if name in tables else table
                for name, table in data.items()}
    extra = {}
    for name, rows_of in rows.items():
        if name in tables:
            tables[name].load(rows_of)
        else:
            extra[name] = rows_of
    return extra


def _plain_pairs(path: str, name: str, table, key: str) -> list[tuple[int, dict]]:
    """(doc_id, record) of a table of a plain TinyDB file; StorageError if one is not a statsd record."""
    if not isinstance(table, dict):
        raise StorageError(f"{path}: table {name} is not a TinyDB table; the file was left untouched")
    pairs = []
    for doc_id, doc in table.items():
        if not (doc_id.isdigit() and isinstance(doc, dict) and isinstance(doc.get(key), str)):
            raise StorageError(f"{path}: table {name}, document {doc_id} is not a"
                               f" statsd record; the file was left untouched")
        pairs.append((int(doc_id), as_record(name, doc)))
    return pairs


BLOCK = 8 << 20  # bytes of the file read at once when loading


def _blocks(f) -> Iterable[tuple[bytes, int]]:
    """The rest of file `f` as (block, end): blocks of about BLOCK bytes read once each, whose
    first `end` bytes are whole lines (the partial line after them is read again with the next).

    Records keep views of their block, so a block's memory goes back whole,
    and soon, once its records are packed (one block the size of the file
    would go back in one long unmapping, on the loop). Nothing is copied:
    the file is read once, at C speed, whatever its size.
    """
    size = BLOCK
    while True:
        at = f.tell()
        block = f.read(size)
        if not block:
            return
        end = block.rfind(b"\n") + 1
        if end == 0 and len(block) == size:  # a line longer than the block: read it whole
            f.seek(at)
            size *= 2
            continue
        end = end or len(block)  # (the last line, without its newline)
        yield block, end
        f.seek(at + end)
        size = BLOCK


def _checkpoint_rows(blocks: Iterable[tuple[bytes, int]], keys: dict[str, str]) -> dict | None:
    """name -> [(doc_id, record)] (the tables of `keys`, table -> key field) or other table, from a file in
    statsd's layout (after its mark); None if it is not (or holds a record that is not statsd's).

    Each stat's `data` is left in its block of the file, as a memoryview: nothing is copied.
    """
    rows: dict[str, Any] = {}
    current = None
    try:
        for raw, stop in blocks:
            current = _block_rows(raw, stop, rows, keys, current)
    except (ValueError, KeyError, IndexError) as e:
        log.warning("%s: not in statsd's own layout (%s); reading it as plain TinyDB JSON", "checkpoint", e)
        return None
    return rows


def _block_rows(raw: bytes, stop: int, rows: dict, keys: dict[str, str], current: tuple | None) -> tuple | None:
    """Add the records of the whole lines before `stop` of one block to `rows`; (its list, its key field)
    of the table being read at their end (None between tables). ValueError at a line that is not statsd's.

    One line a record: `"doc_id":{fields...,"data":...}`. (The hot loop of a load: a line at a time, inline.)
    """
    view, find, loads = memoryview(raw), raw.find, orjson.loads
    start = 0
    while start < stop:
        end = find(b"\n", start, stop)
        if end == -1:
            end = stop
        line, start = start, end + 1
        if current is None:
            text = raw[line:end]
            if text.endswith(b":{"):
                name = loads(text[:-2])
                key = keys.get(name)  # (another table is kept as it is: a TinyDB table, whole records)
                rows[name] = found = [] if key is not None else {}
                current = (found, key)
                continue
            name, _, value = text.rstrip(b",").partition(b":")
            rows[loads(name)] = loads(value)
            continue
        if end - line <= 2 and raw[line:end] in (b"}", b"},", b"}}"):
            current = None
            continue
        if raw[end - 1] == 44:  # ","
            end -= 1
        colon = raw.index(b'":', line, end)
        doc_id, body = raw[line + 1:colon], colon + 2
        if not doc_id.isdigit():
            raise ValueError(f"document id {doc_id!r} is not a number")
        found, key = current
        at = find(b',"data":', body, end) if raw[body] == 123 and key is not None else -1  # "{"
        if at == -1 and key is not None and raw.startswith(b'{"data":', body, end):
            at = body
        if at >= 0 and raw[end - 1] == 125:  # "}"
            doc = loads(raw[body:at] + b"}") if at > body else {}
            doc["data"] = view[(at + 8 if at > body else body + 8):end - 1]
        else:
            doc = loads(raw[body:end])
        if key is None:
            found[doc_id.decode()] = doc
        elif doc.__class__ is dict and doc.get(key).__class__ is str:
            found.append((int(doc_id), doc))
        else:
            raise ValueError(f"document {doc_id.decode()} is not a statsd record")
    return current


def _encode_journal_line(ops) -> bytes:
    body = dumps(ops)
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
    """The SHA-256 hex digest of an API key: what the database keeps of it."""
    return hashlib.sha256(token.encode()).hexdigest()


# ---------------------------------------------------- validation of bodies ---

PERIOD_FIELDS = (*PERIODS, "year")


@functools.lru_cache(maxsize=4096)  # (a batch, and a day's collection, share their date; callers only read it)
def periods_of(day: str) -> dict:
    """The periods of a YYYY-MM-DD date: day of year, ISO week, month, quarter, year."""
    moment = date.fromisoformat(day)
    return {"day": moment.timetuple().tm_yday, "week": moment.isocalendar().week, "month": moment.month,
            "quarter": (moment.month - 1) // 3 + 1, "year": moment.year}


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


def derive_periods(clean: dict, body: dict) -> None:
    """A write that sets `date` and no period field gets the periods of that date."""
    if "date" in clean and not any(name in body for name in PERIOD_FIELDS):
        clean.update(periods_of(clean["date"]))


def _link_path_matches(value, path: str) -> bool:
    """Whether a link string sent back points at `path` (the host may differ)."""
    found = re.search(r"href='([^']*)'", value) if isinstance(value, str) else None
    return bool(found) and urlsplit(found.group(1)).path == path


# ------------------------------------------------------------------ routes ---
# Each handler carries its route: @route(METHOD, path, OpenAPI facts). ROUTES then
# builds the router (create_app) and the OpenAPI document (openapi_document).

ERRORS_PUBLIC = (400, 429, 500)  # the error statuses of a route that needs no key
ERRORS_READ = (400, 401, 429, 500)
ERRORS_WRITE = (400, 401, 409, 413, 415, 429, 500, 503, 507)
ERRORS_DELETE = (400, 401, 429, 500, 503, 507)
ERRORS_V1 = (400, 401, 403, 426, 429, 500)
ERRORS_V1_WRITE = ERRORS_V1 + (413, 415, 503, 507)
ADMIN, NOT_FOUND = (403,), (404,)
LOCATION_HEADER = {"Location": {"schema": {"type": "string"}, "description": "URL of the new object"}}


@dataclass
class Route:
    """One route: its method, its path as documented, its handler and the facts of its OpenAPI operation.

    A path ending in "/" (other than "/") is served with and without that slash.
    A schema is named (str: a component), listed (tuple: any of those components)
    or written out (dict).
    """

    method: str
    path: str
    handler: Callable
    summary: str | None = None  # None: left out of the OpenAPI document (the dashboard's HTML pages)
    params: tuple = ()  # names of parameters (see _oa_parameters)
    body: Any = None  # the schema of the request body
    body_required: bool = True
    ok: tuple = ()  # (status, description[, schema[, headers]]) of each success
    errors: tuple = ()  # the error statuses
    responses: dict | None = None  # the responses written out, in place of ok and errors
    public: bool = False  # needs no API key
    when: Callable[[Config], bool] | None = None  # served only when this holds of the config

    def forms(self) -> tuple[str, ...]:
        """The paths that reach it: with its trailing slash first (the form links use), then without."""
        return (self.path, self.path[:-1]) if self.path.endswith("/") and self.path != "/" else (self.path,)


class Routes:
    """Every route of the app, each declared once on its handler."""

    def __init__(self):
        self.all: list[Route] = []

    def route(self, method: str, path: str, **facts) -> Callable:
        """A decorator declaring that `method path` is answered by the function it decorates."""
        def declare(handler):
            self.all.append(Route(method, path, handler, **facts))
            return handler
        return declare

    def served(self, config: Config) -> list[Route]:
        """The routes an app with `config` serves; fixed paths before those with {placeholders}."""
        return sorted((r for r in self.all if r.when is None or r.when(config)), key=lambda r: "{" in r.path)

    def add_to(self, app: web.Application, config: Config) -> None:
        """Register the served routes: one resource per path form, holding all its methods (a wrong
        method is then a 405); GET brings HEAD, which aiohttp answers without the body."""
        resources: dict[str, web.Resource] = {}
        for r in self.served(config):
            for form in r.forms():
                if form not in resources:
                    resources[form] = app.router.add_resource(form)
                resources[form].add_route(r.method, r.handler)
                if r.method == "GET":
                    resources[form].add_route("HEAD", r.handler)

    @functools.cached_property
    def public_paths(self) -> frozenset[str]:
        """The paths of the routes that need no key (read once every route is declared)."""
        return frozenset(form for r in self.all if r.public for form in r.forms())


ROUTES = Routes()
route = ROUTES.route
DASHBOARD_PREFIX = "/dashboard"  # the dashboard's pages (and `/`, its overview)


def is_dashboard_path(path: str) -> bool:
    """Whether a path is the dashboard's (`/` included)."""
    return path == "/" or path == DASHBOARD_PREFIX or path.startswith(DASHBOARD_PREFIX + "/")

# ------------------------------------------- auth and rate-limit middleware ---

@dataclass
class Caller:
    """Who is asking: an organization (or None with authentication off)."""

    organization: str | None
    is_admin: bool
    token_sha256: str | None = None  # to look the key up again after an await

    @property
    def scope(self) -> str | None:
        """The one organization whose stats this caller sees, or None: an admin sees every organization's."""
        return None if self.is_admin else self.organization

    def sees(self, organization: str | None) -> bool:
        """Whether this caller may see the stats of `organization`."""
        return self.is_admin or organization == self.organization


CONFIG_KEY = web.AppKey("config", Config)
STORE_KEY = web.AppKey("store", Store)
IDS_KEY = web.AppKey("ids", IdGenerator)
RATE_LIMIT_KEY = web.AppKey("rate_limit", object)
TRUSTED_PROXIES_KEY = web.AppKey("trusted_proxies", list)
LIMITER_KEY = web.AppKey("limiter", Limiter)
CALLER_KEY = web.RequestKey("caller", Caller)
CALLER_VERSION_KEY = web.RequestKey("caller_version", int)  # Store.organizations_version when the caller was resolved
LIMIT_HEADERS_KEY = web.RequestKey("limit_headers", dict)  # for answers whose headers leave before the handler returns
STAT_VIEWS_KEY = web.AppKey("stat_views", object)
STAT_QUERIES_KEY = web.AppKey("stat_queries", object)
COUNTING_KEY = web.AppKey("counting", asyncio.Task)  # the first count of the aggregates
REQUESTS_KEY = web.AppKey("requests", list)  # [how many requests came so far] (see _keep_memory)
MEMORY_KEY = web.AppKey("memory", asyncio.Task)  # _keep_memory


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
    return web.Response(body=dumps(body), status=status, headers=headers,
                        content_type="application/json")


RATE_LIMIT_MAX_COUNTERS = 10000  # bounds the rate-limit memory: at most this many (client, endpoint) counters


@web.middleware
async def api_middleware(request: web.Request, handler):
    """Every request, in order: the rate limit, the caller, and errors as the JSON error object.

    One middleware rather than three, since every request pays for each one.
    """
    request.app[REQUESTS_KEY][0] += 1
    limit_headers = None
    if request.app[RATE_LIMIT_KEY] is not None and (request.path.startswith("/api/") or (
            is_dashboard_path(request.path) and request.app[CONFIG_KEY].dashboard != "off")):
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
    """Count an /api/ or dashboard request per client and endpoint: (its X-Rate-Limit-* headers, a 429 if over or None)."""
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
    """Set the request's Caller before its handler runs; routes that need no key are left alone.

    An /api/v1/ path that no route answers is a 404 or 405 whatever the key, as upstream.
    """
    path = request.path
    if not path.startswith("/api/") or path in ROUTES.public_paths:
        return
    if path.startswith(V1_PREFIX + "/") and request.match_info.http_exception is not None:
        return
    request[CALLER_KEY] = resolve_caller(request)
    request[CALLER_VERSION_KEY] = request.app[STORE_KEY].organizations_version


V1_UNAUTHORIZED = "Unauthorized - Authentication required."
V1_FORBIDDEN = "Forbidden - Authentication failed."
MONARC_MIN_VERSION = (2, 10, 2)
MONARC_AGENT_RE = re.compile(r"MONARC/([0-9]+(?:\.[0-9]+)*)")


def resolve_caller(request: web.Request) -> Caller:
    """The caller named by the request's API key as it stands now, or the refusal of the request's API.

    /api/v2/ refuses a missing or unknown key with 401. /api/v1/ refuses as upstream:
    426 for a MONARC older than 2.10.2 (by its User-Agent), then 401 without a key,
    403 with a wrong one. With api_key_authentication off every caller is an admin;
    in v1 a known key still names the organization that new stats and client/me belong to.
    """
    v1 = request.path.startswith(V1_PREFIX + "/")
    if v1:
        check_monarc_version(request)
    open_ = not request.app[CONFIG_KEY].api_key_authentication
    if open_ and not v1:
        return Caller(None, True)
    key = presented_key(request)
    known = _caller_for(request.app[STORE_KEY], key) if key is not None else None
    if open_:
        return Caller(known.organization if known else None, True)
    if known is None:
        if not v1:
            raise ApiError(401, "Unauthorized")
        raise ApiError(401, V1_UNAUTHORIZED) if key is None else ApiError(403, V1_FORBIDDEN)
    return known


def check_monarc_version(request: web.Request) -> None:
    """A MONARC older than 2.10.2 (by its User-Agent) gets 426, as upstream."""
    found = MONARC_AGENT_RE.search(request.headers.get("User-Agent", ""))
    if found and tuple(int(part) for part in found.group(1).split(".")) < MONARC_MIN_VERSION:
        raise ApiError(426, "Upgrade Required - This service requires use of MONARC version >= 2.10.2.")


def presented_key(request: web.Request) -> str | None:
    """The non-empty API key sent (X-API-KEY header or api_key argument), else None; 400 if sent twice."""
    keys = [k for k in one_key(request) if k]
    return keys[0] if keys else None


def sent_keys(request: web.Request) -> list[str]:
    """Every API key the request carries: X-API-KEY headers, then api_key arguments."""
    return request.headers.getall("X-API-KEY", []) + request.query.getall("api_key", [])


def one_key(request: web.Request) -> list[str]:
    """The API key sent, as a list of one (or none); 400 when more than one was sent."""
    keys = sent_keys(request)
    if len(keys) > 1:
        headers, arguments = len(request.headers.getall("X-API-KEY", [])), len(request.query.getall("api_key", []))
        raise bad_request(f"the API key is sent {len(keys)} times ({headers} X-API-KEY header(s),"
                          f" {arguments} api_key argument(s)); send it once, preferably as the X-API-KEY header")
    return keys


def _caller_for(store: Store, token: str) -> Caller | None:
    """The organization holding `token`; the hash is looked up, then compared in constant time."""
    try:
        digest = hash_token(token)
    except UnicodeEncodeError:  # header bytes that are not UTF-8 (kept as surrogates): no key holds them
        return None
    org = store.organization_with_token(digest)
    if org is None or not hmac.compare_digest(org["token_sha256"], digest):
        return None
    return Caller(org["name"], bool(org.get("is_admin")), digest)


# -------------------------------------------------------------- handlers ---
JSON_HEADERS = {"Content-Type": "application/json"}


def json_response(body, status: int = 200, headers=None) -> web.Response:
    """A JSON answer."""
    return web.Response(body=dumps(body), status=status,
                        headers={**JSON_HEADERS, **headers} if headers else JSON_HEADERS)


def _link(rel: str, title: str, url: str) -> str:
    return f"<link rel='{rel}' title='{title}' href='{url}'/>"


def stat_path(stat_id: str) -> str:
    """The path of a stat's URL."""
    return f"{API_PREFIX}/stats/{stat_id}/"


@functools.lru_cache(maxsize=4096)
def org_path(name: str) -> str:
    """The path of an organization's URL (its name percent-encoded)."""
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
    and MAX_BYTES of them are kept; when full, it starts over. Answers for an
    unusually long host name are not kept.
    """

    MAX = 20000
    MAX_BYTES = 24 << 20  # MONARC's threat lists make answers of 8 KB: 3,000 of them
    MAX_BASE = 256

    def __init__(self):
        self.entries: dict[str, tuple[dict, str, bytes]] = {}
        self.size = 0

    def of(self, base: str, doc: dict) -> bytes:
        """The JSON answer for `doc` (splice it into a page with orjson.Fragment)."""
        entry = self.entries.get(doc["id"])
        if entry is not None and entry[0] is doc and entry[1] == base:
            return entry[2]
        view = dumps(present_stat(base, doc))
        if len(base) > self.MAX_BASE:
            return view
        if len(self.entries) >= self.MAX or self.size + len(view) > self.MAX_BYTES:
            self.entries.clear()
            self.size = 0
        old = self.entries.get(doc["id"])
        if old is not None:
            self.size -= len(old[2])
        self.entries[doc["id"]] = (doc, base, view)
        self.size += len(view)
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
        """The parsed query of a request, from the kept ones when its query string was seen."""
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


def only_params(request: web.Request, *allowed: str) -> None:
    """Refuse query parameters a route does not take (the API key is always allowed)."""
    if not request.rel_url.raw_query_string:
        return
    for name in single_params(request.query):
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


async def read_object(request: web.Request, example: str = "") -> dict:
    """The request body as a JSON object, else a 400 (ending with `example`, the shape expected)."""
    body = await read_json(request)
    if not isinstance(body, dict):
        raise bad_request("the body must be a JSON object" + example)
    return body


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


CLIENT_FIELDS_SKIPPED = frozenset(("uuid", "organization", *STAT_READ_ONLY))  # checked on their own


def stat_client_fields(body: dict, errors: dict) -> dict:
    """The validated, normalized client fields of a body (uuid and organization aside)."""
    return validated_fields(body, STAT_CLIENT_FIELDS, errors, skip=CLIENT_FIELDS_SKIPPED)


def ordered_stat(values: dict) -> dict:
    """A stat record with its fields in one stable order."""
    return {name: values[name] for name in STAT_ORDER if name in values}


def new_stat(request: web.Request, body, now: str, also: dict | None = None) -> dict:
    """A new stat record from a posted object, or ApiError(400) naming what is wrong (and the errors `also` found)."""
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
        clean["uuid"] = new_uuid()
    organization = _stat_organization(request, body, errors)
    if organization is not None:
        clean["organization"] = organization
    errors.update(also or {})
    if errors:
        raise _fail(errors, "stat")
    return ordered_stat({**clean, "id": new_stat_id(request), "created_at": now, "updated_at": now})


def new_stat_id(request: web.Request) -> str:
    """A fresh id no stored stat holds."""
    store: Store = request.app[STORE_KEY]
    new_id = request.app[IDS_KEY]()
    while store.stat(new_id) is not None:
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
    if not isinstance(given, str) or request.app[STORE_KEY].organization(given) is None:
        errors["organization"] = f"{given!r} is not an existing organization"
        return None
    return given


def visible_stat(request: web.Request) -> dict:
    """The stat of the URL, if the caller may see it; 404 otherwise."""
    stat_id = request.match_info["id"]
    doc = request.app[STORE_KEY].stat(stat_id)
    caller: Caller = request[CALLER_KEY]
    if doc is None or not caller.sees(doc.get("organization")):
        raise ApiError(404, f"Not Found: no stat with id {stat_id!r}")
    return doc


def _check_read_only(body: dict, old: dict, names, path: str, parents=()) -> dict:
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


@route("GET", API_PREFIX + "/stats/", summary="List stats", params=("stat_list",),
       ok=((200, "a page of stats", "StatsPage"),), errors=ERRORS_READ)
async def list_stats(request: web.Request) -> web.Response:
    """GET /api/v2/stats/: a page of the stats the caller sees, filtered, ordered, with _fields."""
    query = request.app[STAT_QUERIES_KEY].of(request)  # shared: never changed here
    caller: Caller = request[CALLER_KEY]
    if caller.scope is not None:
        query = replace(query, filters=[Filter(("organization",), "exact", caller.scope), *query.filters])
    page, more = await request.app[STORE_KEY].find("stats", query)
    base = base_url(request)
    if query.fields is None:
        views = request.app[STAT_VIEWS_KEY]
        data = [orjson.Fragment(views.of(base, d)) for d in page]
    else:
        data = [present_stat(base, d, query.fields) for d in page]
    return json_response({"data": data, "has_more": more})


@route("POST", API_PREFIX + "/stats/",
       summary="Create one stat (object) or 1 to max_limit stats (list, all-or-nothing)",
       body=("NewStat", "NewStats"), ok=((201, "created", "StatsCreated", LOCATION_HEADER),), errors=ERRORS_WRITE)
async def create_stats(request: web.Request) -> web.Response:
    """POST /api/v2/stats/: one stat (object) or 1 to max_limit stats (list), all or nothing."""
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
    conflicts = {str(i): problem for i, problem in uuid_conflicts(store, enumerate(docs)).items()}
    if conflicts:
        message = conflicts["0"] if single else \
            f"{len(conflicts)} of {len(items)} stats conflict with stored ones; nothing was stored"
        raise ApiError(409, f"Conflict: {message}", None if single else conflicts)
    await store.commit([("stats", doc["id"], doc) for doc in docs])
    base = base_url(request)
    if single:
        return json_response(present_stat(base, docs[0]), 201,
                             {"Location": base + stat_path(docs[0]["id"])})
    return json_response({"data": [present_stat(base, d) for d in docs]}, 201)


def uuid_conflicts(store: Store, docs: Iterable[tuple[int, dict]]) -> dict[int, str]:
    """Item index -> what is wrong, for each new stat whose uuid an earlier item or a stored stat holds."""
    conflicts, seen = {}, {}
    for i, doc in docs:
        if doc["uuid"] in seen:
            conflicts[i] = f"uuid {doc['uuid']} repeats item {seen[doc['uuid']]}"
        elif store.stat_with_uuid(doc["uuid"]) is not None:
            conflicts[i] = f"uuid {doc['uuid']} already exists"
        seen[doc["uuid"]] = i
    return conflicts


async def body_to_write(request: web.Request, example: str = "", *, optional: bool = False) -> dict:
    """The JSON object a write sends (with `optional`, no body at all is {}), then the caller as its key stands now."""
    only_params(request)
    body = {} if optional and not request.body_exists else await read_object(request, example)
    await ready_to_write(request)
    return body


async def ready_to_write(request: web.Request) -> Caller:
    """Wait out a checkpoint, then take the caller as its key stands now (v1 and v2 alike).

    The caller was resolved before the body was read: meanwhile the key may have
    been rotated, its organization demoted or deleted. Call this after the
    handler's last await and before the checks that justify its write.
    """
    store: Store = request.app[STORE_KEY]
    await store.writable()
    if request.get(CALLER_VERSION_KEY) == store.organizations_version and CALLER_KEY in request:
        return request[CALLER_KEY]  # no organization changed since: the caller stands
    caller = request[CALLER_KEY] = resolve_caller(request)
    request[CALLER_VERSION_KEY] = store.organizations_version
    return caller


def fields_param(request: web.Request, schema: dict) -> list[str] | None:
    """The `_fields` of a GET of one record, the one parameter it takes (as lists do), or None."""
    only_params(request, "_fields")
    raw = request.query.get("_fields")
    return None if raw is None else _parse_fields(raw, schema)


@route("GET", API_PREFIX + "/stats/{id}/", summary="Get a stat", params=("stat_id", "stat_fields"),
       ok=((200, "the stat (with _fields: only those, plus id)", ("Stat", "StatFields")),),
       errors=ERRORS_READ + NOT_FOUND)
async def get_stat(request: web.Request) -> web.Response:
    """GET /api/v2/stats/<id>/: one stat the caller sees (with _fields: only those, plus id)."""
    only = fields_param(request, STAT_FIELDS)
    doc = visible_stat(request)
    if only is not None:
        return json_response(present_stat(base_url(request), doc, only))
    return web.Response(body=request.app[STAT_VIEWS_KEY].of(base_url(request), doc), headers=JSON_HEADERS)


@route("PUT", API_PREFIX + "/stats/{id}/", summary="Replace a stat's client fields", params=("stat_id",),
       body="StatPut", ok=((200, "the stat", "Stat"),), errors=ERRORS_WRITE + NOT_FOUND)
@route("PATCH", API_PREFIX + "/stats/{id}/", summary="Change some of a stat's fields", params=("stat_id",),
       body="StatPatch", ok=((200, "the stat", "Stat"),), errors=ERRORS_WRITE + NOT_FOUND)
async def update_stat(request: web.Request) -> web.Response:
    """PUT replaces the client fields, PATCH merges the given ones."""
    body = await body_to_write(request)
    store: Store = request.app[STORE_KEY]
    old = visible_stat(request)
    parents = [org_path(old["organization"])] if "organization" in old else []
    errors = _check_read_only(body, old, STAT_KEPT + STAT_READ_ONLY, stat_path(old["id"]), parents)
    clean = stat_client_fields(body, errors)
    derive_periods(clean, body)
    if request.method == "PUT":
        for name in ("type", "data"):
            if name not in body:
                errors[name] = "is required (PUT replaces the stat; use PATCH to change some fields)"
    if errors:
        raise _fail(errors, "stat")
    kept = {name: old[name] for name in STAT_KEPT if name in old}
    values = {**kept, **clean} if request.method == "PUT" else {**old, **clean}
    new = ordered_stat({**values, "updated_at": utcnow()})
    await store.commit([("stats", new["id"], new)])
    return json_response(present_stat(base_url(request), new))


@route("DELETE", API_PREFIX + "/stats/{id}/", summary="Delete a stat", params=("stat_id",),
       ok=((204, "deleted"),), errors=ERRORS_DELETE + NOT_FOUND)
async def delete_stat(request: web.Request) -> web.Response:
    """DELETE /api/v2/stats/<id>/: one stat the caller sees."""
    only_params(request)
    store: Store = request.app[STORE_KEY]
    await ready_to_write(request)
    doc = visible_stat(request)
    await store.commit([("stats", doc["id"], None)])
    return web.Response(status=204)


ORG_NAME_MAX = 120
TOKEN_RE = re.compile(r"[\x21-\x7e]{16,512}")
TOKEN_RULE = "16 to 512 visible ASCII characters (no spaces)"


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
        return f"must be {TOKEN_RULE}"
    return None


def require_admin(request: web.Request, what: str = "manage organizations") -> None:
    """403 unless the caller is an admin organization (`what` says what it may not do)."""
    if not request[CALLER_KEY].is_admin:
        raise ApiError(403, f"Forbidden: only an admin organization may {what}")


def visible_org(request: web.Request) -> dict:
    """The organization of the URL, for an admin; 404 if there is none."""
    require_admin(request)
    name = request.match_info["name"]
    doc = request.app[STORE_KEY].organization(name)
    if doc is None:
        raise ApiError(404, f"Not Found: no organization named {name!r}")
    return doc


def org_body(body, errors: dict, *, creating: bool) -> tuple[dict, str | None]:
    """(the validated is_admin, and name when creating; the new token or None) of an organization body."""
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


def new_token() -> str:
    """A random API key; never one starting with "-", which a command line would read as an option."""
    token = secrets.token_urlsafe(64)
    while token.startswith("-"):
        token = secrets.token_urlsafe(64)
    return token


def _unused_token_hash(store: Store, token: str) -> str:
    """The hash to store for a new token; 409 if another organization holds it."""
    digest = hash_token(token)
    if store.organization_with_token(digest) is not None:
        raise ApiError(409, "Conflict: that token is already in use; choose another one")
    return digest


@route("GET", API_PREFIX + "/organizations/", summary="List organizations (admin)", params=("org_list",),
       ok=((200, "a page of organizations", "OrganizationsPage"),), errors=ERRORS_READ + ADMIN)
async def list_orgs(request: web.Request) -> web.Response:
    """GET /api/v2/organizations/ (admin): a page of organizations."""
    require_admin(request)
    query = parse_query(request.query, ORG_FIELDS, request.app[CONFIG_KEY], stored_as={"id": "name"})
    page, more = await request.app[STORE_KEY].find("organizations", query)
    base = base_url(request)
    return json_response({"data": [present_org(base, d, query.fields) for d in page], "has_more": more})


@route("POST", API_PREFIX + "/organizations/",
       summary="Create an organization (admin); its token is answered only now", body="NewOrganization",
       ok=((201, "created", "Organization", LOCATION_HEADER),), errors=ERRORS_WRITE + ADMIN)
async def create_org(request: web.Request) -> web.Response:
    """POST /api/v2/organizations/ (admin): a new organization; its token is answered only now."""
    require_admin(request)
    body = await body_to_write(request, ": {\"name\": ..., \"token\"?: ..., \"is_admin\"?: ...}")
    require_admin(request)
    store: Store = request.app[STORE_KEY]
    errors: dict[str, str] = {}
    clean, token = org_body(body, errors, creating=True)
    if errors:
        raise _fail(errors, "organization")
    doc, token = new_organization(store, clean["name"], token, clean.get("is_admin", False))
    base = base_url(request)
    await store.commit([("organizations", doc["name"], doc)])
    return json_response(present_org(base, doc, token=token), 201,
                         {"Location": base + org_path(doc["name"])})


def new_organization(store: Store, name: str, token: str | None, is_admin: bool) -> tuple[dict, str]:
    """(a new organization record, holding only its token's hash; its clear token)."""
    if store.organization(name) is not None:
        raise ApiError(409, f"Conflict: an organization named {name!r} already exists")
    token = token or new_token()
    now = utcnow()
    doc = {"name": name, "token_sha256": _unused_token_hash(store, token), "is_admin": is_admin,
           "created_at": now, "updated_at": now}
    return doc, token


@route("GET", API_PREFIX + "/organizations/{name}/", summary="Get an organization (admin)",
       params=("org_name", "org_fields"),
       ok=((200, "the organization (with _fields: only those, plus id)", ("Organization", "OrganizationFields")),),
       errors=ERRORS_READ + ADMIN + NOT_FOUND)
async def get_org(request: web.Request) -> web.Response:
    """GET /api/v2/organizations/<name>/ (admin): one organization."""
    only = fields_param(request, ORG_FIELDS)
    doc = visible_org(request)
    return json_response(present_org(base_url(request), doc, only))


@route("PUT", API_PREFIX + "/organizations/{name}/", summary="Set is_admin and maybe a new token (admin)",
       params=("org_name",), body="OrganizationPut", ok=((200, "the organization", "Organization"),),
       errors=ERRORS_WRITE + ADMIN + NOT_FOUND)
@route("PATCH", API_PREFIX + "/organizations/{name}/", summary="Set is_admin or a new token (key rotation) (admin)",
       params=("org_name",), body="OrganizationPatch", ok=((200, "the organization", "Organization"),),
       errors=ERRORS_WRITE + ADMIN + NOT_FOUND)
async def update_org(request: web.Request) -> web.Response:
    """PUT sets is_admin (required) and maybe a new token; PATCH sets either."""
    body = await body_to_write(request)
    store: Store = request.app[STORE_KEY]
    old = visible_org(request)
    errors = _check_read_only(body, {**old, "id": old["name"]},
                              ("id", "name", "created_at", "updated_at", "link"), org_path(old["name"]))
    clean, token = org_body(body, errors, creating=False)
    if request.method == "PUT" and "is_admin" not in body:
        errors["is_admin"] = "is required (PUT replaces the organization; use PATCH to change one field)"
    if errors:
        raise _fail(errors, "organization")
    new = changed_organization(store, old, clean.get("is_admin"), token, keeps_admin(request))
    await store.commit([("organizations", new["name"], new)])
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
    return [doc["name"] for doc in store.admins()]


def check_not_last_admin(store: Store, doc: dict, doing: str) -> None:
    """409 if `doc` is the only admin organization: without one, nobody could manage the others."""
    if doc.get("is_admin") and admin_names(store) == [doc["name"]]:
        raise ApiError(409, f"Conflict: {doc['name']!r} is the last admin organization; {doing} it"
                            " would leave no one able to manage organizations: make another"
                            " organization admin first")


@route("DELETE", API_PREFIX + "/organizations/{name}/",
       summary="Delete an organization (admin); 409 if it has stats, unless cascade=true",
       params=("org_name", "cascade"), ok=((204, "deleted"),), errors=ERRORS_DELETE + (409,) + ADMIN + NOT_FOUND)
async def delete_org(request: web.Request) -> web.Response:
    """DELETE /api/v2/organizations/<name>/ (admin); its stats too with cascade=true, else 409 if it has any."""
    only_params(request, "cascade")
    cascade = _convert_bool(request.query.get("cascade", "false"), "cascade")
    store: Store = request.app[STORE_KEY]
    await ready_to_write(request)
    doc = visible_org(request)
    await store.commit(organization_deletion(store, doc, cascade, keep_admin=keeps_admin(request)))
    return web.Response(status=204)


def organization_deletion(store: Store, doc: dict, cascade: bool, cascade_hint: str = "add ?cascade=true",
                          keep_admin: bool = True) -> list:
    """The changes deleting an organization (and its stats with cascade); 409 if it has stats, or
    is the last admin (with `keep_admin`)."""
    if keep_admin:
        check_not_last_admin(store, doc, "deleting")
    name = doc["name"]
    owned = store.stats_of(organization=name)
    if owned and not cascade:
        raise ApiError(409, f"Conflict: organization {name!r} still has {len(owned)} stat(s);"
                            f" delete them first, or {cascade_hint} to delete them with it")
    return [("stats", d["id"], None) for d in owned] + [("organizations", name, None)]


DASHBOARD_PATH = "/dashboard/"
INDEX_TITLES = {"api": "Stats API v2 (needs a key)", "openapi": "OpenAPI description of the API",
                "v1": "/api/v1/, the API of the MONARC front office", "dashboard": "Dashboard"}


def index_links(request: web.Request) -> dict[str, str]:
    """The entry points of the service, as absolute URLs."""
    base = base_url(request)
    links = {"api": base + API_PREFIX + "/", "stats": base + API_PREFIX + "/stats/",
             "organizations": base + API_PREFIX + "/organizations/", "openapi": base + OPENAPI_PATH,
             "v1": base + V1_PREFIX + "/", "dashboard": base + DASHBOARD_PATH}
    if request.app[CONFIG_KEY].dashboard == "off":
        del links["dashboard"]
    return links


def accepted_quality(accept: str, media: str) -> float:
    """The q an Accept header gives `media` (its most specific matching range; 0 when none)."""
    kind = media.split("/")[0] + "/*"
    best, quality = -1, 0.0
    for item in accept.split(","):
        name, *options = [part.strip() for part in item.split(";")]
        rank = {media: 2, kind: 1, "*/*": 0}.get(name.lower(), -1)
        if rank > best:
            q = next((option[2:] for option in options if option.lower().startswith("q=")), "1")
            try:
                best, quality = rank, float(q)
            except ValueError:
                continue
    return quality if math.isfinite(quality) else 0.0


INDEX_HTML = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>statsd</title></head>
<body><h1>statsd {version}</h1><p>Statistics service for MONARC.</p>
<ul>
<li><a href="{api}">{api_title}</a></li>
<li><a href="{openapi}">{openapi_title}</a></li>
<li><a href="{v1}">{v1_title}</a></li>
</ul><p>The dashboard is off (config key <code>dashboard</code>).</p></body></html>
"""


EXPORT_FORMAT = "statsd-export"
ORG_RECORD_FIELDS = ("name", "token_sha256", "is_admin", "is_sharing_enabled", "created_at", "updated_at")


EXPORT_CHUNK = 100  # records serialized between two writes of a streamed export (measured: 1000 made
# a cheap request wait ~25 ms at 100k MONARC-shaped stats, 100 about 3 ms)


def export_chunks(orgs: list[dict], stats: list[dict], exported_at: str) -> Iterable[bytes]:
    """The export document (organizations with token hashes only, stats) in pieces of
    at most EXPORT_CHUNK records; joined, they are one JSON document and a newline."""
    head = dumps({"format": EXPORT_FORMAT, "version": 1, "statsd": __version__,
                  "exported_at": exported_at, "organizations": orgs})
    yield head[:-1] + b',"stats":['
    for start in range(0, len(stats), EXPORT_CHUNK):
        items = dumps(stats[start:start + EXPORT_CHUNK])[1:-1]  # without [ and ]
        yield b"," + items if start else items
    yield b"]}\n"


@route("GET", API_PREFIX + "/export/",
       summary="Online backup (admin): the `statsd export` document of this server, a snapshot taken"
               " at one instant, streamed; `statsd import` restores it into a stopped database",
       ok=((200, "the export document (chunked)", "Export", {
           "X-Export-Organizations": {"schema": {"type": "string"}, "description": "organizations in it"},
           "X-Export-Stats": {"schema": {"type": "string"}, "description": "stats in it"}}),),
       errors=ERRORS_READ + ADMIN + (503,))
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
    orgs, stats = store.snapshot()
    exported_at = utcnow()
    await store.commit([])  # a barrier: every write in the snapshot is durable (else a 503 now)
    resp = web.StreamResponse(headers={
        **JSON_HEADERS, **request.get(LIMIT_HEADERS_KEY, {}),
        "Content-Disposition": f'attachment; filename="statsd-export-{exported_at[:10]}.json"',
        "X-Export-Organizations": str(len(orgs)), "X-Export-Stats": str(len(stats))})
    await resp.prepare(request)
    if request.method == "HEAD":  # the headers (with the counts) and no body
        return resp
    try:
        for chunk in export_chunks(orgs, stats, exported_at):
            await resp.write(chunk)
            await asyncio.sleep(0)  # write() returns at once while the socket takes it all
        await resp.write_eof()
    except ConnectionError:
        log.warning("export to %s stopped: the client went away", client_address(request))
    return resp


ROOT_FACTS = dict(  # GET / is the index, or with the dashboard on its overview page
    summary="Service index (with Accept: application/json; browsers get the dashboard's overview page)", public=True,
    responses={"200": {"description": "name, version and entry points (JSON), or the dashboard's overview (HTML)",
                       "content": {"application/json": {"schema": {"type": "object"}},
                                   "text/html": {"schema": {"type": "string"}}}},
               "303": {"description": "a browser not logged in is sent to the dashboard's login page",
                       "headers": {"Location": {"schema": {"type": "string"}}}}},
    errors=(429,))


@route("GET", "/", when=lambda config: config.dashboard == "off", **ROOT_FACTS)
async def index(request: web.Request) -> web.Response:
    """/: JSON links to the entry points; with the dashboard off, a browser gets them as an HTML page."""
    accept = request.headers.get("Accept", "*/*")
    if accepted_quality(accept, "text/html") > accepted_quality(accept, "application/json"):
        paths = {"api": API_PREFIX + "/", "openapi": OPENAPI_PATH, "v1": V1_PREFIX + "/"}
        page = INDEX_HTML.format(version=__version__, **paths,
                                 **{f"{name}_title": title for name, title in INDEX_TITLES.items()})
        return web.Response(text=page, content_type="text/html", charset="utf-8")
    links = index_links(request)
    return json_response({"service": "statsd", "version": __version__, "api": links["api"],
                          "endpoints": [API_PREFIX + "/stats/", API_PREFIX + "/organizations/"], "links": links})


@route("GET", API_PREFIX + "/", summary="API index: the caller's organization and links to the entry points",
       ok=((200, "organization, is_admin and links", {"type": "object", "required": ["organization", "is_admin", "links"]}),),
       errors=ERRORS_READ)
async def api_index(request: web.Request) -> web.Response:
    """GET /api/v2/: who the key belongs to, and the entry points."""
    only_params(request)
    caller: Caller = request[CALLER_KEY]
    return json_response({"service": "statsd", "version": __version__, "organization": caller.organization,
                          "is_admin": caller.is_admin, "links": index_links(request)})


# ----------------------------------------------------------- v1 processors ---
# processors: (days, labels, processor_params) -> data, from the kept sums of each day
# (StatAggregates over every organization; a walk over the chosen stats for a narrower choice)


def _no_params(params: dict, processor: str) -> None:
    if params:
        raise bad_request(f"processor_params: {processor} takes no parameter, not {', '.join(params)}")


def _mean(total: int, count: int) -> float:
    """The mean of `count` numbers whose exact sum (times EXACT) is `total`, correctly rounded."""
    return total / (EXACT * count)


async def object_averages_on_date(days: list, labels: dict, processor: str, params: dict) -> list:
    """Per object: the means of its measures per day and over all the days."""
    _no_params(params, processor)
    objects: dict[str, tuple[list, list]] = {}
    budget = LoopBudget()
    for day, bucket in days:
        await budget.spend()
        for uuid, (count, *sums) in bucket.items():
            entry = objects.get(uuid)
            if entry is None:
                entry = objects[uuid] = ([], [0, 0, 0, 0])
            entry[0].append({**{name: _mean(total, count) for name, total in zip(STAT_MEASURES, sums)}, "date": day})
            totals = entry[1]
            totals[0] += count
            for i, total in enumerate(sums, 1):
                totals[i] += total
    return [{"object": uuid, "labels": object_labels(labels, uuid), "values": values,
             "averages": {name: _mean(total, totals[0]) for name, total in zip(STAT_MEASURES, totals[1:])}}
            for uuid, (values, totals) in objects.items()]


async def threat_average_on_date(days: list, labels: dict, params: dict) -> list:
    """Averages of count, maxRisk and averageRate of each threat, per date and overall, across all analyses."""
    return await object_averages_on_date(days, labels, "threat_average_on_date", params)


async def vulnerability_average_on_date(days: list, labels: dict, params: dict) -> list:
    """Averages of count, maxRisk and averageRate of each vulnerability, per date and overall, across all analyses."""
    return await object_averages_on_date(days, labels, "vulnerability_average_on_date", params)


def _risk_means(sums: dict) -> dict:
    """state -> kind -> level -> mean, 0 for a level nobody counted."""
    result = {state: {kind: dict.fromkeys(RISK_LEVELS, 0) for kind in RISK_KINDS} for state in RISK_STATES}
    for (state, kind, level), (count, total) in sums.items():
        result[state][kind][level] = _mean(total, count)
    return result


async def risk_averages(days: list, labels: dict, params: dict) -> dict:
    """Averages of the number of risks per level (current/residual, informational/operational, low/medium/high)."""
    _no_params(params, "risk_averages")
    sums: dict[tuple, list] = {}
    for _, bucket in days:
        for key, (count, total) in bucket.items():
            entry = sums.setdefault(key, [0, 0])
            entry[0] += count
            entry[1] += total
    return _risk_means(sums)


def _risk_selection(params: dict, name: str, choices: tuple) -> tuple:
    """The comma-separated choices of a risk processor parameter (all when absent or empty)."""
    value = params.get(name)
    value = ",".join(choices) if value is None or value == "" else value
    parts = [part.strip() for part in value.split(",")] if isinstance(value, str) else None
    if not parts or not set(parts) <= set(choices):
        raise bad_request(f"processor_params: {name} must be {' or '.join(choices)} (or both, comma-separated),"
                          f" not {value!r}")
    return tuple(choice for choice in choices if choice in parts)


async def risk_averages_on_date(days: list, labels: dict, params: dict) -> dict:
    """Averages of the number of risks per level and date. Parameters: risks_type (informational or
    operational), risks_state (current or residual)."""
    unknown = sorted(set(params) - {"risks_type", "risks_state"})
    if unknown:
        raise bad_request(f"processor_params: unknown parameter(s) {', '.join(unknown)}"
                          " (known: risks_type, risks_state)")
    kinds = _risk_selection(params, "risks_type", RISK_KINDS)
    states = _risk_selection(params, "risks_state", RISK_STATES)
    result = {state: {kind: {level: [] for level in RISK_LEVELS} for kind in kinds} for state in states}
    for day, bucket in days:
        for (state, kind, level), (count, total) in bucket.items():
            if state in result and kind in result[state]:
                result[state][kind][level].append({"date": day, "value": _mean(total, count)})
    return result


V1_PROCESSORS = {func.__name__: func for func in (threat_average_on_date, vulnerability_average_on_date,
                                                  risk_averages, risk_averages_on_date)}


async def processed_stats(store: Store, kind: str, processor: str, params: dict, *, date_from: str | None = None,
                          date_to: str | None = None, anrs: set | None = None, organization: str | None = None,
                          as_json: bool = False):
    """A processor's data over the stats of one type (of one organization, of some analyses) within the dates;
    with `as_json`, its JSON, serialized an object at a time. Each is kept until a write changes a sum."""
    aggregates = store.aggregates
    key = (kind, processor, orjson.dumps(params, option=orjson.OPT_SORT_KEYS), date_from, date_to,
           None if anrs is None else tuple(sorted(anrs)), organization, as_json)
    kept = aggregates.kept(key)
    if kept is not None:
        return kept
    version = aggregates.version
    days = await store.measures_by_day(kind, date_from, date_to, organization=organization, anrs=anrs)
    data = await V1_PROCESSORS[processor](days, aggregates.labels, params)
    if not days and not store.has_stats(kind, date_from, date_to, organization=organization, anrs=anrs):
        data = []
    if as_json:
        data = await json_of_consumed(data)
    if store.aggregates is aggregates:  # (not reloaded meanwhile)
        aggregates.keep(key, version, data)
    return data


async def json_of_consumed(data) -> bytes:
    """The JSON of `data`, a list emptied as it goes: an item at a time, each freed once serialized (a
    year of threat lists is 100,000 objects, too many to build or free in one go on the loop)."""
    if data.__class__ is not list:
        return dumps(data)
    budget, parts = LoopBudget(), []
    data.reverse()
    while data:
        parts.append(dumps(data.pop()))
        await budget.spend()
    return b"[" + b",".join(parts) + b"]"


def stat_counts_by_month(store: Store, organization: str | None, months: int = 12) -> dict:
    """{type: {"YYYY-MM": count}} of the stats dated in the last `months` calendar months.

    By v1 stat date, from the first day of the month `months - 1` before today's (server
    local time) to the end of this month; of `organization` when given, else of all. Every
    type with at least one stat in that window maps each of the `months` months, oldest
    first, to its count (0 included); other types are left out.
    """
    today = date.today()
    keys = [months_before(today.replace(day=1), back).isoformat()[:7] for back in range(months - 1, -1, -1)]
    counts: dict[str, dict[str, int]] = {}
    for kind in store.stat_types():
        by_month = {month: store.count_between(kind, month + "-01", month + "-31", organization=organization)
                    for month in keys}
        if any(by_month.values()):
            counts[kind] = by_month
    return counts


def organization_activity(store: Store, organization: str | None) -> list[dict]:
    """Per organization (only `organization` when given), by name: {"name", "analyses" (its
    distinct anrs, sorted by their text), "stats" (how many), "latest" (its latest v1 stat
    date, or None)}. Without `organization`, stats that belong to no organization (with
    authentication off) come last under the name None, when there are any.
    """
    names = [organization] if organization is not None else sorted(doc["name"] for doc in store.organizations())
    rows = [{"name": name, **store.activity(name)} for name in names if store.organization(name) is not None]
    if organization is None:
        orphans = store.activity(None)
        if orphans["stats"]:
            rows.append({"name": None, **orphans})
    return rows


# ------------------------------------------------- MONARC /api/v1 handlers ---
# The upstream stats service's API, as today's MONARC front office calls it,
# on the same store as /api/v2/: the v1 view of a stat is {uuid, anr, type, date, data}.

V1_TYPES = ("risk", "vulnerability", "threat", "cartography", "compliance")
V1_LIST_PARAMS = ("type", "anrs", "anr", "date_from", "date_to", "get_last", "offset", "limit", "group_by_anr")
V1_PROCESSED_PARAMS = ("type", "processor", "processor_params", "date_from", "date_to", "anrs",
                       "local_stats_only", "organization")
V1_DEFAULT_MONTHS = 3


async def v1_params(request: web.Request, allowed: tuple) -> dict:
    """The parameters of a v1 GET: a JSON object body and/or the query string (not both for one name)."""
    params: dict[str, Any] = {}
    if (await request.read()).strip():
        body = await read_object(request, " of parameters, e.g. {\"type\": \"risk\"}")
        params.update({name: _whole(value) for name, value in body.items() if value is not None})
    for name, raw in single_params(request.query).items():
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
    """A query-string value in the type its JSON form would have (numbers and flags stay text:
    v1_count and v1_flag read text as they do in a body)."""
    if name == "anrs":
        return [item.strip() for item in raw.split(",") if item.strip()]
    if name == "processor_params":
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise bad_request(f"processor_params: {raw!r} is not a JSON object") from None
    return raw


def v1_type(params: dict) -> str:
    """The `type` parameter, one of V1_TYPES (required)."""
    value = params.get("type", MISSING)
    if value is MISSING:
        raise bad_request(f"type is required (one of {', '.join(V1_TYPES)})")
    if value not in V1_TYPES:
        raise bad_request(f"type: {value!r} is not one of {', '.join(V1_TYPES)}")
    return value


def v1_date(params: dict, name: str) -> str | None:
    """A date parameter (date_from, date_to), or None when absent."""
    value = params.get(name)
    return None if value is None else _convert_date(value, name)


def v1_anrs(params: dict) -> set | None:
    """The anrs asked for (`anrs` list and/or `anr`), or None for every anr."""
    wanted = params.get("anrs", [])
    if not isinstance(wanted, list):
        raise bad_request("anrs must be a list of analysis UUIDs")
    named = [("anrs", value) for value in wanted] + ([("anr", params["anr"])] if "anr" in params else [])
    anrs = set()
    for name, value in named:
        parsed = parse_uuid(value)
        if parsed is None:
            raise bad_request(f"{name}: {value!r} is not an analysis UUID")
        anrs.add(parsed)
    return anrs or None


def v1_count(params: dict, name: str, choices=None) -> int:
    """An integer parameter: a JSON integer or, as upstream's parser takes, a numeric string (PHP's)."""
    value = params.get(name, 0)
    number = parse_int(value.strip()) if isinstance(value, str) else value
    if not _is_int(number) or number < 0 or (choices and number not in choices):
        allowed = " or ".join(map(str, choices)) if choices else "a non-negative integer"
        raise bad_request(f"{name}: {value!r} is not {allowed}")
    return number


def v1_flag(params: dict, name: str) -> bool:
    """A flag: true/false, 0/1, or a word parse_bool reads; "" is false, as upstream's parser has it."""
    value = params.get(name, False)
    if isinstance(value, str):
        flag = parse_bool(value) if value.strip() else False
        if flag is not None:
            return flag
    elif value in (0, 1) and not isinstance(value, float):
        return bool(value)
    raise bad_request(f"{name}: {value!r} is not true or false ({BOOL_WORDS_TEXT})")


def present_v1_stat(doc: dict) -> dict:
    """A stat as v1 answers it: {uuid, anr (as text), type, date, data}."""
    return {"uuid": doc["uuid"], "anr": str(doc["anr"]) if "anr" in doc else None, "type": doc["type"],
            "date": stat_date(doc), "data": doc["data"]}


def v1_page(items: list, count: int, offset: int = 0, limit: int = 0) -> dict:
    """The v1 list body; its metadata values are strings, as upstream."""
    return {"metadata": {"count": str(count), "offset": str(offset), "limit": str(limit)},
            "data": items}


@route("GET", V1_PREFIX + "/stats/", summary="MONARC: stats of one type (parameters in a JSON body or the query string)",
       body="V1Query", ok=((200, "stats", "V1Page"),), errors=ERRORS_V1 + (413, 415))
async def v1_list_stats(request: web.Request) -> web.Response:
    """GET stats/: one type, by anrs, by date (default: the last 3 months) or only the latest per anr."""
    caller: Caller = request[CALLER_KEY]
    params = await v1_params(request, V1_LIST_PARAMS)
    kind, anrs = v1_type(params), v1_anrs(params)
    date_from, date_to = v1_date(params, "date_from"), v1_date(params, "date_to")
    offset, limit = v1_count(params, "offset"), v1_count(params, "limit")
    v1_count(params, "group_by_anr", (0, 1))  # accepted and, as upstream, without effect
    store: Store = request.app[STORE_KEY]
    owner = caller.scope
    if v1_flag(params, "get_last"):
        found = [present_v1_stat(d) for d in store.latest_stats(kind, organization=owner, anrs=anrs)]
        return json_response(v1_page(found, len(found)))
    today = date.today()
    date_from = date_from or months_before(today, V1_DEFAULT_MONTHS).isoformat()
    date_to = date_to or today.isoformat()
    matching = store.stats_between(kind, date_from, date_to, organization=owner, anrs=anrs)
    page = matching[offset:offset + limit] if limit else matching[offset:]
    return json_response(v1_page([present_v1_stat(d) for d in page], len(page), offset, limit))


V1_STAT_FIELDS = ("uuid", "anr", "type", "date", "data")


def v1_stat_body(caller: Caller, item) -> tuple[dict, dict]:
    """(the /api/v2/ body, the errors only v1 finds) of one item of a v1 batch: its v1 fields, the caller's organization."""
    if not isinstance(item, dict):
        raise bad_request("a stat must be a JSON object {\"anr\", \"type\", \"date\", \"data\"}")
    errors = {name: "unknown field" for name in item if name not in V1_STAT_FIELDS}
    errors.update({name: "is required" for name in ("anr", "date") if name not in item})
    if "anr" in item and parse_uuid(item["anr"]) is None:
        errors["anr"] = "must be the analysis' UUID, as a string"  # v1 has no integer anrs
    if "type" in item and item["type"] not in V1_TYPES and check_stat_value("type", item["type"])[1] is None:
        errors["type"] = f"must be one of {', '.join(V1_TYPES)}"
    body = {name: item[name] for name in V1_STAT_FIELDS if name in item}
    if caller.organization is not None:
        body["organization"] = caller.organization
    return body, errors


@route("POST", V1_PREFIX + "/stats/", summary="MONARC: send stats, each stored on its own", body="V1NewStats",
       ok=((201, "all stored", "V1Created"), (207, "some items failed", "V1Created")), errors=ERRORS_V1_WRITE)
async def v1_create_stats(request: web.Request) -> web.Response:
    """POST stats/ with a list: each item stored on its own; 201 if all went in, else 207 with per-item results."""
    only_params(request)
    body = await read_json(request)
    config: Config = request.app[CONFIG_KEY]
    if not isinstance(body, list) or len(body) > config.max_limit:
        raise bad_request(f"the body must be a JSON list of at most {config.max_limit} stats"
                          " [{\"anr\", \"type\", \"date\", \"data\"}, ...]")
    store: Store = request.app[STORE_KEY]
    caller = await ready_to_write(request)
    now = utcnow()
    valid, results = {}, {}
    for i, item in enumerate(body):
        try:
            v2_body, v1_errors = v1_stat_body(caller, item)
            valid[i] = new_stat(request, v2_body, now, also=v1_errors)
        except ApiError as e:
            results[i] = {"index": i, "status": 400, "error": e.message, "errors": e.errors}
    conflicts = uuid_conflicts(store, valid.items())
    docs = [doc for i, doc in valid.items() if i not in conflicts]
    for i, doc in valid.items():
        results[i] = {"index": i, "status": 201, "uuid": doc["uuid"]} if i not in conflicts else \
            {"index": i, "status": 409, "uuid": doc["uuid"], "error": f"Conflict: {conflicts[i]}"}
    results = [results[i] for i in sorted(results)]
    if docs:
        await store.commit([("stats", doc["id"], doc) for doc in docs])
    answer = {**v1_page([present_v1_stat(d) for d in docs], len(docs)), "results": results}
    return json_response(answer, 201 if len(docs) == len(body) else 207)


def v1_path_anr(request: web.Request) -> str:
    """The analysis UUID of a stats/<anr> URL; 400 if it is none (upstream answers 500)."""
    anr = parse_uuid(request.match_info["anr"])
    if anr is None:
        raise bad_request(f"{request.match_info['anr']!r} is not an analysis UUID")
    return anr


@route("GET", V1_PREFIX + "/stats/{anr}/", summary="MONARC: the caller's stats of an analysis (an admin's: all)",
       params=("anr",), ok=((200, "the stats, oldest first (none: [])", "V1Stats"),), errors=ERRORS_V1)
async def v1_anr_stats(request: web.Request) -> web.Response:
    """GET stats/<anr>: the caller's stats of that analysis (an admin's: every organization's), as a list."""
    caller: Caller = request[CALLER_KEY]
    only_params(request)
    anr = v1_path_anr(request)
    docs = request.app[STORE_KEY].stats_of(organization=caller.scope, anr=anr)
    return json_response([present_v1_stat(d) for d in docs])


@route("DELETE", V1_PREFIX + "/stats/{anr}/", summary="MONARC: delete the caller's stats of an analysis",
       params=("anr",), ok=((204, "deleted (also when there were none)"),), errors=ERRORS_V1 + (503, 507))
async def v1_delete_stats(request: web.Request) -> web.Response:
    """DELETE stats/<anr>: the caller's stats of that analysis (204 even when there were none)."""
    only_params(request)
    anr = v1_path_anr(request)
    store: Store = request.app[STORE_KEY]
    caller = await ready_to_write(request)
    owned = store.stats_of(organization=caller.organization, anr=anr)
    if owned:
        await store.commit([("stats", d["id"], None) for d in owned])
    return web.Response(status=204)


V1_ROLE_USER, V1_ROLE_ADMIN = "1", "2"  # upstream's role numbers, which it answers as strings


def client_me_body(org: dict | None, key: str | None) -> dict:
    """client/me as upstream answers it; the token is the key presented (only its hash is stored)."""
    if org is None:
        return {"name": None, "token": key, "role": V1_ROLE_ADMIN, "is_sharing_enabled": True}
    return {"name": org["name"], "token": key, "role": V1_ROLE_ADMIN if org.get("is_admin") else V1_ROLE_USER,
            "is_sharing_enabled": org.get("is_sharing_enabled", True)}


@route("GET", V1_PREFIX + "/client/me/", summary="MONARC: the caller's organization",
       ok=((200, "the client", "V1Client"),), errors=ERRORS_V1)
@route("PATCH", V1_PREFIX + "/client/me/", summary="MONARC: turn sharing on or off", body="V1ClientPatch",
       ok=((200, "the client", "V1Client"),), errors=ERRORS_V1_WRITE)
async def v1_client_me(request: web.Request) -> web.Response:
    """GET client/me; PATCH client/me sets is_sharing_enabled."""
    caller: Caller = request[CALLER_KEY]
    only_params(request)
    store: Store = request.app[STORE_KEY]
    key = presented_key(request)
    org = store.organization(caller.organization) if caller.organization is not None else None
    if request.method != "PATCH":  # GET, HEAD
        return json_response(client_me_body(org, key))
    body = await read_object(request, " {\"is_sharing_enabled\": true|false}")
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
    caller = await ready_to_write(request)
    org = store.organization(caller.organization) if caller.organization is not None else None
    if org is None:
        raise ApiError(403, V1_FORBIDDEN)
    new = {**org, "is_sharing_enabled": body["is_sharing_enabled"], "updated_at": utcnow()}
    await store.commit([("organizations", new["name"], new)])
    return json_response(client_me_body(new, key))


@route("GET", V1_PREFIX + "/stats/processed/", summary="MONARC: a processor over the stats of every organization",
       body="V1Processed", ok=((200, "processed", {"type": "object", "required": ["type", "processor", "data"]}),),
       errors=ERRORS_V1 + (413, 415))
async def v1_processed(request: web.Request) -> web.Response:
    """GET stats/processed/: a processor applied to the stats of one type, over every organization
    (or one: `organization`, a statsd addition; an ordinary organization may name only its own)."""
    caller: Caller = request[CALLER_KEY]
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
    organization = params.get("organization")
    if organization is not None:
        if not isinstance(organization, str):
            raise bad_request("organization must be an organization name")
        if not caller.sees(organization):
            raise ApiError(403, "Forbidden: an ordinary organization may ask only for its own organization")
    data = await processed_stats(request.app[STORE_KEY], kind, processor, processor_params, date_from=date_from,
                                 date_to=date_to, anrs=anrs, organization=organization, as_json=True)
    return json_response({"type": kind, "processor": processor, "data": data})  # (its bytes spliced in)


@route("GET", V1_PREFIX + "/", summary="MONARC: the v1 routes (no key)", public=True,
       ok=((200, "the routes", {"type": "object", "required": ["routes"]}),), errors=ERRORS_PUBLIC)
async def v1_index(request: web.Request) -> web.Response:
    """GET /api/v1/ (no key, as upstream's API page): the v1 routes, from the app's own routes."""
    only_params(request)
    base = base_url(request)
    routes = sorted((r.path, r.method) for r in ROUTES.served(request.app[CONFIG_KEY])
                    if r.path.startswith(V1_PREFIX + "/") and r.path != V1_PREFIX + "/")
    return json_response({"service": "statsd", "version": __version__, "api": "v1 (MONARC front office)",
                          "routes": [{"method": method, "path": path, "url": base + path} for path, method in routes],
                          "links": {"openapi": base_url(request) + OPENAPI_PATH, "v2": base_url(request) + API_PREFIX + "/"}})


@route("GET", V1_PREFIX + "/stats/processed/list/", summary="MONARC: the processors (no key)", public=True,
       ok=((200, "processors", {"type": "array", "items": {"type": "object", "required": ["name", "description"]}}),),
       errors=ERRORS_PUBLIC)
async def v1_processors(request: web.Request) -> web.Response:
    """GET stats/processed/list (no key): the processors and what they compute."""
    return json_response([{"name": name, "description": " ".join(func.__doc__.split())}
                          for name, func in V1_PROCESSORS.items()])


# ------------------------------------------------------------ dashboard ---
# HTML pages over the same store, rendered on the server: jinja2 templates (autoescape on)
# and the stylesheet live in DASHBOARD_TEMPLATES below, charts are pygal SVG drawn inline,
# so this module (and the one-file binary) carries everything and nothing is loaded from
# another host. No page needs JavaScript, and no page has any: the Content-Security-Policy
# forbids every script. Processor numbers come from processed_stats, or from period_sums (the
# same kept per-day sums, read once for every month of a chart and added up as the processors
# add them: the same means); the overview's from stat_counts_by_month and organization_activity.

DASHBOARD_MODES = ("key", "public", "off")
SESSION_COOKIE = "statsd_session"
LOGIN_RATE_LIMIT = "10/minute"  # login attempts per client address, whatever rate_limit says
LABEL_LANGUAGES = {"fr": "label1", "en": "label2", "de": "label3", "nl": "label4"}  # as MONARC numbers them
PERIOD_DAYS = (30, 90, 365)
TOP_CHOICES = (5, 10, 15)
SERIES_CHOICES = (5, 10, 20)  # evolution lines, at most 20
EVOLUTION_MONTHS = (6, 12, 24)
SILENT_DAYS = 7
MEASURE_NAMES = {"averageRate": "probability (averageRate)", "count": "occurrence (count)",
                 "maxRisk": "max. associated risk (maxRisk)"}
VULNERABILITY_MEASURE_NAMES = {**MEASURE_NAMES, "averageRate": "qualification (averageRate)"}
EXPLORER_LIMITS = (10, 25, 50, 100)
STAT_PAGE_MAX_DATA = 256 * 1024  # bytes of pretty-printed data shown on a stat's page
SESSIONS_KEY = web.AppKey("dashboard_sessions", object)
TEMPLATES_KEY = web.AppKey("dashboard_templates", object)
LOGIN_LIMIT_KEY = web.AppKey("dashboard_login_limit", object)


def dashboard_on(config: Config) -> bool:
    """Whether the dashboard's routes are served (`/` is then its overview)."""
    return config.dashboard != "off"


@dataclass
class Session:
    """A dashboard session: whose key opened it, and until when it lasts."""
    token_sha256: str  # the key's hash, never the key: the organization is found again on each request
    expires: float


class Sessions:
    """Dashboard sessions in memory: random id -> the key's hash and an expiry.

    At most MAX at once; when full, expired ones are dropped, then the oldest.
    A restart ends every session.
    """

    MAX = 10000

    def __init__(self, lifetime: float = 8 * 3600):
        self.lifetime = lifetime
        self.by_id: dict[str, Session] = {}

    def new(self, token_sha256: str) -> str:
        """Open a session for the key with this hash; its random id (for the cookie)."""
        if len(self.by_id) >= self.MAX:
            now = time.time()
            self.by_id = {sid: s for sid, s in self.by_id.items() if s.expires > now}
            while len(self.by_id) >= self.MAX:
                del self.by_id[next(iter(self.by_id))]
        sid = secrets.token_urlsafe(32)
        self.by_id[sid] = Session(token_sha256, time.time() + self.lifetime)
        return sid

    def get(self, sid: str | None) -> Session | None:
        """The live session of this id, or None (expired or ended)."""
        session = self.by_id.get(sid) if sid else None
        if session is not None and session.expires <= time.time():
            del self.by_id[sid]
            return None
        return session

    def end(self, sid: str | None) -> None:
        """End the session of this id (logout)."""
        if sid:
            self.by_id.pop(sid, None)


@dataclass
class Viewer:
    """Who looks at the dashboard: an organization, anyone (public mode), or everyone (no auth)."""

    organization: str | None
    is_admin: bool
    anonymous: bool = False  # "public" mode, not logged in: aggregated pages only
    auth_off: bool = False

    @property
    def chooses_organization(self) -> bool:
        """Whether organizations are listed and chosen (admins, and everyone with authentication off)."""
        return (self.is_admin or self.auth_off) and not self.anonymous

    def scope(self, chosen: str | None) -> str | None:
        """The organization whose stats are counted (None: all of them)."""
        if self.anonymous:
            return None
        return chosen if self.chooses_organization else self.organization


class DashboardError(Exception):
    """An error page: status and what to tell the person."""

    def __init__(self, status: int, message: str, headers=None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


class LoginNeeded(Exception):
    """The page needs a logged-in organization: send the browser to the login page."""


def dashboard_viewer(request: web.Request) -> Viewer | None:
    """The viewer of this request from its session cookie (None: not logged in).

    The organization is looked up again from the key's hash on every request, so a
    rotated or deleted key ends its sessions at once, and a demoted admin is demoted.
    """
    if not request.app[CONFIG_KEY].api_key_authentication:
        return Viewer(None, True, auth_off=True)
    sessions: Sessions = request.app[SESSIONS_KEY]
    sid = request.cookies.get(SESSION_COOKIE)
    session = sessions.get(sid)
    if session is None:
        return None
    org = request.app[STORE_KEY].organization_with_token(session.token_sha256)
    if org is None or not hmac.compare_digest(org["token_sha256"], session.token_sha256):
        sessions.end(sid)
        return None
    return Viewer(org["name"], bool(org.get("is_admin")))


def page_viewer(request: web.Request, aggregated: bool) -> Viewer:
    """The viewer, or LoginNeeded; anyone may see the aggregated pages in "public" mode."""
    viewer = dashboard_viewer(request)
    if viewer is not None:
        return viewer
    if aggregated and request.app[CONFIG_KEY].dashboard == "public":
        return Viewer(None, False, anonymous=True)
    raise LoginNeeded()


def dashboard_handler(func):
    """A dashboard route: its security headers on every answer, errors as HTML pages."""
    @functools.wraps(func)
    async def handle(request: web.Request) -> web.StreamResponse:
        nonce = secrets.token_urlsafe(16)
        request[NONCE_KEY] = nonce
        try:
            response = await func(request)
        except LoginNeeded:
            target = request.path_qs if request.method == "GET" else "/"
            response = see_other(DASHBOARD_PREFIX + "/login?" + urlencode({"next": target}))
        except (DashboardError, ApiError) as e:
            response = render_page(request, "error.html", {"title": f"Error {e.status}", "status": e.status,
                                                           "message": e.message, "viewer": None, "page": "error"},
                                   status=e.status)
            response.headers.update(e.headers)
        if "Content-Security-Policy" not in response.headers:
            response.headers["Content-Security-Policy"] = (
                f"default-src 'none'; img-src 'self' data:; style-src 'self' 'nonce-{nonce}';"
                " form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Referrer-Policy"] = "same-origin"
        response.headers.setdefault("Cache-Control", "no-store")
        return response
    return handle


NONCE_KEY = web.RequestKey("dashboard_nonce", str)


def see_other(location: str) -> web.Response:
    """A 303 redirect (after a form, or to the login page)."""
    return web.Response(status=303, headers={"Location": location})


def dashboard_templates():
    """The jinja2 environment of the dashboard, built once per app (autoescape on everywhere)."""
    import jinja2  # imported here: only the dashboard needs it
    env = jinja2.Environment(loader=jinja2.DictLoader(DASHBOARD_TEMPLATES), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["number"] = format_number
    env.filters["size"] = format_size
    env.globals.update(prefix=DASHBOARD_PREFIX, version=__version__)
    return env


def render_page(request: web.Request, template: str, context: dict, status: int = 200) -> web.Response:
    """A dashboard page: `template` rendered with `context`, as HTML with the page's CSP nonce."""
    env = request.app[TEMPLATES_KEY]
    html = env.get_template(template).render(nonce=request.get(NONCE_KEY, ""), config=request.app[CONFIG_KEY],
                                             path=request.path, **context)
    return web.Response(text=html, status=status, content_type="text/html", charset="utf-8")


def format_number(value) -> str:
    """A number as a page shows it: integers as they are, others with at most two decimals."""
    if value is None:
        return ""
    if isinstance(value, float) and not value.is_integer():
        return f"{value:,.2f}".rstrip("0").rstrip(".")
    return f"{int(value):,}"


def format_size(size: int) -> str:
    """A size in bytes as people read it (bytes, KiB, MiB, GiB)."""
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:,} {unit}" if unit == "bytes" else f"{size:,.1f} {unit}"
        size /= 1024
    raise AssertionError(size)


def preferred_languages(request: web.Request) -> list[str]:
    """The primary language tags of Accept-Language, best first (at most 20 read)."""
    ranked = []
    for position, part in enumerate(request.headers.get("Accept-Language", "").split(",")[:20]):
        tag, _, params = part.strip().partition(";")
        q = 1.0
        params = params.strip()
        if params.startswith("q="):
            try:
                q = float(params[2:])
            except ValueError:
                q = 0.0
            q = q if math.isfinite(q) else 0.0
        tag = tag.strip().split("-")[0].lower()
        if tag and q > 0:
            ranked.append((-q, position, tag))
    return [tag for _, _, tag in sorted(ranked)]


def label_of(labels: dict, languages: list[str], fallback: str = "") -> str:
    """The label in the first language asked for that has one, else the first present."""
    if not isinstance(labels, dict):
        return fallback
    for language in languages:
        name = LABEL_LANGUAGES.get(language)
        value = labels.get(name) if name else None
        if isinstance(value, str) and value.strip():
            return value
    for name in ("label1", "label2", "label3", "label4"):
        value = labels.get(name)
        if isinstance(value, str) and value.strip():
            return value
    return fallback


# charts: numbers in, pygal SVG or CSV out

@dataclass
class Chart:
    """One chart: categories (x labels) and named series of numbers, plus where its data comes from."""

    name: str
    title: str
    kind: str  # "hbar" (horizontal bars), "bar" (grouped), "stacked", "line"
    labels: list
    series: list  # [(name, [number or None per label])]
    category: str  # the header of the label column in the CSV
    query: str = ""  # the page's query string, for the export links
    json_url: str = ""
    keys: list | None = None  # an identifier per label (threat uuid), for the CSV
    key_name: str = "uuid"
    note: str = ""
    label_links: list | None = None  # a JSON link per label (evolution months), for the table

    @property
    def empty(self) -> bool:
        """Whether the chart has nothing to draw."""
        return not self.labels or all(v is None for _, values in self.series for v in values)

    def export_url(self, extension: str) -> str:
        """The URL that downloads this chart as CSV or SVG, for the same choices."""
        return f"{DASHBOARD_PREFIX}/charts/{self.name}.{extension}" + (f"?{self.query}" if self.query else "")

    def rows(self):
        """(label, values) per label, for the table and the CSV."""
        for i, label in enumerate(self.labels):
            yield label, [values[i] for _, values in self.series]


CHART_COLORS = ("#2f6db5", "#e07b39", "#3a9e6f", "#c94f5a", "#7b5ea7", "#c9a227", "#4fa3c7", "#8c6d4f",
                "#d46fa8", "#6b8e23", "#5a6b7d", "#b5452f", "#2a9d8f", "#9467bd", "#e9c46a", "#264653",
                "#f4a261", "#8ab17d", "#bc6c25", "#577590")
RISK_LEVEL_COLORS = {"Low risks": "#3a9e6f", "Medium risks": "#e0a030", "High risks": "#c94f5a"}


def _pygal_style(colors=CHART_COLORS):
    import pygal.style
    return pygal.style.Style(
        background="#ffffff", plot_background="#ffffff", foreground="#3b4452", foreground_strong="#1d2430",
        foreground_subtle="#c9d1dc", opacity=".92", opacity_hover="1", transition="0ms", colors=tuple(colors),
        font_family='"DejaVu Sans", "Liberation Sans", Arial, sans-serif', label_font_size=12,
        major_label_font_size=12, value_font_size=11, legend_font_size=12, title_font_size=15,
        tooltip_font_size=12, value_colors=("#1d2430",), guide_stroke_color="#e3e8ef",
        major_guide_stroke_color="#c9d1dc")


def _clean_svg(nonce: str | None):
    """A pygal XML filter: no script, no comment, no style attribute; the <style> gets the nonce."""
    from xml.etree import ElementTree

    def clean(root):
        for parent in root.iter():
            for child in list(parent):
                if child.tag is ElementTree.Comment or child.tag is ElementTree.ProcessingInstruction \
                        or str(child.tag).rsplit("}", 1)[-1] in ("script", "foreignObject"):
                    parent.remove(child)
            parent.attrib.pop("style", None)
            if nonce and str(parent.tag).rsplit("}", 1)[-1] == "style":
                parent.set("nonce", nonce)
        return root
    return clean


SVG_CACHE: dict = {}  # chart content -> SVG text drawn for it (a pure function of it), bounded
SVG_CACHE_MAX = 256
NONCE_PLACEHOLDER = "statsd-nonce-placeholder"


def render_svg(chart: Chart, nonce: str | None = None, standalone: bool = False) -> str:
    """The chart as SVG text; the same numbers are drawn once, then served from SVG_CACHE."""
    svg = cached_svg(chart, nonce, standalone)
    if svg is None:
        svg = draw_svg(chart, None if nonce is None else NONCE_PLACEHOLDER, standalone)
        if len(SVG_CACHE) >= SVG_CACHE_MAX:
            SVG_CACHE.clear()
        SVG_CACHE[_svg_key(chart, nonce, standalone)] = svg
        svg = cached_svg(chart, nonce, standalone) or svg
    return svg


async def render_svg_async(chart: Chart, nonce: str | None = None, standalone: bool = False) -> str:
    """render_svg, drawing a chart not in the cache in a worker thread: pygal takes 10 to 60 ms
    a chart, and the event loop keeps serving other requests meanwhile."""
    svg = cached_svg(chart, nonce, standalone)
    if svg is not None:
        return svg
    return await asyncio.get_running_loop().run_in_executor(None, render_svg, chart, nonce, standalone)


def _svg_key(chart: Chart, nonce: str | None, standalone: bool) -> tuple:
    return (chart.name, chart.kind, chart.title, tuple(chart.labels),
            tuple((name, tuple(values)) for name, values in chart.series), standalone, nonce is None)


def cached_svg(chart: Chart, nonce: str | None, standalone: bool) -> str | None:
    """The SVG drawn earlier for this chart, nonce and form, or None."""
    svg = SVG_CACHE.get(_svg_key(chart, nonce, standalone))
    if svg is not None and nonce is not None:  # the <style> element comes first, before any text
        svg = svg.replace(f'nonce="{NONCE_PLACEHOLDER}"', f'nonce="{nonce}"', 1)
    return svg


@functools.cache
def _pygal():
    """pygal, imported once, and spared a cost: for each series, it lists the attributes of a fresh
    SerieConfig (dir) once per attribute of the chart's state, a third of the time of a 10-line
    chart. That list is the same every time, so its module's `dir` answers it from a set."""
    import builtins
    import pygal
    import pygal.graph.base
    config = getattr(pygal.graph.base, "SerieConfig", None)
    if config is not None and not hasattr(pygal.graph.base, "dir"):
        names = frozenset(dir(config()))
        pygal.graph.base.dir = lambda obj: names if obj.__class__ is config else builtins.dir(obj)
    return pygal


def draw_svg(chart: Chart, nonce: str | None = None, standalone: bool = False) -> str:
    """The chart as SVG text: drawn by pygal with no script (js=[]) and nothing from elsewhere."""
    pygal = _pygal()
    narrow = chart.name.startswith(("risks-", "evolution-risks-"))  # shown two side by side
    width = 600 if narrow else 900
    names = [name for name, _ in chart.series]
    colors, dashed = list(CHART_COLORS), set()
    if chart.kind == "bar":
        colors = ["#2f6db5", "#8fbbe8"]
    elif narrow:  # risk levels over time: a level's colour, residual dashed
        colors = [RISK_LEVEL_COLORS[level + " risks"] for level in (name.split()[0] for name in names)]
        dashed = {name for name in names if name.endswith("residual")}
    longest = max((len(name) for name in names), default=1)
    columns = max(1, min(len(names), (width - 40) // (8 * min(longest, 40) + 40)))
    legend_rows = 0 if chart.kind == "hbar" else -(-len(names) // columns)
    options = dict(js=[], css=["file://style.css", "file://graph.css"], disable_xml_declaration=not standalone,
                   style=_pygal_style(colors), show_legend=chart.kind != "hbar", legend_at_bottom=True,
                   legend_at_bottom_columns=columns, truncate_legend=40, margin=14, spacing=10,
                   print_values=chart.kind in ("hbar", "bar"),
                   value_formatter=lambda v: format_number(v) if v is not None else "",
                   formatter=lambda v: format_number(v) if v is not None else "", no_data_text="No data",
                   title=chart.title if standalone else None, explicit_size=standalone)
    if chart.kind == "hbar":
        height = 90 + 34 * max(1, len(chart.labels))
        graph = pygal.HorizontalBar(width=width, height=height, truncate_label=48, **options)
        graph.x_labels = list(reversed(chart.labels))  # pygal draws the first at the bottom
        for name, values in chart.series:
            graph.add(name, list(reversed(values)))
    else:
        cls = {"bar": pygal.Bar, "stacked": pygal.StackedBar, "line": pygal.Line}[chart.kind]
        extra = {"show_dots": len(chart.labels) <= 6, "dots_size": 3, "stroke_style": {"width": 2.5}} \
            if chart.kind == "line" else {}
        height = (340 if narrow else 380) + 26 * legend_rows
        graph = cls(width=width, height=height, x_label_rotation=0 if len(chart.labels) <= 12 else 35,
                    truncate_label=14, show_minor_x_labels=not narrow or len(chart.labels) <= 6,
                    x_labels_major_every=2 if narrow and len(chart.labels) > 6 else None, **extra, **options)
        graph.x_labels = list(chart.labels)
        for name, values in chart.series:
            more = {"stroke_style": {"width": 2.5, "dasharray": "7,5"}} if name in dashed else {}
            graph.add(name, list(values), **more)
    graph.add_xml_filter(_clean_svg(nonce))
    svg = graph.render(is_unicode=True)
    if not standalone:
        svg = svg.replace("<title>Pygal</title>", f"<title>{html_escape(chart.title)}</title>", 1)
    return svg


def html_escape(text: str) -> str:
    """`text` safe inside HTML text and attribute values."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def render_csv(chart: Chart) -> str:
    """The chart's numbers as CSV (full precision). Text cells that a spreadsheet would read as
    a formula get a leading apostrophe: labels are written by clients and may be hostile."""
    import csv
    import io
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    header = [chart.category] + ([chart.key_name] if chart.keys is not None else []) + [n for n, _ in chart.series]
    writer.writerow([_csv_text(h) for h in header])
    for i, (label, values) in enumerate(chart.rows()):
        key = [_csv_text(str(chart.keys[i]))] if chart.keys is not None else []
        writer.writerow([_csv_text(str(label)), *key, *("" if v is None else repr(v) if isinstance(v, float) else v
                                                       for v in values)])
    return out.getvalue()


def _csv_text(text: str) -> str:
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


# what the pages ask for

@dataclass
class Selection:
    """The choices of a landscape or evolution page (or of the overview), validated."""

    organization: str | None = None  # chosen (None: all those the viewer may see)
    anr: str | None = None
    period: str = "90"
    date_from: str | None = None
    date_to: str | None = None
    top: int = 10
    by: str = "averageRate"
    order: str = "highest"
    months: int = 12
    series: int = 10
    params: dict = field(default_factory=dict)  # the choices as given, for links

    @property
    def anrs(self) -> set | None:
        """The analyses chosen, as the processors take them (None: all)."""
        return {self.anr} if self.anr else None


PAGE_PARAMS = {"overview": ("organization",),
               "landscape": ("organization", "anr", "period", "date_from", "date_to", "top", "by", "order"),
               "evolution": ("organization", "anr", "months", "by", "order", "series")}


def _choice(params: dict, name: str, choices, default):
    raw = params.get(name)
    if raw is None:
        return default
    for choice in choices:
        if raw == str(choice):
            return choice
    raise DashboardError(400, f"{name}: {raw!r} is not one of {', '.join(map(str, choices))}")


def page_selection(request: web.Request, viewer: Viewer, page: str) -> Selection:
    """The page's choices from its query string; anything unknown or out of range is a 400."""
    allowed = PAGE_PARAMS[page]
    params = {}
    for name, raw in request.query.items():
        if name not in allowed:
            raise DashboardError(400, f"unknown query parameter {name!r} (this page takes {', '.join(allowed)})")
        if name in params:
            raise DashboardError(400, f"query parameter {name!r} is given more than once")
        if raw.strip():
            params[name] = raw.strip()  # an empty form field is no choice
    sel = Selection(params=params)
    organization = params.get("organization")
    if organization is not None:
        if viewer.anonymous:
            raise DashboardError(403, "choosing an organization needs a key: log in")
        if not viewer.chooses_organization and organization != viewer.organization:
            raise DashboardError(403, "an ordinary organization sees only its own stats")
        if request.app[STORE_KEY].organization(organization) is None:
            raise DashboardError(404, f"no organization named {organization!r}")
        sel.organization = organization if viewer.chooses_organization else None
    if "anr" in params:
        if viewer.anonymous:
            raise DashboardError(403, "choosing an analysis needs a key: log in")
        sel.anr = parse_uuid(params["anr"])
        if sel.anr is None:
            raise DashboardError(400, f"anr: {params['anr']!r} is not an analysis UUID")
    if page == "landscape":
        custom = "date_from" in params or "date_to" in params
        sel.period = _choice(params, "period", [*map(str, PERIOD_DAYS), "custom"], "custom" if custom else "90")
        if sel.period == "custom":
            sel.date_from, sel.date_to = params.get("date_from"), params.get("date_to")
            for name in ("date_from", "date_to"):
                if getattr(sel, name) is not None and parse_date(getattr(sel, name)) is None:
                    raise DashboardError(400, f"{name}: {getattr(sel, name)!r} is not a date written YYYY-MM-DD")
            if sel.date_from and sel.date_to and sel.date_from > sel.date_to:
                raise DashboardError(400, "date_from is after date_to")
        else:
            today = date.today()
            sel.date_from = date.fromordinal(today.toordinal() - int(sel.period)).isoformat()
            sel.date_to = today.isoformat()
        sel.top = _choice(params, "top", TOP_CHOICES, 10)
    if page == "evolution":
        sel.months = _choice(params, "months", EVOLUTION_MONTHS, 12)
        sel.series = _choice(params, "series", SERIES_CHOICES, 10)
    if page in ("landscape", "evolution"):
        sel.by = _choice(params, "by", tuple(MEASURE_NAMES), "averageRate")
        sel.order = _choice(params, "order", ("highest", "lowest"), "highest")
    return sel


class ChartContext:
    """What building a page's charts needs; processed_stats answers are reused within the request."""

    def __init__(self, request: web.Request, viewer: Viewer, sel: Selection):
        self.request, self.viewer, self.sel = request, viewer, sel
        self.store: Store = request.app[STORE_KEY]
        self.languages = preferred_languages(request)
        self.query = urlencode(sel.params)
        self.memo: dict = {}

    @property
    def organization(self) -> str | None:
        """The organization the charts cover: the one chosen, within what the viewer may see."""
        return self.viewer.scope(self.sel.organization)

    async def processed(self, kind: str, processor: str, date_from: str | None, date_to: str | None):
        """A v1 processor's answer for this selection and dates, computed once per page."""
        key = (kind, processor, date_from, date_to)
        if key not in self.memo:
            self.memo[key] = await processed_stats(self.store, kind, processor, {}, date_from=date_from, date_to=date_to,
                                             anrs=self.sel.anrs, organization=self.organization)
        return self.memo[key]

    def processed_url(self, kind: str, processor: str, date_from: str | None, date_to: str | None) -> str:
        """The /api/v1/stats/processed/ call that answers the same numbers."""
        params = {"type": kind, "processor": processor}
        if date_from:
            params["date_from"] = date_from
        if date_to:
            params["date_to"] = date_to
        if self.sel.anr:
            params["anrs"] = self.sel.anr
        if self.organization is not None:
            params["organization"] = self.organization
        return f"{V1_PREFIX}/stats/processed/?{urlencode(params)}"


def _object_label(item: dict, languages: list[str]) -> str:
    return label_of(item.get("labels"), languages, str(item.get("object", "")))


def top_objects(items: list, by: str, order: str, count: int) -> list:
    """The `count` objects of a *_average_on_date answer with the highest (lowest) average `by`."""
    ranked = sorted(items, key=lambda item: (item["averages"][by], item["object"]), reverse=order == "highest")
    return ranked[:count]


async def period_sums(ctx: ChartContext, kind: str, periods: list[tuple[str | None, str | None]]) -> list[dict]:
    """Per period (first day, last day; in order, one after the other), key -> [count, exact sums...]
    over its days: the kept per-day sums (Store.measures_by_day) read once for all of them and added
    up as the processors add them, so the means are theirs (see object_items, _risk_means).

    Kept with the processor answers, until the next write that changes a sum.
    """
    store, aggregates = ctx.store, ctx.store.aggregates
    key = ("period_sums", kind, tuple(periods), None if ctx.sel.anrs is None else tuple(sorted(ctx.sel.anrs)),
           ctx.organization)
    kept = aggregates.kept(key)
    if kept is not None:
        return kept
    version = aggregates.version
    days = await store.measures_by_day(kind, periods[0][0], periods[-1][1], organization=ctx.organization,
                                       anrs=ctx.sel.anrs)
    found: list[dict] = [{} for _ in periods]
    at, budget = 0, LoopBudget()
    for day, bucket in days:
        while periods[at][1] is not None and day > periods[at][1]:
            at += 1
        sums = found[at]
        for name, measures in bucket.items():
            entry = sums.get(name)
            if entry is None:
                sums[name] = list(measures)
            else:
                entry[:] = map(operator.add, entry, measures)
        await budget.spend()
    if store.aggregates is aggregates:  # (not reloaded meanwhile)
        aggregates.keep(key, version, found)
    return found


def object_items(ctx: ChartContext, sums: dict) -> list[dict]:
    """{"object", "labels", "averages"} per object of period_sums: what the *_average_on_date
    processors answer over the same days (without the values of each day)."""
    labels = ctx.store.aggregates.labels
    return [{"object": uuid, "labels": object_labels(labels, uuid),
             "averages": {name: _mean(total, count) for name, total in zip(STAT_MEASURES, totals)}}
            for uuid, (count, *totals) in sums.items()]


def added_sums(sums: list[dict]) -> dict:
    """The period_sums of several periods, as one."""
    total: dict = {}
    for one in sums:
        for name, measures in one.items():
            entry = total.get(name)
            total[name] = list(measures) if entry is None else list(map(operator.add, entry, measures))
    return total


async def chart_top(ctx: ChartContext, kind: str) -> Chart:
    """Top threats or vulnerabilities as horizontal bars, by the chosen measure and order."""
    sel = ctx.sel
    processor = f"{kind}_average_on_date"
    sums, = await period_sums(ctx, kind, [(sel.date_from, sel.date_to)])
    items = top_objects(object_items(ctx, sums), sel.by, sel.order, sel.top)
    names = VULNERABILITY_MEASURE_NAMES if kind == "vulnerability" else MEASURE_NAMES
    plural = "threats" if kind == "threat" else "vulnerabilities"
    return Chart(plural, f"Top {sel.top} {plural} by {names[sel.by]}, {sel.order} first", "hbar",
                 [_object_label(item, ctx.languages) for item in items],
                 [(sel.by, [item["averages"][sel.by] for item in items])],
                 kind, ctx.query, ctx.processed_url(kind, processor, sel.date_from, sel.date_to),
                 keys=[item["object"] for item in items])


async def chart_risks(ctx: ChartContext, risk_kind: str) -> Chart:
    """Information or operational risks: Low, Medium and High, current against residual."""
    sel = ctx.sel
    data = await ctx.processed("risk", "risk_averages", sel.date_from, sel.date_to)
    states = [(state, [data[state][risk_kind][level] if data else None for level in RISK_LEVELS])
              for state in RISK_STATES]
    title = "Information risks" if risk_kind == "informational" else "Operational risks"
    return Chart(f"risks-{risk_kind}", f"{title}: mean number of risks per analysis, current and residual", "bar",
                 [level.split()[0] for level in RISK_LEVELS], states, "level", ctx.query,
                 ctx.processed_url("risk", "risk_averages", sel.date_from, sel.date_to))


def evolution_months(sel: Selection) -> list[tuple[str, str, str]]:
    """(YYYY-MM, first day, last day) of the months shown, oldest first (this month last)."""
    today = date.today().replace(day=1)
    out = []
    for back in range(sel.months - 1, -1, -1):
        first = months_before(today, back)
        following = months_before(first, -1)
        out.append((first.isoformat()[:7], first.isoformat(), date.fromordinal(following.toordinal() - 1).isoformat()))
    return out


async def chart_evolution(ctx: ChartContext, kind: str) -> Chart:
    """Monthly means of the top objects: each month's value is the processor's over that month."""
    sel = ctx.sel
    months = evolution_months(sel)
    processor = f"{kind}_average_on_date"
    sums = await period_sums(ctx, kind, [(first, last) for _, first, last in months])
    chosen = top_objects(object_items(ctx, added_sums(sums)), sel.by, sel.order, sel.series)
    per_month = [{item["object"]: item["averages"][sel.by] for item in object_items(ctx, month)} for month in sums]
    plural = "threats" if kind == "threat" else "vulnerabilities"
    names = VULNERABILITY_MEASURE_NAMES if kind == "vulnerability" else MEASURE_NAMES
    series = [(_object_label(item, ctx.languages), [values.get(item["object"]) for values in per_month])
              for item in chosen]
    return Chart(f"evolution-{plural}", f"{len(chosen)} {sel.order} {plural} by {names[sel.by]}, month by month",
                 "line", [m for m, _, _ in months], series, "month", ctx.query,
                 ctx.processed_url(kind, processor, months[0][1], months[-1][2]),
                 label_links=[ctx.processed_url(kind, processor, first, last) for _, first, last in months],
                 note="Each point is the mean over the stats dated in that month (the processor asked for"
                      " that month alone); the series are the top ones over the whole window.")


async def chart_evolution_risks(ctx: ChartContext, risk_kind: str) -> Chart:
    """Information or operational risk levels per month, current and residual."""
    months = evolution_months(ctx.sel)
    series = []
    sums = await period_sums(ctx, "risk", [(first, last) for _, first, last in months])
    answers = [_risk_means(month)  # what risk_averages answers for the month
               if month or ctx.store.has_stats("risk", first, last, organization=ctx.organization, anrs=ctx.sel.anrs)
               else [] for month, (_, first, last) in zip(sums, months)]
    for state in RISK_STATES:
        for level in RISK_LEVELS:
            series.append((f"{level.split()[0]} {state}",
                           [answer[state][risk_kind][level] if answer else None for answer in answers]))
    title = "Information risks" if risk_kind == "informational" else "Operational risks"
    return Chart(f"evolution-risks-{risk_kind}", f"{title} by level, month by month (mean per analysis)", "line",
                 [m for m, _, _ in months], series, "month", ctx.query,
                 ctx.processed_url("risk", "risk_averages", months[0][1], months[-1][2]),
                 label_links=[ctx.processed_url("risk", "risk_averages", first, last) for _, first, last in months])


def chart_stats_by_month(ctx: ChartContext) -> Chart:
    """Stats received per type and month, over the last 12 months."""
    counts = stat_counts_by_month(ctx.store, ctx.organization, 12)
    months = evolution_months(replace(ctx.sel, months=12))
    labels = [m for m, _, _ in months]
    series = [(kind, [by_month.get(m, 0) for m in labels]) for kind, by_month in sorted(counts.items())]
    params = {"date__gte": months[0][1], "_fields": "type,date,organization", "_limit": "1000"}
    if ctx.organization is not None:
        params["organization"] = ctx.organization
    owner = f" of {ctx.organization}" if ctx.organization is not None else ""
    return Chart("stats-by-month", f"Stats{owner} by type and month, last 12 months", "stacked", labels, series,
                 "month", ctx.query, f"{API_PREFIX}/stats/?{urlencode(params)}",
                 note="By the stat's date (else its year and day, else the day it was received).")


CHARTS = {
    "stats-by-month": ("overview", lambda ctx: asyncio.sleep(0, chart_stats_by_month(ctx))),
    "threats": ("landscape", lambda ctx: chart_top(ctx, "threat")),
    "vulnerabilities": ("landscape", lambda ctx: chart_top(ctx, "vulnerability")),
    "risks-informational": ("landscape", lambda ctx: chart_risks(ctx, "informational")),
    "risks-operational": ("landscape", lambda ctx: chart_risks(ctx, "operational")),
    "evolution-threats": ("evolution", lambda ctx: chart_evolution(ctx, "threat")),
    "evolution-vulnerabilities": ("evolution", lambda ctx: chart_evolution(ctx, "vulnerability")),
    "evolution-risks-informational": ("evolution", lambda ctx: chart_evolution_risks(ctx, "informational")),
    "evolution-risks-operational": ("evolution", lambda ctx: chart_evolution_risks(ctx, "operational")),
}
PAGE_CHARTS = {page: [name for name, (p, _) in CHARTS.items() if p == page] for page in PAGE_PARAMS}


@dataclass
class ShownChart:
    """A chart as a page shows it: the chart and its inline SVG."""

    chart: Chart
    svg: Any


async def shown(request: web.Request, chart: Chart) -> ShownChart:
    """A chart ready for a template: its SVG (drawn off the loop) and its links."""
    from markupsafe import Markup
    return ShownChart(chart, Markup(await render_svg_async(chart, request[NONCE_KEY])))


# the pages

def choices_for(request: web.Request, viewer: Viewer, sel: Selection) -> dict:
    """The organizations and analyses the viewer may choose among (bounded lists)."""
    if viewer.anonymous:
        return {"organizations": [], "analyses": []}
    store: Store = request.app[STORE_KEY]
    organizations = sorted(o["name"] for o in store.organizations()) if viewer.chooses_organization \
        else [viewer.organization]
    activity = organization_activity(store, viewer.scope(sel.organization))
    analyses = sorted({str(anr) for row in activity for anr in row["analyses"] if parse_uuid(str(anr))})
    return {"organizations": organizations[:1000], "analyses": analyses[:1000]}


@route("GET", "/", when=dashboard_on, **ROOT_FACTS)
async def dashboard_overview(request: web.Request) -> web.Response:
    """`/`: the JSON service index for clients asking for JSON, else the overview page."""
    accept = request.headers.get("Accept", "*/*")
    if accepted_quality(accept, "text/html") <= accepted_quality(accept, "application/json"):
        return await index(request)  # curl and scripts (Accept: */*) get JSON; browsers prefer text/html
    return await _overview(request)


@dashboard_handler
async def _overview(request: web.Request) -> web.Response:
    viewer = page_viewer(request, aggregated=True)
    sel = page_selection(request, viewer, "overview")
    ctx = ChartContext(request, viewer, sel)
    store: Store = request.app[STORE_KEY]
    activity = [] if viewer.anonymous else organization_activity(store, ctx.organization)
    silent_before = date.fromordinal(date.today().toordinal() - SILENT_DAYS).isoformat()
    for row in activity:
        row["silent"] = row["latest"] is not None and row["latest"] < silent_before
    sizes = store.file_sizes()
    storage = {"database": sizes["database"], "journal": sizes["journal"] + sizes["folding"],
               "checkpoint": _file_time(store.path), "stats": store.count_stats(),
               "organizations": len(store.organizations())}
    chart = chart_stats_by_month(ctx)
    return render_page(request, "overview.html", {
        "title": "Overview", "page": "overview", "viewer": viewer, "sel": sel,
        "choices": choices_for(request, viewer, sel), "chart": await shown(request, chart),
        "activity": activity, "storage": storage, "silent_days": SILENT_DAYS,
        "json_url": chart.json_url})


def _file_time(path: str) -> str | None:
    try:
        return datetime.fromtimestamp(os.path.getmtime(path), timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    except OSError:
        return None


async def chart_page(request: web.Request, page: str, title: str, **choices) -> web.Response:
    """The landscape or evolution page: its charts for the choices made, and the `choices` it offers."""
    viewer = page_viewer(request, aggregated=True)
    sel = page_selection(request, viewer, page)
    ctx = ChartContext(request, viewer, sel)
    charts = {name: await shown(request, await CHARTS[name][1](ctx)) for name in PAGE_CHARTS[page]}
    return render_page(request, f"{page}.html", {
        "title": title, "page": page, "viewer": viewer, "sel": sel, "charts": charts,
        "choices": choices_for(request, viewer, sel), "measures": MEASURE_NAMES,
        "json_url": charts[PAGE_CHARTS[page][0]].chart.json_url, **choices})


@route("GET", DASHBOARD_PREFIX + "/landscape/", when=dashboard_on)
@dashboard_handler
async def dashboard_landscape(request: web.Request) -> web.Response:
    """GET /dashboard/landscape/: top threats and vulnerabilities, and the risks, for the choices."""
    return await chart_page(request, "landscape", "Current landscape", periods=PERIOD_DAYS, tops=TOP_CHOICES)


@route("GET", DASHBOARD_PREFIX + "/evolution/", when=dashboard_on)
@dashboard_handler
async def dashboard_evolution(request: web.Request) -> web.Response:
    """GET /dashboard/evolution/: the monthly lines of the top objects and of the risk levels."""
    return await chart_page(request, "evolution", "Evolution", months=EVOLUTION_MONTHS, series=SERIES_CHOICES)


@route("GET", DASHBOARD_PREFIX + r"/charts/{name:[a-z-]+}.{ext:[a-z]+}", when=dashboard_on)
@dashboard_handler
async def dashboard_chart(request: web.Request) -> web.Response:
    """A chart of a page, alone, as SVG or CSV: /dashboard/charts/NAME.svg?the page's choices."""
    name, extension = request.match_info["name"], request.match_info["ext"]
    if name not in CHARTS or extension not in ("svg", "csv"):
        raise DashboardError(404, f"no chart {name}.{extension}")
    page, build = CHARTS[name]
    viewer = page_viewer(request, aggregated=True)
    ctx = ChartContext(request, viewer, page_selection(request, viewer, page))
    chart = await build(ctx)
    filename = f"statsd-{name}-{date.today().isoformat()}.{extension}"
    headers = {"Content-Disposition": f'attachment; filename="{filename}"'}
    if extension == "csv":
        return web.Response(text=render_csv(chart), content_type="text/csv", charset="utf-8", headers=headers)
    headers["Content-Security-Policy"] = "default-src 'none'; style-src 'unsafe-inline'"  # no script can run
    svg = await render_svg_async(chart, standalone=True)
    return web.Response(text=svg, content_type="image/svg+xml", charset="utf-8", headers=headers)


EXPLORER_COLUMNS = ("created_at", "organization", "anr", "type", "date")
EXPLORER_ORDERS = {"-created_at": "newest first", "created_at": "oldest first", "-date": "latest date first",
                   "date": "earliest date first", "type": "type", "organization": "organization"}


@route("GET", DASHBOARD_PREFIX + "/explorer/", when=dashboard_on)
@dashboard_handler
async def dashboard_explorer(request: web.Request) -> web.Response:
    """The stats as a table: the same query parameters as /api/v2/stats/ (empty ones ignored)."""
    viewer = page_viewer(request, aggregated=False)
    config: Config = request.app[CONFIG_KEY]
    params = {}
    for name, raw in request.query.items():
        if name in params:
            raise DashboardError(400, f"query parameter {name!r} is given more than once")
        if raw != "" and name != "api_key":
            params[name] = raw
    params.setdefault("_limit", "25")
    query = parse_query(params, STAT_FIELDS, config)
    if not viewer.chooses_organization:
        query = replace(query, filters=[Filter(("organization",), "exact", viewer.organization), *query.filters])
    page, more = await request.app[STORE_KEY].find("stats", query)
    rows = [{"id": d["id"], "data": _data_summary(parsed_data(d)), **{c: d.get(c) for c in EXPLORER_COLUMNS}}
            for d in page]

    def with_params(**changes) -> str:
        merged = {**params, **{k: str(v) for k, v in changes.items()}}
        return f"{DASHBOARD_PREFIX}/explorer?{urlencode(merged)}"
    form_fields = ("type", "organization", "anr", "date__gte", "date__lte", "_order_by", "_limit")
    hidden = {k: v for k, v in params.items() if k not in form_fields and k not in ("_skip", "offset")}
    store: Store = request.app[STORE_KEY]
    return render_page(request, "explorer.html", {
        "title": "Explorer", "page": "explorer", "viewer": viewer, "rows": rows, "params": params,
        "hidden": hidden, "skip": query.skip, "limit": query.limit, "more": more,
        "previous": with_params(_skip=max(0, query.skip - query.limit)) if query.skip else None,
        "next": with_params(_skip=query.skip + query.limit) if more else None,
        "organizations": sorted(o["name"] for o in store.organizations())[:1000] if viewer.chooses_organization
        else [],
        "types": store.stat_types()[:200], "orders": EXPLORER_ORDERS,
        "limits": EXPLORER_LIMITS, "json_url": f"{API_PREFIX}/stats/?{urlencode(params)}"})


def _data_summary(data) -> str:
    if isinstance(data, list):
        return f"list of {len(data)}"
    if isinstance(data, dict):
        keys = list(data)
        return "{" + ", ".join(map(str, keys[:4])) + (", …" if len(keys) > 4 else "") + "}"
    text = orjson.dumps(data).decode()
    return text if len(text) <= 40 else text[:39] + "…"


def record_page_viewer(request: web.Request) -> "Viewer":
    """The viewer of a stat's or an organization's page, which take no choices (400 for any query parameter)."""
    viewer = page_viewer(request, aggregated=False)
    only = set(request.query) - {"api_key"}
    if only:
        raise DashboardError(400, f"unknown query parameter(s): {', '.join(sorted(only))}")
    return viewer


@route("GET", DASHBOARD_PREFIX + "/stats/{id}/", when=dashboard_on)
@dashboard_handler
async def dashboard_stat(request: web.Request) -> web.Response:
    """GET /dashboard/stats/{id}: one stat, its data pretty-printed, and a link to its JSON."""
    viewer = record_page_viewer(request)
    stat_id = request.match_info["id"]
    doc = request.app[STORE_KEY].stat(stat_id)
    if doc is None or not (viewer.chooses_organization or doc.get("organization") == viewer.organization):
        raise DashboardError(404, f"no stat with id {stat_id!r}")
    pretty = orjson.dumps(parsed_data(doc), option=orjson.OPT_INDENT_2).decode()
    truncated = len(pretty) > STAT_PAGE_MAX_DATA
    fields_shown = [(name, doc[name]) for name in ("id", "uuid", "organization", "anr", "type", "date", "day",
                                                   "week", "month", "quarter", "year", "created_at", "updated_at")
                    if name in doc]
    return render_page(request, "stat.html", {
        "title": f"Stat {doc['id']}", "page": "explorer", "viewer": viewer, "doc": doc, "fields": fields_shown,
        "pretty": pretty[:STAT_PAGE_MAX_DATA], "truncated": truncated, "v1_date": stat_date(doc),
        "json_url": stat_path(doc["id"])})


@route("GET", DASHBOARD_PREFIX + "/organizations/{name}/", when=dashboard_on)
@dashboard_handler
async def dashboard_organization(request: web.Request) -> web.Response:
    """GET /dashboard/organizations/{name}: an organization, its analyses and latest collections."""
    viewer = record_page_viewer(request)
    name = request.match_info["name"]
    store: Store = request.app[STORE_KEY]
    org = store.organization(name)
    if org is None or not (viewer.chooses_organization or name == viewer.organization):
        raise DashboardError(404, f"no organization named {name!r}")
    sel = Selection(organization=name, params={"organization": name})
    ctx = ChartContext(request, viewer, sel)
    activity = organization_activity(store, name)[0]
    return render_page(request, "organization.html", {
        "title": f"Organization {name}", "page": "explorer", "viewer": viewer, "org": org, "activity": activity,
        "chart": await shown(request, chart_stats_by_month(ctx)),
        "explorer_url": f"{DASHBOARD_PREFIX}/explorer?{urlencode({'organization': name})}",
        "json_url": org_path(name) if viewer.chooses_organization else
        f"{API_PREFIX}/stats/?{urlencode({'organization': name})}"})


def safe_next(target: str | None) -> str:
    """Where to go after logging in: a path on this site only (never //host or /\\host)."""
    if not target or not target.startswith("/") or target.startswith(("//", "/\\")) \
            or any(ord(c) < 33 or c == "\\" for c in target):
        return "/"
    return target


def same_origin(request: web.Request) -> bool:
    """Whether a POST comes from a page of this site (its Origin, else its Referer)."""
    base = base_url(request)
    origin = request.headers.get("Origin")
    if origin is not None:
        return origin == base
    referer = urlsplit(request.headers.get("Referer", ""))
    return bool(referer.scheme) and f"{referer.scheme}://{referer.netloc}" == base


def _check_same_origin(request: web.Request) -> None:
    if not same_origin(request):
        raise DashboardError(403, "this form must be sent from a page of this site (Origin or Referer"
                                  " of another site, or none)")


@route("GET", DASHBOARD_PREFIX + "/login/", when=dashboard_on)
@route("POST", DASHBOARD_PREFIX + "/login/", when=dashboard_on)
@dashboard_handler
async def dashboard_login(request: web.Request) -> web.Response:
    """GET: the login form. POST: check the key, start a session, go where the person was going."""
    config: Config = request.app[CONFIG_KEY]
    target = safe_next(request.query.get("next"))
    context = {"title": "Log in", "page": "login", "viewer": None, "next": target, "error": None,
               "json_url": f"{V1_PREFIX}/client/me"}
    if not config.api_key_authentication:
        return see_other(target)
    if request.method == "GET":
        return render_page(request, "login.html", context)
    _check_same_origin(request)
    item = request.app[LOGIN_LIMIT_KEY]
    limiter: Limiter = request.app[LIMITER_KEY]
    address = client_address(request)
    if not await limiter.moving_window.hit(item, "dashboard-login", address):
        stats = await limiter.moving_window.get_window_stats(item, "dashboard-login", address)
        retry = str(max(1, math.ceil(stats.reset_time - time.time())))
        raise DashboardError(429, f"too many login attempts from your address: at most {item}; try again in"
                                  f" {retry} s", {"Retry-After": retry})
    form = await request.post()
    token = form.get("api_key")
    target = safe_next(form.get("next") if isinstance(form.get("next"), str) else None)
    caller = _caller_for(request.app[STORE_KEY], token) if isinstance(token, str) and token else None
    if caller is None:
        return render_page(request, "login.html", {**context, "next": target,
                                                   "error": "That key belongs to no organization."}, status=401)
    sessions: Sessions = request.app[SESSIONS_KEY]
    sessions.end(request.cookies.get(SESSION_COOKIE))  # a fresh id at each login
    response = see_other(target)
    response.set_cookie(SESSION_COOKIE, sessions.new(caller.token_sha256), max_age=int(sessions.lifetime),
                        path="/", httponly=True, samesite="Strict", secure=base_url(request).startswith("https:"))
    return response


@route("POST", DASHBOARD_PREFIX + "/logout/", when=dashboard_on)
@dashboard_handler
async def dashboard_logout(request: web.Request) -> web.Response:
    """POST /dashboard/logout: end the session (same-origin only) and go to the login page."""
    _check_same_origin(request)
    request.app[SESSIONS_KEY].end(request.cookies.get(SESSION_COOKIE))
    response = see_other(DASHBOARD_PREFIX + "/login")
    response.del_cookie(SESSION_COOKIE, path="/")
    return response


@route("GET", DASHBOARD_PREFIX + "/static/dashboard.css", when=dashboard_on)
@dashboard_handler
async def dashboard_css(request: web.Request) -> web.Response:
    """GET the dashboard's stylesheet (served by statsd: nothing comes from another host)."""
    return web.Response(text=DASHBOARD_TEMPLATES["dashboard.css"], content_type="text/css", charset="utf-8",
                        headers={"Cache-Control": "public, max-age=3600"})


@route("GET", DASHBOARD_PREFIX + "/", when=dashboard_on)
@dashboard_handler
async def dashboard_home(request: web.Request) -> web.Response:
    """GET /dashboard/: the overview is at /."""
    return see_other("/")


def setup_dashboard(app: web.Application) -> None:
    """The dashboard's sessions, templates and login limit (none when dashboard = "off")."""
    if not dashboard_on(app[CONFIG_KEY]):
        return
    app[SESSIONS_KEY] = Sessions()
    app[TEMPLATES_KEY] = dashboard_templates()
    app[LOGIN_LIMIT_KEY] = limits.parse(LOGIN_RATE_LIMIT)


# The dashboard's templates and stylesheet, carried by this module (no data files to ship).
DASHBOARD_TEMPLATES = {
    "layout.html": """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="same-origin">
<title>{{ title }} · statsd</title>
<link rel="stylesheet" href="{{ prefix }}/static/dashboard.css">
</head>
<body class="page-{{ page }}">
<header class="top">
  <a class="brand" href="/"><span class="logo" aria-hidden="true"></span>statsd <small>MONARC statistics</small></a>
  {% if viewer is not none %}
  <nav aria-label="pages">
    <a href="/"{% if page == 'overview' %} aria-current="page"{% endif %}>Overview</a>
    <a href="{{ prefix }}/landscape"{% if page == 'landscape' %} aria-current="page"{% endif %}>Current landscape</a>
    <a href="{{ prefix }}/evolution"{% if page == 'evolution' %} aria-current="page"{% endif %}>Evolution</a>
    {% if not viewer.anonymous %}<a href="{{ prefix }}/explorer"{% if page == 'explorer' %} aria-current="page"{% endif %}>Explorer</a>{% endif %}
  </nav>
  <div class="who">
    {% if viewer.anonymous %}
      <span class="badge">public view</span> <a class="button" href="{{ prefix }}/login?next={{ path|urlencode }}">Log in</a>
    {% elif viewer.auth_off %}
      <span class="badge warn">authentication off</span>
    {% else %}
      <a class="org" href="{{ prefix }}/organizations/{{ viewer.organization|urlencode }}">{{ viewer.organization }}</a>
      {% if viewer.is_admin %}<span class="badge">admin</span>{% endif %}
      <form method="post" action="{{ prefix }}/logout" class="inline"><button type="submit">Log out</button></form>
    {% endif %}
  </div>
  {% endif %}
</header>
<main>
{% block content %}{% endblock %}
</main>
<footer>
  statsd {{ version }}{% if json_url is defined and json_url %} · <a class="json-link" href="{{ json_url }}">the JSON API call behind this page</a>{% endif %}
  · works offline, without JavaScript
</footer>
</body>
</html>
""",
    "macros.html": """{% macro chart_figure(c) %}
<figure class="chart card" id="chart-{{ c.chart.name }}" data-chart="{{ c.chart.name }}">
  <figcaption>
    <h3>{{ c.chart.title }}</h3>
    <span class="exports">
      <a href="{{ c.chart.export_url('csv') }}" download class="export-csv">CSV</a>
      <a href="{{ c.chart.export_url('svg') }}" download class="export-svg">SVG</a>
      <a href="{{ c.chart.json_url }}" class="export-json">JSON</a>
    </span>
  </figcaption>
  {% if c.chart.empty %}
  <p class="empty">No stats for this selection.</p>
  {% else %}
  <div class="svg">{{ c.svg }}</div>
  {% endif %}
  {% if c.chart.note %}<p class="note">{{ c.chart.note }}</p>{% endif %}
  {% if not c.chart.empty %}
  <details>
    <summary>The numbers</summary>
    <div class="table-wrap"><table class="numbers">
      <thead><tr><th>{{ c.chart.category }}</th>{% for name, _ in c.chart.series %}<th>{{ name }}</th>{% endfor %}</tr></thead>
      <tbody>
      {% for label, values in c.chart.rows() %}
        <tr><th scope="row">{% if c.chart.label_links %}<a href="{{ c.chart.label_links[loop.index0] }}">{{ label }}</a>{% else %}{{ label }}{% endif %}</th>
        {% for v in values %}<td>{{ v|number }}</td>{% endfor %}</tr>
      {% endfor %}
      </tbody>
    </table></div>
  </details>
  {% endif %}
</figure>
{% endmacro %}

{% macro organization_field(organizations, selected) %}
  <label>Organization
    <select name="organization">
      <option value="">all</option>
      {% for name in organizations %}<option value="{{ name }}"{% if selected == name %} selected{% endif %}>{{ name }}</option>{% endfor %}
    </select>
  </label>
{% endmacro %}

{% macro scope_fields(sel, choices, viewer) %}
  {% if choices.organizations|length > 1 %}{{ organization_field(choices.organizations, sel.organization) }}{% endif %}
  {% if not viewer.anonymous %}
  <label>Analysis
    <select name="anr">
      <option value="">all</option>
      {% for anr in choices.analyses %}<option value="{{ anr }}"{% if sel.anr == anr %} selected{% endif %}>{{ anr }}</option>{% endfor %}
    </select>
  </label>
  {% endif %}
{% endmacro %}

{% macro select_field(label, name, values, selected, text="{}", extra=None) %}
  <label>{{ label }}
    <select name="{{ name }}">
      {% for value in values %}<option value="{{ value }}"{% if selected|string == value|string %} selected{% endif %}>{{ text.format(value) }}</option>{% endfor %}
      {% if extra %}<option value="{{ extra[0] }}"{% if selected|string == extra[0] %} selected{% endif %}>{{ extra[1] }}</option>{% endif %}
    </select>
  </label>
{% endmacro %}

{% macro choice_form(page, sel, choices, viewer, measures, span, count) %}
{# The choices of the landscape and evolution pages: the span (then, from a call block, more
   fields), the scope, how many objects (span and count are select_field's arguments), the measure. #}
<form method="get" action="{{ prefix }}/{{ page }}" class="controls card">
  {{ select_field(*span) }}
  {% if caller is defined %}{{ caller() }}{% endif %}
  {{ scope_fields(sel, choices, viewer) }}
  {{ select_field(*count) }}
  {{ measure_fields(sel, measures) }}
  <button type="submit">Show</button>
</form>
{% endmacro %}

{% macro chart_grids(charts, first, second, left, right) %}
<div class="grid one">
  {{ chart_figure(charts[first]) }}
  {{ chart_figure(charts[second]) }}
</div>
<div class="grid two">
  {{ chart_figure(charts[left]) }}
  {{ chart_figure(charts[right]) }}
</div>
{% endmacro %}

{% macro measure_fields(sel, measures) %}
  <label>By
    <select name="by">
      {% for key, name in measures.items() %}<option value="{{ key }}"{% if sel.by == key %} selected{% endif %}>{{ name }}</option>{% endfor %}
    </select>
  </label>
  <label>Order
    <select name="order">
      <option value="highest"{% if sel.order == 'highest' %} selected{% endif %}>highest first</option>
      <option value="lowest"{% if sel.order == 'lowest' %} selected{% endif %}>lowest first</option>
    </select>
  </label>
{% endmacro %}
""",
    "overview.html": """{% extends "layout.html" %}
{% from "macros.html" import chart_figure, organization_field %}
{% block content %}
<h1>Overview</h1>
<p class="lead">What this statsd has collected{% if sel.organization %} from <strong>{{ sel.organization }}</strong>{% elif viewer.organization and not viewer.chooses_organization %} from <strong>{{ viewer.organization }}</strong>{% endif %}.</p>
{% if choices.organizations|length > 1 %}
<form method="get" action="/" class="controls card">
  {{ organization_field(choices.organizations, sel.organization) }}
  <button type="submit">Show</button>
</form>
{% endif %}
<section class="tiles">
  <div class="tile card"><span class="value">{{ storage.stats|number }}</span><span class="label">stats in all</span></div>
  <div class="tile card"><span class="value">{{ storage.organizations|number }}</span><span class="label">organizations</span></div>
  <div class="tile card"><span class="value">{% if storage.database is not none %}{{ storage.database|size }}{% else %}none yet{% endif %}</span><span class="label">database file</span></div>
  <div class="tile card"><span class="value">{% if storage.journal is not none %}{{ storage.journal|size }}{% else %}none{% endif %}</span><span class="label">journal</span></div>
  <div class="tile card"><span class="value small">{{ storage.checkpoint or "never" }}</span><span class="label">last checkpoint</span></div>
  <div class="tile card"><span class="value small">{{ version }}</span><span class="label">statsd version</span></div>
</section>
{{ chart_figure(chart) }}
{% if not viewer.anonymous %}
<section class="card">
  <h2>Organizations and analyses</h2>
  <div class="table-wrap"><table class="activity">
    <thead><tr><th>organization</th><th>analyses</th><th>stats</th><th>latest stat</th><th></th></tr></thead>
    <tbody>
    {% for row in activity %}
      <tr{% if row.silent %} class="silent"{% endif %}>
        <th scope="row">{% if row.name is none %}<em>no organization</em>{% else %}<a href="{{ prefix }}/organizations/{{ row.name|urlencode }}">{{ row.name }}</a>{% endif %}</th>
        <td>{% if row.analyses %}<details><summary>{{ row.analyses|length }}</summary><ul class="anrs">{% for anr in row.analyses[:200] %}<li><a href="{{ prefix }}/explorer?anr={{ anr|string|urlencode }}">{{ anr }}</a></li>{% endfor %}{% if row.analyses|length > 200 %}<li>…</li>{% endif %}</ul></details>{% else %}0{% endif %}</td>
        <td>{{ row.stats|number }}</td>
        <td>{{ row.latest or "never" }}</td>
        <td>{% if row.silent %}<span class="badge warn" title="no stat dated in the last {{ silent_days }} days">silent &gt; {{ silent_days }} days</span>{% elif row.latest is none %}<span class="badge">no stats yet</span>{% else %}<span class="badge ok">active</span>{% endif %}</td>
      </tr>
    {% else %}
      <tr><td colspan="5" class="empty">No organization yet.</td></tr>
    {% endfor %}
    </tbody>
  </table></div>
</section>
{% endif %}
{% endblock %}
""",
    "landscape.html": """{% extends "layout.html" %}
{% from "macros.html" import choice_form, chart_grids %}
{% block content %}
<h1>Current landscape</h1>
<p class="lead">Threats, vulnerabilities and risks of the analyses{% if viewer.organization and not viewer.chooses_organization %} of <strong>{{ viewer.organization }}</strong>{% endif %},
from {{ sel.date_from or "the first stat" }} to {{ sel.date_to or "today" }}.</p>
{% call choice_form("landscape", sel, choices, viewer, measures, ("Period", "period", periods, sel.period, "last {} days", ("custom", "custom (dates below)")), ("Top", "top", tops, sel.top)) %}
  <label>From <input type="date" name="date_from" value="{{ sel.date_from if sel.period == 'custom' and sel.date_from else '' }}"></label>
  <label>To <input type="date" name="date_to" value="{{ sel.date_to if sel.period == 'custom' and sel.date_to else '' }}"></label>
{% endcall %}
{{ chart_grids(charts, "threats", "vulnerabilities", "risks-informational", "risks-operational") }}
<section class="card explain">
  <h2>Reading these charts</h2>
  <dl>
    <dt>Probability (<code>averageRate</code>)</dt><dd>for a threat, the probability (likelihood) the analysts gave it; for a vulnerability, its qualification: how easily it can be exploited. MONARC sends the mean over the analysis; the bars show the mean over the stats selected.</dd>
    <dt>Occurrence (<code>count</code>)</dt><dd>how many times the threat or vulnerability occurs in the analysis (in how many risks).</dd>
    <dt>Max. associated risk (<code>maxRisk</code>)</dt><dd>the highest risk value associated with it in the analysis.</dd>
    <dt>Risks</dt><dd>the mean number of information and operational risks per analysis at each level (low, medium, high), before treatment (current) and after the planned treatment (residual).</dd>
  </dl>
</section>
{% endblock %}
""",
    "evolution.html": """{% extends "layout.html" %}
{% from "macros.html" import choice_form, chart_grids %}
{% block content %}
<h1>Evolution</h1>
<p class="lead">Month by month over the last {{ sel.months }} months{% if viewer.organization and not viewer.chooses_organization %}, for <strong>{{ viewer.organization }}</strong>{% endif %}.</p>
{{ choice_form("evolution", sel, choices, viewer, measures, ("Months", "months", months, sel.months), ("Lines", "series", series, sel.series)) }}
{{ chart_grids(charts, "evolution-threats", "evolution-vulnerabilities", "evolution-risks-informational", "evolution-risks-operational") }}
{% endblock %}
""",
    "explorer.html": """{% extends "layout.html" %}
{% from "macros.html" import organization_field %}
{% block content %}
<h1>Explorer</h1>
<p class="lead">The stats{% if not viewer.chooses_organization %} of <strong>{{ viewer.organization }}</strong>{% endif %}, with the query parameters of <a href="{{ json_url }}"><code>/api/v2/stats/</code></a>: any filter of the API (<code>data__total__current__operational__gt=5</code>, <code>type__in=risk,threat</code>, ...) can be added to this page's address.</p>
<form method="get" action="{{ prefix }}/explorer" class="controls card">
  <label>Type
    <select name="type">
      <option value="">all</option>
      {% for t in types %}<option value="{{ t }}"{% if params.get('type') == t|string %} selected{% endif %}>{{ t }}</option>{% endfor %}
    </select>
  </label>
  {% if organizations %}{{ organization_field(organizations, params.get('organization')) }}{% endif %}
  <label>Analysis <input type="text" name="anr" size="20" value="{{ params.get('anr', '') }}" placeholder="UUID or number"></label>
  <label>Date from <input type="date" name="date__gte" value="{{ params.get('date__gte', '') }}"></label>
  <label>to <input type="date" name="date__lte" value="{{ params.get('date__lte', '') }}"></label>
  <label>Order
    <select name="_order_by">
      <option value="">as received</option>
      {% for key, name in orders.items() %}<option value="{{ key }}"{% if params.get('_order_by') == key %} selected{% endif %}>{{ name }}</option>{% endfor %}
    </select>
  </label>
  <label>Per page
    <select name="_limit">
      {% for n in limits %}<option value="{{ n }}"{% if limit == n %} selected{% endif %}>{{ n }}</option>{% endfor %}
    </select>
  </label>
  {% for name, value in hidden.items() %}<input type="hidden" name="{{ name }}" value="{{ value }}">{% endfor %}
  <button type="submit">Show</button>
  {% if hidden %}<span class="note">also: {% for name, value in hidden.items() %}<code>{{ name }}={{ value }}</code> {% endfor %}(<a href="{{ prefix }}/explorer">clear</a>)</span>{% endif %}
</form>
<section class="card">
<div class="table-wrap"><table class="stats">
  <thead><tr><th>id</th><th>received</th><th>organization</th><th>analysis</th><th>type</th><th>date</th><th>data</th></tr></thead>
  <tbody>
  {% for row in rows %}
    <tr>
      <td><a href="{{ prefix }}/stats/{{ row.id|urlencode }}"><code>{{ row.id }}</code></a></td>
      <td>{{ (row.created_at or '')[:19]|replace('T', ' ') }}</td>
      <td>{% if row.organization is not none %}<a href="{{ prefix }}/organizations/{{ row.organization|urlencode }}">{{ row.organization }}</a>{% endif %}</td>
      <td>{% if row.anr is not none %}<code>{{ row.anr }}</code>{% endif %}</td>
      <td>{{ row.type }}</td>
      <td>{{ row.date or '' }}</td>
      <td class="data">{{ row.data }}</td>
    </tr>
  {% else %}
    <tr><td colspan="7" class="empty">No stat matches.</td></tr>
  {% endfor %}
  </tbody>
</table></div>
<nav class="pages" aria-label="pagination">
  {% if previous %}<a class="button" rel="prev" href="{{ previous }}">← previous</a>{% endif %}
  <span>{% if rows %}stats {{ skip + 1 }} to {{ skip + rows|length }}{% else %}nothing here{% endif %}</span>
  {% if next %}<a class="button" rel="next" href="{{ next }}">next →</a>{% endif %}
</nav>
</section>
{% endblock %}
""",
    "stat.html": """{% extends "layout.html" %}
{% block content %}
<h1>Stat <code>{{ doc.id }}</code></h1>
<p class="lead"><a href="{{ json_url }}">Its JSON</a> · <a href="{{ prefix }}/explorer">back to the explorer</a></p>
<section class="card">
<table class="fields">
  {% for name, value in fields %}
  <tr><th scope="row">{{ name }}</th><td>{% if name == 'organization' %}<a href="{{ prefix }}/organizations/{{ value|urlencode }}">{{ value }}</a>{% else %}<code>{{ value }}</code>{% endif %}</td></tr>
  {% endfor %}
  <tr><th scope="row">v1 date</th><td><code>{{ v1_date }}</code></td></tr>
</table>
</section>
<section class="card">
<h2>data</h2>
<pre class="json">{{ pretty }}</pre>
{% if truncated %}<p class="note">Cut at {{ pretty|length|number }} characters: <a href="{{ json_url }}">the JSON</a> has all of it.</p>{% endif %}
</section>
{% endblock %}
""",
    "organization.html": """{% extends "layout.html" %}
{% from "macros.html" import chart_figure %}
{% block content %}
<h1>Organization {{ org.name }}</h1>
<p class="lead"><a href="{{ explorer_url }}">Its stats in the explorer</a> · <a href="{{ json_url }}">JSON</a></p>
<section class="tiles">
  <div class="tile card"><span class="value">{{ activity.stats|number }}</span><span class="label">stats</span></div>
  <div class="tile card"><span class="value">{{ activity.analyses|length|number }}</span><span class="label">analyses</span></div>
  <div class="tile card"><span class="value small">{{ activity.latest or "never" }}</span><span class="label">latest stat</span></div>
  <div class="tile card"><span class="value small">{{ "admin" if org.is_admin else "ordinary" }}</span><span class="label">role</span></div>
  <div class="tile card"><span class="value small">{{ "on" if org.get("is_sharing_enabled", true) else "off" }}</span><span class="label">sharing</span></div>
  <div class="tile card"><span class="value small">{{ org.created_at[:10] }}</span><span class="label">created</span></div>
</section>
{{ chart_figure(chart) }}
<section class="card">
  <h2>Analyses</h2>
  {% if activity.analyses %}
  <ul class="anrs columns">{% for anr in activity.analyses[:1000] %}<li><a href="{{ prefix }}/explorer?{{ {'organization': org.name, 'anr': anr|string}|urlencode }}"><code>{{ anr }}</code></a></li>{% endfor %}</ul>
  {% else %}<p class="empty">No analysis has sent stats.</p>{% endif %}
</section>
{% endblock %}
""",
    "login.html": """{% extends "layout.html" %}
{% block content %}
<section class="card login">
  <h1>Log in</h1>
  <p>Give the API key of your organization. The browser keeps only a random session id
  (for 8 hours, or until you log out or the key changes), never the key.</p>
  {% if error %}<p class="error" role="alert">{{ error }}</p>{% endif %}
  <form method="post" action="{{ prefix }}/login">
    <input type="hidden" name="next" value="{{ next }}">
    <label>API key <input type="password" name="api_key" autocomplete="off" required autofocus size="48"></label>
    <button type="submit">Log in</button>
  </form>
  {% if config.dashboard == 'public' %}<p class="note">Without a key: <a href="/">the public overview</a>, <a href="{{ prefix }}/landscape">landscape</a> and <a href="{{ prefix }}/evolution">evolution</a>.</p>{% endif %}
</section>
{% endblock %}
""",
    "error.html": """{% extends "layout.html" %}
{% block content %}
<section class="card">
  <h1>{{ status }}</h1>
  <p class="error" role="alert">{{ message }}</p>
  <p><a href="/">Back to the overview</a></p>
</section>
{% endblock %}
""",
    "dashboard.css": """:root {
  --ink: #1d2430; --muted: #5b6675; --line: #dfe4ea; --bg: #f3f5f8; --card: #ffffff;
  --brand: #1f3f68; --brand-2: #2f6db5; --warn: #b4541c; --ok: #2f7d4f; --error: #a32630;
  font-family: "DejaVu Sans", "Liberation Sans", Arial, sans-serif;
}
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--ink); font-size: 15px; line-height: 1.45; }
a { color: var(--brand-2); }
code, pre { font-family: "DejaVu Sans Mono", "Liberation Mono", monospace; font-size: 0.9em; }
header.top { display: flex; flex-wrap: wrap; align-items: center; gap: 8px 28px; padding: 10px 28px;
  background: var(--brand); color: #fff; }
header.top a { color: #fff; text-decoration: none; }
.brand { font-weight: bold; font-size: 20px; display: flex; align-items: center; gap: 10px; }
.brand small { font-weight: normal; font-size: 13px; opacity: 0.75; }
.logo { width: 22px; height: 22px; border-radius: 5px; display: inline-block;
  background: linear-gradient(135deg, #8fbbe8 0 33%, #e07b39 33% 66%, #3a9e6f 66%); }
header nav { display: flex; gap: 4px; flex-wrap: wrap; }
header nav a { padding: 6px 12px; border-radius: 6px; opacity: 0.85; }
header nav a:hover { background: rgba(255,255,255,0.12); opacity: 1; }
header nav a[aria-current=page] { background: rgba(255,255,255,0.2); opacity: 1; font-weight: bold; }
.who { margin-left: auto; display: flex; align-items: center; gap: 10px; }
.who .org { font-weight: bold; }
form.inline { display: inline; margin: 0; }
button, .button { font: inherit; padding: 6px 14px; border-radius: 6px; border: 1px solid var(--brand-2);
  background: var(--brand-2); color: #fff; cursor: pointer; text-decoration: none; display: inline-block; }
header button { background: transparent; border-color: rgba(255,255,255,0.6); }
main { max-width: 1240px; margin: 0 auto; padding: 20px 28px 40px; }
h1 { margin: 8px 0 4px; font-size: 26px; }
h2 { font-size: 18px; margin: 0 0 12px; }
h3 { font-size: 15px; margin: 0; }
.lead { color: var(--muted); margin: 0 0 18px; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 10px; padding: 16px 18px;
  margin: 0 0 18px; box-shadow: 0 1px 2px rgba(20, 30, 50, 0.05); }
.controls { display: flex; flex-wrap: wrap; gap: 10px 18px; align-items: flex-end; }
.controls label { display: flex; flex-direction: column; font-size: 12px; color: var(--muted); gap: 3px; }
.controls select, .controls input { font: inherit; font-size: 14px; padding: 5px 7px; border: 1px solid #c5ced9;
  border-radius: 6px; background: #fff; color: var(--ink); max-width: 22em; }
.tiles { display: grid; grid-template-columns: repeat(auto-fit, minmax(160px, 1fr)); gap: 14px; margin-bottom: 18px; }
.tile { margin: 0; display: flex; flex-direction: column; gap: 2px; }
.tile .value { font-size: 24px; font-weight: bold; color: var(--brand); }
.tile .value.small { font-size: 16px; padding-top: 6px; }
.tile .label { color: var(--muted); font-size: 13px; }
.grid.two { display: grid; grid-template-columns: repeat(auto-fit, minmax(480px, 1fr)); gap: 0 18px; }
figure.chart { margin: 0 0 18px; }
figure.chart figcaption { display: flex; justify-content: space-between; align-items: baseline; gap: 12px;
  margin-bottom: 8px; }
.exports a { font-size: 12px; margin-left: 6px; padding: 2px 8px; border: 1px solid var(--line); border-radius: 5px;
  text-decoration: none; }
.exports a:hover { background: var(--bg); }
.svg svg { width: 100%; height: auto; display: block; }
.note { color: var(--muted); font-size: 13px; }
.empty { color: var(--muted); font-style: italic; padding: 24px 0; text-align: center; }
details summary { cursor: pointer; color: var(--brand-2); font-size: 13px; margin-top: 6px; }
.table-wrap { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; font-size: 14px; }
th, td { text-align: left; padding: 6px 10px; border-bottom: 1px solid var(--line); vertical-align: top; }
thead th { font-size: 12px; text-transform: uppercase; letter-spacing: 0.03em; color: var(--muted); }
table.numbers td { text-align: right; font-variant-numeric: tabular-nums; }
table.fields th { width: 10em; color: var(--muted); font-weight: normal; }
td.data { color: var(--muted); max-width: 22em; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
tr.silent th, tr.silent td { background: #fff8f0; }
.badge { font-size: 11px; padding: 2px 8px; border-radius: 10px; background: #e6edf6; color: var(--brand); white-space: nowrap; }
header .badge { background: rgba(255,255,255,0.2); color: #fff; }
.badge.warn { background: #fde7d6; color: var(--warn); }
.badge.ok { background: #dcf1e4; color: var(--ok); }
ul.anrs { margin: 6px 0 0; padding-left: 18px; font-size: 13px; }
ul.anrs.columns { columns: 2 24em; }
pre.json { background: #f7f9fb; border: 1px solid var(--line); border-radius: 8px; padding: 12px; overflow: auto;
  max-height: 70vh; white-space: pre; }
.pages { display: flex; gap: 14px; align-items: center; justify-content: center; margin-top: 14px; }
.login { max-width: 560px; margin: 40px auto; }
.login form { display: flex; gap: 10px; align-items: flex-end; flex-wrap: wrap; }
.login label { display: flex; flex-direction: column; gap: 4px; font-size: 13px; color: var(--muted); flex: 1; }
.login input { font: inherit; padding: 7px 9px; border: 1px solid #c5ced9; border-radius: 6px; }
.error { color: var(--error); font-weight: bold; }
.explain dt { font-weight: bold; margin-top: 8px; }
.explain dd { margin: 2px 0 0 0; color: var(--muted); }
footer { text-align: center; color: var(--muted); font-size: 12px; padding: 0 0 30px; }
""",
}


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
    docs = store.stats_of(organization=organization) if organization is not None else store.snapshot()[1]
    return docs if kind is None else [d for d in docs if d.get("type") == kind]


async def delete_stat_records(store: Store, records: list[dict], still: Callable[[dict], bool] | None = None
                              ) -> list[dict]:
    """Delete those of `records` still stored unchanged (and, given `still`, for which it holds
    at that moment), RETENTION_CHUNK per commit; the records deleted."""
    deleted: list[dict] = []
    for start in range(0, len(records), RETENTION_CHUNK):
        await store.writable()
        chunk = [doc for doc in records[start:start + RETENTION_CHUNK]  # no await from here to the commit
                 if stored_unchanged(store, doc) and (still is None or still(doc))]
        if chunk:
            await store.commit([("stats", doc["id"], None) for doc in chunk])
            deleted += chunk
        else:
            await asyncio.sleep(0)
    return deleted


def stored_unchanged(store: Store, doc: dict) -> bool:
    """Whether the stat record `doc` is still the one stored under its id."""
    return store.stat(doc["id"]) is doc


async def _scan(records: list[dict], keep: Callable[[dict], bool]) -> list[dict]:
    """The records for which `keep` holds, giving the loop back every SCAN_SLICE records."""
    out: list[dict] = []
    for start in range(0, len(records), SCAN_SLICE):
        out += filter(keep, records[start:start + SCAN_SLICE])
        await asyncio.sleep(0)
    return out


def utc_today() -> date:
    """Today's date in UTC."""
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


async def admin_options(request: web.Request, what: str, allowed: Iterable[str]) -> tuple[dict, dict[str, str]]:
    """(the options of an admin POST, the errors of unknown ones and of dry_run), the caller an admin before and after."""
    require_admin(request, what)
    body = await body_to_write(request, " of options", optional=True)
    require_admin(request, what)
    errors = {name: "unknown option" for name in body if name not in allowed}
    if "dry_run" in body and not isinstance(body["dry_run"], bool):
        errors["dry_run"] = "must be true or false"
    return body, errors


def check_older_than(value) -> tuple[int | None, str | None]:
    """(months, None) or (None, what is wrong); 12.0 is 12, as JSON does not tell them apart."""
    value = _whole(value)
    if not _is_int(value) or not 0 <= value <= MAX_MONTHS:
        return None, f"must be a whole number of months from 0 to {MAX_MONTHS}"
    return value, None


@route("POST", API_PREFIX + "/purge/",
       summary="Retention (admin): delete the stats dated more than `older_than` months before today"
               " (UTC), in chunks; `dry_run` only counts",
       body="PurgeOptions", ok=((200, "what matched and what was deleted", "PurgeReport"),),
       errors=ERRORS_WRITE + ADMIN + NOT_FOUND)
async def purge_handler(request: web.Request) -> web.Response:
    """POST /api/v2/purge {"older_than": MONTHS, "organization"?: NAME, "dry_run"?: bool}."""
    body, errors = await admin_options(request, "purge stats", ("older_than", "organization", "dry_run"))
    store: Store = request.app[STORE_KEY]
    older_than, problem = check_older_than(body["older_than"]) if "older_than" in body else (None, "is required")
    if problem:
        errors["older_than"] = problem
    if body.get("organization") is not None and not isinstance(body["organization"], str):
        errors["organization"] = "must be an organization name"
    if errors:
        raise _fail(errors, "purge options")
    if body.get("organization") is not None and store.organization(body["organization"]) is None:
        raise ApiError(404, f"Not Found: no organization named {body['organization']!r}; nothing was deleted")
    return json_response(await purge_stats(store, older_than, body.get("organization"),
                                           body.get("dry_run", False)))


@route("POST", API_PREFIX + "/remove-duplicates/",
       summary="Retention (admin): of the stats with the same organization, anr, type and date, keep the"
               " newest (latest created_at) and delete the others, in chunks; `dry_run` only counts",
       body="RemoveDuplicatesOptions", body_required=False,
       ok=((200, "what matched and what was deleted", "RemoveDuplicatesReport"),), errors=ERRORS_WRITE + ADMIN)
async def remove_duplicates_handler(request: web.Request) -> web.Response:
    """POST /api/v2/remove-duplicates {"type"?: TYPE, "dry_run"?: bool}."""
    body, errors = await admin_options(request, "remove duplicates", ("type", "dry_run"))
    store: Store = request.app[STORE_KEY]
    if body.get("type") is not None:
        _, problem = check_stat_value("type", body["type"])
        if problem:
            errors["type"] = problem
    if errors:
        raise _fail(errors, "remove-duplicates options")
    return json_response(await remove_duplicate_stats(store, body.get("type"), body.get("dry_run", False)))


# ------------------------------------------------------------ OpenAPI ---
# GET /api/v2/openapi.json: an OpenAPI 3.1 description built from the app's own
# routes and from the tables the code runs on (STAT_FIELDS, ORG_FIELDS,
# OPERATORS, PERIODS, ApiError.NAMES, the v1 processors), so it cannot drift.
# It is public (no key), and counted by the rate limit like every /api/ request.

UUID_PATTERN = "^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}$"
SAFE_DATE = "[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|1[0-9]|2[0-8])"  # always a real date


def _oa_ref(name: str, kind: str = "schemas") -> dict:
    return {"$ref": f"#/components/{kind}/{name}"}


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
        return _oa_bool(), f"({'|'.join(TRUE_WORDS + FALSE_WORDS)})"
    return {"type": "string"}, "[^,]*"


def _oa_bool(description: str = "") -> dict:
    """A boolean query value: the words parse_bool reads (any case)."""
    return {"type": "string", "enum": [*TRUE_WORDS, *FALSE_WORDS],
            "description": " ".join(filter(None, (description, f"{BOOL_WORDS_TEXT}, in any case")))}


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
                properties[f"{name}__{op}"] = _oa_bool()
            elif op in ("in", "nin"):
                properties[f"{name}__{op}"] = {"type": "string", "pattern": f"^{item}(,{item})*$"}
            elif op in STRING_OPS:
                properties[f"{name}__{op}"] = {"type": "string"}
            else:
                properties[f"{name}__{op}"] = value
    filters = {"type": "object", "properties": properties, "additionalProperties": False,
               "maxProperties": MAX_FILTERS}
    if "data" in schema:
        ops = "|".join(op for op in OPERATORS if op != "exists")
        filters["patternProperties"] = {f"^data(__[A-Za-z0-9]+)*__({ops})$": {"type": "string"},
                                        "^data(__[A-Za-z0-9]+)*__exists$": _oa_bool()}
    return {"name": "filters", "in": "query", "style": "form", "explode": True, "schema": filters,
            "description": f"Filters (at most {MAX_FILTERS}), combined with AND: `field=value` (exact) or"
                           " `field__OPERATOR=value`;"
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
    params.append({"name": "_order_by", "in": "query",
                   "schema": {"type": "string", "pattern": f"^{order}(,{order}){{0,{MAX_ORDER_KEYS - 1}}}$"},
                   "description": f"comma-separated fields, `-` for descending ({names}; ties by id);"
                                  f" at most {MAX_ORDER_KEYS}, each field once (else 400)"})
    params.append(_oa_fields_param(schema))
    return params + [_oa_filters(schema)]


def _oa_fields_param(schema: dict) -> dict:
    shown = "(" + "|".join([*schema, *LINK_FIELDS]) + ")"
    return {"name": "_fields", "in": "query",
            "schema": {"type": "string", "pattern": f"^{shown}(,{shown}){{0,{MAX_FIELDS - 1}}}$"},
            "description": f"comma-separated fields to return (plus id): {', '.join(schema)}, link, links;"
                           f" at most {MAX_FIELDS} names"}


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


def _oa_page(item: str) -> dict:
    """A page of a v2 list: its records and whether more follow."""
    return {"type": "object", "required": ["data", "has_more"], "properties": {
        "data": {"type": "array", "items": _oa_ref(item)}, "has_more": {"type": "boolean"}}}


def _oa_stat_schemas(config: Config) -> dict:
    """The Stat schemas, from the field table STAT_TABLE."""
    client = {f.name: f.schema for f in STAT_TABLE if f.check}
    server = {**{f.name: f.schema for f in STAT_TABLE if not f.check},
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
        "StatsPage": _oa_page("StatFields"),
        "StatsCreated": {"oneOf": [_oa_ref("Stat"), {"type": "object", "required": ["data"], "additionalProperties": False,
                                                      "properties": {"data": {"type": "array", "items": _oa_ref("Stat")}}}]},
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
        "OrganizationsPage": _oa_page("OrganizationFields"),
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
    """The /api/v1/ schemas: its stats and pages, its query, the processors' parameters, its client."""
    uuid_s = UUID_SCHEMA
    day = {"type": "string", "format": "date"}
    flag = {"anyOf": [{"type": "boolean"}, {"type": "integer", "enum": [0, 1]},
                      {**_oa_bool("or \"\" (false)"), "enum": [*TRUE_WORDS, *FALSE_WORDS, ""]}]}
    zero_one = {"anyOf": [{"enum": [0, 1]}, {"type": "string", "pattern": "^\\s*\\+?[01]\\s*$"}]}
    count = {"anyOf": [_oa_int(0), {"type": "string", "pattern": "^\\s*\\+?[0-9]{1,18}\\s*$",
                                    "description": "a numeric string, as PHP sends it"}]}
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
                           "anrs": {"type": "array", "items": uuid_s}, "local_stats_only": zero_one,
                           "organization": {"type": "string", "description": "statsd only: the stats of this"
                                            " organization alone (an ordinary one may name only itself)"}}}))
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
        "V1Stats": {"type": "array", "items": _oa_ref("V1Stat")},
        "V1Page": page,
        "V1Query": _oa_v1_params({
            "type": "object", "additionalProperties": False, "required": ["type"],
            "properties": {"type": {"enum": list(V1_TYPES)}, "anrs": {"type": "array", "items": uuid_s},
                           "anr": uuid_s, "date_from": day, "date_to": day, "get_last": flag,
                           "offset": count, "limit": count, "group_by_anr": zero_one}}),
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
                                    "role": {"enum": [V1_ROLE_USER, V1_ROLE_ADMIN],
                                             "description": "as upstream: \"1\" user, \"2\" admin"},
                                    "is_sharing_enabled": {"type": "boolean"}}},
        "V1ClientPatch": {"type": "object", "additionalProperties": False, "required": ["is_sharing_enabled"],
                          "properties": {"is_sharing_enabled": {"type": "boolean"}}},
    }


def _oa_parameters(config: Config) -> dict[str, list]:
    """The parameters a Route names, by name."""
    return {
        "stat_id": [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"},
                     "description": "the stat's id (24 hex characters)"}],
        "org_name": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"},
                      "description": "the organization's name (its id)"}],
        "cascade": [{"name": "cascade", "in": "query", "schema": _oa_bool(),
                     "description": "true (or 1, yes, on): delete the organization's stats with it"}],
        "anr": [{"name": "anr", "in": "path", "required": True, "schema": {"type": "string", "format": "uuid"}}],
        "stat_list": _oa_list_params(STAT_FIELDS, config), "org_list": _oa_list_params(ORG_FIELDS, config),
        "stat_fields": [_oa_fields_param(STAT_FIELDS)], "org_fields": [_oa_fields_param(ORG_FIELDS)],
    }


def _oa_schema(spec) -> dict | None:
    """A Route's schema: a component's name, a tuple of names (any of them), or a schema written out."""
    if isinstance(spec, str):
        return _oa_ref(spec)
    if isinstance(spec, tuple):
        return {"anyOf": [_oa_ref(name) for name in spec]}
    return spec


def _oa_operation(r: Route, parameters: dict) -> dict:
    """The OpenAPI operation of one route, from the facts it was declared with."""
    op: dict[str, Any] = {"summary": r.summary}
    if r.public:
        op["security"] = []
    if r.params:
        op["parameters"] = [param for name in r.params for param in parameters[name]]
    if r.body is not None:
        op["requestBody"] = _oa_body(_oa_schema(r.body), r.body_required)
    responses = dict(r.responses or {})
    for status, description, *more in r.ok:
        responses.update(_oa_ok(status, description, *[_oa_schema(more[0])] if more else (), *more[1:]))
    op["responses"] = {**responses, **_oa_errors(*r.errors)}
    return op


def openapi_document(app: web.Application, server: str = "") -> dict:
    """The OpenAPI 3.1 description of `app`: every route of ROUTES it serves, with its parameters, bodies and answers."""
    config: Config = app[CONFIG_KEY]
    parameters = _oa_parameters(config)
    rate_headers = {name: {"schema": {"type": "string", "pattern": "^[0-9]+$"}, "description": text}
                    for name, text in (("X-Rate-Limit-Limit", "requests allowed per window"),
                                       ("X-Rate-Limit-Remaining", "requests left in the window"),
                                       ("X-Rate-Limit-Reset", "UTC epoch second at which the window"
                                                              " frees a request"))}
    paths: dict[str, dict] = {}
    for r in sorted(ROUTES.served(config), key=lambda r: (r.path, r.method)):
        if r.summary is None:
            continue
        method, path, op = r.method, r.path, _oa_operation(r, parameters)
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
                                " front office speaks). Every path also answers without its trailing slash, and every"
                                " GET also answers HEAD (the same status and headers, no body)."},
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


@route("GET", OPENAPI_PATH, summary="This OpenAPI description", public=True,
       ok=((200, "OpenAPI 3.1 document", {"type": "object"}),), errors=ERRORS_PUBLIC)
async def openapi_json(request: web.Request) -> web.Response:
    """GET /api/v2/openapi.json (no key): the OpenAPI document, its server the address the client used."""
    only_params(request)
    return json_response(openapi_document(request.app, base_url(request)))


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
    app[REQUESTS_KEY] = [0]
    setup_dashboard(app)
    ROUTES.add_to(app, config)
    app.on_startup.append(_start_store)
    app.on_cleanup.append(_close_store)
    return app


async def _start_store(app: web.Application) -> None:
    store: Store = app[STORE_KEY]
    await store.start()
    app[COUNTING_KEY] = asyncio.create_task(store.aggregates.count_all(store.stats.docs))
    app[MEMORY_KEY] = asyncio.create_task(_keep_memory(app))
    app[LIMITER_KEY] = Limiter(keyfunc=client_address)
    if app[CONFIG_KEY].api_key_authentication and not store.organizations():
        log.warning("no organization yet, so every request will be refused: stop the server and"
                    " run `statsd create-organization NAME --admin` to get an admin key")


async def _close_store(app: web.Application) -> None:
    app[COUNTING_KEY].cancel()
    app[MEMORY_KEY].cancel()
    await app[STORE_KEY].close()


MEMORY_LOOK = 0.25  # seconds between two looks at the process's memory
MEMORY_GROWTH = 32 << 20  # bytes the process may grow by before the memory that answers freed goes back


async def _keep_memory(app: web.Application) -> None:
    """When requests pause, hand back to the system what their answers freed (malloc_trim, in a thread).

    Big answers (a year of threat lists) leave freed memory in the C heap; it
    is used again, but it counts in the process's size until handed back. A
    trim takes a few ms, so it runs only after a pause with no request.
    """
    loop, seen, low = asyncio.get_running_loop(), -1, resident_bytes()
    while True:
        await asyncio.sleep(MEMORY_LOOK)
        size, count = resident_bytes(), app[REQUESTS_KEY][0]
        low = min(low, size)
        if count == seen and size - low >= MEMORY_GROWTH:
            await loop.run_in_executor(None, release_free_memory)
            low = resident_bytes()
        seen = count


def resident_bytes() -> int:
    """The process's resident memory in bytes (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


# ---------------------------------------------------------- command line ---

def build_parser() -> argparse.ArgumentParser:
    """The command line: `statsd COMMAND [options]`."""
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
    create.add_argument("--token", help=f"the API key to use: {TOKEN_RULE} (default: a random one)")
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


GC_THRESHOLDS = (10_000, 10, 100)  # a full collection every ~10M allocations, not every 70k


def cmd_serve(config: Config, args) -> int:
    """`statsd serve`: run the server until it is stopped."""
    # Long requests hold lists of 100k sort keys; every full collection walks them (50 ms at 8 such
    # requests). The records themselves are frozen out of collections (Store._load, _pack_forever).
    gc.set_threshold(*GC_THRESHOLDS)
    store = Store(config.database)
    with way_out(LOCK_HINTS["serve"]):
        store.lock()
    app = create_app(config, store)

    def announce(_aiohttp_banner: str) -> None:  # called once the database is loaded and the port open
        log.info("statsd %s serving %s (%d stats, loaded in %.2f s) on http://%s:%s%s/ (authentication %s,"
                 " rate limit %s)", __version__, config.database, store.count_stats(), store.open_seconds,
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
    """`statsd create-organization`: a new organization; prints its token."""
    for problem, what in ((check_org_name(args.name), "NAME"),
                          (args.token is not None and check_token(args.token), "--token")):
        if problem:
            raise ConfigError(f"{what} {problem}")

    async def work(store: Store):
        doc, token = new_organization(store, args.name, args.token, args.admin)
        await store.commit([("organizations", doc["name"], doc)])
        return token
    token = _offline(config, work, LOCK_HINTS["create-organization"])
    print(f"Created {'admin ' if args.admin else ''}organization {args.name!r} in {config.database}."
          " Its API key (shown only now; send it as the X-API-KEY header):")
    print(token)
    return 0


def cmd_list_orgs(config: Config, args) -> int:
    """`statsd list-organizations`: a table of the organizations and their stats."""
    async def work(store: Store):
        return [(d["name"], d["is_admin"], store.count_stats(d["name"]), d["created_at"])
                for d in store.organizations()]
    rows = _offline(config, work, LOCK_HINTS["list-organizations"])
    print(f"{'NAME':30} {'ADMIN':5} {'STATS':>8}  CREATED_AT")
    for name, is_admin, count, created in rows:
        print(f"{name:30} {'yes' if is_admin else 'no':5} {count:>8}  {created}")
    return 0


def cmd_update_org(config: Config, args) -> int:
    """`statsd update-organization`: make it admin or not, or rotate its token."""
    if args.admin is None and not args.rotate_token:
        raise ConfigError("nothing to change: give --admin, --no-admin or --rotate-token")
    token = new_token() if args.rotate_token else None

    async def work(store: Store):
        old = store.organization(args.name)
        if old is None:
            raise ConfigError(f"no organization named {args.name!r} in {config.database}")
        new = changed_organization(store, old, args.admin, token)
        await store.commit([("organizations", new["name"], new)])
        return new
    new = _offline(config, work, LOCK_HINTS["update-organization"].format(name=quote(args.name, safe="")))
    print(f"Updated organization {args.name!r} in {config.database}: {'admin' if new['is_admin'] else 'not admin'}"
          + ("." if token is None else "; its new API key (shown only now; the old one no longer works):"))
    if token is not None:
        print(token)
    return 0


def cmd_purge(config: Config, args) -> int:
    """`statsd purge`: delete the stats older than --older-than months."""
    _, problem = check_older_than(args.older_than)
    if problem:
        raise ConfigError(f"--older-than {problem}")

    async def work(store: Store):
        if args.organization is not None and store.organization(args.organization) is None:
            raise ConfigError(f"--organization: no organization named {args.organization!r} in {config.database}")
        return await purge_stats(store, args.older_than, args.organization, args.dry_run)
    report = _offline(config, work, LOCK_HINTS["purge"])
    print_retention_report(report, f"dated before {report['before']} (more than {args.older_than} month(s) ago)"
                           + (f" of organization {args.organization!r}" if args.organization else ""))
    return 0


def cmd_remove_duplicates(config: Config, args) -> int:
    """`statsd remove-duplicates`: keep the newest stat of each group of duplicates."""
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
    """Print a purge or remove-duplicates report, one line per organization."""
    done = "dry run, nothing deleted" if report["dry_run"] else f"{report['deleted']} deleted"
    print(f"{report['matched']} stat(s) {what}; {done}.")
    for row in report["organizations"]:
        name = row["organization"] if row["organization"] is not None else "(no organization)"
        print(f"  {name:30} {row['matched']:>8} matched {row['deleted']:>8} deleted")


def cmd_delete_org(config: Config, args) -> int:
    """`statsd delete-organization`: delete it (its stats too with --cascade)."""
    async def work(store: Store):
        doc = store.organization(args.name)
        if doc is None:
            raise ConfigError(f"no organization named {args.name!r} in {config.database}")
        changes = organization_deletion(store, doc, args.cascade, cascade_hint="run it again with --cascade")
        await store.commit(changes)
        return len(changes) - 1
    deleted = _offline(config, work, LOCK_HINTS["delete-organization"].format(name=quote(args.name, safe="")))
    print(f"Deleted organization {args.name!r}" + (f" and its {deleted} stat(s)." if deleted else "."))
    return 0


IMPORT_CHUNK = 1000  # stats per journal transaction
IMPORT_PROGRESS_MIN = 5000  # stats from which a terminal gets a progress bar
SHA256_RE = re.compile(r"[0-9a-f]{64}")
STAT_ID_RE = re.compile(r"[0-9a-f]{24}")


def cmd_export(config: Config, args) -> int:
    """`statsd export`: the database as one JSON document, offline or from a running server (--url)."""
    if args.output is not None and (os.path.isdir(args.output) or args.output.endswith(os.sep)):
        raise ConfigError(f"--output {args.output} is a folder; name the file to write,"
                          f" e.g. --output {os.path.join(args.output, 'statsd-export.json')}")
    if (args.url is None) != (args.token is None):
        raise ConfigError("--url and --token go together: the address of a running statsd and an admin key")
    if args.url is not None:
        return export_remote(args)

    async def work(store: Store):
        orgs, stats = store.snapshot()
        return b"".join(export_chunks(orgs, stats, utcnow())), len(orgs), len(stats)
    data, orgs, stats = _offline(config, work, LOCK_HINTS["export"])
    if args.output is None:
        view = memoryview(data)
        while view:  # a reader that leaves early cuts a write short, then raises BrokenPipeError
            written = sys.stdout.buffer.write(view)
            if not written:
                raise OSError(errno.EIO, "stdout takes no more data")
            view = view[written:]
        sys.stdout.flush()
    else:
        try:
            write_atomically(args.output, data)
        except OSError as e:
            raise ConfigError(f"cannot write {args.output}: {e.strerror}") from None
        print(f"Exported {orgs} organization(s) and {stats} stat(s) from {config.database} to {args.output}.")
    return 0


def service_endpoint(url: str, endpoint: str, suffixes: tuple[str, ...]) -> str:
    """The address of `endpoint` on a service given by its base URL (or by an address ending in `suffixes`)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"--url {url!r} must be an http:// or https:// address")
    base = url.rstrip("/")
    for suffix in suffixes:
        base = base.removesuffix(suffix)
    return base + endpoint


def export_endpoint(url: str) -> str:
    """The GET /api/v2/export address of a statsd given by its base URL (or by that address)."""
    return service_endpoint(url, API_PREFIX + "/export", ("/export", API_PREFIX))


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
    """(organizations, stats) of an export file, checked; ConfigError names what is wrong."""
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
        if store.organization(doc["name"]) is not None:
            counts["orgs_kept"] += 1
            continue
        holder = store.organization_with_token(doc["token_sha256"])
        if holder is not None or any(o["token_sha256"] == doc["token_sha256"] for o in new_orgs):
            raise ConfigError(f"organization {doc['name']!r} has the same API key as another one; nothing"
                              " was imported")
        new_orgs.append({"is_admin": False, **doc})  # no is_sharing_enabled means true
    known = {o["name"] for o in store.organizations()} | {o["name"] for o in new_orgs}
    orphans = sorted({d["organization"] for d in stats if "organization" in d and d["organization"] not in known})
    if orphans:
        raise ConfigError(f"stats belong to organization(s) that are neither in the file nor in the database:"
                          f" {', '.join(map(repr, orphans))}; nothing was imported")
    if new_orgs:
        await store.commit([("organizations", doc["name"], doc) for doc in new_orgs])
    counts["orgs"] = len(new_orgs)
    ids = IdGenerator()
    for start in range(0, len(stats), IMPORT_CHUNK):
        ops, taken = [], set()
        for doc in stats[start:start + IMPORT_CHUNK]:
            if store.stat_with_uuid(doc["uuid"]) is not None:
                counts["stats_kept"] += 1
                continue
            stat_id = doc.get("id")
            while stat_id is None or stat_id in taken or store.stat(stat_id) is not None:
                stat_id = ids()
            taken.add(stat_id)
            ops.append(("stats", stat_id, ordered_stat({**doc, "id": stat_id})))
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
    """`statsd import`: load an export document into a stopped database."""
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
    return service_endpoint(url, V1_PREFIX + "/stats/", ("/api/v1/stats", "/api/v1"))


def push_state_key(args) -> str:
    """The key under which a push's state file records its progress: endpoint and dates."""
    return f"{push_endpoint(args.url)} {args.date_from or ''} {args.date_to or ''}"


def read_push_state(path: str) -> dict:
    """The state file of `statsd push` ({} when there is none)."""
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
    for position, doc in store.stats_after(after):
        org = store.organization(doc["organization"]) if "organization" in doc else None
        day = stat_date(doc)
        if org is not None and not org.get("is_sharing_enabled", True):
            counts["not_shared"] += 1
        elif (args.date_from and day < args.date_from) or (args.date_to and day > args.date_to):
            counts["outside_dates"] += 1
        elif not isinstance(doc.get("anr"), str) or doc["type"] not in V1_TYPES:
            counts["not_v1"] += 1
        else:
            selected.append((position, {"uuid": doc["uuid"], "anr": doc["anr"], "type": doc["type"],
                                      "date": day, "data": doc["data"]}))
    return selected


async def post_chunk(session, endpoint: str, items: list[dict]) -> tuple[int, int, list[str]]:
    """Send one chunk: (created, already there, refusals); PushFailed when the chunk was not taken."""
    try:
        async with session.post(endpoint, data=dumps(items)) as resp:
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
    """`statsd push`: send the stats to another service's /api/v1/, resuming where the last push stopped."""
    for name in ("date_from", "date_to"):
        value = getattr(args, name)
        if value is not None and parse_date(value) is None:
            raise ConfigError(f"--{name.replace('_', '-')} {value!r} is not {DATE_RULE}")
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
    """Run the command line; the exit status."""
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
    except BrokenPipeError:  # the reader of stdout left early (`statsd export | head`): nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # keeps the final flush quiet
        return 1
    except OSError as e:  # e.g. the port is taken, or the disk refuses the start-up fold
        print(f"statsd: error: {e}", file=sys.stderr)
        return 1
    except ApiError as e:
        print(f"statsd: error: {e.message.removeprefix('Conflict: ')}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
