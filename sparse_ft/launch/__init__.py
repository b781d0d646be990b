"""Multi-GPU and multi-node launch commands: the logic behind ``launch/multinode.py``,
``launch/torchrun.py`` and ``launch/slurm.py`` (the top layer of the package, beside the CLI).

Every launcher builds a :class:`LaunchPlan` (the exact command, the environment it adds, the files
it writes) from arguments that are checked first, so a bad hostfile, an unknown host or a missing
config fails in a second with a message naming the argument instead of minutes later on a remote
node. ``--dry-run`` prints the plan; tests compare plans without launching anything.

Modules: :mod:`.common` (the plan, checks, training arguments, running), :mod:`.hostfile`
(hostfiles and ``--include``/``--exclude``), one module per launcher: :mod:`.multinode`
(deepspeed over a hostfile), :mod:`.torchrun`, :mod:`.slurm`.
"""
from .common import LaunchPlan, run_plan
from .multinode import multinode_main
from .slurm import slurm_main
from .torchrun import torchrun_main

__all__ = ["LaunchPlan", "multinode_main", "run_plan", "slurm_main", "torchrun_main"]
