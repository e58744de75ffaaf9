"""Host identity: may this fleet manage a host, under this host name? Pure (no I/O).

The first fully successful apply writes ``/etc/reconciler/identity`` (in its finish step, with the
inventory); every observation reads it back (one section of shell builtins: no extra process);
plan and apply refuse a host that another fleet, or this fleet under another host name, has
claimed, unless told to take it over (``--adopt``). See docs/ENGINE.md, "Host identity".

The file's record, format and parser, and what the observation saw, are
reconciler.host.identity's (the stages below the engine read them too); this module holds the
fleet's claim and the verdict. Their names are importable from here as well.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import StrEnum

from reconciler.fleet.model import Fleet
from reconciler.host.identity import (
    FLEET_ID_PATTERN,
    FORMAT,
    IDENTITY_DIR,
    IDENTITY_PATH,
    MAX_LINES,
    HostIdentity,
    IdentityFormatError,
    Seen,
    SeenIdentity,
    derived_fleet_id,
    format_identity,
    parse_identity,
    parse_section,
)

__all__ = [
    "FLEET_ID_PATTERN",
    "FORMAT",
    "IDENTITY_DIR",
    "IDENTITY_PATH",
    "MAX_LINES",
    "HostIdentity",
    "IdentityFormatError",
    "Judgement",
    "Seen",
    "SeenIdentity",
    "Verdict",
    "claim_for",
    "derived_fleet_id",
    "fleet_id",
    "format_identity",
    "identity_in_line",
    "judge",
    "parse_identity",
    "parse_section",
]


def fleet_id(fleet: Fleet) -> str:
    """``fleet.id`` when fleet.yaml pins one, else derived from ``fleet.name``."""
    pinned = getattr(fleet, "id", "") or ""
    return str(pinned) if pinned else derived_fleet_id(str(fleet.name))


def claim_for(fleet: Fleet, host: str) -> HostIdentity:
    """The identity this fleet records on its host ``host``."""
    return HostIdentity(fleet=str(fleet.name), fleet_id=fleet_id(fleet), host=host)


# ---------------------------------------------------------------- the verdict


class Verdict(StrEnum):
    MATCH = "match"  # this fleet's host: plan as usual (prune from the inventory)
    FIRST = "first"  # no identity yet: this apply records it (no prune from the inventory)
    ADOPT = "adopt"  # claimed otherwise, taken over with --adopt (no prune from the inventory)
    REFUSE = "refuse"  # claimed otherwise: nothing is planned, nothing changes


@dataclass(frozen=True)
class Judgement:
    verdict: Verdict
    message: str  # the refusal, or why the identity is (re)written
    record: bool = False  # write this fleet's identity in the finish step
    previous: HostIdentity | None = None  # the claim found on the host

    @property
    def prune_inventory(self) -> bool:
        """The inventory on the host is this fleet's record only when the identity matched."""
        return self.verdict is Verdict.MATCH


_ADOPT_HINT = "use --adopt to take it over"


def judge(claim: HostIdentity, seen: SeenIdentity | None, *, adopt: bool) -> Judgement:
    """What this fleet may do on a host whose identity file the observation saw as ``seen``."""
    if seen is None:
        return Judgement(Verdict.REFUSE, f"its identity ({IDENTITY_PATH}) could not be read: refusing")
    if seen.kind is Seen.ABSENT:
        return Judgement(
            Verdict.FIRST,
            f"no identity on the host yet: the first apply records it ({claim.describe()} "
            f"in {IDENTITY_PATH})",
            record=True,
        )
    if seen.kind is Seen.FILE and seen.identity is not None:
        found = seen.identity
        if found.fleet_id == claim.fleet_id and found.host == claim.host:
            if found == claim:
                return Judgement(Verdict.MATCH, "", previous=found)
            return Judgement(
                Verdict.MATCH,
                f"the identity names the fleet '{found.fleet}'; this fleet (id {claim.fleet_id}) is "
                f"now called '{claim.fleet}'",
                record=True,
                previous=found,
            )
        if adopt:
            return Judgement(
                Verdict.ADOPT,
                f"belongs to {found.describe()}: taken over (--adopt) as {claim.describe()}",
                record=True,
                previous=found,
            )
        if found.fleet_id == claim.fleet_id:
            return Judgement(
                Verdict.REFUSE,
                f"is host '{found.host}' of this fleet '{claim.fleet}' (id {claim.fleet_id}), not "
                f"'{claim.host}' (a wrong address, or a renamed host?): refusing; {_ADOPT_HINT}",
                previous=found,
            )
        hint = ""
        if found.fleet == claim.fleet and found.fleet_id == derived_fleet_id(found.fleet):
            hint = " (recorded before fleet.yaml pinned its id? then adopt it once)"
        return Judgement(
            Verdict.REFUSE,
            f"belongs to {found.describe()}; this is fleet '{claim.fleet}' (id {claim.fleet_id}): "
            f"refusing; {_ADOPT_HINT}{hint}",
            previous=found,
        )
    # a file we cannot read as an identity: replaceable with --adopt (rename replaces a link
    # itself, never its target); what is in the way of a safe write: fixed by hand only
    replaceable = {
        Seen.GARBAGE: f"{IDENTITY_PATH} is not a valid identity file ({seen.detail})",
        Seen.UNSUPPORTED: f"{IDENTITY_PATH} was written by a newer reconciler ({seen.detail})",
        Seen.LINK: f"{IDENTITY_PATH} is a symbolic link (not followed)",
    }
    if seen.kind in replaceable:
        if adopt:
            return Judgement(
                Verdict.ADOPT,
                f"{replaceable[seen.kind]}: replaced (--adopt) by {claim.describe()}",
                record=True,
            )
        return Judgement(Verdict.REFUSE, f"{replaceable[seen.kind]}: refusing; {_ADOPT_HINT}")
    by_hand = {
        Seen.NOT_FILE: f"{IDENTITY_PATH} is not a regular file",
        Seen.DIR_LINK: f"{IDENTITY_DIR} is a symbolic link",
        Seen.DIR_NOT_DIR: f"{IDENTITY_DIR} is not a directory",
        Seen.NOT_OWNER: f"{IDENTITY_PATH} or {IDENTITY_DIR} is not owned by root (whoever owns it "
        "could claim or disown this host)",
    }
    what = by_hand.get(seen.kind, f"{IDENTITY_PATH}: unexpected state {seen.kind}")
    return Judgement(Verdict.REFUSE, f"{what}: refusing, also with --adopt; fix it by hand")


def identity_in_line(fleet: Fleet, host: str, kind: str | None, sha256: str | None) -> bool:
    """Whether a snapshot entry of IDENTITY_PATH is exactly what this fleet writes on ``host``
    (the drift scan counts it as managed, not as a new file)."""
    if kind != "file" or sha256 is None:
        return False
    return sha256 == hashlib.sha256(format_identity(claim_for(fleet, host))).hexdigest()
