"""plan_host: Desired x Observed -> ordered actions with reasons and diffs (pure)."""

from __future__ import annotations

import hashlib
from types import MappingProxyType

from reconciler.engine.plan import INVENTORY_PATH, managed_paths, plan_host
from reconciler.kinds.actions import ActionKind, summary_line
from reconciler.kinds.files import SECRET_DIFF
from reconciler.kinds.observed import FileState, LinkState, Observed, ServiceState
from reconciler.kinds.resources import (
    Address,
    Desired,
    Domain,
    FileResource,
    FirewallRuleset,
    Handler,
    KeyPair,
    LinkResource,
    Pending,
    Service,
    Tunnel,
    Validator,
)
from reconciler.netfilter.iptables import canonical_iptables

RULES = """*filter
:INPUT DROP [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
-A INPUT -p udp --dport 500 -j ACCEPT
-A INPUT -p tcp --dport 22 -s 192.0.2.254 -j ACCEPT
COMMIT
"""

APACHE = Handler(
    name="apache2",
    validators=(
        Validator(argv=("apache2ctl", "-t"), tree_root="/etc/apache2", env=(("APACHE_CONFDIR", "{tree}"),)),
    ),
    reload=("apache2ctl", "graceful"),
)
CHARON = Handler(name="charon", reload=("swanctl", "--load-all"))


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def live_file(
    path: str, content: bytes, mode: int = 0o644, owner: str = "root", fetched: bool = True
) -> FileState:
    return FileState(
        path=path,
        exists=True,
        kind="file",
        sha256=sha(content),
        mode=mode,
        owner=owner,
        group="root",
        content=content if fetched else None,
    )


def desired(**kw: object) -> Desired:
    base: dict[str, object] = {
        "host": "web1",
        "files": (
            FileResource(
                "/etc/apache2/sites-available/shop.conf",
                b"<VirtualHost>\nnew\n",
                Domain.APACHE,
                handler="apache2",
            ),
            FileResource(
                "/etc/apache2/conf-available/security.conf",
                b"ServerTokens Prod\n",
                Domain.APACHE,
                handler="apache2",
            ),
            FileResource("/etc/motd", b"hello\n", Domain.FILES),
            FileResource(
                "/etc/swanctl/conf.d/mesh.conf",
                b"connections {}\n",
                Domain.IPSEC,
                handler="charon",
                mode=0o600,
            ),
            FileResource("/etc/secret.key", b"TOPSECRET\n", Domain.FILES, mode=0o600, secret=True),
        ),
        "links": (
            LinkResource(
                "/etc/apache2/sites-enabled/shop.conf",
                "../sites-available/shop.conf",
                Domain.APACHE,
                handler="apache2",
            ),
        ),
        "handlers": (APACHE, CHARON),
        "firewall": FirewallRuleset(RULES),
    }
    base.update(kw)
    return Desired(**base)  # type: ignore[arg-type]


def in_sync_observed(d: Desired, **kw: object) -> Observed:
    files: dict[str, FileState] = {}
    for f in d.files:
        files[f.path] = live_file(f.path, f.content, mode=f.mode, fetched=False)
    for lk in d.links:
        files[lk.path] = FileState(lk.path, True, kind="link", link_target=lk.target)
    if d.firewall:
        files[d.firewall.persistent_path] = live_file(
            d.firewall.persistent_path, d.firewall.rules_v4.encode(), mode=0o640
        )
    base: dict[str, object] = {
        "host": d.host,
        "files": MappingProxyType(files),
        "iptables": canonical_iptables(RULES) if d.firewall else None,
        "inventory": managed_paths(d),
        "init_system": "sysv",
    }
    base.update(kw)
    return Observed(**base)  # type: ignore[arg-type]


def test_in_sync_is_a_noop_that_says_why() -> None:
    d = desired()
    plan = plan_host(d, in_sync_observed(d))
    assert plan.actions == ()
    assert not plan.changed
    assert plan.noop_reason.startswith("in sync: 5 files, 1 links")
    assert "firewall" in plan.noop_reason
    assert summary_line([plan]) == "Plan: 0 to add, 0 to change, 0 to destroy, 0 reloads on 1 host"


