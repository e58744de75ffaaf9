"""The template sandbox's bounds: huge strings, lists and integers fail at once, naming the
template file and line; ordinary templates are unaffected; output stops at the per-file cap."""

from __future__ import annotations

import time

import pytest
from services_fleets import example_fleet

from reconciler.domains.render_limits import RenderLimitExceeded
from reconciler.domains.templating import MAX_SEQUENCE, output_limit, render_template
from reconciler.errors import RenderError


def render(text: str) -> str:
    fleet = example_fleet(templates={"templates/t.j2": text})
    return render_template(fleet, fleet.host("web1"), "templates/t.j2", used_by="files/t.yaml")


def refused(text: str, limit: str = "sandbox") -> str:
    started = time.monotonic()
    with pytest.raises(RenderLimitExceeded) as err:
        render(text)
    assert time.monotonic() - started < 1.0, "a bound must fail fast, before allocating"
    assert err.value.limit == limit
    return str(err.value)


@pytest.mark.parametrize(
    ("text", "what"),
    [
        ("{{ 'x' * 3000000000 }}", "'*' (repetition) would build 3,000,000,000 items"),
        ("{{ 3000000000 * 'x' }}", "'*' (repetition)"),
        ("{{ ([1] * 100000000) | length }}", "'*' (repetition) would build 100,000,000 items"),
        ("{{ 10 ** (9 ** 9) }}", "'**' would build an integer"),
        ("{{ (2 ** 60000) * (2 ** 60000) }}", "'*' would build an integer"),
        ("{{ 'x'.ljust(3000000000) }}", "ljust()"),
        ("{{ 'x'.center(3000000000) }}", "center()"),
        ("{{ 'x'.zfill(3000000000) }}", "zfill()"),
        ("{{ 'x' | center(3000000000) }}", "center"),
        ("{{ 'a\\tb'.expandtabs(3000000000) }}", "expandtabs()"),
        ("{{ '{:>3000000000}'.format(1) }}", "format() width"),
        ("{{ '{:>{w}}'.format(1, w=3000000000) }}", "format() width"),
        ("{{ '%3000000000d' % 1 }}", "'%' formatting width"),
        ("{{ '%*d' % (3000000000, 1) }}", "'%' formatting width"),
        ("{{ '%3000000000d' | format(1) }}", "'%' formatting width"),
        ("{{ ('x' * 1000).replace('x', 'y' * 100000) }}", "replace()"),
        ("{{ ('x' * 1000) | replace('x', 'y' * 100000) }}", "replace()"),
        ("{{ ('x' * 10000000) + ('y' * 10000000) }}", "'+'"),
        ("{{ 'a\\nb' | indent(3000000000) }}", "indent"),
        ("{{ range(1000000) | list | length }}", "range() of more than 100,000 items"),
    ],
)
def test_huge_values_are_refused_at_once_with_file_and_line(text: str, what: str) -> None:
    message = refused("first line\n" + text)
    assert message.startswith("templates/t.j2:2: template refused by the sandbox: "), message
    assert what in message and "(host web1)" in message and "(used by files/t.yaml)" in message


def test_the_bound_is_exact() -> None:
    assert render(f"{{{{ ('x' * {MAX_SEQUENCE}) | length }}}}") == str(MAX_SEQUENCE)
    refused(f"{{{{ 'x' * {MAX_SEQUENCE + 1} }}}}")


def test_ordinary_templates_are_unaffected() -> None:
    text = (
        "{{ 'ab' * 3 }} {{ 3 * 'ab' }} {{ 2 ** 10 }} {{ 7 * 6 }} {{ '%05d' % 42 }} {{ '%s-%s' % ('a', 'b') }}"
        " {{ '{:>5}'.format('a') }} {{ '{}{}'.format(1, 2) }} {{ 'a' + 'b' }} {{ [1, 2] + [3] }}"
        " {{ 'x' | center(5) }}|{{ 'a\nb' | indent(2) }}|{{ 'aXb'.replace('X', '-') }}"
        " {{ ', '.join(['a', 'b']) }} {{ 'ab'.ljust(4, '.') }} {{ '%s' | format('f') }} {{ 1.5 ** 2 }}"
        " {{ range(3) | list }} {{ 'a\tb'.expandtabs(2) }}"
    )
    assert render(text) == (
        "ababab ababab 1024 42 00042 a-b     a 12 ab [1, 2, 3]   x  |a\n  b|a-b a, b ab.. f 2.25"
        " [0, 1, 2] a b"
    )


def test_jinja_pow_is_left_associative_so_10_9_9_is_small() -> None:
    # Jinja parses 10**9**9 as (10**9)**9 = 10**81 (Python would be right-associative).
    assert render("{{ 10**9**9 }}") == "1" + "0" * 81


def test_output_stops_at_the_per_file_cap_while_generating() -> None:
    started = time.monotonic()
    message = refused("{% for i in range(100000) %}{{ 'x' * 730 }}\n{% endfor %}", limit="file-size")
    assert time.monotonic() - started < 0.5  # 1 MiB generated, not 73 MB
    assert message.startswith("templates/t.j2: the output is larger than 1 MiB, the limit per file")
    assert "render.max_file_bytes" in message and "(used by files/t.yaml)" in message
    with output_limit(10):
        with pytest.raises(RenderLimitExceeded, match="larger than 10 bytes"):
            render("12345678901")
        assert render("1234567890") == "1234567890"


def test_security_and_plain_errors_are_not_limits() -> None:
    with pytest.raises(RenderError) as err:
        render("{{ ''.__class__.__mro__ }}")
    assert not isinstance(err.value, RenderLimitExceeded)
    with pytest.raises(RenderError) as err:
        render("ok\n{{ nope }}")
    assert not isinstance(err.value, RenderLimitExceeded) and "templates/t.j2:2" in str(err.value)


def test_a_bound_in_an_included_template_names_that_template() -> None:
    fleet = example_fleet(
        templates={
            "templates/t.j2": "{% include 'templates/inc.j2' %}",
            "templates/inc.j2": "a\nb\n{{ 'x' * 10**10 }}",
        }
    )
    with pytest.raises(RenderLimitExceeded, match=r"^templates/inc.j2:3: template refused by the sandbox"):
        render_template(fleet, fleet.host("web1"), "templates/t.j2")
