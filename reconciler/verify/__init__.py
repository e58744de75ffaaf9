"""``reconciler verify``: check that the fleet really works (see docs/VERIFY.md).

``verify_fleet(fleet, hosts, pool) -> VerifyReport`` is what the CLI and the daemon call;
``VerifyReport.metrics()`` gives flat samples for /metrics and ``as_dict()`` the /status view.
"""

from __future__ import annotations

from reconciler.verify.checks import Check, Status, VerifyReport
from reconciler.verify.runner import VerifyOptions, verify_fleet

__all__ = ["Check", "Status", "VerifyOptions", "VerifyReport", "verify_fleet"]
