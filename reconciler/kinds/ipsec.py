"""Kind ``ipsec child``: CHILD_SAs this host starts actively (libipsec has no trap policies), an
established mesh being observed state: a child that is not up while charon runs is planned to
be initiated again, and apply asks charon to start it without waiting (it settles once the
peer answers). Whether a host runs IPsec at all is read from its desired resources
(``runs_ipsec``), not from handler names. Observed (only on a host that runs IPsec) by ``ip
xfrm policy``, charon's pid file (or ``/proc/*/comm``) and, only while charon's vici socket
exists, ``swanctl --list-conns/--list-sas`` (parsed in ``reconciler.kinds.ipsec_state``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from reconciler.host.script import ScriptBuilder
from reconciler.kinds.actions import Action, ActionKind
from reconciler.kinds.ipsec_state import ViciParseError, loaded_conns, up_names
from reconciler.kinds.kind import ApplyRun, BaseKind, PlanStep, SectionReader
from reconciler.kinds.observed import IpsecState, Observed, XfrmPolicy
from reconciler.kinds.resources import Desired, Domain


def runs_ipsec(desired: Desired) -> bool:
    """The host has an IPsec configuration to observe: files or links of the IPsec domain
    (strongSwan's swanctl.conf, racoon's), or children it starts."""
    return (
        bool(desired.initiate)
        or any(f.domain is Domain.IPSEC for f in desired.files)
        or any(lk.domain is Domain.IPSEC for lk in desired.links)
    )


def plan_initiate(desired: Desired, observed: Observed) -> list[Action]:
    """Children this host starts that are not up: start them again. Without trap policies
    (libipsec) a child whose first attempt failed (e.g. the peer had not loaded its config
    yet and answered NO_PROPOSAL_CHOSEN) is never retried by charon itself. Only when charon
    runs: a charon started by this apply initiates them on its own."""
    if not desired.initiate or not observed.ipsec.daemon_running:
        return []
    up = set(observed.ipsec.installed_children)
    return [
        Action(
            ActionKind.INITIATE_CHILD,
            f"ipsec child {name}",
            Domain.SERVICES,
            "not established; this host is the pair's initiator (no trap policies with libipsec)",
        )
        for name in desired.initiate
        if name not in up
    ]


# Start each named CHILD_SA without waiting for it: a negative timeout makes the vici
# `initiate` asynchronous (charon queues the exchange and answers at once), so a host with 49
# peers costs 49 short vici round trips, not 49 waits on peers that may be busy themselves.
INITIATE = r"""
for c in "$@"; do swanctl --initiate --child "$c" --timeout -1 >/dev/null 2>&1 || true; done
"""


async def apply_initiate(run: ApplyRun) -> None:
    idx = run.indices({ActionKind.INITIATE_CHILD})
    if not idx:
        return
    names = [run.plan.actions[i].resource.removeprefix("ipsec child ") for i in idx]
    conn = await run.conn()
    await conn.run_script(INITIATE, args=names, timeout=30)
    for i in idx:
        # the pair's other side may not be ready yet: the next reconcile looks again
        run.mark(i, "done", "initiated (settles once the peer answers)")


# ---------------------------------------------------------------- observation

# settings for reconciler's own swanctl listings (observe, verify): no crypto plugin loaded
# (listing connections and SAs needs none; swanctl loads every plugin by default, ~10 ms a call)
# (under /etc/strongswan.d, which Debian's AppArmor profile of swanctl lets it read (found on
# AppArmor-enforcing guests: /etc/reconciler was denied); in a subdirectory that strongswan.conf
# does not include, so charon and the engine's own `swanctl --load-all` never read it)
SWANCTL_CLIENT_CONF = "/etc/strongswan.d/reconciler/swanctl-client.conf"

SHELL = r"""charon_state() {
  if [ -r /run/charon.pid ]; then
    read -r pid < /run/charon.pid || pid=
    printf 'pidfile %s\n' "$pid"
    case $pid in
      *[!0-9]*|'') ;;
      *) if read -r c < "/proc/$pid/comm"; then printf 'pidcomm %s\n' "$c"; fi 2>/dev/null ;;
    esac
    return 0  # the pid file decides (parse_charon); no process scan needed
  fi
  grep -lxs charon /proc/[0-9]*/comm | sed -n 's|^/proc/\([0-9]*\)/comm$|proc \1|p'
  return 0
}
swanctl_q() { if [ -n "${SW:-}" ]; then STRONGSWAN_CONF=$SW swanctl "$@"; else swanctl "$@"; fi; }
"""


def parse_xfrm_policies(text: str) -> tuple[XfrmPolicy, ...]:
    """``ip xfrm policy`` text (iproute2 prints no JSON for xfrm). Socket policies (charon's
    IKE bypass) are skipped."""
    blocks: list[list[str]] = []
    for line in text.splitlines():
        if line.startswith("src "):
            blocks.append([line])
        elif blocks and line.strip():
            blocks[-1].append(line)
    out: list[XfrmPolicy] = []
    for block in blocks:
        head = block[0].split()
        fields = dict(zip(head[0::2], head[1::2], strict=False))
        direction = None
        tmpls: list[str] = []
        for line in block[1:]:
            words = line.split()
            if words and words[0] == "dir" and len(words) > 1:
                direction = words[1]
            elif words and words[0] == "proto" and "mode" in words:
                tmpls.append(f"{words[1]}/{words[words.index('mode') + 1]}")
        if direction is None:
            continue  # "socket in/out" policies
        out.append(
            XfrmPolicy(
                src=fields.get("src", ""),
                dst=fields.get("dst", ""),
                dir=direction,
                proto=fields.get("proto"),
                tmpl=tuple(tmpls),
            )
        )
    return tuple(out)


def parse_charon(text: str) -> bool:
    """charon runs if its pid file names a live charon process; without a pid file, if any
    charon process is visible (``/proc/*/comm``)."""
    has_pidfile = False
    for line in text.splitlines():
        words = line.split()
        if not words:
            continue
        if words[0] == "pidfile":
            has_pidfile = True
        elif words[0] == "pidcomm" and words[1:] == ["charon"]:
            return True
    if has_pidfile:
        return False
    return any(line.startswith("proc ") for line in text.splitlines())


class IpsecKind(BaseKind):
    name = "ipsec"
    shell = SHELL

    def wanted(self, desired: Desired) -> bool:
        return runs_ipsec(desired)

    def probe(self, desired: Desired, b: ScriptBuilder) -> None:
        b.add("frame xfrm ip xfrm policy")
        b.add("frame charon charon_state")
        # swanctl only talks to a live charon (its vici socket); saves ~25 ms when there is none
        b.add("if [ -S /var/run/charon.vici ] || [ -S /run/charon.vici ]; then")
        # swanctl loads every crypto plugin at start (~10 ms a call); listing needs none: the
        # rendered client settings load one tiny plugin (plain swanctl until they are applied)
        b.add(f'  SW={SWANCTL_CLIENT_CONF}; [ -r "$SW" ] || SW=')
        b.add("  frame conns swanctl_q --list-conns --pretty")
        b.add("  frame sas swanctl_q --list-sas --pretty")
        b.add("fi")

    def parse(self, desired: Desired, read: SectionReader, observed: Observed) -> Observed:
        policies: tuple[XfrmPolicy, ...] = ()
        xfrm = read("xfrm", "ip xfrm policy")
        if xfrm is not None:
            policies = parse_xfrm_policies(xfrm)
        running = parse_charon(read("charon", "charon process", required=False) or "")
        conns: tuple[str, ...] = ()
        ike: tuple[str, ...] = ()
        children: tuple[str, ...] = ()
        if running and (read.section("conns") is not None or read.section("sas") is not None):
            try:
                conns = loaded_conns(read("conns", "swanctl --list-conns") or "")
                ike, children = up_names(read("sas", "swanctl --list-sas") or "")
            except ViciParseError as err:
                read.error(f"swanctl: cannot parse its output: {err}")
        elif running:
            read.error("swanctl: charon runs but its vici socket (/var/run/charon.vici) is missing")
        ipsec = IpsecState(
            daemon_running=running,
            loaded_connections=conns,
            established_ike=ike,
            installed_children=children,
            policies=policies,
        )
        return replace(observed, ipsec=ipsec)

    def plan(self, step: PlanStep) -> Sequence[Action]:
        return plan_initiate(step.desired, step.observed)


KIND = IpsecKind()
