"""Safe YAML reading: bytes -> plain data (dict/list/str/int/float/bool/None) + node marks.

Nothing here constructs Python objects from tags. The YAML *parser* (libyaml's when available,
else PyYAML's pure-Python one; both only through ``SafeLoader`` subclasses) produces a stream of
events; this module composes them iteratively (no recursion, so deep nesting cannot overflow a
stack) into plain data while enforcing, before anything else walks the data:

- a size cap per file (the caller also caps the whole repo), strict UTF-8;
- a depth cap;
- an alias-expansion cap: every alias counts the full size of the node it repeats, so a
  "billion laughs" document fails after a few hundred events, in bounded memory;
- recursive aliases, undefined aliases, aliases as keys and merge keys (``<<``) are refused;
- only the core tags (str, int, float, bool, null, seq, map) are accepted: python tags and
  any application tag are errors;
- duplicate mapping keys are errors naming both lines.

Plain scalars resolve like YAML 1.2's core schema, more strictly: only ``true``/``false`` are
booleans (``yes``, ``no``, ``on``, ``off`` stay strings), numbers with a leading zero such as
``0644`` stay strings (so file modes are never silently read as octal or decimal), no
timestamps. Every node's position is kept: ``marks[path] = (line, col)`` (1-based) for the
value at ``path`` (a tuple of keys and indexes), ``key_marks[path]`` for a mapping key.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import yaml

from reconciler.errors import Problem

MAX_FILE_BYTES = 1024 * 1024
MAX_DEPTH = 32
MAX_ALIAS_NODES = 10_000  # nodes added by alias expansion, per file
MAX_SCALAR_NUMBER_DIGITS = 40

Path = tuple[str | int, ...]
Mark = tuple[int, int]

CORE = "tag:yaml.org,2002:"
_SCALAR_TAGS = {CORE + t for t in ("str", "int", "float", "bool", "null")}

# Characters that must never reach a config file or a command line through a one-line value.
BAD_CHARS = re.compile("[\x00-\x1f\x7f\x85\u2028\u2029]")

_NULL = frozenset({"", "~", "null", "Null", "NULL"})
_TRUE = frozenset({"true", "True", "TRUE"})
_FALSE = frozenset({"false", "False", "FALSE"})
_INT = re.compile(r"[-+]?(?:0|[1-9][0-9]*)")
_HEX = re.compile(r"0x[0-9a-fA-F]+")
_OCT = re.compile(r"0o[0-7]+")
_FLOAT = re.compile(r"[-+]?(?:\.[0-9]+|(?:0|[1-9][0-9]*)(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?")


if yaml.__with_libyaml__:  # pragma: no branch - both parsers give the same events and marks

    class _EventSource(yaml.CSafeLoader):
        """libyaml's parser; only its event stream is used (never construct_*)."""

else:  # pragma: no cover - libyaml is present on the supported platforms

    class _EventSource(yaml.SafeLoader):  # type: ignore[no-redef]
        """PyYAML's pure-Python parser; only its event stream is used."""


class PurePythonEventSource(yaml.SafeLoader):
    """The pure-Python parser, for tests that check both parsers agree."""


@dataclass
class YamlDocument:
    """One YAML document of a file, as plain data plus where each node was."""

    file: str
    index: int  # 0-based position of the document in its file
    line: int  # where the document starts (1-based)
    col: int
    data: Any = None
    marks: dict[Path, Mark] = field(default_factory=dict)
    key_marks: dict[Path, Mark] = field(default_factory=dict)
    # strings holding a control character: (path, mark, the character); the caller decides
    # which fields may hold newlines (file contents) and which may not (everything else)
    control_strings: list[tuple[Path, Mark, str]] = field(default_factory=list)
    ok: bool = True  # False when a problem was found inside it (data may be partial)

    def mark(self, path: Path) -> Mark:
        """The position of ``path``, or of its nearest ancestor that has one."""
        p = tuple(path)
        while True:
            m = self.marks.get(p)
            if m is not None:
                return m
            if not p:
                return (self.line, self.col)
            p = p[:-1]

    def key_mark(self, path: Path) -> Mark:
        return self.key_marks.get(tuple(path)) or self.mark(path)

    def problem(self, path: Path, message: str, *, key: bool = False, severity: str = "error") -> Problem:
        line, col = self.key_mark(path) if key else self.mark(path)
        return Problem(self.file, line, col, format_path(path), message, severity)


