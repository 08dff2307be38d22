# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Each creates .venv (pip takes torch 2.14.1 / torchvision 0.29.1 from the local wheel cache).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install browser services demo lint test test-full bench clean

install: $(STAMP)

$(STAMP): pyproject.toml docker/install.sh
	PYTHON=$(PYTHON) sh docker/install.sh $(VENV) full
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/toolchain example digits --out build/example
	$(VENV)/bin/toolchain build build/example/digits_cnn.pt2 --target x86_fbgemm \
		--calib build/example/calib.npz --val build/example/val.npz --out build/digits_cnn-x86_fbgemm
	$(VENV)/bin/toolchain build build/example/digits_cnn.pt2 --target qualcomm_snapdragon \
		--calib build/example/calib.npz --val build/example/val.npz --out build/digits_cnn-qualcomm_snapdragon

# Debian's Chromium, for the test that renders report.html headless (needs root and apt).
browser:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

# Debian's PostgreSQL server, for the test that keeps a matrix history in it (the test starts and stops its own).
services:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq postgresql >/dev/null)

# Lint, format and the layers of docs/architecture.md (import-linter), before any test runs.
lint: $(STAMP)
	$(VENV)/bin/ruff check toolchain tests benchmarks
	$(VENV)/bin/ruff format --check toolchain tests benchmarks
	$(VENV)/bin/lint-imports

# The suite CI runs (deterministic, no timing assertions; docs/development.md gives its time).
test: $(STAMP) browser services lint
	TOOLCHAIN_REQUIRE_BROWSER=1 TOOLCHAIN_REQUIRE_SERVICES=1 $(PY) -m pytest -q -m "not slow" -n 2 --dist loadfile --durations=20

# Everything, the heavier end-to-end builds too (every torchvision architecture): nightly.
test-full: $(STAMP) browser services
	TOOLCHAIN_REQUIRE_BROWSER=1 TOOLCHAIN_REQUIRE_SERVICES=1 $(PY) -m pytest -q -n 2 --dist loadfile

bench: $(STAMP) $(VENV)/.bench
	$(PY) benchmarks/x86_resnet18.py
	$(PY) benchmarks/x86_peers.py
	$(PY) benchmarks/snapdragon_mobile.py
	$(PY) benchmarks/x86_isa_settings.py
	$(PY) benchmarks/matrix_workers.py
	$(PY) benchmarks/snapdragon_npu.py
	$(PY) benchmarks/sequence_precisions.py
	$(MAKE) $(PEERS)
	$(PY) benchmarks/int8_recovery.py --peers-python $(PEERS)/bin/python
	$(PY) benchmarks/recovery_cost.py

# NNCF in the toolchain's venv (a peer in benchmarks/x86_peers.py), installed once
$(VENV)/.bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]'
	touch $(VENV)/.bench

# NNCF and Intel Neural Compressor for the INT8 recovery benchmark, apart from the toolchain's venv:
# Neural Compressor's last ONNX Runtime back end (2.6) needs numpy < 2 and onnx < 1.17.
PEERS = .venv-peers
$(PEERS):
	$(PYTHON) -m venv $(PEERS)
	$(PEERS)/bin/pip install --quiet "numpy<2" "onnx<1.17" neural-compressor==2.6 six nncf onnxruntime

clean:
	rm -rf build
