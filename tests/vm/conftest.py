"""The VM tier: the example fleet's four hosts as QEMU guests with a Debian 12 kernel, booted
once for the whole directory (booting is the expensive part under emulation)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from vm_fleet import EXAMPLE

from reconciler.lab import Lab, specs_from_repo


@pytest.fixture(scope="session")
def vm_lab(lab_factory: Any) -> Iterator[Lab]:
    """web1, web2, db1, db2 (the example's names and addresses) as QEMU guests.

    RECONCILER_VM_LAB=current: use the VM lab left up by `reconciler lab up --vm --fleet
    fleet-repo-example` instead (developing: no boot per run; that lab is left up)."""
    specs = specs_from_repo(EXAMPLE)
    if os.environ.get("RECONCILER_VM_LAB") == "current":
        info = Lab.current()
        if (
            info is None
            or info.kind != "vm"
            or sorted(h.name for h in info.hosts) != sorted(s.name for s in specs)
        ):
            pytest.fail("RECONCILER_VM_LAB=current: no VM lab of the example fleet is up")
        yield Lab.attach(info.prefix)
        return
    lab = lab_factory(specs, vm=True, lock_timeout=3600)
    yield lab
    lab.down()


@pytest.fixture(scope="session")
def example_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fleet-repo-example exactly as shipped (mode ipip, datapath kernel), in a scratch dir
    because `keys collect` writes keys/<host>.pub into it."""
    repo = tmp_path_factory.mktemp("vm") / "fleet"
    shutil.copytree(EXAMPLE, repo)
    return repo
