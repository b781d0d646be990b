"""``sparse-ft`` command line: ``train``, ``export`` and the other subcommands.

``sparse-ft train --config X.yaml [key=value ...]`` runs in one process, or under any launcher
(``deepspeed launch/train.py ...`` is the same entry point).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from .errors import ConfigError, RunError

# The subcommands import what they need inside their functions, and only for start-up speed: torch,
# DeepSpeed and transformers take seconds to import, and `sparse-ft --help` or a config error should
# not wait for them. Nothing here dodges an import cycle (cli is the top layer).


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class _DefaultsFormatter(argparse.RawDescriptionHelpFormatter):
    """Each optional argument's help ends with its default (required ones and off-switches have none)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.option_strings and not action.required and "%(default)" not in text
                and action.default not in (None, False, argparse.SUPPRESS)):
            text += " (default: %(default)s)"
        return text


def _fill(text: str, width: int = 100, indent: str = "") -> str:
    import textwrap

    return textwrap.fill(text, width=width, initial_indent=indent, subsequent_indent=indent)


def config_keys_help(width: int = 100) -> str:
    """Every config section and key with its default and docstring, from the dataclasses' source
    (:mod:`.config_docs`; nothing imports torch)."""
    import textwrap

    from .config_docs import sections

    lines = ["config keys (YAML section -> key = default: meaning; override any as section.key=value):"]
    for section in sections():
        head = f"{section.section}:" if section.method is None else f"method (name: {section.method}):"
        lines.append("")
        lines.append(head)
        for key in section.keys:
            lines.append(f"  {section.section}.{key.name} = {key.default}")
            doc = key.doc.replace("``", "`")
            lines.extend(textwrap.wrap(doc, width=width, initial_indent="      ", subsequent_indent="      "))
    return "\n".join(lines)


def _peek_model(config: str, overrides: list[str]) -> str:
    """The model a config names (for the first log line, before the heavy imports); '' if unknown."""
    try:
        import yaml

        with open(config) as f:
            tree = yaml.safe_load(f) or {}
        model = dict(tree.get("model") or {})
    except Exception:  # the real load reports a bad file properly
        model = {}
    for pair in overrides:
        key, _, value = pair.partition("=")
        if key.strip() in ("model.name_or_path", "model.gguf_file"):
            model[key.strip().split(".")[1]] = value
    name = str(model.get("name_or_path") or "")
    return f"{name}/{model['gguf_file']}" if name and model.get("gguf_file") else name


def _output_dir_or_none(config: str, overrides: list[str]):
    from .config import output_dir_of

    try:
        return output_dir_of(config, overrides)
    except Exception:  # noqa: BLE001 - the config's own error is the one to report
        return None


def train_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sparse-ft train", formatter_class=_DefaultsFormatter,
        description=_fill("Fine-tune a causal LM with a sparse method, as a YAML config says. Runs as one "
                          "process, or under a launcher (deepspeed, torchrun, srun) with the same arguments."),
        epilog=config_keys_help())
    parser.add_argument("--config", required=True, help="YAML config (sections: model, method, task, train, deepspeed)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.lr=1e-2")
    args = parser.parse_args(argv)
    _setup_logging()
    if os.environ.get("RANK", "0") == "0":
        # Before torch, transformers and DeepSpeed are imported (several seconds), so a run shows life at once.
        logging.getLogger("sparse_ft").info("sparse-ft train: config %s, model %s: importing torch, transformers and "
                                            "DeepSpeed", args.config, _peek_model(args.config, args.overrides) or "?")
    from .config import load_config

    from .training.jobstatus import report_before_start

    try:
        run = load_config(args.config, args.overrides)
    except Exception as error:
        # Under a multi-node launcher the other ranks stop too; exit_status.json goes to the run dir.
        report_before_start(error, _output_dir_or_none(args.config, args.overrides))
        raise
    from .training.guard import EXIT_DIVERGED
    from .training.trainer import train

    result = train(run)
    # A diverged run is not a crash: its own exit code, so job scripts and `sparse-ft sweep` can tell.
    return EXIT_DIVERGED if "diverged" in result else 0


