# Developer and CI entry points. `make test` is the test command README.md gives.
#
# The virtualenv is rebuilt only when pyproject.toml changes (stamp file), so every target can
# depend on it and stay fast. torch is installed first and pinned: an unpinned `torch` from
# PyPI resolves to the multi-GB CUDA build, while this pin resolves to the CPU wheel here.
# Set TORCH_INDEX (e.g. https://download.pytorch.org/whl/cpu) where that is not so.

PYTHON      ?= python3
VENV        := .venv
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.fedmq-installed
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX ?=
PYTEST_ARGS ?=
# pytest-xdist workers. Most broker tests wait on service processes and RabbitMQ, so two
# workers overlap those waits even on two cores; files stay whole on one worker (--dist
# loadfile) so module fixtures (a provisioned vhost, a cluster, keys) are built once, and
# files are handed out in collection order (--no-loadscope-reorder: tests/conftest.py puts
# the long federation files first; xdist's own order, most tests first, started them last).
# PYTEST_WORKERS=0 runs in one process (pdb, -x).
PYTEST_WORKERS ?= 2
# The MedMNIST file beside the checkout (our machines and CI); elsewhere fedmq downloads it
# from MedMNIST's official URL and checks its MD5.
FEDMQ_DATA_ROOT ?= $(if $(wildcard ../shared/data/pneumoniamnist.npz),$(abspath ../shared/data),)
export FEDMQ_DATA_ROOT

.PHONY: venv test test-fast faults demo async-vs-sync bench bench-crypto bench-gpu broker-local clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) '$(TORCH_SPEC)'
	$(PY) -m pip install -e '.[dev]'
	touch $@

test: venv
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

# The edit-run loop: unit tests only, no broker and nothing marked slow (under a minute).
test-fast: venv
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist load -m "not broker and not slow" tests/unit $(PYTEST_ARGS)

# Fault injection on live federations (>= 20 aggregator SIGKILLs, a broker restart, broker-side
# connection closes, a site killed mid-publish) + fuzzing; writes reports/faults/results.json.
# The reduced CI version is `pytest -m fault` (tests/faults/).
faults: venv
	$(VENV)/bin/fedmq faults run --out reports/faults $(FAULTS_ARGS)

demo: venv
	$(VENV)/bin/fedmq demo

# async (FedBuff) vs sync (FedAvg) on real processes, 3 seeds, one site 4x slower, DP on (6 runs
# of up to 10 minutes each; about 35 minutes on 2 loaded cores) -> reports/async_vs_sync/,
# reports/reproduce/results.json
async-vs-sync: venv
	$(VENV)/bin/fedmq experiment async-vs-sync --time-limit 600 $(AVS_ARGS)

broker-local: venv
	$(VENV)/bin/fedmq broker local

# Everything in benchmarks/ (python -m benchmarks): aggregator throughput vs its floor, wire bytes
# and AUC cost, site overhead, scaling, shards, async vs sync -> benchmarks/results/latest.{json,md}
bench: venv
	$(PY) -m benchmarks

bench-crypto: venv
	$(PY) -m benchmarks.crypto

# Site training on a GPU (plain vs DP-SGD per preset, engines, one 5,000-image round split into
# phases) -> benchmarks/results/gpu.json. Without CUDA: small_cnn on the CPU, "device": "cpu".
bench-gpu: venv
	$(PY) -m benchmarks.gpu

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis reports build *.egg-info
