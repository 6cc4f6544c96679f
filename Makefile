# The two commands README promises: `make demo` and `make test` (each sets up first).
.PHONY: setup demo test test-fast

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/python -m grailcore.train --cfg configs/demo_gun.py

test: setup
	.venv/bin/python -m pytest tests -q

test-fast: setup
	.venv/bin/python -m pytest tests -q -m "not slow"
