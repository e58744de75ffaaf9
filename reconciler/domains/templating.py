"""Jinja2 templates of managed files, rendered in a sandbox. Pure: no I/O, no clock.

A template sees only the fleet model: ``host`` (the Host being rendered), ``fleet`` (the Fleet),
``peers`` (``fleet.peers_of(host)``) and ``roles`` (``fleet.roles_of(host)``). Templates are
looked up only in ``Fleet.templates`` (repo path -> text, read by the loader), so
``{% include %}``/``{% import %}`` reach other templates of the repo and nothing else.

Settings: a ``SandboxedEnvironment`` (no attribute access to internals, no unsafe calls),
``StrictUndefined`` (a typo is an error, never an empty string), autoescape off (these are
config files, not HTML), trailing newline kept, and no ``lipsum`` global (it is random).

Bounds (``RenderLimitExceeded``, which refuses the whole commit): a single ``*``, ``+``, ``%``,
``**``, string method or filter that would build a string or list of more than
``MAX_SEQUENCE`` items, a format width above it, or an integer of more than ``MAX_INT_BITS``
bits fails at once, before anything is allocated; ``range()`` is capped by Jinja's sandbox
(100,000 items); a template's output is cut off at the per-file cap (``output_limit``) while it
is generated. Loops that take too long and allocations the bounds do not foresee end at the
render worker's time and memory limits (``reconciler.domains.bounded_render``).

Any template problem becomes a ``RenderError`` naming the template file and line.
"""

from __future__ import annotations

import contextlib
import functools
import math
import re
import string
import types
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from typing import Any

import jinja2
from jinja2 import filters as jinja_filters
from jinja2.sandbox import SandboxedEnvironment

from reconciler.domains.render_limits import RenderLimitExceeded, RenderLimits, format_size
from reconciler.errors import RenderError
from reconciler.fleet.model import Fleet, Host

MAX_SEQUENCE = 1 << 24  # items of a string or list one expression may build (16,777,216)
MAX_INT_BITS = 1 << 16  # bits of an integer one expression may build (about 19,700 digits)

_MAX_OUTPUT: ContextVar[int] = ContextVar("reconciler_template_output", default=RenderLimits().max_file_bytes)


@contextlib.contextmanager
def output_limit(max_bytes: int) -> Iterator[None]:
    """Templates rendered inside this block stop once their output passes ``max_bytes``."""
    token = _MAX_OUTPUT.set(max_bytes)
    try:
        yield
    finally:
        _MAX_OUTPUT.reset(token)


# ---------------------------------------------------------------- sandbox bounds


def _refuse(what: str) -> RenderLimitExceeded:
    return RenderLimitExceeded(f"refused by the sandbox: {what}", limit="sandbox")


def _length(value: object) -> int | None:
    if isinstance(value, str | bytes | bytearray | list | tuple):
        return len(value)
    return None


def _check_items(total: int, what: str) -> None:
    if total > MAX_SEQUENCE:
        raise _refuse(f"{what} would build {total:,} items (at most {MAX_SEQUENCE:,})")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int_bits(bits: float, what: str) -> None:
    if bits > MAX_INT_BITS:
        raise _refuse(f"{what} would build an integer of about {int(bits):,} bits (at most {MAX_INT_BITS:,})")


def _check_multiply(left: Any, right: Any) -> None:
    for seq, count in ((left, right), (right, left)):
        size = _length(seq)
        if size is not None and _is_int(count):
            _check_items(size * max(count, 0), "'*' (repetition)")
            return
    if _is_int(left) and _is_int(right):
        _check_int_bits(abs(left).bit_length() + abs(right).bit_length(), "'*'")


def _check_power(base: Any, exponent: Any) -> None:
    if _is_int(base) and _is_int(exponent) and exponent > 0 and abs(base) > 1:
        _check_int_bits(exponent * math.log2(abs(base)), "'**'")


def _check_add(left: Any, right: Any) -> None:
    a, b = _length(left), _length(right)
    if a is not None and b is not None:
        _check_items(a + b, "'+'")


_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")


def _check_widths(numbers: list[str], args: Any, what: str) -> None:
    star = False
    for text in numbers:
        if text == "*" or "{" in text:
            star = True
        elif text.isdigit():
            _check_items(int(text), f"{what} width")
    if star:  # the width comes from the arguments
        values = (
            list(args.values())
            if isinstance(args, Mapping)
            else list(args)
            if isinstance(args, tuple | list)
            else [args]
        )
        for v in values:
            if _is_int(v):
                _check_items(abs(v), f"{what} width")


def _check_percent(fmt: Any, args: Any) -> None:
    if not isinstance(fmt, str):
        return
    numbers = [n for m in _PERCENT_SPEC.finditer(fmt) for n in m.groups() if n]
    _check_widths(numbers, args, "'%' formatting")


