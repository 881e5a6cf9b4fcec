"""Scan every object and every version under a prefix for erased ids.

``verify`` knows erased ids only through a keyed-hash predicate, so it cannot search
for them: this module proposes every plausible token from every object and asks the
predicate. Tokens come from Parquet, Arrow and ORC cells, CSV/TSV fields, JSON
strings, keys and numbers, pickle strings, NumPy string arrays, the words of text and
the printable runs of any other bytes, through gzip, zstd, bz2, xz, zip and tar
wrappings, so a purged file restored under another name, folder or format is found.

Memory stays bounded by one chunk, one line, one Parquet row group or one bounded
document, never by the object: bodies are streamed, and spooled to a temporary file
(16 MiB in memory, the rest on disk) only where a format needs random access.

Findings and errors name only keys, version ids, counts and places (a column name, a
line number, a member name), never a token: what matched is an erased id.
"""

from __future__ import annotations

import ast
import bz2
import codecs
import csv
import gzip
import io
import json
import lzma
import pickletools
import re
import sys
import tarfile
import tempfile
import time
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any, Literal, Protocol

import botocore.exceptions
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lethe.store import MISSING, Store

CHUNK_SIZE = 1 << 20  # bytes read at a time from any stream
SPOOL_IN_MEMORY = 16 << 20  # a spooled object beyond this goes to a temporary file
HEAD_BYTES = 8192  # look-ahead used to tell a format
MAX_CARRY = 64 << 10  # longest unbroken printable run kept whole across chunks
MAX_LINE = 4 << 20  # longest line parsed as CSV or JSON; longer ones are scanned as text
MAX_JSON_DOCUMENT = 8 << 20  # largest JSON document parsed whole
MAX_PICKLE = 64 << 20  # largest pickle walked opcode by opcode; larger ones are raw bytes
MAX_DEPTH = 8  # containers nested deeper than this are scanned as raw bytes
MAX_PLACES = 100  # places listed per object version; the rest are summed into one finding
MAX_SPLIT_VALUE = 1024  # values up to this length are also split on each delimiter alone
MAX_CACHED = 256  # tokens and values up to this length have their answers cached
CACHE_ENTRIES = 1 << 16  # cached answers per object version before the cache is cleared
INT_WIDTH = 12  # integers are also tried zero-padded up to this width ("000042" stored as 42)
BATCH_ROWS = 1 << 16  # rows per batch read from a row group
PROGRESS_INTERVAL = 0.2  # seconds between progress updates

ProgressMode = bool | Literal["always"]


@dataclass
class Finding:
    """An object version that holds erased ids: where, and how many tokens matched there."""

    key: str
    version: str
    where: str  # e.g. "parquet column subject_id", "text line 17", "gzip > csv column 2"
    hits: int


@dataclass
class ScanReport:
    """What a scan covered and found; any error means the scan is not a proof."""

    objects: int = 0
    versions: int = 0
    bytes: int = 0  # bytes read from the store (stored, not decompressed, sizes)
    findings: list[Finding] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # "<key> (version <id>): <where>: <why>"

    @property
    def clean(self) -> bool:
        return not self.findings and not self.errors


class _Readable(Protocol):
    def read(self, size: int = ..., /) -> bytes: ...


class _PredicateFailed(Exception):
    """The caller's predicate raised: a bug to surface, not an unreadable object."""


class _LineTooLong(Exception):
    """A line too long to parse whole: the rest of the stream is scanned as text."""


# -- tokens ------------------------------------------------------------------------
_RUN = re.compile(rb"[^\x00-\x20\x7f]+")  # printable, non-whitespace ASCII and any high byte
_RUN_BYTES = bytes(b for b in range(256) if b > 0x20 and b != 0x7F)
_SEPARATORS = bytes(range(0x21)) + b"\x7f"
_UTF8_CHAR = (  # one well-formed UTF-8 sequence other than an ASCII control or space
    rb"[\xc2-\xdf][\x80-\xbf]|\xe0[\xa0-\xbf][\x80-\xbf]|[\xe1-\xec\xee\xef][\x80-\xbf]{2}"
    rb"|\xed[\x80-\x9f][\x80-\xbf]|\xf0[\x90-\xbf][\x80-\xbf]{2}|[\xf1-\xf3][\x80-\xbf]{3}"
    rb"|\xf4[\x80-\x8f][\x80-\xbf]{2}"
)
_UTF8_RUN = re.compile(rb"(?:[\x21-\x7e]|" + _UTF8_CHAR + rb")+")
_UTF8_PART = re.compile(  # the same without the ASCII delimiters
    rb"(?:[^\x00-\x20\x7f-\xff,;|\"'`\[\](){}<>=:/\\&?#!]|" + _UTF8_CHAR + rb")+"
)
_DELIMITERS = ",;|\"'`[](){}<>=:/\\&?#!\ufeff\ufffd\u200b"
_SPLIT = re.compile(r"[\s" + re.escape(_DELIMITERS) + r"]+")
_DELIMITER = re.compile(r"[\s" + re.escape(_DELIMITERS) + r"]")
_STRIP = " \t\r\n\f\v\"'`[](){}<>\ufeff\u200b"
_PATH_SPLIT = re.compile(r"[/\\]")
_NL = b"\n"


