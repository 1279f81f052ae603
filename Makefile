# The README's commands. Every target sets up what it needs on a fresh machine.
.PHONY: venv test crds lint quickstart bench

PY := .venv/bin/python

venv:
	@scripts/venv.sh

# The operator tests run against a real kube-apiserver built once from Debian's sources
# (cached in ~/.cache/sami/kube-1.20; a no-op afterwards).
test: venv
	scripts/kube-build.sh
	$(PY) -m pytest $(PYTEST_ARGS)

crds: venv
	.venv/bin/sami crd

lint: venv
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

quickstart: venv
	.venv/bin/sami run examples/quickstart.yaml

# Benchmarks: ratios against baselines measured side by side (benchmarks/README.md).
bench: venv
	$(PY) -m benchmarks.run $(BENCH_ARGS)
