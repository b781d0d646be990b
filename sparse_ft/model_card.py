"""Model cards for exports (``README.md`` with the Hub's YAML front matter) and ``--push-to-hub``.

The card says what the export is (base model, method and its settings, trainable count, the
command that made it, how to load it) and carries the run's scores from ``results.json`` in the
Hub's ``model-index`` form. The front matter is built with huggingface_hub's ``ModelCardData``, so
``huggingface_hub.ModelCard.load`` parses it.
"""
from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import torch

from .errors import ConfigError

# Tensors of a delta that hold fixed structure (positions, masks, folded values), not trained values.
_FIXED_SUFFIXES = (".indices", ".fold_U", ".fold_V")


def trainable_count(tensors: dict[str, torch.Tensor]) -> int:
    """Trained values in a compact delta: its floating-point tensors, less fixed ones (a LoReML
    fold, DSEE's pruning state); integer tensors are positions or bit-packed masks."""
    return sum(t.numel() for k, t in tensors.items()
               if t.is_floating_point() and not k.endswith(_FIXED_SUFFIXES) and not k.startswith("dsee_prune."))


def _run_dir(delta_path: Path) -> Path | None:
    """The training run a delta came from: the first of its parents holding ``results.json`` or
    ``run_config.yaml`` (a run's ``delta.safetensors`` or one of its checkpoints)."""
    for parent in list(delta_path.resolve().parents)[:4]:
        if (parent / "results.json").is_file() or (parent / "run_config.yaml").is_file():
            return parent
    return None


def _scores(results: dict) -> list[tuple[str, str, float]]:
    """(split, metric, value) of the final dev/test scores in a run's ``results.json``."""
    out = []
    for split in ("test", "dev"):
        for metric, value in (results.get(split) or {}).items():
            if metric != "n" and isinstance(value, (int, float)) and not isinstance(value, bool):
                out.append((split, metric, float(value)))
    return out


def default_command() -> str:
    """The command line of this process, as a user would retype it."""
    argv = list(sys.argv)
    if argv and Path(argv[0]).name in ("sparse-ft", "cli.py", "__main__.py"):
        argv[0] = "sparse-ft"
    return " ".join(shlex.quote(a) for a in argv)


def build_card(*, base: str, method: dict, n_trainable: int, fmt: str, command: str, results: dict | None,
               task: str | None, peft_type: str | None = None, note: str | None = None,
               describe: str | None = None, eval_metric: str | None = None, trained_by: str | None = None) -> str:
    from huggingface_hub import ModelCardData
    from huggingface_hub.repocard_data import EvalResult

    name = method["name"]
    library = "peft" if fmt == "peft" else "transformers"
    tags = ["sparse-ft", name] + (["peft", peft_type.lower()] if peft_type else [])
    scores = _scores(results or {})
    eval_results = [EvalResult(task_type="text-generation", dataset_type=task or "custom", dataset_name=task or "custom",
                               dataset_split=split, metric_type=metric, metric_value=value,
                               metric_name=f"{split} {metric}") for split, metric, value in scores]
    data = ModelCardData(base_model=base, library_name=library, tags=tags, datasets=[task] if task else None,
                         metrics=sorted({m for _, m, _ in scores}) or None, pipeline_tag="text-generation",
                         model_name=f"{Path(base).name or base}-sparse-ft-{name}" if eval_results else None,
                         eval_results=eval_results or None)
    settings = json.dumps({k: v for k, v in method.items() if k != "name"}, indent=2)
    if fmt == "peft":
        load = ("```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n"
                f"base = AutoModelForCausalLM.from_pretrained({base!r})\n"
                "model = PeftModel.from_pretrained(base, \"THIS_DIR_OR_REPO\")\n"
                "merged = model.merge_and_unload()  # optional: a plain transformers model\n```")
        what = f"A PEFT {peft_type} adapter for `{base}`"
    elif note is not None:
        load = "```python\nfrom load_model import load  # this directory's loader; needs sparse-ft\nmodel = load()\n```"
        what = f"The compact sparse-ft delta for `{base}`, with a loader"
    else:
        load = ("```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                "model = AutoModelForCausalLM.from_pretrained(\"THIS_DIR_OR_REPO\")\n"
                "tokenizer = AutoTokenizer.from_pretrained(\"THIS_DIR_OR_REPO\")\n```")
        what = f"`{base}` with the trained update merged in: a plain Hugging Face model"
    lines = [f"# {name} fine-tune of {base}", "", f"{what}, trained with sparse-ft's `{name}` method.", ""]
    if note:
        lines += [note.strip(), ""]
    lines += ["## Method", "", f"`{name}` with these settings:", "", "```json", settings, "```", "",
              f"Trainable values: {n_trainable:,}" + (f" ({describe})" if describe else ""), ""]
    if scores:
        lines += ["## Results", "", "| split | metric | value |", "|---|---|---|"]
        lines += [f"| {split} | {metric} | {value:.4g} |" for split, metric, value in scores]
        rule = {"acc": "the highest summed log-likelihood (lm-eval's acc)",
                "acc_norm": "the highest summed log-likelihood per byte (lm-eval's acc_norm)"}.get(
            eval_metric or "", "the highest mean log-likelihood per token")
        lines += ["", f"Scores from training (train.eval_metric = {eval_metric or 'mean_logprob'}): a classification "
                  f"prediction is the option with {rule}. `sparse-ft eval` gives lm-evaluation-harness numbers.", ""]
    made = ([trained_by] if trained_by else []) + [command]
    lines += ["## How it was made", "", "```sh", *made, "```", "", "## How to load it", "", load, ""]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)


