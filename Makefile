# Shortcuts for scripts/dev, which does the work (and needs no make on a fresh machine).
.PHONY: setup serve test test-fast lint molecule bench
setup:
	scripts/dev setup
serve:
	scripts/dev serve
test:
	scripts/dev test
test-fast:
	scripts/dev test-fast
lint:
	scripts/dev lint
molecule:
	scripts/molecule.sh test default
bench:
	.venv/bin/python scripts/bench.py