def _tokens(value: str) -> set[str]:
    """Candidate ids in one value: itself, without quotes, and its parts between delimiters.

    Splitting on all delimiters at once finds "subj-1" in "id=subj-1,"; splitting on
    each delimiter alone also keeps an id that itself holds one, like "a:b" in "a:b c".
    """
    out = {value}
    stripped = value.strip(_STRIP)
    out.add(stripped)
    if _DELIMITER.search(value):
        out.update(_SPLIT.split(value))
        if len(value) <= MAX_SPLIT_VALUE:
            for ch in set(_DELIMITER.findall(value)):
                out.update(part.strip(_STRIP) for part in value.split(ch))
    out.update([t.rstrip(".") for t in out if t.endswith(".")])  # end of a sentence
    out.discard("")
    return out


def _name_tokens(name: str) -> set[str]:
    """Tokens of an object key or member name: its path parts and their stems."""
    out = _tokens(name)
    for part in _PATH_SPLIT.split(name):
        stem = part
        while "." in stem:
            stem = stem.rsplit(".", 1)[0]
            if stem:
                out.add(stem)
    return out


def _int_tokens(n: int) -> list[str]:
    """An integer as text, and zero-padded: an id like "000042" read into a typed column is 42."""
    s = str(n)
    if n < 0:
        return [s]
    return [s] + [s.zfill(width) for width in range(len(s) + 1, INT_WIDTH + 1)]


# -- one object version -------------------------------------------------------------
def _reason(e: BaseException) -> str:
    """Why something failed, without its message: messages can quote the data."""
    response = getattr(e, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        if code:
            return f"{type(e).__name__} {code}"
    return type(e).__name__


class _Asker:
    """The predicate, asked at most once per token while its bounded caches remember.

    Answers depend on the token only, so the caches serve the whole scan. Binary data
    is full of one- to three-byte tokens; their answers live in a flat table (16 MiB,
    made on first use) that never needs clearing.
    """

    def __init__(self, is_erased: Callable[[str], bool]) -> None:
        self._is_erased = is_erased
        self._answers: dict[str, bool] = {}
        self._values: dict[str | bytes, int] = {}
        self._short: bytearray | None = None  # by int.from_bytes(token): 0 unknown, 1 no, 2 yes

    def erased(self, token: str) -> bool:
        answer = self._answers.get(token)
        if answer is None:
            try:
                answer = bool(self._is_erased(token))
            except Exception as e:
                raise _PredicateFailed() from e
            if len(token) <= MAX_CACHED:
                if len(self._answers) >= CACHE_ENTRIES:
                    self._answers.clear()
                self._answers[token] = answer
        return answer

    def _remember(self, value: str | bytes, hits: int) -> int:
        if len(value) <= MAX_CACHED:
            if len(self._values) >= CACHE_ENTRIES:
                self._values.clear()
            self._values[value] = hits
        return hits

    def value(self, text: str) -> int:
        """How many distinct erased ids one value (a cell, a string, a word) holds."""
        cached = self._values.get(text)
        if cached is not None:
            return cached
        return self._remember(text, sum(1 for t in _tokens(text) if self.erased(t)))

    def run(self, raw: bytes) -> int:
        """Like ``value`` for a printable run of bytes (invalid UTF-8 acts as a delimiter)."""
        cached = self._values.get(raw)
        if cached is not None:
            return cached
        text = raw.decode("utf-8", "replace")
        return self._remember(raw, sum(1 for t in _tokens(text) if self.erased(t)))

    def raw_token(self, raw: bytes) -> bool:
        """Whether one token of binary data (well-formed UTF-8, no controls) is an erased id."""
        if len(raw) <= 3:  # its bytes are all above 0x20, so lengths cannot collide
            if self._short is None:
                self._short = bytearray(1 << 24)
            i = int.from_bytes(raw, "big")
            state = self._short[i]
            if not state:
                state = 2 if self.erased(raw.decode("utf-8", "replace")) else 1
                self._short[i] = state
            return state == 2
        cached = self._values.get(raw)
        if cached is not None:
            return bool(cached)
        return bool(self._remember(raw, int(self.erased(raw.decode("utf-8", "replace")))))

    def integer(self, n: int) -> int:
        return sum(1 for t in _int_tokens(n) if self.erased(t))

    def name(self, name: str) -> int:
        return sum(1 for t in _name_tokens(name) if self.erased(t))


class _Version:
    """One object version under scan: hits by place, and errors."""

    def __init__(
        self, key: str, version: str, ask: _Asker, chunk_size: int, errors: list[str]
    ) -> None:
        self.key = key
        self.version = version
        self.chunk_size = chunk_size
        self._errors = errors
        self.places: dict[str, int] = {}
        self._more_places = 0
        self._more_hits = 0
        self.erased = ask.erased
        self.value = ask.value
        self.run = ask.run
        self.raw_token = ask.raw_token
        self.integer = ask.integer
        self.name = ask.name

    def label(self, name: str, index: int, chain: tuple[str, ...], place: str) -> str:
        """A column or member name fit for a report: its position if the name is an id."""
        hits = self.name(name)
        if hits:
            self.add(chain, place, hits)
            return f"#{index}"
        return name

    # answers
    def add(self, chain: tuple[str, ...], label: str, hits: int) -> None:
        self.add_where(" > ".join((*chain, label)), hits)

    def add_where(self, where: str, hits: int) -> None:
        if where in self.places:
            self.places[where] += hits
        elif len(self.places) < MAX_PLACES:
            self.places[where] = hits
        else:
            self._more_places += 1
            self._more_hits += hits

    def fail(self, chain: tuple[str, ...], what: str, e: BaseException | None = None) -> None:
        """Record that part of this version could not be read (a predicate error propagates)."""
        if isinstance(e, _PredicateFailed):
            raise e
        place = " > ".join(chain)
        why = f" ({_reason(e)})" if e is not None else ""
        where = f"{place}: " if place else ""
        self._errors.append(f"{self.key} (version {self.version}): {where}{what}{why}")

    def findings(self) -> list[Finding]:
        out = [Finding(self.key, self.version, w, h) for w, h in self.places.items()]
        if self._more_places:
            where = f"{self._more_places} more places"
            out.append(Finding(self.key, self.version, where, self._more_hits))
        return out


# -- streams ----------------------------------------------------------------------
class _Source(io.RawIOBase):
    """A forward-only reader with look-ahead, so a format can be told by its first bytes."""

    def __init__(self, inner: _Readable, on_read: Callable[[int], None] | None = None) -> None:
        super().__init__()
        self._inner = inner
        self._on_read = on_read
        self._head = b""
        self._eof = False

    def readable(self) -> bool:
        return True

    def _pull(self, n: int) -> bytes:
        if self._eof:
            return b""
        data = self._inner.read(n)
        if not data:
            self._eof = True
            return b""
        if self._on_read is not None:
            self._on_read(len(data))
        return bytes(data)

    def peek(self, n: int) -> bytes:
        """The next n bytes (fewer at the end), left in place."""
        if len(self._head) < n:
            parts = [self._head]
            have = len(self._head)
            while have < n:
                data = self._pull(max(n - have, 8192))
                if not data:
                    break
                parts.append(data)
                have += len(data)
            self._head = b"".join(parts)
        return self._head[:n]

    def push(self, data: bytes) -> None:
        """Put bytes back in front of the stream."""
        self._head = data + self._head

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            parts = [self._head]
            self._head = b""
            while data := self._pull(CHUNK_SIZE):
                parts.append(data)
            return b"".join(parts)
        if len(self._head) < size:
            self.peek(size)
        out, self._head = self._head[:size], self._head[size:]
        return out

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


class _Transcoded(io.RawIOBase):
    """UTF-16 text re-encoded as UTF-8, so the text scanners see ids as plain bytes."""

    def __init__(self, src: _Readable, encoding: str) -> None:
        super().__init__()
        self._src = src
        self._decoder = codecs.getincrementaldecoder(encoding)("replace")

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        while True:
            raw = self._src.read(CHUNK_SIZE if size is None or size < 0 else max(size, 2))
            text = self._decoder.decode(raw, final=not raw)
            if text or not raw:
                return text.encode("utf-8")


def _spool(src: _Readable) -> IO[bytes]:
    """Copy a stream where a format needs random access, in memory only up to a bound."""
    f = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY)
    while chunk := src.read(CHUNK_SIZE):
        f.write(chunk)
    f.seek(0)
    return f  # type: ignore[return-value]


