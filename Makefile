# The README's commands. Every target sets up what it needs on a fresh machine.
.PHONY: venv test crds lint quickstart bench images lock

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

# ruff, then the import boundaries in pyproject.toml's [tool.importlinter].
lint: venv
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/lint-imports

quickstart: venv
	.venv/bin/sami run examples/quickstart.yaml

# Benchmarks: ratios against baselines measured side by side (benchmarks/README.md).
bench: venv
	$(PY) -m benchmarks.run $(BENCH_ARGS)

# The hash-locked requirements of the test venv and the images, from pyproject.toml (needs PyPI).
lock: venv
	$(PY) scripts/lock.py

# Container images (needs a Docker engine; see images/README.md).
REGISTRY ?= ghcr.io/sami-project
TAG ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
images:
	docker build -f images/operator/Dockerfile -t $(REGISTRY)/sami-operator:$(TAG) .
	docker build -f images/worker/Dockerfile $(WORKER_BUILD_ARGS) -t $(REGISTRY)/sami-worker:$(TAG) .
