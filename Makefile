# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Each creates .venv (pip takes torch 2.14.1 / torchvision 0.29.1 from the local wheel cache).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml docker/install.sh
	PYTHON=$(PYTHON) sh docker/install.sh $(VENV) full
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/toolchain example digits --out build/example
	$(VENV)/bin/toolchain build build/example/digits_cnn.pt2 --target x86_fbgemm \
		--calib build/example/calib.npz --val build/example/val.npz --out build/digits_cnn-x86_fbgemm

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/x86_resnet18.py

clean:
	rm -rf build
