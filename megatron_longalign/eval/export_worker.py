"""Child process of eval/model_source.py: export a trainer checkpoint to an HF directory.

    python -m megatron_longalign.eval.export_worker CHECKPOINT OUTPUT [--tokenizer DIR]

Exit status 0 on success; 2 with a one-line message on stderr when the checkpoint
cannot be exported.
"""

from __future__ import annotations

import argparse
import sys
import warnings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("output")
    parser.add_argument("--tokenizer")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    from megatron_longalign.config.parallel import ParallelConfig
    from megatron_longalign.convert.errors import ConversionError
    from megatron_longalign.convert.hf_export import export_checkpoint
    from megatron_longalign.parallel.distributed import destroy_distributed, initialize_distributed
    from megatron_longalign.training.checkpoint import CheckpointError

    # Export is file I/O on the host: CPU and gloo, one process.
    initialize_distributed(ParallelConfig(), seed=0, cpu=True)
    try:
        export_checkpoint(
            args.checkpoint, args.output, tokenizer_dir=args.tokenizer, progress=False
        )
    except (ConversionError, CheckpointError) as err:
        print(" ".join(str(err).split()), file=sys.stderr)
        return 2
    finally:
        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