class _LineReader:
    """Numbered lines of a stream, each at most MAX_LINE bytes; the unread rest stays available."""

    def __init__(self, src: _Readable, chunk_size: int) -> None:
        self._src = src
        self._chunk_size = chunk_size
        self._buf = b""
        self._pos = 0
        self._searched = 0
        self._eof = False
        self.number = 0  # the number of the last line returned

    def next(self) -> bytes | None:
        while True:
            i = self._buf.find(b"\n", max(self._pos, self._searched))
            if i >= 0:
                if i + 1 - self._pos > MAX_LINE:
                    raise _LineTooLong()
                line = self._buf[self._pos : i + 1]
                self._pos = i + 1
                self.number += 1
                return line
            if len(self._buf) - self._pos > MAX_LINE:
                raise _LineTooLong()
            if self._eof:
                if self._pos >= len(self._buf):
                    return None
                line = self._buf[self._pos :]
                self._pos = len(self._buf)
                self.number += 1
                return line
            self._searched = len(self._buf)
            chunk = self._src.read(self._chunk_size)
            if not chunk:
                self._eof = True
                continue
            self._searched -= self._pos
            self._buf = self._buf[self._pos :] + chunk
            self._pos = 0

    def rest(self) -> bytes:
        """Bytes read from the stream but not returned as lines."""
        return self._buf[self._pos :]


# -- formats ----------------------------------------------------------------------
def _looks_text(head: bytes) -> bool:
    """UTF-8 without NULs and with hardly any control characters."""
    if b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.reason != "unexpected end of data" or e.start < len(head) - 3:
            return False
    control = len(head.translate(None, _TEXT_BYTES))
    return control * 100 <= len(head)


_TEXT_BYTES = b"\t\n\r\f\v\x1b\x08" + bytes(range(0x20, 0x7F)) + bytes(range(0x80, 0x100))


