# `make demo` and `make test` each (re)create .venv when it is missing or older than requirements.txt.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test clean

$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -r requirements.txt
	# DeepSpeed (for the ZeRO-3 tests; CPU-only here): its sdist imports torch while building, so no build
	# isolation, which would fetch a second torch
	DS_BUILD_OPS=0 $(VENV)/bin/pip install --quiet --no-build-isolation $$(grep -i '^deepspeed' requirements-gpu.txt)
	touch $(STAMP)

demo: $(STAMP)
	$(PY) train_sft.py configs/sft_toy.yaml
	$(PY) train_dpo.py configs/dpo_toy.yaml

test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf outputs
