"""strongSwan (IKEv2, swanctl) rendering of the mesh: one connection file per peer.

Files (all in directories Debian's strongSwan already reads):
- ``/etc/swanctl/conf.d/mesh-<peer>.conf``: the connection to one peer (Debian's default
  swanctl.conf has ``include conf.d/*.conf``; the engine stages temp files as dotfiles, which
  the glob never sees). The directory is owned: a connection whose peer left is pruned.
- ``/etc/swanctl/pubkey/<peer>.pem``: the peer's raw public key from ``Fleet.public_keys``.
- ``/etc/strongswan.d/charon/kernel-libipsec.conf``: the userspace datapath on or off.
- ``/etc/strongswan.d/charon-reconciler-log.conf``: a charon file log (charon logs nowhere by
  default on a host without syslog/journald).

Authentication is ``pubkey`` with raw public keys on both sides; the IKE identities are the
public addresses (``id``), which become the subjects of the raw keys.
"""

from __future__ import annotations

from reconciler.domains.keys import SWANCTL_DIR, strongswan_keypair, swanctl_public_key
from reconciler.fleet.crypto import racoon_esp_proposal, racoon_ike_proposal
from reconciler.fleet.model import Datapath, Fleet, Host, IpsecBackend, MeshMode
from reconciler.kinds.ipsec import SWANCTL_CLIENT_CONF as SWANCTL_CLIENT_CONF  # observe's swanctl reads it
from reconciler.kinds.resources import Domain, FileResource, Fragment, Handler, Service, Validator

CONF_DIR = f"{SWANCTL_DIR}/conf.d"
LIBIPSEC_CONF = "/etc/strongswan.d/charon/kernel-libipsec.conf"
LOG_CONF = "/etc/strongswan.d/charon-reconciler-log.conf"
CHARON_LOG = "/var/log/charon.log"
# charon keeps its log open: copytruncate rotates it in place (charon never reopens or creates
# it, which Debian's AppArmor profile of charon would not let it do), weekly, 8 kept
LOGROTATE_CONF = "/etc/logrotate.d/reconciler-charon"
# the log exists (0640) before charon starts: charon's AppArmor profile lets it write the file
# (the local override below), creating it may still be refused on enforcing hosts
_ENSURE_LOG = f"[ -e {CHARON_LOG} ] || (umask 027; : >> {CHARON_LOG})"
# Debian's AppArmor profile of charon (enforcing) lets it write no log file: its local override
# (the profile's own extension point) adds the one charon log this domain configures.
CHARON_PROFILE = "usr.lib.ipsec.charon"
CHARON_APPARMOR_LOCAL = f"/etc/apparmor.d/local/{CHARON_PROFILE}"
APPARMOR_HANDLER = f"apparmor:{CHARON_PROFILE}"
CHARON = "/usr/lib/ipsec/charon"
CHARON_PID = "/run/charon.pid"
CHARON_VICI = "/run/charon.vici"
# Debian 12's unit for the classic charon (the one this domain configures: the `charon` section,
# /run/charon.pid, /run/charon.vici). strongswan.service would need charon-systemd, which reads
# other settings, writes no pid file and logs only to the journal. The unit loads no swanctl
# config: Service.post_start does (found on systemd guests, docs/LAB.md).
SYSTEMD_UNIT = "strongswan-starter"

HANDLER = "charon"  # reload swanctl config into the running charon
RESTART_HANDLER = "charon-restart"  # plugin settings (strongswan.d) need a new charon

LOAD_ALL = ("swanctl", "--load-all", "--noprompt")
# charon runs: its pid file names a live process. (Not `swanctl --stats`: swanctl loads every
# crypto plugin at start, ~10 ms on each observation; whether charon answers on vici is seen by
# the observation's swanctl listings anyway.)
STATUS = ("sh", "-c", 'test -s /run/charon.pid && kill -0 "$(cat /run/charon.pid)"')

