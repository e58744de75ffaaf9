"""Every command that loads a fleet through commands.plan.prepare gets the arguments it needs
(verify renders nothing; plan and apply render in the bounded worker and seed the engine)."""

from __future__ import annotations

from pathlib import Path

import pytest

from reconciler.cli import build_parser
from reconciler.commands.plan import prepare
from reconciler.engine import fleet as engine
from reconciler.kinds.resources import Desired

EXAMPLE = Path(__file__).resolve().parents[2] / "fleet-repo-example"
REACH = ["--known-hosts", "/dev/null", "--identity", "/dev/null"]


@pytest.mark.parametrize("command", ["verify", "plan", "apply"])
def test_prepare_works_with_each_commands_arguments(command: str) -> None:
    args = build_parser().parse_args([command, str(EXAMPLE), "--host", "web1", *REACH])
    prepared = prepare(args, render=command != "verify")
    assert not isinstance(prepared, int)
    fleet, reach = prepared
    assert reach.known_hosts == "/dev/null"
    if command != "verify":  # rendered in the worker, seeded: the engine never renders here
        assert isinstance(engine.render_cached(fleet, "web1"), Desired)
        with pytest.raises(Exception, match="not rendered"):
            engine.render_cached(fleet, "db1")


def test_plan_refuses_a_template_that_breaks_a_bound(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    repo = tmp_path / "fleet"
    shutil.copytree(EXAMPLE, repo)
    (repo / "templates" / "motd.j2").write_text("{{ 'x' * 3000000000 }}\n")
    args = build_parser().parse_args(["plan", str(repo), *REACH])
    assert prepare(args) == 1
    err = capsys.readouterr().err
    assert "render refused: templates/motd.j2:1: template refused by the sandbox" in err
