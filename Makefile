# The two set-up commands: `make demo` and `make test`. Both install what is missing first.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test lint gen bench soak clean image

setup:
	@bash scripts/setup.sh

demo: setup
	$(VENV)/bin/cn2mirror demo

test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q tests

lint: setup
	$(VENV)/bin/ruff check .

# Files generated from the Python definitions (tests check that they are fresh).
gen: setup
	$(PY) -m cn2mirror.agent.layout --write

bench: setup
	$(PY) -m benchmarks.run

# >= 10 minutes of mixed traffic, policy churn and kill -9 restarts; memory, flow table
# and drops plotted to benchmarks/results/soak.png; fails if anything leaked.
soak: setup
	$(PY) -m benchmarks.soak --duration $${SOAK_SECONDS:-600}

# The agent's container image (Dockerfile), with docker or podman. Then push it where the
# nodes can pull it and set the same name in manifests/deploy/kustomization.yaml (images:)
# or the chart's image values.
IMAGE ?= cn2mirror:$(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
image:
	@engine=$$(command -v docker || command -v podman) || \
	  { echo "make image: needs docker or podman" >&2; exit 1; }; \
	$$engine build -t $(IMAGE) .

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
