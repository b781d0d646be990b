#!/usr/bin/env python
"""python launch/multinode.py --hostfile HOSTFILE [--include H:0,1] [--env K=V] [--dry-run] --config X.yaml [key=value ...]

    python launch/multinode.py --hostfile hostfile --env NCCL_SOCKET_IFNAME=eth0 --config X.yaml train.lr=1e-2
    python launch/multinode.py --hostfile hostfile --include worker-1:0,1@worker-2 --dry-run --config X.yaml

Multi-node training with the deepspeed launcher (pdsh/ssh to the hosts of a hostfile). Checks the
hostfile, filters and config before anything starts, writes ``--env`` pairs to ``.deepspeed_env``
(which the deepspeed launcher exports on every node) and runs
``deepspeed --hostfile ... launch/train.py --config X.yaml ...``; ``--dry-run`` prints it instead.
The logic is in ``sparse_ft.launch.multinode``; see launch/README.md.
"""
import sys

from sparse_ft.launch.multinode import multinode_main

if __name__ == "__main__":
    sys.exit(multinode_main())
