"""``sparse-ft eval``: lm-evaluation-harness on a trained model, with no export needed.

``--model`` takes a run's output directory, a checkpoint directory or a ``delta.safetensors`` (the
base model plus the delta, built in memory with :func:`sparse_ft.load_delta`), an HF export
(``sparse-ft export --format hf``) or a PEFT adapter directory. The model goes to lm-eval's
``HFLM`` as an instance; ``--tasks`` are lm-eval task names or local YAML task files (whose
folders are added to lm-eval's ``TaskManager`` include path, so offline tasks work). Results go to
``<run or export>/lm_eval/<timestamp>.json``.

This is the export layer: it reads deltas and runs (``export.find_delta``), never the trainer.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch

from .errors import ConfigError

logger = logging.getLogger("sparse_ft")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _require_lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise ConfigError("sparse-ft eval needs lm-evaluation-harness: pip install 'sparse-ft[eval]'") from None
    return lm_eval


def _is_hf_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(
        (path / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                                       "pytorch_model.bin.index.json"))


def resolve_tasks(tasks: list[str], include_path: list[str] | None) -> tuple[list[str], list[str]]:
    """(task names, include paths): a task given as a local ``.yaml`` file becomes the name it
    declares (its ``task:`` key) and its folder joins the include path."""
    import yaml

    names, paths = [], [str(Path(p)) for p in include_path or []]
    for task in tasks:
        path = Path(task)
        if path.suffix in (".yaml", ".yml"):
            if not path.is_file():
                raise ConfigError(f"--tasks {task}: no such YAML file")
            try:
                name = (yaml.safe_load(path.read_text()) or {}).get("task")
            except yaml.YAMLError as e:
                raise ConfigError(f"--tasks {task} is not valid YAML: {str(e).splitlines()[0]}") from None
            if not isinstance(name, str):
                raise ConfigError(f"--tasks {task}: the YAML file has no 'task: NAME' key")
            names.append(name)
            if str(path.parent) not in paths:
                paths.append(str(path.parent))
        else:
            names.append(task)
    for p in paths:
        if not Path(p).is_dir():
            raise ConfigError(f"--include-path {p} is not a directory")
    return names, paths


def load_model(source: str | os.PathLike, *, base_model: str | None = None, dtype: str = "fp32",
               device: str | None = None):
    """``(model, tokenizer, results_dir, description)`` for ``source`` (see the module doc)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
    torch_dtype = DTYPES[dtype]
    path = Path(source)
    if path.is_dir() and (path / "adapter_config.json").is_file():
        from peft import PeftModel

        config = json.loads((path / "adapter_config.json").read_text())
        base = base_model or config.get("base_model_name_or_path")
        if not base:
            raise ConfigError(f"{path}/adapter_config.json names no base model; pass --base-model")
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch_dtype)
        model = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
        tokenizer = AutoTokenizer.from_pretrained(base)
        description = {"kind": "peft", "adapter": str(path), "base_model": str(base)}
        results_dir = path
    elif path.is_dir() and _is_hf_model_dir(path):
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        description = {"kind": "hf", "model": str(path)}
        results_dir = path
    else:
        from .delta import load_delta, read_delta
        from .export import find_delta
        from .model_card import _run_dir

        delta_path = find_delta(path)
        _, meta = read_delta(delta_path)
        base = base_model or meta.get("base_model")
        if not base:
            raise ConfigError(f"{delta_path} does not record its base model; pass --base-model")
        if meta.get("quantization"):
            logger.warning("the delta was trained on a %s-quantized base; evaluating it on the unquantized base",
                           meta["quantization"]["scheme"])
        kwargs = json.loads(meta.get("model_kwargs", "{}"))
        run_dir = _run_dir(delta_path)
        tokenizer_name = base
        if run_dir is not None and (run_dir / "run_config.yaml").is_file():
            import yaml

            tokenizer_name = (yaml.safe_load((run_dir / "run_config.yaml").read_text()) or {}).get(
                "model", {}).get("tokenizer") or base
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch_dtype, **kwargs)
        load_delta(model, delta_path)
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_name), **{k: v for k, v in kwargs.items()
                                                                          if k == "trust_remote_code"})
        description = {"kind": "delta", "delta": str(delta_path), "base_model": str(base),
                       "method": meta["method"]}
        results_dir = run_dir or delta_path.parent
    if device:
        model.to(device)
    return model.eval(), tokenizer, Path(results_dir), description


