"""Kind ``keypair``: a key pair generated on the host when its private key is missing (never
read, never copied off); a missing public key next to a present private key is a warning, not a
regeneration (peers trust the current key)."""

from __future__ import annotations

from collections.abc import Sequence

from reconciler.kinds.actions import Action, ActionKind
from reconciler.kinds.files import refused_reason
from reconciler.kinds.kind import BaseKind, PlanStep
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
