# Two commands on a fresh clone:
#   make demo   creates .venv, installs autotp, runs the 4-process Llama demo on CPU
#   make test   creates .venv, installs autotp with its test extras, runs the test suite
VENV  ?= .venv
PY    := $(VENV)/bin/python
# The CPU build of torch; on a CUDA machine use e.g. `make TORCH=torch==2.13.0 install` with the CUDA index.
TORCH ?= torch==2.13.0
NPROC ?= 4

.PHONY: install demo test test-fast bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m torch.distributed.run --nproc-per-node $(NPROC) examples/llama_tp.py

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/plan_time.py

clean:
	rm -rf $(VENV) out .pytest_cache
