"""Where the reconciler keeps its own state on a host (one definition for every stage)."""

from __future__ import annotations

STATE_DIR = "/var/lib/reconciler"
INVENTORY_PATH = f"{STATE_DIR}/inventory.json"  # JSON list of absolute paths (plan writes it)
# handlers whose files were swapped in but not yet reloaded (apply writes it before a swap and
# clears it after the reloads; a leftover means an apply was interrupted in between; observe
# reads it: Observed.pending_reloads)
PENDING_RELOADS_PATH = f"{STATE_DIR}/pending-reloads"
FIREWALL_STATE_DIR = f"{STATE_DIR}/firewall"  # the dead-man switch's files
VERIFY_CURSOR_PATH = f"{STATE_DIR}/verify/charon-log.cursor"