# Fixed scripts (no fleet data in them): start charon without systemd and load the config
# (charon alone loads nothing); restart through systemd when it is PID 1, by pid file otherwise.
# The vici socket can take seconds to appear (30 s at most: an emulated guest is slow).
_WAIT_VICI = f"i=0; while [ ! -S {CHARON_VICI} ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done"
_START_SCRIPT = (
    f"{_ENSURE_LOG}; setsid -f {CHARON} </dev/null >/dev/null 2>&1 && {_WAIT_VICI}; "
    "swanctl --load-all --noprompt >/dev/null"
)
_STOP_SCRIPT = (
    f'[ -s {CHARON_PID} ] || exit 0; kill "$(cat {CHARON_PID})" 2>/dev/null; '
    f"i=0; while [ -e {CHARON_PID} ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done; "
    f"rm -f {CHARON_VICI}"
)
# After a systemd (re)start: wait until charon answers on vici (the socket file of the charon
# that was just stopped can still be there, refusing connections), then load the config.
_LOAD_AFTER_START = (
    "i=0; until swanctl --stats >/dev/null 2>&1; do [ $i -ge 150 ] && break; sleep 0.2; i=$((i+1)); done; "
    "swanctl --load-all --noprompt >/dev/null"
)
_RESTART_SCRIPT = (
    f"{_ENSURE_LOG}; if [ -d /run/systemd/system ]; then systemctl restart {SYSTEMD_UNIT}.service || exit; "
    f"{_LOAD_AFTER_START}; exit; fi; "
    f"{_STOP_SCRIPT}; {_START_SCRIPT}"
)


def has_racoon_peers(fleet: Fleet, host: Host) -> bool:
    """racoon peers read only RSA keys: such a host makes an RSA key pair instead of EC."""
    return any(fleet.stack_of(p) is IpsecBackend.RACOON for p in fleet.peers_of(host))


def connection_name(peer: Host) -> str:
    return f"mesh-{peer.name}"


def child_name(fleet: Fleet, peer: Host) -> str:
    suffix = "ipip" if fleet.mesh.mode is MeshMode.IPIP else "net"
    return f"mesh-{peer.name}-{suffix}"


def initiates(host: Host, peer: Host) -> bool:
    """With libipsec (no trap policies) exactly one side of a pair starts the CHILD_SA: the
    host whose name sorts first."""
    return host.name < peer.name


def _header(fleet: Fleet, host: Host, what: str) -> str:
    return (
        f"# Rendered by reconciler (fleet {fleet.name}) for {host.name}: {what}.\n"
        "# Local changes are reverted: edit the fleet repository instead.\n"
    )


