"""LoReML in one process: the stage-2 mask (exactly rho of each matrix, from the largest |U V|), the
fold W <- W + alpha2 U V, the compact delta of each stage (load, fingerprint, offline export equal
to the in-memory model), the stage-1 result file and config errors."""
import pytest
import torch

import sparse_ft
from sparse_ft.errors import ConfigError
from sparse_ft.methods.lora.layer import LoRALinear
from sparse_ft.methods.loreml import FoldedSparseDeltaLinear, LoReMLConfig
from sparse_ft.methods.random_mask.layer import SparseDeltaLinear
from helpers import make_model_dir, tiny_model

INPUT = torch.tensor([[2, 5, 9, 17, 33, 12, 40, 7], [2, 44, 31, 48, 25, 8, 48, 3]])


def logits(model):
    with torch.no_grad():
        return model(input_ids=INPUT).logits


def stage1_trained(arch="llama", model=None, seed=0, **kw):
    """A model in LoReML stage 1 whose U V are set to random values (as if trained)."""
    cfg = LoReMLConfig(**{"r": 4, "alpha": 4, "rho": 0.05, **kw})
    model = sparse_ft.apply(model if model is not None else tiny_model(arch), cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sparse_ft.trainable_parameters(model):
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return model, cfg


def to_stage2(model, cfg):
    result = cfg.stage1_result_of(model)
    cfg.to_stage2(model, result)
    return result


def sparse_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SparseDeltaLinear)]


