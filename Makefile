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
GATEAU_OUT ?= outputs/gateau_demo
EVAL_OUT ?= outputs/eval_demo

.PHONY: venv demo gateau-demo eval-demo test lint bench-preprocess bench-packing bench-dataloader clean

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

# GATEAU on the bundled data, on CPU in a few minutes (docs/GATEAU.md): the long samples
# (up to 8k tokens) and the short chats in one set; two tiny homologous models trained on
# it, A with a 1k window and B with 4k; both score every sample (HMG + CAM), and the top
# 10% are written as a new preprocessed set. Reruns resume the scoring where it stopped.
gateau-demo: $(STAMP)
	$(PY) tools/preprocess.py --input data/sample/long.jsonl.gz data/sample/short_chat.jsonl.gz \
		--tokenizer data/sample/tokenizer.model --template llama2 \
		--output-prefix $(GATEAU_OUT)/mix --max-length 8192 --on-overlength drop --overwrite
	$(PY) -m megatron_longalign.train +experiment=smoke name=gateau_a data=single \
		data.prefix=$(GATEAU_OUT)/mix data.seq_length=1024 train.max_steps=20 \
		train.save_interval=20 train.output_dir=$(GATEAU_OUT)/model_a
	$(PY) -m megatron_longalign.train +experiment=smoke name=gateau_b data=single \
		data.prefix=$(GATEAU_OUT)/mix data.seq_length=4096 train.max_steps=20 \
		train.save_interval=20 train.output_dir=$(GATEAU_OUT)/model_b
	$(PY) tools/gateau.py score --prefix $(GATEAU_OUT)/mix \
		--model-a $(GATEAU_OUT)/model_a/checkpoints --model-b $(GATEAU_OUT)/model_b/checkpoints \
		--output $(GATEAU_OUT)/scores --seq-length 8192
	$(PY) tools/gateau.py select --prefix $(GATEAU_OUT)/mix \
		--scores $(GATEAU_OUT)/scores/scores.jsonl --output-prefix $(GATEAU_OUT)/selected \
		--ratio 0.1 --overwrite

# Train -> export -> evaluate on CPU in a few minutes (docs/EVALUATION.md): the tiny model
# trained on the bundled data (as `make demo`, 5% held out: valid/loss every 10 steps and
# in $(EVAL_OUT)/model/metrics.jsonl), exported to a Hugging Face directory
# (with the training chat template), then a needle-in-a-haystack heatmap through
# transformers on a generated haystack: $(EVAL_OUT)/needle/heatmap.png. A model this
# small finds no needle; the point is the whole path. Reruns resume the evaluation.
eval-demo: $(STAMP)
	$(PY) tools/preprocess.py --input data/sample/long.jsonl.gz \
		--tokenizer data/sample/tokenizer.model --template llama2 \
		--output-prefix $(EVAL_OUT)/long --max-length 65536 --on-overlength truncate-middle \
		--overwrite
	$(PY) tools/preprocess.py --input data/sample/short_chat.jsonl.gz \
		--tokenizer data/sample/tokenizer.model --template llama2 \
		--output-prefix $(EVAL_OUT)/short_chat --max-length 65536 --overwrite
	DEMO_OUT=$(EVAL_OUT) $(PY) -m megatron_longalign.train +experiment=smoke name=eval_demo \
		train.max_steps=20 train.save_interval=20 train.output_dir=$(EVAL_OUT)/model \
		data.valid_fraction=0.05 train.eval_interval=10
	rm -rf $(EVAL_OUT)/hf  # the demo's own export: re-made from the checkpoint
	$(PY) tools/convert_hf.py export --checkpoint $(EVAL_OUT)/model/checkpoints \
		--output $(EVAL_OUT)/hf
	$(PY) tools/evaluate.py needle --backend transformers --model $(EVAL_OUT)/hf \
		--haystack generated --lengths 250,500,1k,2k --num-depths 5 --max-new-tokens 32 \
		--output $(EVAL_OUT)/needle

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
