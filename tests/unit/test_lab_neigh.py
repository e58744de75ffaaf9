"""The lab raises the machine-wide neighbour (ARP) table limits a big mesh needs, and puts them
back at lab down. (Live evidence: a 50-host libipsec mesh lost IKE packets to "neighbor table
overflow!" with the kernel's default gc_thresh3 of 1024; see bench/results/verify.md.)"""

from __future__ import annotations

from pathlib import Path

from reconciler.lab.network import neigh_entries_needed, raise_neigh_table, restore_neigh_table


def sysctls(tmp: Path, thresh2: int = 512, thresh3: int = 1024) -> Path:
    (tmp / "gc_thresh1").write_text("128\n")
    (tmp / "gc_thresh2").write_text(f"{thresh2}\n")
    (tmp / "gc_thresh3").write_text(f"{thresh3}\n")
    return tmp


def read(root: Path, key: str) -> int:
    return int((root / key).read_text())


def test_a_big_lab_raises_the_limits_and_lab_down_restores_them(tmp_path: Path) -> None:
    root = sysctls(tmp_path)
    need = neigh_entries_needed(50)
    assert need >= 50 * 49  # every host resolves every peer
    changed = raise_neigh_table(50, root)
    assert read(root, "gc_thresh2") == need and read(root, "gc_thresh3") == 2 * need
    assert read(root, "gc_thresh1") == 128  # untouched
    assert changed == {"gc_thresh2": [512, need], "gc_thresh3": [1024, 2 * need]}
    restore_neigh_table(changed, root)
    assert read(root, "gc_thresh2") == 512 and read(root, "gc_thresh3") == 1024


def test_limits_are_never_lowered_and_a_small_lab_changes_nothing(tmp_path: Path) -> None:
    root = sysctls(tmp_path, thresh2=100_000, thresh3=200_000)
    assert raise_neigh_table(50, root) == {}
    assert read(root, "gc_thresh3") == 200_000
    root = sysctls(tmp_path)
    assert raise_neigh_table(4, root) == {}  # 4 hosts fit the defaults
    assert read(root, "gc_thresh3") == 1024


def test_restore_leaves_a_value_someone_else_changed_since(tmp_path: Path) -> None:
    root = sysctls(tmp_path)
    changed = raise_neigh_table(50, root)
    (root / "gc_thresh3").write_text("99999\n")
    restore_neigh_table(changed, root)
    assert read(root, "gc_thresh3") == 99999 and read(root, "gc_thresh2") == 512
