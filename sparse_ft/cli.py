"""``sparse-ft`` command line: ``train``, ``export`` and the other subcommands.

``sparse-ft train --config X.yaml [key=value ...]`` runs in one process, or under any launcher
(``deepspeed launch/train.py ...`` is the same entry point).
"""
from __future__ import annotations

import argparse
import logging
import sys

from .errors import ConfigError, RunError


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def train_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sparse-ft train", description="Fine-tune a causal LM with a sparse method.")
    parser.add_argument("--config", required=True, help="YAML config (sections: model, method, task, train, deepspeed)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.lr=1e-2")
    args = parser.parse_args(argv)
    _setup_logging()
    from .config import load_config

    run = load_config(args.config, args.overrides)
    from .training.guard import EXIT_DIVERGED
    from .training.trainer import train

    result = train(run)
    # A diverged run is not a crash: its own exit code, so job scripts and `sparse-ft sweep` can tell.
    return EXIT_DIVERGED if "diverged" in result else 0


def export_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sparse-ft export",
        description="Merge a trained delta into its base model and write a Hugging Face model directory "
                    "(--format hf), or copy out the compact delta (--format delta).")
    parser.add_argument("--checkpoint", required=True,
                        help="a run's output dir, a checkpoint dir, or a delta.safetensors file")
    parser.add_argument("--out", required=True, help="output directory (hf) or file/directory (delta)")
    parser.add_argument("--format", choices=["hf", "delta"], default="hf")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="hf: weight dtype")
    parser.add_argument("--max-shard-size", default="5GB", help="hf: largest output shard, e.g. 5GB")
    parser.add_argument("--base-model", default=None, help="base model dir or hub id (default: the one recorded in the delta)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = parser.parse_args(argv)
    _setup_logging()
    if args.format == "delta":
        import shutil
        from pathlib import Path

        from .delta import read_delta
        from .export import find_delta

        src = find_delta(args.checkpoint)
        read_delta(src)  # validates the file: checksums, finite values
        out = Path(args.out)
        if out.suffix != ".safetensors":
            if out.exists() and not out.is_dir():
                raise ConfigError(f"--out {out} is a file that is not a .safetensors delta; allowed: a directory or "
                                  "a path ending in .safetensors")
            out.mkdir(parents=True, exist_ok=True)
            out = out / "delta.safetensors"
        if out.exists() and not args.overwrite:
            raise ConfigError(f"--out {out} exists; pass --overwrite to replace it")
        if out.exists() and out.resolve() == src.resolve():
            raise ConfigError(f"--out {out} is the source delta itself; choose another path")
        import os
        import secrets

        tmp = out.with_name(f"{out.name}.partial-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            shutil.copyfile(src, tmp)
            tmp.replace(out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        print(out)
        return 0
    from .export import export_hf

    out = export_hf(args.checkpoint, args.out, base_model=args.base_model, dtype=args.dtype,
                    max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    import json

    dequantized = json.loads((out / "sparse_ft_export.json").read_text()).get("dequantized")
    if dequantized:
        print(f"trained on a {dequantized['scheme']}-quantized base: dequantized its {dequantized['layers']} quantized "
              f"layers to {args.dtype}, then merged the delta")
    print(out)
    return 0


def rpca_main(argv: list[str] | None = None) -> int:
    from .methods.dsee.omega import cli_main

    return cli_main(argv)


def sweep_main(argv: list[str] | None = None) -> int:
    _setup_logging()
    from .sweep import main as sweep_cli

    return sweep_cli(argv)


COMMANDS = {"train": train_main, "export": export_main, "rpca": rpca_main, "sweep": sweep_main}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: sparse-ft {%s} ..." % ",".join(COMMANDS))
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"sparse-ft: unknown command {command!r}; allowed: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        return COMMANDS[command](rest)
    except ConfigError as e:
        print(f"sparse-ft {command}: error: {e}", file=sys.stderr)
        return 2
    except RunError as e:  # a runtime failure with a path and an action: one line, no traceback
        print(f"sparse-ft {command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
