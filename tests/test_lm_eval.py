"""``sparse-ft eval`` through lm-evaluation-harness on a local YAML task: the in-memory model (base +
delta) and its HF export score the same, and lm-eval's acc / acc_norm equal train.eval_metric's
``acc`` / ``acc_norm`` on the same examples."""
import json

import pytest
import torch

import sparse_ft
from sparse_ft.cli import main
from sparse_ft.errors import ConfigError
from sparse_ft.export import export_hf
from sparse_ft.tasks import get_task
from sparse_ft.training.evaluate import evaluate as in_training_evaluate
from helpers import make_model_dir, sentiment_rows

pytest.importorskip("lm_eval")

TASK_YAML = """task: tiny_sentiment
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{sentence}}}} It was"
doc_to_choice: ["terrible", "great"]
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    tmp = tmp_path_factory.mktemp("lm_eval")
    base_dir = make_model_dir(tmp / "base", "llama")
    model = sparse_ft.apply(AutoModelForCausalLM.from_pretrained(str(base_dir)),
                            sparse_ft.RandomMaskConfig(density=0.3, target_modules=["q_proj", "v_proj", "down_proj"]))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in sparse_ft.trainable_parameters(model):
            p.add_(0.5 * torch.randn(p.shape, generator=gen))
    sparse_ft.save_delta(model, tmp / "run" / "delta.safetensors", base_model=str(base_dir))
    rows = sentiment_rows(40, seed=5)
    data = tmp / "tiny.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    yaml_file = tmp / "tasks" / "tiny_sentiment.yaml"
    yaml_file.parent.mkdir()
    yaml_file.write_text(TASK_YAML.format(data=data))
    return {"tmp": tmp, "base": base_dir, "run": tmp / "run", "yaml": yaml_file, "rows": rows, "model": model.eval()}


def scores(file):
    res = json.loads(file.read_text())["results"]["tiny_sentiment"]
    return res["acc,none"], res["acc_norm,none"]


@pytest.mark.slow
def test_in_memory_equals_hf_export_and_in_training_definitions(setup, capsys):
    assert main(["eval", "--model", str(setup["run"]), "--tasks", str(setup["yaml"]), "--batch-size", "4"]) == 0
    written = sorted((setup["run"] / "lm_eval").glob("*.json"))
    assert len(written) == 1
    acc, acc_norm = scores(written[0])
    record = json.loads(written[0].read_text())
    assert record["sparse_ft"]["model"]["kind"] == "delta"

    export = export_hf(setup["run"], setup["tmp"] / "hf", dtype="fp32")
    assert main(["eval", "--model", str(export), "--tasks", str(setup["yaml"]), "--batch-size", "4"]) == 0
    exported = sorted((export / "lm_eval").glob("*.json"))
    assert len(exported) == 1
    assert scores(exported[0]) == (acc, acc_norm)

    # train.eval_metric acc / acc_norm are lm-eval's definitions: the same accuracy on the same examples
    task = get_task("sst2")
    examples = [task.example(r) for r in setup["rows"]]
    tok = __import__("transformers").AutoTokenizer.from_pretrained(str(setup["base"]))
    got = {}
    for metric in ("acc", "acc_norm", "mean_logprob"):
        got[metric] = in_training_evaluate(setup["model"], tok, task, examples, batch_size=4, max_length=64,
                                           max_new_tokens=4, device=torch.device("cpu"), rank=0, world=1, zero3=False,
                                           eval_metric=metric)["accuracy"]
    assert got["acc"] == pytest.approx(acc, abs=1e-9)
    assert got["acc_norm"] == pytest.approx(acc_norm, abs=1e-9)
    # the two definitions differ on this model (" terrible" is 9 bytes, " great" 6), so the check has teeth
    assert acc != acc_norm


@pytest.mark.slow  # an unknown name is looked up in lm-eval's whole task index (most of a minute to build)
def test_unknown_task_is_one_line_before_loading(setup, capsys):
    assert main(["eval", "--model", str(setup["run"]), "--tasks", "no_such_task_xyz",
                 "--include-path", str(setup["yaml"].parent)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no_such_task_xyz" in err[0]
    with pytest.raises(ConfigError, match="no such YAML file"):
        sparse_ft.harness.resolve_tasks([str(setup["tmp"] / "missing.yaml")], None)