def test_changed_file_has_unified_diff_and_reload_once_after_all_its_files() -> None:
    d = desired()
    obs = in_sync_observed(d)
    files = dict(obs.files)
    files["/etc/apache2/sites-available/shop.conf"] = live_file(
        "/etc/apache2/sites-available/shop.conf", b"<VirtualHost>\nold\n"
    )
    del files["/etc/apache2/conf-available/security.conf"]
    plan = plan_host(d, Observed(**{**obs.__dict__, "files": MappingProxyType(files)}))
    kinds = [(a.kind, a.resource) for a in plan.actions]
    assert kinds == [
        (ActionKind.CREATE, "file /etc/apache2/conf-available/security.conf"),
        (ActionKind.UPDATE, "file /etc/apache2/sites-available/shop.conf"),
        (ActionKind.RELOAD, "handler apache2"),
    ]
    upd = plan.actions[1]
    assert upd.reason == "content differs"
    assert "-old\n" in upd.diff and "+new\n" in upd.diff
    assert upd.diff.startswith("--- /etc/apache2/sites-available/shop.conf (live)")
    assert plan.reloads() == ("apache2",)
    assert summary_line([plan]) == "Plan: 1 to add, 1 to change, 0 to destroy, 1 reload on 1 host"


def test_secret_file_diff_is_hidden() -> None:
    d = desired()
    obs = in_sync_observed(d)
    files = dict(obs.files)
    files["/etc/secret.key"] = live_file("/etc/secret.key", b"OLDSECRET\n", mode=0o600)
    plan = plan_host(d, Observed(**{**obs.__dict__, "files": MappingProxyType(files)}))
    (a,) = plan.actions
    assert a.kind is ActionKind.UPDATE
    assert a.diff == SECRET_DIFF
    assert "SECRET" not in repr(plan.as_dict())


def test_mode_and_owner_drift_are_chmod_and_chown() -> None:
    d = desired()
    obs = in_sync_observed(d)
    files = dict(obs.files)
    files["/etc/motd"] = live_file("/etc/motd", b"hello\n", mode=0o666, owner="www-data")
    plan = plan_host(d, Observed(**{**obs.__dict__, "files": MappingProxyType(files)}))
    assert [(a.kind, a.reason) for a in plan.actions] == [
        (ActionKind.CHMOD, "mode 0666 should be 0644"),
        (ActionKind.CHOWN, "owner www-data:root should be root:root"),
    ]


def test_order_follows_domains_firewall_first_services_last() -> None:
    d = desired(
        keypairs=(
            KeyPair(
                "strongswan",
                "/etc/swanctl/private/host.pem",
                "/etc/swanctl/pubkey/host.pem",
                generate=(("pki", "--gen"),),
                handler="charon",
            ),
        ),
        services=(Service("apache2", start=("apache2ctl", "start")),),
    )
    obs = Observed(host="web1", iptables=canonical_iptables("*filter\n:INPUT ACCEPT\nCOMMIT\n"))
    plan = plan_host(d, obs)
    domains = [int(a.domain) for a in plan.actions]
    assert domains == sorted(domains)
    kinds = [a.kind for a in plan.actions]
    assert kinds[0] is ActionKind.RESTORE_FIREWALL
    assert kinds[1] is ActionKind.GENERATE_KEYPAIR
    assert kinds[-1] is ActionKind.START_SERVICE
    # each handler reloads once, after the last of its files
    for name in ("apache2", "charon"):
        reload_at = [
            i for i, a in enumerate(plan.actions) if a.kind is ActionKind.RELOAD and a.handler == name
        ]
        assert len(reload_at) == 1
        last_file = max(
            i for i, a in enumerate(plan.actions) if a.handler == name and a.kind is not ActionKind.RELOAD
        )
        assert reload_at[0] == last_file + 1
    fw = plan.actions[0]
    assert "+-A INPUT -p udp -m udp --dport 500 -j ACCEPT" in fw.diff
    assert "dead-man" in fw.reason


