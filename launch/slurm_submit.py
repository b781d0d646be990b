#!/usr/bin/env python
"""python launch/slurm_submit.py [--nodes N] [--gpus-per-node G] [--cpus-per-task C] [--partition P] [--dry-run] --config X.yaml [key=value ...]

    python launch/slurm_submit.py --dry-run --config X.yaml                  # shows every resource and its default
    python launch/slurm_submit.py --nodes 4 --gpus-per-node 4 --partition gpu --time 24:00:00 --config X.yaml

Submits ``launch/slurm_train.sbatch`` with the resources given as arguments, after checking with
``sinfo`` that the partition can hold them (refused with a warning otherwise; ``--force`` submits
anyway). Arguments it does not know (``--launcher``, ``--env``, ``--config`` ...) go to
``launch/slurm.py``. The job's output goes to ``<train.output_dir>/slurm-<job id>.out``. The logic
is in ``sparse_ft.launch.slurm``; see docs/multi-node.md.
"""
import sys

from sparse_ft.launch.slurm import submit_main

if __name__ == "__main__":
    sys.exit(submit_main())
