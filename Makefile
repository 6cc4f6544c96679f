# The two commands README promises: `make demo` and `make test` (each sets up first).
.PHONY: setup demo test test-fast

PY := .venv/bin/python

setup:
	bash scripts/setup.sh

# SFT warm start (teaches the answer format), then GRPO from it; both evaluate before and after.
demo: setup
	$(PY) -m grailcore.sft --cfg configs/demo_sft_gun.py
	$(PY) -m grailcore.train --cfg configs/demo_gun.py

test: setup
	$(PY) -m pytest tests -q

test-fast: setup
	$(PY) -m pytest tests -q -m "not slow"
