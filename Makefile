# The two set-up commands of the README are `make demo` and `make test`.
PY ?= python3
.PHONY: install demo test lint unit bench

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
	$(PY) -m pytest -q -p no:cacheprovider -ra tests

bench: install
	for b in bench/bench_*.py; do $(PY) $$b || exit 1; done