def test_equivalent_iptables_text_is_in_sync() -> None:
    d = desired()
    saved = (
        "# Generated by iptables-save\n*filter\n:INPUT DROP [10:200]\n"
        ":FORWARD DROP [0:0]\n:OUTPUT ACCEPT [5:5]\n"
        "-A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT\n"
        "-A INPUT -p udp -m udp --dport 500 -j ACCEPT\n"
        "-A INPUT -s 192.0.2.254/32 -p tcp -m tcp --dport 22 -j ACCEPT\nCOMMIT\n"
    )
    plan = plan_host(d, in_sync_observed(d, iptables=canonical_iptables(saved)))
    assert plan.actions == ()


def test_prune_inventory_and_owned_dirs_left_the_fleet() -> None:
    d = desired(owned_dirs=("/etc/swanctl/conf.d",))
    obs = in_sync_observed(d)
    files = dict(obs.files)
    files["/etc/swanctl/conf.d/old-peer.conf"] = live_file("/etc/swanctl/conf.d/old-peer.conf", b"old\n")
    files["/etc/swanctl/conf.d/.x.conf.reconciler-abc"] = live_file(
        "/etc/swanctl/conf.d/.x.conf.reconciler-abc", b""
    )
    files["/etc/gone.conf"] = live_file("/etc/gone.conf", b"bye\n")
    inv = (*managed_paths(d), "/etc/gone.conf", "/etc/already-removed.conf")
    files["/etc/already-removed.conf"] = FileState("/etc/already-removed.conf", exists=False)
    plan = plan_host(d, Observed(**{**obs.__dict__, "files": MappingProxyType(files), "inventory": inv}))
    deletes = [(a.resource, a.reason, a.handler) for a in plan.actions if a.kind is ActionKind.DELETE]
    assert deletes == [
        ("file /etc/swanctl/conf.d/old-peer.conf", "left the fleet", "charon"),
        ("file /etc/gone.conf", "left the fleet", None),
    ]
    # a pruned file's content is never shown (it may have been a secret)
    assert next(a.diff for a in plan.actions if a.path == "/etc/gone.conf") == ""
    assert plan.reloads() == ("charon",)
    assert "1 to destroy" not in summary_line([plan]) and "2 to destroy" in summary_line([plan])


def test_inventory_out_of_date_alone_is_recorded() -> None:
    d = desired()
    plan = plan_host(d, in_sync_observed(d, inventory=()))
    (a,) = plan.actions
    assert a.kind is ActionKind.RECORD_INVENTORY and a.path == INVENTORY_PATH
    assert plan.inventory == managed_paths(d)
    assert "/etc/iptables/rules.v4" in plan.inventory


def test_links_missing_and_wrong_target() -> None:
    d = desired()
    obs = in_sync_observed(d)
    files = dict(obs.files)
    files["/etc/apache2/sites-enabled/shop.conf"] = FileState(
        "/etc/apache2/sites-enabled/shop.conf", True, kind="link", link_target="/tmp/evil"
    )
    plan = plan_host(d, Observed(**{**obs.__dict__, "files": MappingProxyType(files)}))
    assert [(a.kind, a.reason) for a in plan.actions] == [
        (ActionKind.RELINK, "is -> /tmp/evil, should be -> ../sites-available/shop.conf"),
        (ActionKind.RELOAD, "after changes to /etc/apache2/sites-enabled/shop.conf"),
    ]


