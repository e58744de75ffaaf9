"""Kind ``keypair``: a key pair generated on the host when its private key is missing (never
read, never copied off); a missing public key next to a present private key is a warning, not a
regeneration (peers trust the current key)."""

from __future__ import annotations

import posixpath
from collections.abc import Sequence

from reconciler.host.script import ScriptBuilder, prelude, result_text, run_framed, said
from reconciler.kinds.actions import Action, ActionKind
from reconciler.kinds.files import refused_reason
from reconciler.kinds.kind import ApplyRun, BaseKind, PlanStep
from reconciler.kinds.observed import Observed
from reconciler.kinds.resources import KeyPair


def plan_keypairs(keypairs: tuple[KeyPair, ...], observed: Observed, warnings: list[str]) -> list[Action]:
    out: list[Action] = []
    for kp in keypairs:
        priv = observed.files.get(kp.private_path)
        pub = observed.files.get(kp.public_path)
        bad = next((st for st in (priv, pub) if st is not None and st.refused), None)
        if bad is not None:
            out.append(
                Action(
                    ActionKind.REFUSED,
                    f"keypair {kp.name}",
                    kp.domain,
                    refused_reason(bad),
                    path=kp.private_path,
                    handler=kp.handler,
                    target=kp,
                )
            )
        elif priv is None or not priv.exists:
            out.append(
                Action(
                    ActionKind.GENERATE_KEYPAIR,
                    f"keypair {kp.name}",
                    kp.domain,
                    f"no private key at {kp.private_path}: generate it on the host (never copied off)",
                    path=kp.private_path,
                    handler=kp.handler,
                    target=kp,
                )
            )
        elif pub is not None and not pub.exists:
            warnings.append(
                f"keypair {kp.name}: private key present but {kp.public_path} is missing; "
                "not regenerating (peers trust the current key); restore the public key by hand"
            )
    return out


class KeyPairsKind(BaseKind):
    """Observed with the declared files (``reconciler.kinds.files``: the private key is stated,
    never hashed); only its diff is its own."""

    name = "keypairs"

    def plan(self, step: PlanStep) -> Sequence[Action]:
        return plan_keypairs(step.kept.keypairs, step.observed, step.warnings)


KIND = KeyPairsKind()


KEYGEN_TIMEOUT = 120.0  # seconds for one host's key generation script


async def apply_keypairs(run: ApplyRun) -> None:
    """Generate each planned key pair on the host when its private key is missing (one framed
    script: paths and generator argv as positional arguments; the private key is never read
    back). Says ``<i> ok|exists|failed`` per pair; a failed generator's output is section
    ``keylog.<i>``."""
    idx = run.indices({ActionKind.GENERATE_KEYPAIR})
    if not idx:
        return
    b = ScriptBuilder()
    b.add("set -u")
    b.add("umask 077")
    b.add("log=$(mktemp) || exit 9")
    for i in idx:
        kp = run.plan.actions[i].target
        assert isinstance(kp, KeyPair)
        priv, pub = b.ref(kp.private_path), b.ref(kp.public_path)
        dirs = b.refs([posixpath.dirname(kp.private_path), posixpath.dirname(kp.public_path)])
        cmds = " && ".join(b.refs(list(argv)) for argv in kp.generate) or "true"
        b.add(f"if [ -e {priv} ]; then say {i} exists")
        b.add(f'elif mkdir -p {dirs} && ( {cmds} ) >"$log" 2>&1 && [ -e {priv} ]; then')
        b.add(f"  chmod 0644 {pub} 2>/dev/null; say {i} ok")
        b.add(f'else say {i} failed; frame keylog.{i} cat "$log"; fi')
    b.add('rm -f "$log"')
    conn = await run.conn()
    framed = await run_framed(conn, b.script(prelude()), b.args, timeout=KEYGEN_TIMEOUT)
    done = {w[0] for w in (line.split() for line in said(framed.sections)) if w[1:] in (["ok"], ["exists"])}
    for i in idx:
        if str(i) in done:
            run.mark(i, "done", "key pair generated on the host (private key never read)")
        else:
            keylog = framed.sections.get(f"keylog.{i}")
            detail = keylog.text.strip() if keylog is not None else result_text(framed.result)
            run.mark(i, "failed", f"key generation failed: {detail[-1000:]}")
            run.messages.append(f"{run.plan.actions[i].resource}: key generation failed: {detail[-1000:]}")
            h = run.plan.actions[i].handler
            if h:
                run.failed_handlers.add(h)
