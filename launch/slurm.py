#!/usr/bin/env python
"""python launch/slurm.py [--launcher torchrun|deepspeed] [--gpus-per-node G] [--dry-run] --config X.yaml [key=value ...]

    sbatch launch/slurm_train.sbatch --config X.yaml train.lr=1e-2      # the usual way: the batch script calls this
    python launch/slurm.py --launcher deepspeed --dry-run --config X.yaml  # inside an allocation (salloc)

Launches training on every node of a SLURM job, either as ``srun ... torchrun --rdzv_backend c10d``
(default; no ssh between nodes needed) or as a deepspeed hostfile plus ``deepspeed --hostfile``.
Reads SLURM_JOB_NODELIST, SLURM_NNODES, SLURM_JOB_ID and SLURM_GPUS_ON_NODE (or --gpus-per-node).
``--dry-run`` prints the hostfile (deepspeed) and the command. The logic is in
``sparse_ft.launch.slurm``; see launch/README.md.
"""
import sys

from sparse_ft.launch.slurm import slurm_main

if __name__ == "__main__":
    sys.exit(slurm_main())
