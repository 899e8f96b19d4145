# `make bench` runs every benchmark in full mode (about 15 min on 2 cores) and rewrites README's results section;
# `make bench-quick` is a smoke run into benchmarks/results/quick/. Extra options: make bench ARGS="--only structured".
PYTHON ?= python
ARGS ?=

.PHONY: bench bench-quick test

bench:
	$(PYTHON) benchmarks/run_all.py $(ARGS)

bench-quick:
	$(PYTHON) benchmarks/run_all.py --quick $(ARGS)

test:
	$(PYTHON) -m pytest -q $(ARGS)
