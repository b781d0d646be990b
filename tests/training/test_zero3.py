"""Two ranks on CPU through the deepspeed launcher, ZeRO-3, tiny LLaMA and OPT: learning, what the
optimizer holds, mask agreement, frozen weights, exact resume, and export from the ZeRO-3 checkpoint."""
import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import ROOT, base_run_tree, make_model_dir, make_sentiment_data, run_deepspeed, write_yaml

pytestmark = pytest.mark.slow
CHECK = ROOT / "tests" / "dist" / "zero3_check.py"
PROBE = torch.tensor([[2, 5, 9, 17, 33, 12, 40, 7], [2, 44, 31, 48, 25, 8, 48, 3]])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Straight runs for LLaMA and OPT, and a LLaMA run stopped at step 5 then resumed."""
    tmp = tmp_path_factory.mktemp("z3")
    data = make_sentiment_data(tmp / "data", 160, 64)
    out = {}
    for arch in ("llama", "opt"):
        model = make_model_dir(tmp / arch, arch)
        tree = base_run_tree(model, data, tmp / f"{arch}-out", eval_before=True, epochs=2, micro_batch_size=4, lr=0.1,
                             save_every=6, schedule="linear", warmup_steps=2)
        tree["deepspeed"] = {"config": "zero3"}
        tree["task"].update(num_train=96, num_test=48)  # 24 steps: ZeRO-3 over gloo is slow on 2 cores
        cfg = write_yaml(tmp / f"{arch}.yaml", tree)
        run_deepspeed(CHECK, ["--config", str(cfg), "--report", str(tmp / f"{arch}-RANK.json")])
        out[arch] = {"dir": tmp / f"{arch}-out", "model": model,
                     "reports": [json.loads((tmp / f"{arch}-{r}.json").read_text()) for r in (0, 1)]}
        if arch == "llama":
            tree["train"]["output_dir"] = str(tmp / "split-out")
            cfg = write_yaml(tmp / "split.yaml", tree)
            run_deepspeed(CHECK, ["--config", str(cfg), "--report", str(tmp / "stop-RANK.json"),
                                  "train.stop_after_steps=5"])
            run_deepspeed(CHECK, ["--config", str(cfg), "--report", str(tmp / "resume-RANK.json"),
                                  "train.resume_from=latest"])
            out["split"] = {"dir": tmp / "split-out"}
    return out


def losses(out_dir):
    rows = [json.loads(l) for l in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["lr"]) for r in rows if "loss" in r]


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_zero3_two_ranks(runs, arch):
    r0, r1 = runs[arch]["reports"]
    assert (r0["world"], r1["world"]) == (2, 2)
    results = r0["results"]
    assert results["test"]["accuracy"] > results["test_before"]["accuracy"] + 0.1, results
    curve = [l for _, l, _ in losses(runs[arch]["dir"])]
    assert sum(curve[-4:]) / 4 < sum(curve[:4]) / 4
    # Only the values train, and the optimizer state is exactly their partitions.
    assert all(n.endswith(".values") for n in r0["trained_names"])
    for r in (r0, r1):
        assert r["state_numel"] == r["fp32_flat_numel"]
        assert abs(r["state_numel"] - r["n_values"] / 2) <= len(r["trained_names"])  # about half each
        assert r["masks_agree"] and r["n_masks"] == 4
        assert r["frozen_unchanged"] and r["n_frozen_checked"] > 10
    assert (r0["state_numel"] - r0["padding"]) + (r1["state_numel"] - r1["padding"]) == r0["n_values"]


def test_zero3_resume_is_exact(runs):
    straight, split = runs["llama"]["dir"], runs["split"]["dir"]
    assert losses(straight) == losses(split)
    a, b = load_file(str(straight / "delta.safetensors")), load_file(str(split / "delta.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # results.json too: train loss, test accuracy before and after (issue 14)
    assert json.loads((straight / "results.json").read_text()) == json.loads((split / "results.json").read_text())


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_export_from_zero3_checkpoint(runs, arch, tmp_path):
    from transformers import AutoModelForCausalLM

    from sparse_ft.export import export_hf
    from sparse_ft.training.checkpoint import read_latest

    ckpt = read_latest(runs[arch]["dir"] / "checkpoints")
    assert ckpt is not None and not (ckpt / "model.safetensors").exists()  # the base is not re-saved
    want = torch.tensor(runs[arch]["reports"][0]["probe_logits"])
    out = export_hf(ckpt, tmp_path / "fp32", dtype="fp32")
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(str(out)).eval()(input_ids=PROBE).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    out = export_hf(ckpt, tmp_path / "bf16", dtype="bf16")
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(str(out)).eval()(input_ids=PROBE).logits.float()
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.05)
