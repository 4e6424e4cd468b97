# shellcheck shell=bash
# NCCL and communication settings for the training jobs, in one place. Sourced by
# slurm/train_64k.sh (NCCL_ENV_FILE points at another file to replace it). Every value is
# a default: a variable already set in the environment wins, so a cluster's module or
# `export NCCL_...=...` before sbatch overrides it without editing this file.

# Warnings only; set NCCL_DEBUG=INFO to see the chosen transports when debugging a hang.
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"

# Megatron's sequence/tensor parallel overlap relies on kernels being issued in order on
# one hardware queue (Megatron-LM's own launch scripts set this too).
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"

# Free NCCL buffers when the collective finishes instead of through the caching allocator's
# record_stream: lower peak memory at 64k-128k tokens per GPU.
export TORCH_NCCL_AVOID_RECORD_STREAMS="${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}"

# A rank that dies must not leave the others blocked in a collective until the job's
# time limit: abort the communicators on error or timeout. torchrun sets this for its
# workers; train_64k.sh starts the ranks with srun directly, so it is set here.
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"

# InfiniBand: retry longer before declaring a link dead (4.096 us x 2^22, about 17 s),
# which rides out short fabric hiccups on large jobs.
export NCCL_IB_TIMEOUT="${NCCL_IB_TIMEOUT:-22}"

# Cluster-specific and left to the site unless set: which NIC carries bootstrap/socket
# traffic (e.g. NCCL_SOCKET_IFNAME=ib0 or ^lo,docker) and which HCAs NCCL uses
# (e.g. NCCL_IB_HCA=mlx5). Exported only when given, so NCCL's auto-detection stays.
if [[ -n "${NCCL_SOCKET_IFNAME:-}" ]]; then export NCCL_SOCKET_IFNAME; fi
if [[ -n "${NCCL_IB_HCA:-}" ]]; then export NCCL_IB_HCA; fi