@pytest.mark.parametrize("rho", [0.05, 0.013])
def test_stage2_mask_is_exactly_rho_of_the_largest_UV(rho):
    model, cfg = stage1_trained(rho=rho)
    uv = {n: (m.lora_B @ m.lora_A).detach() for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    to_stage2(model, cfg)
    assert len(sparse_layers(model)) == len(uv) == 4
    for name, layer in sparse_layers(model):
        assert isinstance(layer, FoldedSparseDeltaLinear)  # the Random Masking module, learned indices
        flat = uv[name].abs().reshape(-1)
        k = round(rho * flat.numel())
        idx = layer.indices.long()
        assert idx.numel() == k and torch.equal(idx, idx.unique())  # sorted, distinct
        inside = torch.zeros_like(flat, dtype=torch.bool)
        inside[idx] = True
        assert flat[inside].min() >= flat[~inside].max()
        assert layer.values.requires_grad and torch.equal(layer.values, torch.zeros(k))
    assert {n for n, _ in sparse_ft.trainable_parameters(model)} == {f"{n}.values" for n in uv}


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_alpha2_zero_and_zero_values_give_the_base_model(arch):
    ref = logits(tiny_model(arch))
    model, cfg = stage1_trained(arch, alpha2=0.0)
    assert not torch.allclose(logits(model), ref)  # stage 1 changed the model...
    to_stage2(model, cfg)
    assert torch.equal(logits(model), ref)  # ...stage 2 with alpha2 = 0 and zero values is the base


def test_alpha2_equal_to_stage1_scale_keeps_the_stage1_model():
    model, cfg = stage1_trained(alpha=8, alpha2=2.0)  # r = 4: stage 1 trains (8 / 4) U V
    want = logits(model)
    to_stage2(model, cfg)
    torch.testing.assert_close(logits(model), want, rtol=1e-5, atol=1e-5)


def test_stage2_folds_alpha2_UV_into_the_weights():
    base = tiny_model("llama")
    model, cfg = stage1_trained(alpha2=0.7)
    result = to_stage2(model, cfg)
    for name, layer in sparse_layers(model):
        U, V, _ = result[name]
        want = base.get_submodule(name).weight + 0.7 * (U @ V)
        torch.testing.assert_close(layer.weight, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_stage2_delta_load_merge_and_offline_export_match(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    from sparse_ft.export import export_hf

    base_dir = make_model_dir(tmp_path / "base", arch)
    model, cfg = stage1_trained(model=AutoModelForCausalLM.from_pretrained(str(base_dir)), alpha2=0.5)
    to_stage2(model, cfg)
    with torch.no_grad():
        for _, layer in sparse_layers(model):
            layer.values.normal_(0, 0.2)
    want = logits(model.eval())
    path = sparse_ft.save_delta(model, tmp_path / "run" / "delta.safetensors", base_model=str(base_dir))
    # the fingerprint describes the base, not the folded weights: loading onto the base works
    loaded = sparse_ft.load_delta(AutoModelForCausalLM.from_pretrained(str(base_dir)), path)
    torch.testing.assert_close(logits(loaded), want, rtol=0, atol=1e-6)
    with pytest.raises(ConfigError, match="wrong base model"):
        sparse_ft.load_delta(tiny_model(arch, seed=4), path)
    # offline export: W + alpha2 U V + S, read back by plain transformers
    out = export_hf(tmp_path / "run", tmp_path / "export", dtype="fp32")
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(str(out))), want, rtol=1e-5, atol=1e-5)
    # the in-memory merge folds the same
    sparse_ft.merge(model)
    torch.testing.assert_close(logits(model), want, rtol=1e-5, atol=1e-5)


def test_stage1_result_file_reruns_stage2_alone(tmp_path):
    model, cfg = stage1_trained(alpha2=0.5)
    result = cfg.stage1_result_of(model)
    path = tmp_path / "loreml_stage1.safetensors"
    cfg.write_stage1(path, result, model, write=True)
    cfg.to_stage2(model, result)
    want = logits(model)
    rerun = LoReMLConfig(r=4, alpha=4, rho=0.05, alpha2=0.5, stage1_result=str(path))
    from sparse_ft.config import TrainConfig

    assert [s.name for s in rerun.stages(TrainConfig())] == ["stage2"]
    again = sparse_ft.apply(tiny_model("llama"), rerun)
    torch.testing.assert_close(logits(again), want, rtol=0, atol=0)
    a = {n: m.indices for n, m in sparse_layers(model)}
    assert all(torch.equal(m.indices, a[n]) for n, m in sparse_layers(again))
    # another rho recomputes the masks from the saved U V
    other = sparse_ft.apply(tiny_model("llama"), LoReMLConfig(r=4, rho=0.1, stage1_result=str(path)))
    assert all(m.indices.numel() == round(0.1 * m.weight.numel()) for _, m in sparse_layers(other))
    with pytest.raises(ConfigError, match="wrong base model"):
        sparse_ft.apply(tiny_model("llama", seed=9), rerun)
    with pytest.raises(ConfigError, match="method.stage1_result"):
        sparse_ft.apply(tiny_model("llama"), LoReMLConfig(stage1_result=str(tmp_path / "missing")))


def test_stages_carry_their_own_settings():
    from sparse_ft.config import TrainConfig

    cfg = LoReMLConfig(stage1={"lr": "5e-5", "epochs": 5, "micro_batch_size": 16},
                       stage2={"lr": 1e-4, "max_steps": "30"})
    s1, s2 = cfg.stages(TrainConfig(lr=1e-3, epochs=2, micro_batch_size=8, output_dir="x"))
    assert (s1.name, s1.train.lr, s1.train.epochs, s1.train.micro_batch_size) == ("stage1", 5e-5, 5.0, 16)
    assert (s2.name, s2.train.lr, s2.train.max_steps, s2.train.micro_batch_size) == ("stage2", 1e-4, 30, 8)
    assert s1.before is None and s2.before is not None
    assert s1.train.output_dir == s2.train.output_dir == "x"


@pytest.mark.parametrize("section,match", [
    ({"rho": 0}, r"method\.rho = 0.0 is out of range; allowed: \(0.0, 1.0\]"),
    ({"rho": 2}, r"method\.rho"),
    ({"alpha2": -1}, r"method\.alpha2 = -1.0 is out of range; allowed: \[0.0, inf\)"),
    ({"r": 0}, r"method\.r = 0; allowed: an integer >= 1"),
    ({"stage1": {"lrr": 1}}, r"method\.stage1\.lrr is not a train key; allowed: .*lr"),
    ({"stage2": {"output_dir": "x"}}, r"method\.stage2\.output_dir: train\.output_dir is set for the whole run"),
    ({"stage2": {"lr": "fast"}}, r"method\.stage2\.lr = 'fast'; allowed: a number"),
    ({"stage1": 3}, r"method\.stage1 = 3; allowed: a mapping"),
])
def test_config_errors_name_the_field(section, match):
    from sparse_ft.config import TrainConfig, check_method
    from sparse_ft.methods import config_from_dict

    with pytest.raises(ConfigError, match=match):
        # check_method: the run-level checks (each stage's train settings) the config runs
        check_method(config_from_dict({"name": "loreml", **section}), TrainConfig())


# -- through the trainer: both stages, exact resume in either stage, export -----------------------
def test_two_stage_run_resumes_exactly_in_either_stage_and_exports(tmp_path):
    import json

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from helpers import base_run_tree, make_sentiment_data, write_yaml
    from sparse_ft.config import load_config
    from sparse_ft.export import export_hf
    from sparse_ft.training.trainer import Trainer, train

    model_dir = make_model_dir(tmp_path / "llama", "llama")
    data = make_sentiment_data(tmp_path / "data", 96, 32)
    method = {"name": "loreml", "r": 4, "alpha": 4, "rho": 0.05, "alpha2": 0.5,
              "stage1": {"lr": 1e-2, "max_steps": 4}, "stage2": {"lr": 5e-2, "max_steps": 4}}

    def cfg(name, *overrides, **train_kw):
        tree = base_run_tree(model_dir, data, tmp_path / name, schedule="linear", warmup_steps=1, **train_kw)
        tree["method"] = method
        tree["task"].update(num_train=64, num_test=16)
        return load_config(write_yaml(tmp_path / f"{name}.yaml", tree), list(overrides))

    trainer = Trainer(cfg("straight"))
    trainer.run()
    assert [r for r in trainer.run_config.method.stages(trainer.run_config.train)][1].train.lr == 5e-2
    # stop 3 steps into stage 1; resume: stage 1 ends, stage 2 stops after 3; resume: re-fold, finish
    assert train(cfg("split", "train.stop_after_steps=3", save_every=100)) == {"stopped_at_step": 3}
    assert train(cfg("split", "train.stop_after_steps=3", "train.resume_from=latest", save_every=100)) == \
        {"stopped_at_step": 3}
    assert (tmp_path / "split" / "checkpoints" / "latest").read_text() == "stage1-step-000003"
    train(cfg("split", "train.resume_from=latest", save_every=100))

    def rows(name):
        lines = [json.loads(l) for l in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "peak_mem_gib")} for r in lines]

    assert rows("straight") == rows("split")
    assert [r["stage"] for r in rows("straight") if "loss" in r] == ["stage1"] * 4 + ["stage2"] * 4
    for f in ("delta.safetensors", "loreml_stage1.safetensors"):
        a, b = load_file(str(tmp_path / "straight" / f)), load_file(str(tmp_path / "split" / f))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    delta = load_file(str(tmp_path / "straight" / "delta.safetensors"))
    assert any(k.endswith(".values") and v.abs().sum() > 0 for k, v in delta.items())
    want = logits(trainer.model.eval())
    exported = AutoModelForCausalLM.from_pretrained(str(export_hf(tmp_path / "straight", tmp_path / "hf",
                                                                  dtype="fp32")))
    torch.testing.assert_close(logits(exported), want, rtol=1e-5, atol=1e-5)


def test_example_config_loads(tmp_path):
    from helpers import ROOT, make_sentiment_data

    from sparse_ft.config import load_config

    path = ROOT / "configs" / "loreml_sst2.yaml"
    assert path.read_text().startswith("# deepspeed ") and "--config configs/loreml_sst2.yaml" in path.read_text()
    run = load_config(path, [f"model.name_or_path={make_model_dir(tmp_path / 'm')}",
                             f"task.data_dir={make_sentiment_data(tmp_path / 'd', 8, 4)}"])
    s1, s2 = run.method.stages(run.train)
    assert (s1.train.lr, s2.train.lr, s1.train.micro_batch_size, s2.train.micro_batch_size) == (5e-5, 1e-4, 16, 32)