def _kind(head: bytes, name: str) -> str:
    """The format of a stream: magic bytes first, then the name, then the look of the text."""
    lower = name.lower()
    if head.startswith(b"PAR1"):
        return "parquet"
    if head.startswith(b"PARE"):
        return "encrypted parquet"
    if head.startswith(b"ARROW1"):
        return "arrow"
    if head.startswith(b"ORC") and not _looks_text(head):  # "ORCID ..." is text
        return "orc"
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return "zstd"
    if (
        head.startswith(b"BZh")
        and head[3:4].isdigit()
        and head[4:10] in (b"\x31\x41\x59\x26\x53\x59", b"\x17\x72\x45\x38\x50\x90")
    ):
        return "bz2"
    if head.startswith(b"\xfd7zXZ\x00"):
        return "xz"
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if head[257:262] == b"ustar":
        return "tar"
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "utf-16"
    if not _looks_text(head):
        return "raw"
    if lower.endswith(".csv"):
        return "csv"
    if lower.endswith((".tsv", ".tab")):
        return "tsv"
    if lower.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    text = head.removeprefix(b"\xef\xbb\xbf").lstrip()
    if lower.endswith(".json") or text[:1] in (b"{", b"["):
        return "json"
    lines = head.split(b"\n")[:2]
    if len(lines) == 2 and lines[1]:
        for sep, kind in ((b"\t", "tsv"), (b",", "csv")):
            if lines[0].count(sep) and lines[0].count(sep) == lines[1].count(sep):
                return kind
    return "text"


def _inner_name(name: str, suffixes: tuple[str, ...]) -> str:
    """The name of what a compressed stream holds: "x.csv.gz" holds "x.csv"."""
    lower = name.lower()
    if lower.endswith(".tgz"):
        return name[:-4] + ".tar"
    for s in suffixes:
        if lower.endswith(s):
            return name[: -len(s)]
    return name


Handler = Callable[[_Source, str, _Version, tuple[str, ...], int], None]


def _scan_stream(src: _Source, name: str, v: _Version, chain: tuple[str, ...], depth: int) -> None:
    """Scan one stream as whatever it is; anything unreadable is recorded, never raised."""
    kind = "stream"
    try:
        head = src.peek(HEAD_BYTES)
        if not head:
            return
        kind = _kind(head, name) if depth < MAX_DEPTH else "raw"
        _HANDLERS[kind](src, name, v, chain, depth)
    except Exception as e:
        v.fail((*chain, kind), "could not be read", e)


def _decompressed(
    kind: str, suffixes: tuple[str, ...], opener: Callable[[_Source], _Readable]
) -> Handler:
    def handler(src: _Source, name: str, v: _Version, chain: tuple[str, ...], depth: int) -> None:
        inner = _Source(opener(src))
        _scan_stream(inner, _inner_name(name, suffixes), v, (*chain, kind), depth + 1)

    return handler


def _zstd_reader(src: _Source) -> _Readable:
    return pa.CompressedInputStream(pa.PythonFile(src, mode="r"), "zstd")


def _raw(src: _Source, name: str, v: _Version, chain: tuple[str, ...], depth: int) -> None:
    _scan_raw(src, v, chain, text=False)


def _text(src: _Source, name: str, v: _Version, chain: tuple[str, ...], depth: int) -> None:
    _scan_raw(src, v, chain, text=True)


def _scan_raw(
    src: _Readable,
    v: _Version,
    chain: tuple[str, ...],
    *,
    text: bool,
    first: bytes = b"",
    line: int = 1,
    offset: int = 0,
    label: str = "text line",
    record: Callable[[str, int], None] | None = None,
) -> None:
    """Every printable run (and its parts) of a byte stream, chunk by chunk.

    A run that reaches the end of a chunk is carried into the next, so a token that
    spans two chunks is still seen whole. Places are lines for text and byte offsets
    otherwise; they are worked out only for runs that hit.
    """
    record = record or v.add_where
    carry = first
    eof = False
    while not eof:
        chunk = src.read(v.chunk_size)
        eof = not chunk
        buf = carry + chunk if carry else chunk
        if not buf:
            break
        end = len(buf)
        cut = end
        if not eof:
            cut = len(buf.rstrip(_RUN_BYTES))  # start of the run that may go on
            if end - cut > MAX_CARRY:
                cut = end
        if text:
            _text_chunk(buf, cut, v, chain, line, label, record)
        else:
            _binary_chunk(buf, cut, v, chain, offset, record)
        if text:
            line += buf.count(_NL, 0, cut)
        offset += cut
        carry = buf[cut:]


def _text_chunk(
    buf: bytes,
    cut: int,
    v: _Version,
    chain: tuple[str, ...],
    line: int,
    label: str,
    record: Callable[[str, int], None],
) -> None:
    """Text: each printable run is a word, split further on delimiters; places are lines."""
    runs = _RUN.findall(buf, 0, cut)
    if not runs:
        return
    hit = {r for r in set(runs) if v.run(r)}
    if not hit:
        return
    for m in _RUN.finditer(buf, 0, cut):
        if m.group() in hit:
            where = f"{label} {line + buf.count(_NL, 0, m.start())}"
            record(" > ".join((*chain, where)), v.run(m.group()))


