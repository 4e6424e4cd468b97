# The two supported entry points are `make demo` and `make test`; everything
# they need is installed here, into .venv, from the project's own files.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The CPU build of torch is installed first and explicitly: a bare `torch`
# requirement would otherwise pull several GB of CUDA wheels on CPU machines.
TORCH_SPEC ?= torch==2.13.0
DEMO_OUT ?= outputs/demo

.PHONY: venv demo test lint bench-preprocess bench-packing bench-dataloader clean

venv: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# The demo preprocesses the bundled data (long samples and short chats as two datasets, as
# LongAlign mixes them; --overwrite: a rerun replaces the demo's own sets), shows one
# rendered sample, then trains the tiny model on CPU (conf/experiment/smoke.yaml;
# DEMO_OUT tells conf/data/demo.yaml where the data is).
demo: $(STAMP)
	$(PY) tools/preprocess.py --input data/sample/long.jsonl.gz \
		--tokenizer data/sample/tokenizer.model --template llama2 \
		--output-prefix $(DEMO_OUT)/long --max-length 65536 --on-overlength truncate-middle --workers 2 \
		--overwrite
	$(PY) tools/preprocess.py --input data/sample/short_chat.jsonl.gz \
		--tokenizer data/sample/tokenizer.model --template llama2 \
		--output-prefix $(DEMO_OUT)/short_chat --max-length 65536 --overwrite
	$(PY) tools/preprocess.py --input data/sample/long.jsonl.gz \
		--tokenizer data/sample/tokenizer.model --template llama2 --inspect 1 --inspect-chars 400
	DEMO_OUT=$(DEMO_OUT) $(PY) -m megatron_longalign.train +experiment=smoke

test: $(STAMP)
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check megatron_longalign tools tests bench
	$(VENV)/bin/ruff format --check megatron_longalign tools tests bench

bench-preprocess: $(STAMP)
	$(PY) bench/preprocess_bench.py

bench-packing: $(STAMP)
	$(PY) bench/packing_bench.py

bench-dataloader: $(STAMP)
	$(PY) bench/dataloader_bench.py

clean:
	rm -rf $(VENV) outputs *.egg-info
