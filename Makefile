# The README's commands. Every target sets up what it needs on a fresh machine.
.PHONY: venv test crds lint quickstart

PY := .venv/bin/python

venv:
	@scripts/venv.sh

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

crds: venv
	.venv/bin/sami crd

lint: venv
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

quickstart: venv
	.venv/bin/sami run examples/quickstart.yaml
