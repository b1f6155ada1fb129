# The two commands a newcomer needs: `make demo` and `make test`. Both install everything first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
PROTOS := $(patsubst %.proto,%_pb2.py,$(wildcard protos/*.proto))

.PHONY: demo test bench install protos system-deps

install: $(INSTALLED) protos

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e ".[test,mxnet,caffe,torch]"
	touch $@

protos: $(INSTALLED) $(PROTOS)

protos/%_pb2.py: protos/%.proto $(INSTALLED)
	$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. $<

# From Debian, installed once, as root: Prometheus (a real server for the metrics tests) and h2load
# (nghttp2-client: the C load generator of the scale-out benchmark, cheap enough to leave the cores to the gateway).
system-deps:
	@command -v prometheus >/dev/null && command -v h2load >/dev/null || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus nghttp2-client >/dev/null; }

demo: install
	$(VENV)/bin/shadowserve demo

# Two at a time (one test file per worker), then alone the tests that measure time, memory or load.
test: install system-deps
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not solo"
	$(PY) -m pytest -q -m solo

bench: install system-deps
	$(PY) -m bench --out BENCHMARKS.md
