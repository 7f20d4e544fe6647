# make install | make test | make tables | make quick
PYTHON ?= .venv/bin/python
DATA ?= ../shared/data

.PHONY: install test test-all tables quick

install:            ## a virtual environment with the CPU build of torch and the test extra
	python3 -m venv .venv
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e '.[test]'

test:               ## the fast CPU suite (what CI runs)
	$(PYTHON) -m pytest

test-all:           ## including slow tests
	$(PYTHON) -m pytest -m "not gpu"

tables:             ## render every paper table from the run records in results/
	$(PYTHON) -m deltalora_repro.tables --results results

quick:              ## a two-minute CPU run on real RTE rows with a tiny random-init model
	$(PYTHON) -m deltalora_repro model=tiny-roberta task=glue/rte method=delta-lora \
	  data_dir=$(DATA)/glue train.epochs=3 task.max_length=128 results_dir=outputs/quick-results