def evaluate(model_source: str | os.PathLike, tasks: list[str], *, include_path: list[str] | None = None,
             base_model: str | None = None, batch_size: int = 8, limit: float | None = None,
             num_fewshot: int | None = None, dtype: str = "fp32", device: str | None = None,
             output_dir: str | os.PathLike | None = None) -> tuple[dict, Path]:
    """Run lm-eval's ``simple_evaluate`` on the model at ``model_source``; returns (lm-eval's
    results dict, the JSON file written)."""
    _require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if not tasks:
        raise ConfigError("--tasks: name at least one lm-eval task or local YAML task file")
    names, paths = resolve_tasks(tasks, include_path)
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size}; allowed: >= 1")
    manager = None
    if paths:
        # lm-eval's own task index takes most of a minute to build: skip it when local YAMLs define every task
        local = TaskManager(include_path=paths, include_defaults=False)
        if all(n in local.all_tasks for n in names):
            manager = local
    if manager is None:
        manager = TaskManager(include_path=paths or None)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"--tasks: {unknown} are not lm-eval tasks (nor defined in {paths or 'any --include-path'}); "
                          "see `lm-eval ls tasks`, or pass a local YAML task file")
    model, tokenizer, results_dir, description = load_model(model_source, base_model=base_model, dtype=dtype,
                                                            device=device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out = simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                          log_samples=False, batch_size=batch_size)
    record = {"sparse_ft": {"model": description, "tasks": names, "include_path": paths, "limit": limit,
                            "num_fewshot": num_fewshot, "dtype": dtype},
              "results": out["results"], "versions": out.get("versions"), "n-shot": out.get("n-shot"),
              "configs": out.get("configs"), "n-samples": out.get("n-samples")}
    target = Path(output_dir) if output_dir else results_dir / "lm_eval"
    target.mkdir(parents=True, exist_ok=True)
    file = target / f"{time.strftime('%Y%m%d-%H%M%S')}.json"
    n = 1
    while file.exists():  # two evaluations in one second: never overwrite the first
        file = target / f"{time.strftime('%Y%m%d-%H%M%S')}-{n}.json"
        n += 1
    tmp = file.with_name(file.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str))
    os.replace(tmp, file)
    return out, file


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="sparse-ft eval",
        description="Evaluate a trained model with lm-evaluation-harness: a run dir, checkpoint or delta (base + "
                    "delta in memory, no export), an HF export or a PEFT adapter dir.")
    parser.add_argument("--model", required=True, help="run output dir, checkpoint dir, delta.safetensors, HF "
                                                       "export dir or PEFT adapter dir")
    parser.add_argument("--tasks", nargs="+", required=True,
                        help="lm-eval task names and/or local YAML task files (offline)")
    parser.add_argument("--include-path", action="append", default=[], help="extra folder of lm-eval task YAMLs")
    parser.add_argument("--base-model", default=None, help="base model dir or hub id (default: the recorded one)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--limit", type=float, default=None, help="examples per task (or a fraction if < 1)")
    parser.add_argument("--num-fewshot", type=int, default=None)
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--device", default=None, help="e.g. cuda:0 (default: where transformers loads it)")
    parser.add_argument("--output-dir", default=None, help="where the results JSON goes (default: <run>/lm_eval)")
    args = parser.parse_args(argv)
    out, file = evaluate(args.model, args.tasks, include_path=args.include_path, base_model=args.base_model,
                         batch_size=args.batch_size, limit=args.limit, num_fewshot=args.num_fewshot, dtype=args.dtype,
                         device=args.device, output_dir=args.output_dir)
    for task, metrics in out["results"].items():
        shown = ", ".join(f"{k.split(',')[0]}={v:.4f}" for k, v in metrics.items()
                          if isinstance(v, (int, float)) and not k.startswith("alias") and "stderr" not in k)
        print(f"{task}: {shown}")
    print(file)
    return 0