def export_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sparse-ft export", formatter_class=_DefaultsFormatter,
        description=_fill("Merge a trained delta into its base model and write a Hugging Face model directory "
                          "(--format hf), write it as a PEFT adapter (--format peft), or copy out the compact "
                          "delta (--format delta). hf and peft exports carry a model card (README.md)."))
    parser.add_argument("--checkpoint", required=True,
                        help="a run's output dir, a checkpoint dir, or a delta.safetensors file")
    parser.add_argument("--out", required=True, help="output directory (hf) or file/directory (delta)")
    parser.add_argument("--format", choices=["hf", "delta", "peft"], default="hf",
                        help="hf: merged Hugging Face model; delta: the compact delta; peft: a PEFT adapter "
                             "(PeftModel.from_pretrained)")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="hf: weight dtype")
    parser.add_argument("--max-shard-size", default="5GB", help="hf: largest output shard, e.g. 5GB")
    parser.add_argument("--base-model", default=None, help="base model dir or hub id (default: the one recorded in the delta)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--push-to-hub", metavar="REPO", default=None,
                        help="hf/peft: upload the export (with its model card) to this Hugging Face Hub repository")
    parser.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")
    args = parser.parse_args(argv)
    _setup_logging()
    if args.push_to_hub and args.format == "delta":
        raise ConfigError("--push-to-hub needs --format hf or peft (a model card and loadable files)")
    if args.private and not args.push_to_hub:
        raise ConfigError("--private only applies with --push-to-hub REPO")
    if args.push_to_hub:
        from .model_card import check_hub

        check_hub(args.push_to_hub)  # before anything is written
    import shlex

    command = "sparse-ft export " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    if args.format == "peft":
        from .export_peft import export_peft

        out = export_peft(args.checkpoint, args.out, base_model=args.base_model, overwrite=args.overwrite,
                          command=command)
        _maybe_push(out, args)
        print(out)
        return 0
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
                    max_shard_size=args.max_shard_size, overwrite=args.overwrite, command=command)
    _maybe_push(out, args)
    import json

    dequantized = json.loads((out / "sparse_ft_export.json").read_text()).get("dequantized")
    if dequantized:
        print(f"trained on a {dequantized['scheme']}-quantized base: dequantized its {dequantized['layers']} quantized "
              f"layers to {args.dtype}, then merged the delta")
    print(out)
    return 0


def _maybe_push(out, args) -> None:
    if args.push_to_hub:
        from .model_card import push_to_hub

        print(f"uploaded to {push_to_hub(out, args.push_to_hub, private=args.private)}")


def rpca_main(argv: list[str] | None = None) -> int:
    _setup_logging()
    from .commands.rpca import main as rpca_cli

    return rpca_cli(argv)


def sweep_main(argv: list[str] | None = None) -> int:
    _setup_logging()
    from .sweep import main as sweep_cli

    return sweep_cli(argv)


def eval_main(argv: list[str] | None = None) -> int:
    _setup_logging()
    from .harness import main as eval_cli

    return eval_cli(argv)


COMMANDS = {"train": train_main, "export": export_main, "rpca": rpca_main, "sweep": sweep_main, "eval": eval_main}

SUMMARIES = {
    "train": "Fine-tune a model as a YAML config says (sections model, method, task, train, deepspeed); "
             "key=value pairs override it.",
    "export": "Merge a run's trained delta into its base model and write a Hugging Face model directory "
              "or a PEFT adapter, or copy out the compact delta.",
    "rpca": "Precompute DSEE's sparse positions (Omega, by RPCA of the pretrained weights) before training.",
    "sweep": "Train a grid of learning rates (x densities, methods, seeds) and pick the best on the dev split.",
    "eval": "Score a run, delta, HF export or PEFT adapter on lm-evaluation-harness tasks (by name or local YAML).",
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    pad = " " * (width + 4)
    rows = "\n".join(f"  {name:<{width}}  " + _fill(SUMMARIES.get(name, ""), indent=pad)[len(pad):] for name in COMMANDS)
    return (f"usage: sparse-ft {{{','.join(COMMANDS)}}} [options]\n\n"
            "Sparse parameter-efficient fine-tuning of causal LMs, scaled with DeepSpeed.\n\n"
            f"commands:\n{rows}\n\n"
            + _fill("`sparse-ft COMMAND --help` shows a command's options; `sparse-ft train --help` also lists "
                    "every config key with its default."))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
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
