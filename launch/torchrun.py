#!/usr/bin/env python
"""python launch/torchrun.py [--nproc-per-node N] [--nnodes N --node-rank R --master-addr A] [--dry-run] --config X.yaml [key=value ...]

    python launch/torchrun.py --nproc-per-node 8 --config X.yaml train.lr=1e-2
    python launch/torchrun.py --nnodes 2 --node-rank 0 --master-addr node0 --nproc-per-node 8 --config X.yaml

Training with torchrun: one node (``--standalone``), or several with static node ranks (run the
same command on every node with its own ``--node-rank``). ``--dry-run`` prints the command.
The logic is in ``sparse_ft.launch.torchrun``; see launch/README.md.
"""
import sys

from sparse_ft.launch.torchrun import torchrun_main

if __name__ == "__main__":
    sys.exit(torchrun_main())