def connection_conf(fleet: Fleet, host: Host, peer: Host) -> str:
    mesh = fleet.mesh
    life = mesh.lifetimes
    libipsec = mesh.datapath is Datapath.LIBIPSEC
    ikev1 = fleet.stack_of(peer) is IpsecBackend.RACOON
    if ikev1:
        # racoon speaks IKEv1 only: its one proposal (semantic checked that the fleet's
        # strongSwan proposals allow it), transport mode over everything between the public
        # addresses (racoon's SPD: "any"), no AH (strongSwan has no ESP+AH bundles)
        ike_proposals: tuple[str, ...] = (racoon_ike_proposal(mesh.racoon),)
        esp_proposals: tuple[str, ...] = (racoon_esp_proposal(mesh.racoon),)
        ike_rekey = mesh.racoon.lifetime_hours * 3600
    else:
        ike_proposals, esp_proposals, ike_rekey = (
            mesh.ike_proposals,
            mesh.esp_proposals,
            life.ike_rekey_seconds,
        )
    lines = [
        "connections {",
        f"    {connection_name(peer)} {{",
        f"        version = {1 if ikev1 else 2}",
        *(["        aggressive = yes"] if ikev1 and mesh.racoon.exchange_mode == "aggressive" else []),
        f"        local_addrs = {host.public_address}",
        f"        remote_addrs = {peer.public_address}",
        f"        proposals = {','.join(ike_proposals)}",
        f"        rekey_time = {ike_rekey}s",
        f"        dpd_delay = {mesh.dpd_seconds}s",
        "        mobike = no",
        *(["        keyingtries = 0"] if libipsec and initiates(host, peer) else []),
        "        local {",
        "            auth = pubkey",
        f"            id = {host.public_address}",
        f"            pubkeys = {host.name}.pem",
        "        }",
        "        remote {",
        "            auth = pubkey",
        f"            id = {peer.public_address}",
        f"            pubkeys = {peer.name}.pem",
        "        }",
        "        children {",
        f"            {child_name(fleet, peer)} {{",
    ]
    child: list[str] = []
    if ikev1:
        child += ["mode = transport", "local_ts = dynamic", "remote_ts = dynamic"]
    elif mesh.mode is MeshMode.IPIP:
        # transport mode protecting only IP-IP (protocol 4) between the public addresses
        child += ["mode = transport", "local_ts = dynamic[ipencap]", "remote_ts = dynamic[ipencap]"]
    else:
        child += [
            "mode = tunnel",
            f"local_ts = {host.internal_address}/32",
            f"remote_ts = {peer.internal_address}/32",
        ]
    child.append(f"esp_proposals = {','.join(esp_proposals)}")
    child.append(f"rekey_time = {life.child_rekey_seconds}s")
    child.append(f"life_time = {life.child_rekey_seconds * 11 // 10}s")
    if life.child_rekey_bytes > 0:
        child.append(f"rekey_bytes = {life.child_rekey_bytes}")
        child.append(f"life_bytes = {life.child_rekey_bytes * 11 // 10}")
    if not libipsec:
        # kernel XFRM: trap policies on both sides; traffic starts the SA, and the policy
        # keeps protected traffic from ever leaving in clear
        child += ["start_action = trap", "dpd_action = trap"]
    elif initiates(host, peer):
        # keyingtries = 0 (below): keep retrying while the responder does not answer yet
        child += ["start_action = start", "dpd_action = restart", "close_action = start"]
    else:
        child += ["start_action = none"]
    lines += [f"                {c}" for c in child]
    lines += ["            }", "        }", "    }", "}"]
    version = "IKEv1 (the peer runs racoon)" if ikev1 else "IKEv2"
    what = f"{version} connection to {peer.name} (mode {mesh.mode.value}, datapath {mesh.datapath.value})"
    return _header(fleet, host, what) + "\n".join(lines) + "\n"


def libipsec_conf(fleet: Fleet, host: Host) -> str:
    on = fleet.mesh.datapath is Datapath.LIBIPSEC
    what = "userspace ESP over TUN ipsec0 " + ("on (datapath libipsec)" if on else "off (datapath kernel)")
    return _header(fleet, host, what) + f"kernel-libipsec {{\n    load = {'yes' if on else 'no'}\n}}\n"


def log_conf(fleet: Fleet, host: Host) -> str:
    return _header(fleet, host, "charon log file") + (
        "charon {\n"
        "    filelog {\n"
        "        reconciler {\n"
        f"            path = {CHARON_LOG}\n"
        "            time_format = %b %e %T\n"
        "            ike_name = yes\n"
        "            append = yes\n"
        "            default = 1\n"
        "            flush_line = yes\n"
        "        }\n"
        "    }\n"
        "}\n"
    )


def logrotate_conf(fleet: Fleet, host: Host) -> str:
    return _header(fleet, host, "rotation of charon's log") + (
        f"{CHARON_LOG} {{\n"
        "    weekly\n"
        "    rotate 8\n"
        "    compress\n"
        "    delaycompress\n"
        "    missingok\n"
        "    notifempty\n"
        "    copytruncate\n"
        "}\n"
    )


def swanctl_client_conf(fleet: Fleet, host: Host) -> str:
    """Read by reconciler only (STRONGSWAN_CONF for its swanctl listings), never by charon."""
    return _header(fleet, host, "settings for reconciler's own swanctl listings") + (
        "swanctl {\n    load = nonce\n}\n"
    )