def format_path(path: Path) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out


def short(value: object, limit: int = 60) -> str:
    """A bounded repr for error messages (hostile input can be a megabyte long)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Stop(Exception):
    """Abort parsing this file (a problem was already recorded)."""


def _line_col(text: str, index: int) -> Mark:
    line = text.count("\n", 0, index) + 1
    start = text.rfind("\n", 0, index) + 1
    return (line, index - start + 1)


def decode(file: str, data: bytes) -> tuple[str | None, list[Problem]]:
    """Strict UTF-8 (a leading BOM is dropped); size capped."""
    if len(data) > MAX_FILE_BYTES:
        return None, [Problem(file, 0, 0, "", f"file is {len(data)} bytes; the limit is {MAX_FILE_BYTES}")]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        prefix = data[: exc.start]
        line = prefix.count(b"\n") + 1
        col = len(prefix[prefix.rfind(b"\n") + 1 :].decode("utf-8", errors="replace")) + 1
        return None, [Problem(file, line, col, "", f"not valid UTF-8 (byte 0x{data[exc.start]:02x})")]
    if text.startswith("\ufeff"):
        text = text[1:]
    return text, []


def load_documents(
    file: str, data: bytes, *, pure_python: bool = False
) -> tuple[list[YamlDocument], list[Problem]]:
    """Parse every document of one file. Never raises for bad input: problems are returned."""
    text, problems = decode(file, data)
    if text is None:
        return [], problems
    composer = _Composer(file, text)
    try:
        composer.run(PurePythonEventSource if pure_python else _EventSource)
    except _Stop:
        pass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark is not None else (0, 0)
        msg = " ".join(x for x in (exc.context, exc.problem) if x) or "invalid YAML"
        composer.problems.append(Problem(file, line, col, "", f"YAML syntax error: {msg}"))
    except yaml.reader.ReaderError as exc:
        position = exc.position
        if not pure_python and yaml.__with_libyaml__:  # libyaml counts bytes, PyYAML characters
            position = len(text.encode("utf-8")[:position].decode("utf-8", errors="ignore"))
        line, col = _line_col(text, position)
        composer.problems.append(
            Problem(file, line, col, "", f"character U+{exc.character:04X} is not allowed in YAML")
            if isinstance(exc.character, int)
            else Problem(file, line, col, "", "character not allowed in YAML")
        )
    except yaml.YAMLError as exc:  # pragma: no cover - every parser error above is marked
        composer.problems.append(Problem(file, 0, 0, "", f"YAML error: {short(str(exc), 200)}"))
    except (RecursionError, MemoryError, ValueError, TypeError) as exc:  # pragma: no cover - defensive
        composer.problems.append(Problem(file, 0, 0, "", f"cannot read YAML: {type(exc).__name__}"))
    problems.extend(composer.problems)
    return composer.documents, problems


class _Frame:
    __slots__ = ("anchor", "container", "is_map", "key", "key_mark", "keys", "path", "start_total")

    def __init__(
        self, container: Any, is_map: bool, path: Path, anchor: str | None, start_total: int
    ) -> None:
        self.container = container
        self.is_map = is_map
        self.path = path
        self.anchor = anchor
        self.start_total = start_total
        self.key: str | None = None  # mapping: the key waiting for its value
        self.key_mark: Mark = (0, 0)
        self.keys: dict[str, int] = {}  # mapping: key -> line where first seen


class _Composer:
    def __init__(self, file: str, text: str) -> None:
        self.file = file
        self.text = text
        self.problems: list[Problem] = []
        self.documents: list[YamlDocument] = []
        self.doc: YamlDocument | None = None
        self.stack: list[_Frame] = []
        self.anchors: dict[str, tuple[Any, int]] = {}
        self.open_anchors: set[str] = set()
        self.total = 0  # nodes in this document, aliases counted by their expanded size
        self.alias_nodes = 0  # nodes added by alias expansion, in the whole file

    # -- helpers

    def _fail(self, mark: Mark, path: Path, message: str) -> None:
        self.problems.append(Problem(self.file, mark[0], mark[1], format_path(path), message))
        if self.doc is not None:
            self.doc.ok = False

    def _stop(self, mark: Mark, path: Path, message: str) -> _Stop:
        self._fail(mark, path, message)
        return _Stop()

    def _child_path(self) -> Path:
        if not self.stack:
            return ()
        top = self.stack[-1]
        if top.is_map:
            assert top.key is not None
            return (*top.path, top.key)
        return (*top.path, len(top.container))

    # -- main loop

    def run(self, source: type[yaml.SafeLoader] | type[yaml.CSafeLoader]) -> None:
        loader = source(self.text)
        try:
            for event in _events(loader):
                self._event(event)
        finally:
            loader.dispose()

    def _event(self, ev: yaml.Event) -> None:
        sm = ev.start_mark
        mark: Mark = (sm.line + 1, sm.column + 1) if sm is not None else (0, 0)
        if isinstance(ev, yaml.ScalarEvent):
            self._scalar(ev, mark)
        elif isinstance(ev, yaml.MappingStartEvent | yaml.SequenceStartEvent):
            self._start(ev, mark)
        elif isinstance(ev, yaml.MappingEndEvent | yaml.SequenceEndEvent):
            self._end()
        elif isinstance(ev, yaml.AliasEvent):
            self._alias(ev, mark)
        elif isinstance(ev, yaml.DocumentStartEvent):
            self.doc = YamlDocument(self.file, len(self.documents), mark[0], mark[1])
            self.anchors = {}
            self.open_anchors = set()
            self.total = 0
        elif isinstance(ev, yaml.DocumentEndEvent):
            if self.doc is not None:
                self.documents.append(self.doc)
            self.doc = None

    def _is_key_slot(self) -> bool:
        return bool(self.stack) and self.stack[-1].is_map and self.stack[-1].key is None

    def _scalar(self, ev: yaml.ScalarEvent, mark: Mark) -> None:
        if self._is_key_slot():
            top = self.stack[-1]
            key = ev.value
            path = (*top.path, key)
            if ev.tag not in (None, "!", CORE + "str"):
                self._fail(mark, path, f"tag {short(ev.tag)} is not allowed on a key")
            if ev.tag is None and ev.implicit[0] and key == "<<":
                self._fail(mark, path, "merge keys (<<) are not supported: write the keys out")
            first = top.keys.get(key)
            if first is not None:
                self._fail(
                    mark, path, f"duplicate key {short(key)} (first at line {first}, again at line {mark[0]})"
                )
                top.key = "\x00dup"  # swallow the value
            else:
                top.keys[key] = mark[0]
                top.key = key
            top.key_mark = mark
            if ev.anchor is not None:
                self.anchors[ev.anchor] = (key, 1)
            return
        value = self._resolve(ev, mark)
        if ev.anchor is not None:
            self.anchors[ev.anchor] = (value, 1)
        self._attach(value, mark)

    def _resolve(self, ev: yaml.ScalarEvent, mark: Mark) -> Any:
        value: str = ev.value
        tag = ev.tag
        if tag is None:
            return self._plain(value, mark) if ev.implicit[0] else self._string(value, mark)
        if tag in ("!", CORE + "str"):
            return self._string(value, mark)
        if tag not in _SCALAR_TAGS:
            self._fail(mark, self._child_path(), f"tag {short(tag)} is not allowed (only plain YAML data)")
            return None
        resolved = self._plain(value, mark)
        want = tag[len(CORE) :]
        ok = {
            "int": isinstance(resolved, int) and not isinstance(resolved, bool),
            "float": isinstance(resolved, int | float) and not isinstance(resolved, bool),
            "bool": isinstance(resolved, bool),
            "null": resolved is None,
        }[want]
        if not ok:
            self._fail(mark, self._child_path(), f"{short(value)} is not a valid !!{want}")
            return None
        return float(resolved) if want == "float" else resolved

    def _string(self, value: str, mark: Mark) -> str:
        bad = BAD_CHARS.search(value)
        if bad is not None and self.doc is not None:
            self.doc.control_strings.append((self._child_path(), mark, bad.group()))
        return value

    def _plain(self, value: str, mark: Mark) -> Any:
        if value in _NULL:
            return None
        if value in _TRUE:
            return True
        if value in _FALSE:
            return False
        if value[:1] in "-+.0123456789" and len(value) <= MAX_SCALAR_NUMBER_DIGITS:
            if _INT.fullmatch(value):
                return int(value)
            if _HEX.fullmatch(value):
                return int(value[2:], 16)
            if _OCT.fullmatch(value):
                return int(value[2:], 8)
            if _FLOAT.fullmatch(value) and not _INT.fullmatch(value):
                return float(value)
        return self._string(value, mark)

    def _attach(self, value: Any, mark: Mark) -> None:
        self.total += 1
        if self.doc is None:  # pragma: no cover - the parser always opens a document first
            return
        if not self.stack:
            self.doc.data = value
            self.doc.marks[()] = mark
            return
        top = self.stack[-1]
        if top.is_map:
            key = top.key
            assert key is not None
            top.key = None
            if key == "\x00dup":
                return
            path = (*top.path, key)
            top.container[key] = value
            self.doc.key_marks[path] = top.key_mark
        else:
            path = (*top.path, len(top.container))
            top.container.append(value)
        self.doc.marks[path] = mark

    def _start(self, ev: yaml.CollectionStartEvent, mark: Mark) -> None:
        is_map = isinstance(ev, yaml.MappingStartEvent)
        if self._is_key_slot():
            raise self._stop(mark, self.stack[-1].path, "a mapping key must be a plain string")
        path = self._child_path()
        want = CORE + ("map" if is_map else "seq")
        if ev.tag not in (None, "!", want):
            self._fail(mark, path, f"tag {short(ev.tag)} is not allowed (only plain YAML data)")
        if len(self.stack) >= MAX_DEPTH:
            raise self._stop(mark, (), f"nesting deeper than {MAX_DEPTH} levels")
        container: Any = {} if is_map else []
        start_total = self.total
        self._attach(container, mark)
        if ev.anchor is not None:
            self.open_anchors.add(ev.anchor)
        self.stack.append(_Frame(container, is_map, path, ev.anchor, start_total))

    def _end(self) -> None:
        frame = self.stack.pop()
        if frame.anchor is not None:
            self.open_anchors.discard(frame.anchor)
            self.anchors[frame.anchor] = (frame.container, self.total - frame.start_total)

    def _alias(self, ev: yaml.AliasEvent, mark: Mark) -> None:
        path = self.stack[-1].path if self.stack else ()
        if self._is_key_slot():
            raise self._stop(mark, path, "an alias cannot be a mapping key")
        name = ev.anchor or ""
        if name in self.open_anchors:
            raise self._stop(mark, self._child_path(), f"recursive alias *{short(name, 40)}")
        if name not in self.anchors:
            raise self._stop(mark, self._child_path(), f"undefined alias *{short(name, 40)}")
        value, size = self.anchors[name]
        self.alias_nodes += size
        if self.alias_nodes > MAX_ALIAS_NODES:
            raise self._stop(
                mark, self._child_path(), f"aliases expand to more than {MAX_ALIAS_NODES} nodes (alias bomb?)"
            )
        self._attach(value, mark)
        self.total += size - 1


def _events(loader: yaml.SafeLoader | yaml.CSafeLoader) -> Iterator[yaml.Event]:
    while loader.check_event():
        event = loader.get_event()
        if event is None:  # pragma: no cover - check_event() said there is one
            return
        yield event
