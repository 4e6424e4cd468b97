"""Helpers shared by pytest modules and their torchrun workers, imported as
`tests.helpers.<module>` (torchrun workers get the repository root on PYTHONPATH from
`tests.helpers.launch.worker_env`).

- launch: run a worker script under torchrun and read back what its ranks wrote
- tiny_model: the tiny Llama-style ModelConfig the tests share
- tiny_gpt: that model on any (TP, PP) layout with layout-independent weights, a fixed
  batch and TP gather/scatter, wired with the package's DDP, loss and finalize
- checkpoint_training: tiny_gpt trained with distributed Adam and a LR scheduler (checkpoint workers)
- tiny_training: a tiny LongAlignConfig on the test datasets, MetricsLogger stand-ins
- megatron_session: megatron's parallel state on one CPU process
- fake_group: a stand-in process group for single-process tests
"""