def test_tunnels_skipped_without_ipip_and_created_with_it() -> None:
    t = Tunnel("tun-web2", "192.0.2.11", "192.0.2.12", "10.99.0.11", "10.99.0.12", "web2")
    d = desired(tunnels=(t,))
    no_ipip = plan_host(d, in_sync_observed(d, kernel=MappingProxyType({"ipip": False})))
    assert no_ipip.actions == ()
    (skip,) = no_ipip.skipped
    assert "ipip" in skip.reason and skip.subject == "tunnel tun-web2"
    assert "1 skipped" in no_ipip.noop_reason

    with_ipip = plan_host(d, in_sync_observed(d, kernel=MappingProxyType({"ipip": True})))
    assert [a.kind for a in with_ipip.actions] == [ActionKind.CREATE_TUNNEL]

    live = LinkState(
        "tun-web2", "ipip", "192.0.2.11", "192.0.2.12", ("10.99.0.11/32 peer 10.99.0.12/32",), True
    )
    ok = plan_host(d, in_sync_observed(d, links=(live,)))
    assert ok.actions == ()
    wrong = LinkState(
        "tun-web2", "ipip", "192.0.2.11", "192.0.2.99", ("10.99.0.11/32 peer 10.99.0.12/32",), True
    )
    (re,) = plan_host(d, in_sync_observed(d, links=(wrong,))).actions
    assert re.kind is ActionKind.RECREATE_TUNNEL and "192.0.2.99" in re.reason


def test_address_on_lo() -> None:
    d = desired(addresses=(Address("lo", "10.99.0.11/32"),))
    lo = LinkState("lo", "loopback", addresses=("127.0.0.1/8",), up=True)
    (a,) = plan_host(d, in_sync_observed(d, links=(lo,))).actions
    assert a.kind is ActionKind.ADD_ADDRESS
    lo2 = LinkState("lo", "loopback", addresses=("127.0.0.1/8", "10.99.0.11/32"), up=True)
    assert plan_host(d, in_sync_observed(d, links=(lo2,))).actions == ()


def test_pending_items_are_listed_not_errors() -> None:
    d = desired(
        pending=(Pending(Domain.IPSEC, "ipsec peer web2", "public key unknown: run reconciler keys collect"),)
    )
    plan = plan_host(d, in_sync_observed(d))
    assert plan.actions == () and plan.errors == ()
    assert plan.pending[0].subject == "ipsec peer web2"
    assert "1 pending" in plan.noop_reason


def test_services_started_when_not_running() -> None:
    d = desired(services=(Service("apache2"), Service("idle", running=False)))
    obs = in_sync_observed(d, services=MappingProxyType({"apache2": ServiceState("apache2", running=False)}))
    (a,) = plan_host(d, obs).actions
    assert a.kind is ActionKind.START_SERVICE and a.reason == "not running"
    obs2 = in_sync_observed(d, services=MappingProxyType({"apache2": ServiceState("apache2", running=True)}))
    assert plan_host(d, obs2).actions == ()


def test_keypair_generated_only_when_private_key_missing() -> None:
    kp = KeyPair(
        "strongswan", "/etc/swanctl/private/h.pem", "/etc/swanctl/pubkey/h.pem", generate=(("true",),)
    )
    d = desired(keypairs=(kp,))
    obs = in_sync_observed(d)
    (a,) = plan_host(d, obs).actions
    assert a.kind is ActionKind.GENERATE_KEYPAIR and a.diff == ""
    files = dict(obs.files)
    files[kp.private_path] = FileState(kp.private_path, True, sha256="x", mode=0o600)
    files[kp.public_path] = FileState(kp.public_path, True, sha256="y")
    assert plan_host(d, Observed(**{**obs.__dict__, "files": MappingProxyType(files)})).actions == ()


def test_observation_errors_are_reported() -> None:
    d = desired()
    plan = plan_host(d, in_sync_observed(d, errors=("iptables-save: not found",)))
    assert plan.errors == ("iptables-save: not found",)
    assert "could not be observed" in plan.noop_reason


def test_plan_is_deterministic_and_json_ready() -> None:
    import json

    d = desired()
    obs = Observed(host="web1")
    p1, p2 = plan_host(d, obs), plan_host(d, obs)
    assert p1 == p2
    json.dumps(p1.as_dict())
