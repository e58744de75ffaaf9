"""What the daemon shows over HTTP: /status, the mesh picture, the host and commits pages, and
for a sharded daemon the whole fleet's status (merged with its peers') and webhooks sent on.

``DaemonStatus`` is a part of ``Daemon`` (daemon.py): it reads the daemon's store, loop, source
and verifier and changes nothing.
"""

from __future__ import annotations

import asyncio
from typing import Any

from reconciler import __version__
from reconciler.daemon.after_apply import AfterApplyVerifier
from reconciler.daemon.config import Config
from reconciler.daemon.loop import ReconcileLoop
from reconciler.daemon.mail import AdminMail
from reconciler.daemon.metrics import DaemonMetrics
from reconciler.daemon.server import Headers
from reconciler.daemon.shard import PeerClient, Shard, merge_status
from reconciler.daemon.source import FleetSource
from reconciler.daemon.statuspage.mesh import pair_state
from reconciler.daemon.step import Target
from reconciler.daemon.store import HostState, JsonObject, JsonValue, Store
from reconciler.gitrepo import redact_url
from reconciler.notify.outbox import Outbox

MESH_MAX_LINKS = 2000  # /status lists the mesh's pairs up to this many


class DaemonStatus:
    """The read side of the daemon (the HTTP server's DaemonView and ShardView)."""

    config: Config
    store: Store
    source: FleetSource
    loop: ReconcileLoop
    verifier: AfterApplyVerifier
    metrics: DaemonMetrics
    outbox: Outbox
    admin_mail: AdminMail
    shard: Shard
    _peers: PeerClient
    _forwards: set[asyncio.Task[dict[str, int | str]]]
    _started: float

    def ready(self) -> bool:
        return self.loop.first_refresh_done.is_set()

    def _outbox_counts(self) -> list[tuple[tuple[str, ...], float]]:
        return self.admin_mail.counts()

    def status(self) -> dict[str, Any]:
        target = self.loop.target
        rows = {h.name: h.as_json() for h in self.store.hosts()}
        names = list(target.hosts) if target is not None else sorted(rows)
        hosts = []
        for name in names:
            row = rows.get(name) or {"name": name, "state": HostState.UNKNOWN.value, "reason": "", "code": "",
                                     "applied_commit": "", "attempted_commit": "", "last_drift_at": None,
                                     "drift_count": 0, "removed_commit": ""}  # fmt: skip
            if row["state"] == HostState.REMOVED.value:  # back in the fleet, not reconciled yet
                row.update(state=HostState.UNKNOWN.value, reason="", removed_commit="")
            row.update(self.loop.host_info(name))
            hosts.append(row)
        # hosts that left the fleet stay visible until acknowledged (reconciler sync --forget)
        for name in sorted(set(rows) - set(names)):
            if rows[name]["state"] == HostState.REMOVED.value:
                hosts.append({**rows[name], "failures": 0, "waiting_for_new_commit": False,
                              "retry_scheduled": False})  # fmt: skip
        rejection = self.source.rejection
        outbox = dict((k[0], v) for k, v in self._outbox_counts())
        return {
            "version": __version__,
            "mode": self.config.mode.value,
            "ready": self.ready(),
            "started_at": self._started,
            "source": {
                "url": redact_url(self.config.source.url),
                "branch": self.config.source.branch,
                "verify": self.config.source.verify.value,
                "head": self.source.head or self.store.get_meta("source.head"),
                "good": self.source.good,
                "rejection": None
                if rejection is None
                else {
                    "commit": rejection.commit,
                    "kind": rejection.kind,
                    "reason": rejection.reason,
                    "good": rejection.good or self.source.good,
                },
                "last_rollback": self.store.get_json("source.rollback"),
            },
            "queue": {"depth": self.loop.hosts.depth, "in_flight": list(self.loop.hosts.in_flight)},
            **({"scope": "local", "shard": self.shard.describe()} if self.shard.sharded else {}),
            "hosts": hosts,
            "events": [e.as_json() for e in self.store.events(limit=50)],
            "outbox": outbox,
            "verify": {h: v.as_json() for h, v in sorted(self.verifier.results.items()) if h in names},
            "mesh": self._mesh(target),
        }

    def _mesh(self, target: Target | None) -> dict[str, Any]:
        """The mesh picture's data: hosts with their site, linked pairs with their state."""
        if target is None:
            return {"hosts": [], "links": []}
        fleet = target.fleet
        pairs = fleet.link_pairs()
        if len(pairs) > MESH_MAX_LINKS:  # a picture of that many edges says nothing: counts only
            return {"hosts": [], "links": [], "links_omitted": len(pairs)}
        checks: dict[str, list[dict[str, Any]]] = {}
        for name in target.hosts:
            live = self.verifier.results.get(name)
            stored = self.store.record(name, "verify") if live is None else None
            checks[name] = list(live.checks) if live is not None else _stored_checks(stored)
        keys = set(getattr(fleet, "public_keys", {}) or {})
        hosts = [
            {"name": h.name, "site": str(getattr(h, "site", None) or getattr(h, "location", None) or "")}
            for h in fleet.hosts
        ]
        links = [{"a": a, "b": b, "state": pair_state(a, b, keys, checks)} for a, b in pairs]
        return {"hosts": hosts, "links": links}

    async def host_page(self, name: str) -> dict[str, Any] | None:
        """Everything the host page shows (None: not a host of the fleet or of the store)."""
        row = next((h for h in self.status()["hosts"] if h["name"] == name), None)
        if row is None:
            return None
        out = dict(row)
        plan = self.store.record(name, "plan")
        out["plan"], out["plan_at"] = (plan[1], plan[0]) if plan else (None, None)
        live = self.verifier.results.get(name)
        stored = self.store.record(name, "verify")
        out["verify"] = live.as_json() if live is not None else (stored[1] if stored else None)
        drift = self.store.record(name, "drift")
        out["drift"] = drift[1] if drift else []
        out["events"] = [e.as_json() for e in self.store.events(limit=30, host=name)]
        out["last_apply_at"] = self.metrics.last_apply.value(name) or None
        out["last_mail"] = self._last_mail(name)
        for key in ("applied", "attempted"):
            commit = str(row.get(f"{key}_commit") or "")
            out[f"{key}_info"] = await self.source.commit_summary(commit) if commit else {}
        return out

    def _last_mail(self, host: str) -> dict[str, str] | None:
        """The newest mail about ``host`` (subject and status only: bodies may quote diffs)."""
        messages = getattr(self.outbox, "messages", None)
        if messages is None:
            return None
        try:
            found = [m for m in messages() if f":{host}:" in m[0]]
        except Exception:  # the outbox is advisory here
            return None
        return {"subject": found[-1][2], "status": found[-1][1]} if found else None

    async def commits_page(self) -> dict[str, Any]:
        by_commit: dict[str, list[str]] = {}
        for h in self.status()["hosts"]:
            by_commit.setdefault(str(h.get("applied_commit") or ""), []).append(str(h["name"]))
        running = []
        for commit, names in sorted(by_commit.items(), key=lambda kv: -len(kv[1])):
            info = await self.source.commit_summary(commit) if commit else {}
            running.append({"commit": commit, "subject": info.get("subject", ""), "hosts": names})
        rejected = [{"commit": c, "reason": r, "at": a} for c, r, a in self.store.rejected_commits()]
        return {"running": running, "rejected": rejected}

    # ------------------------------------------------------------ shard (reconciler/daemon/shard.py)

    @property
    def sharded(self) -> bool:
        return self.shard.sharded

    async def fleet_status(self) -> dict[str, Any]:
        """This replica's status merged with its peers': every host of the fleet, with its owner."""
        local = self.status()
        peers = await self._peers.statuses()
        fleet = self.source.fleet
        names = list(fleet.host_names()) if fleet is not None else [h["name"] for h in local["hosts"]]
        return merge_status(self.shard, local, peers, names)

    def forward_hook(self, provider: str, headers: Headers, body: bytes) -> None:
        task = asyncio.get_running_loop().create_task(self._peers.forward_hook(provider, headers, body))
        self._forwards.add(task)
        task.add_done_callback(self._forwards.discard)  # forward_hook logs its own failures


def _stored_checks(stored: tuple[float, JsonValue] | None) -> list[JsonObject]:
    """The checks of a verify record kept in the store (what after_apply.HostVerify.as_json wrote)."""
    data = stored[1] if stored is not None else None
    checks = data.get("checks") if isinstance(data, dict) else None
    return [c for c in checks if isinstance(c, dict)] if isinstance(checks, list) else []
