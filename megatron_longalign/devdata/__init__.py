"""Data for development only: the demo, the tests and the benchmarks. Training never
imports this package (layer 5: it may use data/, config/ and utils/; nothing in the
product package imports it).

- synthetic: the deterministic synthetic chat records (tools/make_synthetic.py)
- tokenizer_training: tiny sentencepiece / HF tokenizers (tools/train_tokenizer.py)
- random_dataset: preprocessed datasets of random token ids (benchmarks, memory checks)
"""
