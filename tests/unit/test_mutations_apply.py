"""tests/mutations.py stays in step with the code: every mutation still finds the function it
edits and changes it, and names test files that exist (the full mutation run is in .ci/run)."""

from __future__ import annotations

import ast

from tests import mutations


def test_every_mutation_still_applies_and_names_existing_tests() -> None:
    assert mutations.check(list(mutations.MUTATIONS)) == []


def test_each_mutation_really_changes_the_code_and_leaves_it_parseable() -> None:
    for m in mutations.MUTATIONS:
        path, original, mutated = mutations.plan(mutations.REPO, m)
        assert mutated != original, m.name
        if path.suffix == ".py":
            ast.parse(mutated)  # a mutant that does not even import would be "caught" for nothing


def test_a_mutation_that_no_longer_applies_fails_loudly() -> None:
    gone = mutations.Mutation(
        "gone",
        "a claim",
        (mutations.Edit(mutations.PY, r"x", "y", function="no_such_function_anywhere"),),
        (),
    )
    try:
        mutations.plan(mutations.REPO, gone)
    except mutations.StaleMutation as err:
        assert "no_such_function_anywhere" in str(err) and "gone" in str(err)
    else:
        raise AssertionError("a stale mutation must raise")


def test_the_status_page_mutation_follows_a_jinja2_rewrite() -> None:
    """The page is being moved to Jinja2 (autoescape): the mutation's other forms still apply."""
    import re

    (m,) = [m for m in mutations.MUTATIONS if m.name == "status-reason-unescaped"]
    template = next(e for e in m.edits if e.glob.endswith(".j2"))
    text = "<p>Refused {{ rejection.commit[:12] }}: {{ rejection.reason }}</p>"
    assert re.sub(template.pattern, template.replacement, text) == (
        "<p>Refused {{ rejection.commit[:12] }}: {{ rejection.reason | safe }}</p>"
    )
    env = m.edits[-1]
    code = 'env = Environment(loader=loader, autoescape=select_autoescape(["html"]), trim_blocks=True)'
    assert "autoescape=False, trim_blocks" in re.sub(env.pattern, env.replacement, code)
