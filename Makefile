# hvd_ngd: `make demo` runs the main job, `make test` runs every test. Both set up .venv first.
PY := .venv/bin/python
HOROVODRUN := .venv/bin/horovodrun
NP ?= 2

.PHONY: setup test demo bench

setup:
	@bash scripts/setup_env.sh

test: setup
	@$(PY) scripts/run_tests.py $(if $(ONLY),--only $(ONLY),)

demo: setup
	$(HOROVODRUN) -np $(NP) -H localhost:$(NP) --gloo $(PY) examples/pytorch_digits.py --out results/digits_torch

bench: setup
	$(PY) scripts/bench.py --out results/bench
