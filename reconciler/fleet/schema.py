"""JSON Schema (2020-12) validation of fleet documents, with errors located in the YAML.

The schemas live in the top-level ``schemas/`` directory (the source of truth), shipped inside
the package as ``reconciler/schemas/*.json`` (a symlink in the source tree, real files in a
wheel). One validator per kind is compiled once per process.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Iterable, Mapping
from functools import cache
from importlib import resources
from pathlib import Path as FsPath
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError

from reconciler.errors import Problem
from reconciler.fleet.yamlsafe import Path, YamlDocument, short

API_VERSION = "reconciler/v1"

# kind -> schema file stem
KINDS: Mapping[str, str] = {
    "Fleet": "fleet",
    "Host": "host",
    "Role": "role",
    "Site": "site",
    "AppArmorProfile": "apparmorprofile",
    "ManagedFile": "managedfile",
}

_TYPE_WORDS = {
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "true or false",
    "object": "a mapping",
    "array": "a list",
    "null": "empty",
}

_CREDENTIAL_FIELDS = frozenset(
    {"password", "passwd", "pass", "username", "user", "secret", "token", "api_key", "apikey", "credentials"}
)


def _schema_dir() -> Any:
    packaged = resources.files("reconciler") / "schemas"
    if packaged.is_dir():
        return packaged
    return FsPath(__file__).resolve().parents[2] / "schemas"  # pragma: no cover - source checkout fallback


@cache
def schema(kind: str) -> dict[str, Any]:
    """The JSON Schema of one document kind."""
    text = (_schema_dir() / f"{KINDS[kind]}.schema.json").read_text(encoding="utf-8")
    data: dict[str, Any] = json.loads(text)
    return data


@cache
def validator(kind: str) -> Draft202012Validator:
    """A validator for one kind, with local ``$ref``s inlined (about twice as fast; the shared
    ``$defs`` are not recursive). The definition's description wins over a ``$ref``'s sibling
    one: it describes the format, which is what an error message needs."""
    full = schema(kind)
    defs = full.get("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/") and ref[8:] in defs:
                siblings = {k: inline(v) for k, v in node.items() if k != "$ref"}
                return {**siblings, **inline(defs[ref[8:]])}
            return {k: inline(v) for k, v in node.items() if k != "$defs"}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    flat = inline(full)
    flat["$defs"] = defs  # kept for reference only; nothing points into it any more
    return Draft202012Validator(flat)


def type_name(value: object) -> str:
    if value is None:
        return "empty"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__  # pragma: no cover - YAML gives only the above


def check_document(doc: YamlDocument, kind: str) -> list[Problem]:
    """Validate one document against its kind's schema; every error located."""
    problems: list[Problem] = []
    for err in validator(kind).iter_errors(doc.data):
        problems.extend(_problems(doc, err))
    return problems


def _problems(doc: YamlDocument, err: ValidationError) -> Iterable[Problem]:
    path: Path = tuple(err.absolute_path)
    v = err.validator
    inst = err.instance
    sch: Any = err.schema if isinstance(err.schema, dict) else {}
    if v == "additionalProperties" and isinstance(inst, dict) and sch.get("patternProperties"):
        # a mapping whose keys follow a pattern (Role.sysctl): say what a key must look like
        patterns = [re.compile(p) for p in sch["patternProperties"]]
        for extra in sorted(k for k in inst if not any(p.search(k) for p in patterns)):
            yield doc.problem(
                (*path, extra), f"{short(extra)} is not a valid key: {sch['description']}", key=True
            )
        return
    if v == "additionalProperties" and isinstance(inst, dict):
        known = sorted(sch.get("properties", {}))
        for extra in sorted(k for k in inst if k not in sch.get("properties", {})):
            yield doc.problem((*path, extra), _unknown_field(extra, known), key=True)
        return
    if v == "required" and isinstance(inst, dict):
        required: Any = err.validator_value
        for name in required:
            if name not in inst:
                yield doc.problem(path, f"missing required field {name!r}")
        return
    yield doc.problem(path, _message(err, sch))


def _unknown_field(extra: str, known: list[str]) -> str:
    msg = f"unknown field {short(extra)}"
    if extra.lower() in _CREDENTIAL_FIELDS:
        return (
            msg + ": credentials never go in the fleet repo; give the NAME of an environment variable "
            "(username_env, password_env)"
        )
    close = difflib.get_close_matches(extra, known, n=1)
    if close:
        return msg + f" (did you mean {close[0]!r}?)"
    if known:
        return msg + " (known: " + ", ".join(known) + ")"
    return msg


def _message(err: ValidationError, sch: Mapping[str, Any]) -> str:
    v = err.validator
    inst = err.instance
    val: Any = err.validator_value
    desc = sch.get("description")
    if v == "type":
        types = [str(t) for t in (val if isinstance(val, list) else [val])]
        want = " or ".join(_TYPE_WORDS.get(t, t) for t in types)
        return f"must be {want}, not {type_name(inst)}" + (f" ({desc})" if desc else "")
    if v == "pattern":
        return f"{short(inst)} is not valid: must be {desc}" if desc else f"{short(inst)} is not valid"
    if v == "enum":
        return f"{short(inst)} is not one of: " + ", ".join(str(x) for x in val)
    if v == "const":
        return f"must be {short(val)}, not {short(inst)}"
    if v == "minimum":
        return f"{short(inst)} is less than the minimum {val}"
    if v == "maximum":
        return f"{short(inst)} is more than the maximum {val}"
    if v == "minItems":
        return f"needs at least {val} item{'s' if val != 1 else ''}"
    if v == "maxItems":
        return f"has more than {val} items"
    if v == "uniqueItems":
        return "items must be unique"
    if v == "minLength":
        return "must not be empty" if val == 1 else f"must be at least {val} characters"
    if v == "maxLength":
        return f"is longer than {val} characters"
    return short(err.message, 200)  # pragma: no cover - every keyword our schemas use is above
