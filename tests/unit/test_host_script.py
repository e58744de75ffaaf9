"""The one host-script framing (reconciler.host.script), run for real by sh on a fake host."""

from __future__ import annotations

from pathlib import Path

import pytest

from reconciler.host.fake import FakeHost
from reconciler.host.script import ScriptBuilder, prelude, run_framed, said, split_sections, token


async def test_sections_statuses_stderr_and_said_lines(tmp_path: Path) -> None:
    b = ScriptBuilder()
    hostile = b.ref('value; $(rm -rf /) `x` "q"')
    b.add(f"frame 'a b' printf '%s\\n' {hostile}")
    b.add("frame fails sh -c 'echo out; echo err >&2; exit 3'")
    b.add("say done 1")
    b.add("say done 2")
    run = await run_framed(FakeHost(tmp_path), b.script(prelude()), b.args, timeout=30)
    s = run.sections
    assert s["a b"].ok and s["a b"].body == b'value; $(rm -rf /) `x` "q"\n'
    assert s["fails"].exit_status == 3 and s["fails"].text == "out" and s["fails"].stderr == "err"
    assert said(s) == ["done 1", "done 2"] and run.started


async def test_output_that_forges_markers_stays_in_its_section(tmp_path: Path) -> None:
    host = FakeHost(tmp_path)
    forged = "x\n\n@@" + "0" * 32 + ">f 0\n\n@@" + "0" * 32 + "<evil\n@@<evil\n\n@@>f 0\n"
    path = host.write("/data/forged", forged)
    run = await run_framed(host, prelude() + 'frame f cat "$1"\nsay ok\n', [str(path)], timeout=30)
    assert set(run.sections) == {"f", "say.1"} and run.sections["f"].body == forged.encode()


async def test_a_script_cut_off_leaves_an_unfinished_section(tmp_path: Path) -> None:
    script = prelude() + "frame slow sh -c 'echo part; kill -9 $PPID'\n"
    run = await run_framed(FakeHost(tmp_path), script, timeout=30)
    assert run.sections["slow"].exit_status is None and run.sections["slow"].text == "part"


async def test_no_nonce_no_run_and_stdin_after_the_nonce(tmp_path: Path) -> None:
    host = FakeHost(tmp_path)
    res = await host.run_script(prelude() + "frame x echo hi\n", stdin_after=b"not a nonce\n")
    assert res.exit_status == 97 and b"hi" not in res.stdout
    run = await run_framed(host, prelude(keep_stdin=True) + "frame data cat\n", stdin_after=b"payload\0bytes")
    assert run.sections["data"].body == b"payload\0bytes"
    closed = await run_framed(host, prelude() + "frame data cat\n", stdin_after=b"payload")
    assert closed.sections["data"].body == b""  # stdin closed after the nonce


def test_split_ignores_noise_unmatched_ends_and_bad_statuses() -> None:
    nonce = "abcd"
    out = b"noise\n@@abcd<x\n\n@@abcd<a\n1\n@@abcd>a 0\n\n@@abcd>b 0\n\n@@abcd<c\n2\n@@abcd>c nope\n"
    s = split_sections(out, nonce=nonce)
    assert s["a"].body == b"1" and s["a"].exit_status == 0
    assert s["c"].exit_status is None  # a status that is not a number


def test_tokens_are_checked() -> None:
    assert token("svc.3") == "svc.3"
    with pytest.raises(ValueError):
        token("a;b")
    with pytest.raises(ValueError):
        ScriptBuilder().ref("nul\0byte")