def _check_format_string(fmt: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
    numbers: list[str] = []
    try:
        parsed = list(string.Formatter().parse(fmt))
    except ValueError:
        return  # str.format raises the same error itself
    for _, _, spec, _ in parsed:
        if spec:
            numbers += re.findall(r"\d+", spec)
            if "{" in spec:
                numbers.append("{")
    _check_widths(numbers, (*args, *kwargs.values()), "format()")


def _check_str_method(method: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
    """Bound ``str``/``bytes`` methods whose result can be far larger than their inputs."""
    owner = getattr(method, "__self__", None)
    if not isinstance(method, types.BuiltinMethodType) or not isinstance(owner, str | bytes):
        return
    name = method.__name__
    first = args[0] if args else next(iter(kwargs.values()), None)
    if name in ("ljust", "rjust", "center", "zfill") and isinstance(first, int):
        _check_items(first, f"{name}()")
    elif name == "expandtabs":
        tab = first if isinstance(first, int) else 8
        tabs = owner.count("\t") if isinstance(owner, str) else owner.count(b"\t")
        _check_items(len(owner) + tabs * max(tab, 0), "expandtabs()")
    elif name == "replace" and len(args) >= 2:
        _check_replace(owner, args[0], args[1], args[2] if len(args) > 2 else None)
    elif name == "join" and isinstance(first, list | tuple):
        sizes = [_length(x) for x in first]
        if all(s is not None for s in sizes):
            _check_items(sum(s or 0 for s in sizes) + len(owner) * max(len(first) - 1, 0), "join()")


def _check_replace(s: Any, old: Any, new: Any, count: Any) -> None:
    if _length(s) is None or _length(old) is None or _length(new) is None:
        return
    n = len(s) + 1 if not old else s.count(old)
    if _is_int(count) and count >= 0:
        n = min(n, count)
    _check_items(len(s) + n * max(len(new) - len(old), 0), "replace()")


def _bounded_filter(name: str, check: Callable[..., None]) -> Callable[..., Any]:
    original = jinja_filters.FILTERS[name]

    @functools.wraps(original)
    def bounded(*args: Any, **kwargs: Any) -> Any:
        check(*args, **kwargs)
        return original(*args, **kwargs)

    return bounded


def _center_check(value: Any, width: Any = 80) -> None:
    if _is_int(width):
        _check_items(width, "center")


def _indent_check(s: Any, width: Any = 4, *_: Any, **__: Any) -> None:
    size = len(width) if isinstance(width, str) else width if _is_int(width) else 0
    lines = str(s).count("\n") + 1
    _check_items(len(str(s)) + lines * max(size, 0), "indent")


def _format_check(value: Any, *args: Any, **kwargs: Any) -> None:
    _check_percent(str(value), kwargs or args)


def _replace_check(eval_ctx: Any, s: Any, old: Any, new: Any, count: Any = None) -> None:
    _check_replace(str(s), old, new, count)


class BoundedSandbox(SandboxedEnvironment):
    """Jinja's sandbox with size bounds on the operators, methods and filters that can make a
    huge value out of small ones (a constant ``'x' * 3000000000`` is never folded at compile
    time: intercepted operators are evaluated at render time only)."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.filters["center"] = _bounded_filter("center", _center_check)
        self.filters["indent"] = _bounded_filter("indent", _indent_check)
        self.filters["format"] = _bounded_filter("format", _format_check)
        self.filters["replace"] = _bounded_filter("replace", _replace_check)

    def call_binop(self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            _check_multiply(left, right)
        elif operator == "**":
            _check_power(left, right)
        elif operator == "+":
            _check_add(left, right)
        elif operator == "%":
            _check_percent(left, right)
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: jinja2.runtime.Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        _check_str_method(__obj, args, kwargs)
        return super().call(__context, __obj, *args, **kwargs)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        fmt = value.__self__
        if value.__name__ == "format_map":
            return wrapped

        @functools.wraps(wrapped)
        def checked(*args: Any, **kwargs: Any) -> str:
            _check_format_string(fmt, args, kwargs)
            return wrapped(*args, **kwargs)

        return checked


class _FleetLoader(jinja2.BaseLoader):
    """Serves templates from ``Fleet.templates`` only; the template's name is its repo path,
    which is also used as its "filename" so tracebacks point at ``templates/x.j2``."""

    def __init__(self, templates: Mapping[str, str]) -> None:
        self._templates = templates

    def get_source(
        self, environment: jinja2.Environment, template: str
    ) -> tuple[str, str | None, Callable[[], bool] | None]:
        try:
            source = self._templates[template]
        except KeyError:
            raise jinja2.TemplateNotFound(template) from None
        return source, template, lambda: True


def _environment(templates: Mapping[str, str]) -> BoundedSandbox:
    return _environment_for(tuple(sorted(templates.items())))


@functools.lru_cache(maxsize=16)
def _environment_for(templates: tuple[tuple[str, str], ...]) -> BoundedSandbox:
    """One environment per set of template texts, shared by every host of a fleet (and by
    the next commit when the templates did not change), so each template compiles once
    instead of once per host. Rendering keeps no state between calls."""
    env = BoundedSandbox(
        loader=_FleetLoader(dict(templates)),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        auto_reload=False,
        cache_size=64,
    )
    env.globals.pop("lipsum", None)  # random text: would make rendering non-deterministic
    return env


def _template_line(tb: types.TracebackType | None, names: set[str]) -> tuple[str, int] | None:
    """The innermost frame that belongs to a template (Jinja rewrites tracebacks so that
    template frames carry the template's file name and line)."""
    found: tuple[str, int] | None = None
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if filename in names:
            found = (filename, tb.tb_lineno)
        tb = tb.tb_next
    return found


def template_context(fleet: Fleet, host: Host) -> dict[str, Any]:
    """What a template may see: the fleet model, nothing else."""
    return {
        "host": host,
        "fleet": fleet,
        "peers": fleet.peers_of(host),
        "roles": fleet.roles_of(host),
    }


def render_template(fleet: Fleet, host: Host, template: str, *, used_by: str = "") -> str:
    """Render the repo template ``template`` for ``host``.

    ``used_by`` (e.g. ``files/motd.yaml``) is added to error messages. Raises RenderError
    naming the template file and line on a syntax error, an undefined variable, a sandbox
    violation, a missing template or any other exception raised while rendering;
    ``RenderLimitExceeded`` (a RenderError) when a bound is broken.
    """
    suffix = f" (used by {used_by})" if used_by else ""
    if template not in fleet.templates:
        raise RenderError(f"{template}: template not found in the fleet repo{suffix}")
    env = _environment(fleet.templates)
    try:
        tmpl = env.get_template(template)
    except jinja2.TemplateSyntaxError as exc:
        where = exc.filename or exc.name or template
        raise RenderError(f"{where}:{exc.lineno}: template syntax error: {exc.message}{suffix}") from None
    except jinja2.TemplateNotFound as exc:
        raise RenderError(f"{template}: template not found: {exc.name}{suffix}") from None
    except (RenderLimitExceeded, MemoryError) as exc:  # while compiling (the optimizer folds constants)
        raise _limit_error(exc, template, host, suffix) from None
    try:
        return _generate(tmpl, template_context(fleet, host), template, host, suffix)
    except _OutputCapped:
        raise
    except jinja2.TemplateSyntaxError as exc:  # in an included template
        where = exc.filename or exc.name or template
        raise RenderError(f"{where}:{exc.lineno}: template syntax error: {exc.message}{suffix}") from None
    except jinja2.TemplateNotFound as exc:
        raise RenderError(f"{template}: included template not found: {exc.name}{suffix}") from None
    except Exception as exc:  # noqa: BLE001 - anything a template raises is a template error
        located = _template_line(exc.__traceback__, set(fleet.templates))
        where = f"{located[0]}:{located[1]}" if located else template
        if isinstance(exc, RenderLimitExceeded | MemoryError):
            raise _limit_error(exc, where, host, suffix) from None
        kind = "sandbox violation" if isinstance(exc, jinja2.exceptions.SecurityError) else "error"
        detail = str(exc) if isinstance(exc, jinja2.TemplateError) else f"{type(exc).__name__}: {exc}"
        if isinstance(exc, OverflowError) and "MAX_RANGE" in detail:
            raise RenderLimitExceeded(
                f"{where}: template refused by the sandbox: range() of more than 100,000 items "
                f"(host {host.name}){suffix}",
                limit="sandbox",
            ) from None
        raise RenderError(f"{where}: template {kind}: {detail} (host {host.name}){suffix}") from None


class _OutputCapped(RenderLimitExceeded):
    pass


def _generate(tmpl: jinja2.Template, context: dict[str, Any], template: str, host: Host, suffix: str) -> str:
    """The template's output, stopped as soon as it passes the per-file cap (a loop that
    writes 73 MB stops after the first MiB instead of building it all)."""
    cap = _MAX_OUTPUT.get()
    parts: list[str] = []
    size = 0
    for chunk in tmpl.generate(context):
        size += len(chunk)
        if size > cap:
            raise _OutputCapped(
                f"{template}: the output is larger than {format_size(cap)}, the limit per file "
                f"(render.max_file_bytes) (host {host.name}){suffix}",
                limit="file-size",
            )
        parts.append(chunk)
    return "".join(parts)


def _limit_error(exc: BaseException, where: str, host: Host, suffix: str) -> RenderLimitExceeded:
    if isinstance(exc, RenderLimitExceeded):
        return RenderLimitExceeded(f"{where}: template {exc} (host {host.name}){suffix}", limit=exc.limit)
    return RenderLimitExceeded(
        f"{where}: template rendering ran out of memory (render.memory) (host {host.name}){suffix}",
        limit="memory",
    )