def _binary_chunk(
    buf: bytes,
    cut: int,
    v: _Version,
    chain: tuple[str, ...],
    offset: int,
    record: Callable[[str, int], None],
) -> None:
    """Binary: runs of well-formed printable UTF-8 and their parts; places are byte offsets.

    Binary data is mostly separators or short, repeated runs: the distinct runs of the
    whole chunk are tokenised together, and only tokens never seen before reach Python.
    """
    if not buf.translate(None, _SEPARATORS):
        return  # nothing printable at all (zeros, padding)
    runs = _RUN.findall(buf, 0, cut)
    if not runs:
        return
    joined = b"\x00".join(set(runs))
    tokens = set(_UTF8_RUN.findall(joined))
    tokens.update(_UTF8_PART.findall(joined))
    hit = {t for t in tokens if v.raw_token(t)}
    if not hit:
        return
    for m in _RUN.finditer(buf, 0, cut):
        for segment in _UTF8_RUN.finditer(m.group()):
            token = segment.group()
            hits = len(({token} | set(_UTF8_PART.findall(token))) & hit)
            if hits:
                where = f"raw bytes offset {offset + m.start() + segment.start()}"
                record(" > ".join((*chain, where)), hits)


def _csv_handler(fmt: str, delimiter: str) -> Handler:
    def handler(src: _Source, name: str, v: _Version, chain: tuple[str, ...], depth: int) -> None:
        lines = _LineReader(src, v.chunk_size)
        pending: list[bytes] = []  # lines of the row being parsed

        def feed() -> Iterator[str]:
            while (raw := lines.next()) is not None:
                pending.append(raw)
                yield raw.decode("utf-8", "replace")

        try:
            for row in csv.reader(feed(), delimiter=delimiter):
                pending.clear()
                for j, cell in enumerate(row, 1):
                    if cell:
                        hits = v.value(cell)
                        if hits:
                            v.add(chain, f"{fmt} column {j}", hits)
        except (csv.Error, _LineTooLong):
            # Not CSV after all (or a line too long for it): the rest is text.
            start = lines.number - len(pending) + 1
            first = b"".join(pending) + lines.rest()
            _scan_raw(src, v, chain, text=True, first=first, line=start)

    return handler


def _walk(doc: Any, v: _Version) -> int:
    """Hits in a parsed JSON document: every string, key and number, without recursion."""
    hits = 0
    stack = [doc]
    while stack:
        o = stack.pop()
        if isinstance(o, str):
            hits += v.value(o)
        elif isinstance(o, bool) or o is None:
            continue
        elif isinstance(o, int):
            hits += v.integer(o)
        elif isinstance(o, float):
            hits += v.value(repr(o))
            if o.is_integer():
                hits += v.integer(int(o))
        elif isinstance(o, dict):
            for k, item in o.items():
                hits += v.value(k)
                stack.append(item)
        elif isinstance(o, list):
            stack.extend(o)
    return hits


def _json(src: _Source, name: str, v: _Version, chain: tuple[str, ...], depth: int) -> None:
    buf = src.read(MAX_JSON_DOCUMENT + 1)
    if len(buf) <= MAX_JSON_DOCUMENT:
        try:
            doc = json.loads(buf.decode("utf-8-sig"))
        except (ValueError, RecursionError):
            pass
        else:
            hits = _walk(doc, v)
            if hits:
                # Lines where the text shows them; escaped or numeric ones, just "json".
                lines: dict[str, int] = {}

                def record(where: str, n: int) -> None:
                    lines[where] = lines.get(where, 0) + n

                _scan_raw(
                    io.BytesIO(), v, chain, text=True, first=buf, label="json line", record=record
                )
                for where, n in lines.items():
                    v.add_where(where, n)
                if hits > sum(lines.values()):
                    v.add(chain, "json", hits - sum(lines.values()))
            return
    src.push(buf)
    _jsonl(src, name, v, chain, depth)


def _jsonl(src: _Source, name: str, v: _Version, chain: tuple[str, ...], depth: int) -> None:
    lines = _LineReader(src, v.chunk_size)
    try:
        while (raw := lines.next()) is not None:
            text = raw.decode("utf-8", "replace").strip().lstrip("\ufeff")
            if not text:
                continue
            try:
                doc = json.loads(text)
            except (ValueError, RecursionError):
                _scan_raw(io.BytesIO(), v, chain, text=True, first=raw, line=lines.number)
                continue
            hits = _walk(doc, v)
            if hits:
                v.add(chain, f"jsonl line {lines.number}", hits)
    except _LineTooLong:
        _scan_raw(src, v, chain, text=True, first=lines.rest(), line=lines.number + 1)


