"""Run under ``deepspeed --num_gpus 2``: the divergence guard with several ranks. ``--poison-step N``
makes step N's gradient infinite on rank 1 only (every rank must still skip it); ``--drop-step N``
instead trains without step N's batch (the reference run). Each rank writes its optimizer state;
the delta is compared by tests/training/test_divergence.py.

    deepspeed --num_gpus 2 tests/dist/guard_check.py --config cfg.yaml --report out-RANK.pt --poison-step 3
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import InfGrad  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--report", required=True)
    parser.add_argument("--poison-step", type=int, default=0)
    parser.add_argument("--drop-step", type=int, default=0)
    parser.add_argument("--local_rank", type=int, default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from sparse_ft.config import load_config
    from sparse_ft.training.data import BatchPlan
    from sparse_ft.training.trainer import Trainer

    if args.drop_step:
        real_plan = BatchPlan.micro_batches
        BatchPlan.micro_batches = lambda self, step, rank: real_plan(self, step + (step >= args.drop_step - 1), rank)

    class Poisoned(Trainer):
        calls = 0

        def _forward(self, batch):
            loss = super()._forward(batch)
            self.calls += 1
            if self.calls == args.poison_step and self.rank == 1:
                return InfGrad.apply(loss)
            return loss

    trainer = Poisoned(load_config(args.config, args.overrides))
    results = trainer.run()
    state = [{k: v.clone() for k, v in s.items()} for s in trainer.optimizer.state.values()]
    torch.save({"results": results, "state": state, "rank": trainer.rank},
               args.report.replace("RANK", str(trainer.rank)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
