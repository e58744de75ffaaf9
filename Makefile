# The two set-up commands of the README are `make demo` and `make test`.
PY ?= python3
.PHONY: install demo test test-vm vm-image lint unit bench

install:
	bash scripts/install.sh

demo: install
	$(PY) scripts/demo.py

lint:
	ruff check reconciler tests bench
	ruff format --check reconciler tests bench
	mypy

unit:
	$(PY) -m pytest -q tests/unit

test: install lint
	$(PY) -m pytest -q -p no:cacheprovider -ra tests --ignore=tests/vm
	$(MAKE) test-vm

# The VM tier (QEMU guests with a Debian 12 kernel; docs/LAB.md). The base image is built once
# and cached under /var/cache/reconciler-lab; RECONCILER_VM_TESTS=0 skips the tier.
vm-image:
	$(PY) -m reconciler lab image

test-vm: vm-image
	$(PY) -m pytest -q -p no:cacheprovider -ra tests/vm

bench: install
	for b in bench/bench_*.py; do $(PY) $$b || exit 1; done