# Tables: Parquet, Arrow IPC, ORC.
def _holds_tokens(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        return _holds_tokens(t.value_type)
    if pa.types.is_map(t):
        return _holds_tokens(t.key_type) or _holds_tokens(t.item_type)
    if _is_list(t):
        return _holds_tokens(t.value_type)
    if pa.types.is_struct(t):
        return any(_holds_tokens(f.type) for f in t)
    return _is_leaf(t)


def _is_list(t: pa.DataType) -> bool:
    return (
        pa.types.is_list(t)
        or pa.types.is_large_list(t)
        or pa.types.is_fixed_size_list(t)
        or pa.types.is_list_view(t)
        or pa.types.is_large_list_view(t)
    )


def _is_stringish(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _is_binaryish(t: pa.DataType) -> bool:
    return (
        pa.types.is_binary(t)
        or pa.types.is_large_binary(t)
        or pa.types.is_fixed_size_binary(t)
        or pa.types.is_binary_view(t)
    )


def _is_leaf(t: pa.DataType) -> bool:
    return _is_stringish(t) or _is_binaryish(t) or pa.types.is_integer(t)


def _leaves(
    arr: pa.Array, label: str, v: _Version, chain: tuple[str, ...], fmt: str
) -> Iterator[tuple[str, pa.Array]]:
    """The string, binary and integer arrays inside a column, lists and structs flattened."""
    t = arr.type
    if pa.types.is_dictionary(t):
        yield from _leaves(arr.dictionary_decode(), label, v, chain, fmt)
    elif pa.types.is_map(t):
        yield from _leaves(arr.keys, f"{label}.key", v, chain, fmt)
        yield from _leaves(arr.items, f"{label}.value", v, chain, fmt)
    elif _is_list(t):
        yield from _leaves(arr.flatten(), label, v, chain, fmt)
    elif pa.types.is_struct(t):
        for i, (f, child) in enumerate(zip(t, arr.flatten(), strict=True), 1):
            if _holds_tokens(f.type):
                sub = v.label(f.name, i, chain, f"{fmt} schema")
                yield from _leaves(child, f"{label}.{sub}", v, chain, fmt)
    elif _is_leaf(t):
        yield label, arr


def _count_leaf(arr: pa.Array, v: _Version) -> int:
    """Hits in one array: each distinct value asked about once, weighted by its count."""
    if len(arr) == 0 or arr.null_count == len(arr):
        return 0
    t = arr.type
    if pa.types.is_string_view(t):
        arr = arr.cast(pa.large_string())
    elif pa.types.is_binary_view(t):
        arr = arr.cast(pa.large_binary())
    try:
        counts = pc.value_counts(arr)
        pairs: Iterable[tuple[Any, int]] = zip(
            counts.field("values").to_pylist(), counts.field("counts").to_pylist(), strict=True
        )
    except pa.ArrowNotImplementedError:
        pairs = Counter(arr.to_pylist()).items()
    hits = 0
    for x, n in pairs:
        if x is None:
            continue
        if isinstance(x, int):
            hits += v.integer(x) * n
        elif isinstance(x, bytes):
            hits += v.value(x.decode("utf-8", "ignore")) * n
        else:
            hits += v.value(x) * n
    return hits


def _scan_schema(schema: pa.Schema, v: _Version, chain: tuple[str, ...], fmt: str) -> list[str]:
    """Column labels (a position where a name is itself an id) and hits in the metadata."""
    labels = [v.label(name, i, chain, f"{fmt} schema") for i, name in enumerate(schema.names, 1)]
    hits = 0
    for k, val in (schema.metadata or {}).items():
        hits += v.value(k.decode("utf-8", "replace")) + v.value(val.decode("utf-8", "replace"))
    if hits:
        v.add(chain, f"{fmt} metadata", hits)
    return labels


def _scan_batches(
    batches: Iterable[pa.RecordBatch],
    labels: list[str],
    v: _Version,
    chain: tuple[str, ...],
    fmt: str,
) -> None:
    for batch in batches:
        for label, column in zip(labels, batch.columns, strict=True):
            if not _holds_tokens(column.type):
                continue
            for where, leaf in _leaves(column, label, v, chain, fmt):
                hits = _count_leaf(leaf, v)
                if hits:
                    v.add(chain, f"{fmt} column {where}", hits)


def _read_parquet(f: IO[bytes], v: _Version, chain: tuple[str, ...]) -> None:
    pf = pq.ParquetFile(f)
    schema = pf.schema_arrow
    labels = _scan_schema(schema, v, chain, "parquet")
    keep = [i for i, fld in enumerate(schema) if _holds_tokens(fld.type)]
    if not keep:
        return
    names = schema.names
    unique = len(set(names)) == len(names)
    columns = [names[i] for i in keep] if unique else None
    read_labels = [labels[i] for i in keep] if unique else labels
    for rg in range(pf.num_row_groups):  # memory: one row group's chosen columns at most
        batches = pf.iter_batches(batch_size=BATCH_ROWS, row_groups=[rg], columns=columns)
        _scan_batches(batches, read_labels, v, chain, "parquet")


def _read_arrow(f: IO[bytes], v: _Version, chain: tuple[str, ...]) -> None:
    reader = pa.ipc.open_file(f)
    labels = _scan_schema(reader.schema, v, chain, "arrow")
    batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
    _scan_batches(batches, labels, v, chain, "arrow")


def _read_orc(f: IO[bytes], v: _Version, chain: tuple[str, ...]) -> None:
    from pyarrow import orc

    reader = orc.ORCFile(f)
    labels = _scan_schema(reader.schema, v, chain, "orc")
    batches = (reader.read_stripe(i) for i in range(reader.nstripes))
    _scan_batches(batches, labels, v, chain, "orc")


def _table(fmt: str, read: Callable[[IO[bytes], _Version, tuple[str, ...]], None]) -> Handler:
    def handler(src: _Source, name: str, v: _Version, chain: tuple[str, ...], depth: int) -> None:
        with _spool(src) as f:
            try:
                read(f, v, chain)
            except Exception as e:
                # Pages are compressed, so the raw bytes are no proof: an error, and
                # whatever the raw bytes still show.
                v.fail((*chain, fmt), f"could not be read as {fmt.capitalize()}", e)
                f.seek(0)
                _scan_raw(f, v, (*chain, f"unreadable {fmt}"), text=False)

    return handler


def _encrypted_parquet(
    src: _Source, name: str, v: _Version, chain: tuple[str, ...], depth: int
) -> None:
    v.fail((*chain, "parquet"), "encrypted Parquet cannot be scanned")
    _scan_raw(src, v, (*chain, "unreadable parquet"), text=False)


# Containers.
def _zip(src: _Source, name: str, v: _Version, chain: tuple[str, ...], depth: int) -> None:
    with _spool(src) as f:
        try:
            archive = zipfile.ZipFile(f)
        except Exception as e:
            v.fail((*chain, "zip"), "could not be read as zip", e)
            f.seek(0)
            _scan_raw(f, v, (*chain, "unreadable zip"), text=False)
            return
        with archive:
            if archive.comment:
                hits = v.value(archive.comment.decode("utf-8", "replace"))
                if hits:
                    v.add(chain, "zip comment", hits)
            for i, info in enumerate(archive.infolist(), 1):
                member = v.label(info.filename, i, chain, "zip member names")
                if info.is_dir():
                    continue
                where = (*chain, f"zip member {member}")
                try:
                    with archive.open(info) as m:
                        _scan_stream(_Source(m), info.filename, v, where, depth + 1)
                except Exception as e:
                    v.fail(where, "could not be opened", e)


def _tar(src: _Source, name: str, v: _Version, chain: tuple[str, ...], depth: int) -> None:
    with tarfile.open(fileobj=src, mode="r|") as archive:
        for i, info in enumerate(archive, 1):
            member = v.label(info.name, i, chain, "tar member names")
            if not info.isfile():
                continue
            f = archive.extractfile(info)
            if f is not None:
                _scan_stream(_Source(f), info.name, v, (*chain, f"tar member {member}"), depth + 1)
    # Whatever follows the end of the archive is not a member, but may hold data.
    _scan_raw(src, v, (*chain, "after tar"), text=False)


def _utf16(src: _Source, name: str, v: _Version, chain: tuple[str, ...], depth: int) -> None:
    _scan_stream(_Source(_Transcoded(src, "utf-16")), name, v, (*chain, "utf-16"), depth + 1)


_PICKLE_INTS = {"INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4"}


def _pickle(src: _Source, name: str, v: _Version, chain: tuple[str, ...], depth: int) -> None:
    """Strings and integers of one or more pickles, read without running them.

    Length-prefixed and followed by opcodes, pickled strings are not reliably whole
    printable runs (protocol 2 puts a 'q' right after each). Anything that is not
    a well-formed pickle is scanned as raw bytes, which then cover it completely.
    """
    with _spool(src) as f:
        size = f.seek(0, io.SEEK_END)
        f.seek(0)
        if size > MAX_PICKLE:
            _scan_raw(f, v, chain, text=False)
            return
        hits = 0
        try:
            while lead := f.read(2):
                f.seek(-len(lead), io.SEEK_CUR)
                if len(lead) < 2 or lead[0] != 0x80 or not 2 <= lead[1] <= 5:
                    # What follows the pickles (legacy torch files: tensor bytes).
                    _scan_raw(f, v, chain, text=False, offset=f.tell())
                    break
                for op, arg, _ in pickletools.genops(f):
                    if isinstance(arg, str):
                        hits += v.value(arg)
                    elif isinstance(arg, bytes | bytearray):
                        hits += v.value(bytes(arg).decode("utf-8", "ignore"))
                    elif isinstance(arg, int) and not isinstance(arg, bool):
                        if op.name in _PICKLE_INTS:
                            hits += v.integer(arg)
        except Exception as e:
            if isinstance(e, _PredicateFailed):
                raise
            f.seek(0)
            _scan_raw(f, v, chain, text=False)
            return
        if hits:
            v.add(chain, "pickle", hits)


def _npy(src: _Source, name: str, v: _Version, chain: tuple[str, ...], depth: int) -> None:
    """A NumPy array: string arrays hold ids as UTF-32 or fixed-width bytes, not as runs."""
    head = src.peek(12)
    width = 2 if head[6:7] == b"\x01" else 4
    header_len = int.from_bytes(head[8 : 8 + width], "little")
    try:
        if header_len > 1 << 20:
            raise ValueError("header too long")
        prefix = src.peek(8 + width + header_len)
        meta = ast.literal_eval(prefix[8 + width :].decode("latin-1"))
        dtype = np.dtype(meta["descr"])
    except Exception:
        _scan_raw(src, v, chain, text=False)
        return
    src.read(len(prefix))
    if dtype.hasobject:
        _pickle(src, name, v, (*chain, "npy"), depth + 1)
        return
    if dtype.fields or dtype.kind not in "USiu" or dtype.itemsize == 0:
        _scan_raw(src, v, chain, text=False, offset=len(prefix))
        return
    hits = 0
    step = max(1, v.chunk_size // dtype.itemsize) * dtype.itemsize
    carry = b""
    while True:
        data = carry + src.read(step)
        usable = len(data) - len(data) % dtype.itemsize
        if usable == 0:
            break
        values, counts = np.unique(np.frombuffer(data[:usable], dtype), return_counts=True)
        carry = data[usable:]
        for x, n in zip(values.tolist(), counts.tolist(), strict=True):
            if isinstance(x, bytes):
                hits += v.value(x.rstrip(b"\x00").decode("utf-8", "ignore")) * n
            elif isinstance(x, str):
                hits += v.value(x) * n
            else:
                hits += v.integer(int(x)) * n
    if hits:
        v.add(chain, "npy array", hits)


_HANDLERS: dict[str, Handler] = {
    "parquet": _table("parquet", _read_parquet),
    "encrypted parquet": _encrypted_parquet,
    "arrow": _table("arrow", _read_arrow),
    "orc": _table("orc", _read_orc),
    "gzip": _decompressed("gzip", (".gz", ".gzip"), lambda s: gzip.GzipFile(fileobj=s, mode="rb")),
    "zstd": _decompressed("zstd", (".zst", ".zstd"), _zstd_reader),
    "bz2": _decompressed("bz2", (".bz2",), lambda s: bz2.BZ2File(s)),
    "xz": _decompressed("xz", (".xz",), lambda s: lzma.LZMAFile(s)),
    "zip": _zip,
    "tar": _tar,
    "npy": _npy,
    "pickle": _pickle,
    "utf-16": _utf16,
    "csv": _csv_handler("csv", ","),
    "tsv": _csv_handler("tsv", "\t"),
    "json": _json,
    "jsonl": _jsonl,
    "text": _text,
    "raw": _raw,
}


# -- the scan -----------------------------------------------------------------------
class _Progress:
    """One line on stderr, at most five updates a second; silent unless asked for."""

    def __init__(self, mode: ProgressMode, report: ScanReport) -> None:
        self._stream = sys.stderr
        isatty = getattr(self._stream, "isatty", None)
        tty = bool(isatty()) if callable(isatty) else False
        self._on = mode == "always" or (mode is True and tty)
        self._report = report
        self._last = 0.0
        self._width = 0

    def read(self, n: int) -> None:
        self._report.bytes += n
        self.tick()

    def tick(self, final: bool = False) -> None:
        if not self._on:
            return
        now = time.monotonic()
        if not final and now - self._last < PROGRESS_INTERVAL:
            return
        self._last = now
        r = self._report
        line = (
            f"lethe scan: {r.objects} objects, {r.versions} versions, {r.bytes / (1 << 20):.1f} MiB"
        )
        self._stream.write("\r" + line.ljust(self._width))
        self._stream.flush()
        self._width = len(line)

    def done(self) -> None:
        if self._on:
            self.tick(final=True)
            self._stream.write("\n")
            self._stream.flush()


def _scan_version(
    store: Store, v: _Version, meter: _Progress, max_object_bytes: int | None
) -> None:
    hits = v.name(v.key)
    if hits:
        v.add((), "object key", hits)
    try:
        response = store.client.get_object(Bucket=store.bucket, Key=v.key, VersionId=v.version)
    except botocore.exceptions.ClientError as e:
        if str(e.response.get("Error", {}).get("Code", "")) in MISSING:
            return  # deleted since the listing (a concurrent purge): nothing is held
        v.fail((), "could not be fetched", e)
        return
    except Exception as e:
        v.fail((), "could not be fetched", e)
        return
    body = response["Body"]
    try:
        size = response.get("ContentLength")
        if max_object_bytes is not None and size is not None and size > max_object_bytes:
            v.fail((), f"not scanned: {size} bytes, over the limit of {max_object_bytes}")
            return
        _scan_stream(_Source(body, on_read=meter.read), v.key, v, (), 0)
    finally:
        body.close()


def scan(
    store: Store,
    prefix: str,
    is_erased: Callable[[str], bool],
    *,
    progress: ProgressMode = False,
    skip: Callable[[str], bool] | None = None,
    max_object_bytes: int | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> ScanReport:
    """Ask ``is_erased`` about every token of every version of every object under prefix.

    ``prefix`` "" is the whole bucket. Delete markers are skipped, and so are keys for
    which ``skip(key)`` is true. An object larger than ``max_object_bytes`` (if given)
    is not read and counts as an error. ``progress=True`` draws a progress line on
    stderr when it is a terminal, ``"always"`` even when it is not. ``chunk_size`` is
    how much of a stream is held at a time. Unreadable objects end in ``errors``;
    nothing is raised for them (an exception from ``is_erased`` itself propagates).
    """
    report = ScanReport()
    meter = _Progress(progress, report)
    ask = _Asker(is_erased)
    last_key: str | None = None
    try:
        for key, version, is_marker in store.list_versions(prefix):
            if is_marker or (skip is not None and skip(key)):
                continue
            if key != last_key:
                report.objects += 1
                last_key = key
            report.versions += 1
            v = _Version(key, version, ask, max(chunk_size, 16), report.errors)
            _scan_version(store, v, meter, max_object_bytes)
            report.findings.extend(v.findings())
            meter.tick()
    except _PredicateFailed as e:
        raise (e.__cause__ or e) from None
    except Exception as e:
        report.errors.append(f"{prefix or '(whole bucket)'}: listing failed ({_reason(e)})")
    finally:
        meter.done()
    return report