def charon_service() -> Service:
    return Service(
        name=SYSTEMD_UNIT,
        start=("sh", "-c", _START_SCRIPT),
        stop=("sh", "-c", _STOP_SCRIPT),
        status=STATUS,
        pid_file=CHARON_PID,
        log_path=CHARON_LOG,
        needs_package="strongswan-swanctl",
        post_start=("sh", "-c", _LOAD_AFTER_START),
    )


def charon_apparmor_local(fleet: Fleet, host: Host) -> str:
    return _header(fleet, host, "AppArmor: charon may write its log file") + f"{CHARON_LOG} rw,\n"


def handlers() -> tuple[Handler, ...]:
    return (
        Handler(name=HANDLER, reload=LOAD_ALL, only_if_running=STATUS),
        Handler(name=RESTART_HANDLER, reload=("sh", "-c", _RESTART_SCRIPT), only_if_running=STATUS),
        # the packaged profile with its new local override: parsed in the staged tree, then
        # replaced in the kernel (the running charon gets it at once) where AppArmor is enabled
        Handler(
            name=APPARMOR_HANDLER,
            validators=(
                Validator(
                    argv=(
                        "apparmor_parser", "-Q", "-K", "-b", "{tree}", "-I", "{tree}",
                        f"{{tree}}/{CHARON_PROFILE}",
                    ),
                    tree_root="/etc/apparmor.d",
                    needs_command="apparmor_parser",
                ),
            ),
            reload=("apparmor_parser", "-r", f"/etc/apparmor.d/{CHARON_PROFILE}"),
            only_if_running=("aa-enabled", "-q"),
        ),
    )  # fmt: skip


def render(fleet: Fleet, host: Host, ready: tuple[tuple[Host, str], ...]) -> Fragment:
    """The strongSwan part of the ipsec domain for the peers whose keys are ``ready``."""
    pem_check = Validator(
        argv=("openssl", "pkey", "-pubin", "-in", "{path}", "-noout"), needs_command="openssl"
    )
    files: list[FileResource] = []
    for peer, key in ready:
        files.append(
            FileResource(
                path=f"{CONF_DIR}/{connection_name(peer)}.conf",
                content=connection_conf(fleet, host, peer).encode(),
                domain=Domain.IPSEC,
                handler=HANDLER,
                needs_package="strongswan-swanctl",
            )
        )
        files.append(
            FileResource(
                path=swanctl_public_key(peer.name),
                content=key.encode(),
                domain=Domain.IPSEC,
                handler=HANDLER,
                validators=(pem_check,),
                needs_package="strongswan-swanctl",
            )
        )
    for path, text in ((LIBIPSEC_CONF, libipsec_conf(fleet, host)), (LOG_CONF, log_conf(fleet, host))):
        files.append(
            FileResource(
                path=path,
                content=text.encode(),
                domain=Domain.IPSEC,
                handler=RESTART_HANDLER,
                needs_package="strongswan-charon",
            )
        )
    # read by logrotate when it is installed (harmless otherwise: logrotate.d ships with base)
    files.append(
        FileResource(path=LOGROTATE_CONF, content=logrotate_conf(fleet, host).encode(), domain=Domain.IPSEC)
    )
    files.append(
        FileResource(
            path=SWANCTL_CLIENT_CONF, content=swanctl_client_conf(fleet, host).encode(), domain=Domain.IPSEC
        )
    )
    files.append(
        FileResource(
            path=CHARON_APPARMOR_LOCAL,
            content=charon_apparmor_local(fleet, host).encode(),
            domain=Domain.IPSEC,
            handler=APPARMOR_HANDLER,
            needs_package="strongswan-charon",  # it ships the profile and this file's directory
        )
    )
    return Fragment(
        files=tuple(sorted(files, key=lambda f: f.path)),
        keypairs=(strongswan_keypair(host, rsa=has_racoon_peers(fleet, host)),),
        handlers=handlers(),
        services=(charon_service(),),
        owned_dirs=(CONF_DIR,),
        initiate=tuple(
            sorted(
                child_name(fleet, peer)
                for peer, _ in ready
                if fleet.mesh.datapath is Datapath.LIBIPSEC and initiates(host, peer)
            )
        ),
    )