def write_model_card(out_dir: Path, *, delta_path: Path, meta: dict, tensors: dict[str, torch.Tensor], base: str,
                     fmt: str, command: str | None = None, peft_type: str | None = None,
                     keep_note: bool = False) -> Path:
    """Write ``out_dir/README.md``. With ``keep_note`` the README already there (the loader note of
    a non-mergeable export) becomes a section of the card; otherwise it is replaced (a base
    model's own card copied with its side files describes the base, not this export)."""
    run_dir = _run_dir(Path(delta_path))
    results, task, eval_metric, trained_by = None, None, None, None
    if run_dir is not None:
        try:
            results = json.loads((run_dir / "results.json").read_text())
        except (OSError, ValueError):
            results = None
        try:
            import yaml

            run_config = yaml.safe_load((run_dir / "run_config.yaml").read_text()) or {}
            task = (run_config.get("task") or {}).get("name")
            eval_metric = (run_config.get("train") or {}).get("eval_metric")
            trained_by = f"sparse-ft train --config {run_dir / 'run_config.yaml'}"
        except (OSError, ValueError, AttributeError):
            pass
    readme = Path(out_dir) / "README.md"
    note = readme.read_text() if keep_note and readme.is_file() else None
    if note is not None:
        note = note.replace("# Not a plain Hugging Face checkpoint", "## Not a plain Hugging Face checkpoint")
    card = build_card(base=base, method=meta["method"], n_trainable=trainable_count(tensors), fmt=fmt,
                      command=command or default_command(), results=results, task=task, peft_type=peft_type,
                      note=note, describe=(results or {}).get("method"), eval_metric=eval_metric,
                      trained_by=trained_by)
    readme.write_text(card)
    return readme


def check_hub(repo: str) -> None:
    """Fail in one line, before anything is written, when the Hub cannot be reached or the user is
    not logged in: ``--push-to-hub`` then writes nothing, locally or remotely."""
    from huggingface_hub import HfApi

    if not repo or repo.count("/") > 1:
        raise ConfigError(f"--push-to-hub {repo!r}; allowed: a repository id such as user/name")
    try:
        HfApi().whoami()
    except Exception as e:  # noqa: BLE001 - offline, refused, unauthorised: the same one line to the user
        raise ConfigError(f"--push-to-hub {repo}: the Hugging Face Hub cannot be reached or you are not logged in "
                          f"({type(e).__name__}); nothing was exported or uploaded") from None


def push_to_hub(folder: Path, repo: str, private: bool = False) -> str:
    """Create ``repo`` (if needed) and upload ``folder`` to it; returns the repository's URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        url = api.create_repo(repo, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo, commit_message="Upload sparse-ft export")
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"--push-to-hub {repo}: upload failed ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
                          f"the export is complete at {folder}") from None
    return str(url)

