"""``sparse-ft export --format peft``: for every method with an exact PEFT form, the adapter loaded by
``PeftModel.from_pretrained`` gives the sparse-ft model's logits, and ``merge_and_unload()`` equals
the HF export; methods without one are refused by name."""
import json

import pytest
import torch

import sparse_ft
from sparse_ft.cli import main
from sparse_ft.errors import ConfigError
from sparse_ft.export import export_hf
from sparse_ft.export_peft import export_peft, supertuning_sparsity
from sparse_ft.methods import config_from_dict
from sparse_ft.methods.loreml import LoReMLConfig
from sparse_ft.methods.random_mask import SparseDeltaLinear
from helpers import make_model_dir

peft = pytest.importorskip("peft")

INPUT = torch.tensor([[2, 5, 9, 17, 33, 12, 40, 7], [2, 44, 31, 48, 25, 8, 48, 3]])

CASES = {
    "lora": ({"name": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}, "LORA"),
    # q_proj 64x64 and v_proj 32x64 (GQA): k 205 and 102, not one Super-Tuning fraction without padding
    "random_mask": ({"name": "random_mask", "density": 0.05, "target_modules": ["q_proj", "v_proj"]}, "SUPERTUNING"),
    "random_mask-model": ({"name": "random_mask", "density": 0.002, "density_of": "model",
                           "target_modules": ["q_proj", "v_proj", "down_proj"], "seed": 3}, "SUPERTUNING"),
    "dsee": ({"name": "dsee", "r": 4, "alpha": 8, "n_sparse": 8, "rpca_rank": 8,
              "target_modules": ["q_proj", "v_proj"]}, "SUPERTUNING"),
    "propetl-lora": ({"name": "propetl", "prototype": "lora", "r": 4, "alpha": 6, "keep_ratio": 0.5}, "LORA"),
    "loreml-stage1": ({"name": "loreml", "r": 4, "alpha": 4, "rho": 0.05, "alpha2": 0.5}, "LORA"),
}
REFUSED = {
    "full": ({"name": "full"}, "full"),
    "propetl-adapter": ({"name": "propetl", "prototype": "adapter", "bottleneck": 8}, "propetl with method.prototype = adapter"),
    "dsee-prune": ({"name": "dsee", "r": 4, "alpha": 8, "n_sparse": 8, "rpca_rank": 8, "prune": "unstructured",
                    "prune_ratio": 0.5, "prune_ratio_other": 0.3, "target_modules": ["q_proj", "v_proj"]},
                   "dsee with method.prune = unstructured"),
}


def logits(model):
    with torch.no_grad():
        return model(input_ids=INPUT).logits


def base_model(base_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()


def trained(base_dir, method: dict, seed=0):
    model = sparse_ft.apply(base_model(base_dir), config_from_dict(method))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sparse_ft.trainable_parameters(model):
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def loreml_stage2(base_dir, alpha2):
    cfg = LoReMLConfig(r=4, alpha=4, rho=0.07, alpha2=alpha2)
    model = sparse_ft.apply(base_model(base_dir), cfg)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in sparse_ft.trainable_parameters(model):
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    cfg.to_stage2(model, cfg.stage1_result_of(model))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, SparseDeltaLinear):
                m.values.normal_(0, 0.2, generator=gen)
    return model


def check_peft_matches(tmp_path, base_dir, model, peft_type):
    from peft import PeftModel

    want = logits(model.eval())
    sparse_ft.save_delta(model, tmp_path / "run" / "delta.safetensors", base_model=str(base_dir))
    out = export_peft(tmp_path / "run", tmp_path / "peft")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == peft_type and config["base_model_name_or_path"] == str(base_dir)
    loaded = PeftModel.from_pretrained(base_model(base_dir), str(out)).eval()
    torch.testing.assert_close(logits(loaded), want, rtol=1e-5, atol=1e-5)
    merged = loaded.merge_and_unload()
    hf = base_model(export_hf(tmp_path / "run", tmp_path / "hf", dtype="fp32"))
    got, ref = merged.state_dict(), hf.state_dict()
    assert set(got) == set(ref)
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("case", list(CASES))
def test_peft_adapter_reproduces_the_model(case, tmp_path):
    method, peft_type = CASES[case]
    base_dir = make_model_dir(tmp_path / "base", "llama")
    check_peft_matches(tmp_path, base_dir, trained(base_dir, method), peft_type)


@pytest.mark.parametrize("alpha2", [0.0, 0.5])
def test_loreml_stage2_as_supertuning(alpha2, tmp_path):
    base_dir = make_model_dir(tmp_path / "base", "llama")
    check_peft_matches(tmp_path, base_dir, loreml_stage2(base_dir, alpha2), "SUPERTUNING")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["r"] == (4 if alpha2 else None)


@pytest.mark.parametrize("case", list(REFUSED))
def test_methods_without_peft_form_are_refused(case, tmp_path, capsys):
    method, named = REFUSED[case]
    base_dir = make_model_dir(tmp_path / "base", "llama")
    sparse_ft.save_delta(trained(base_dir, method), tmp_path / "run" / "delta.safetensors", base_model=str(base_dir))
    with pytest.raises(ConfigError, match="--format hf"):
        export_peft(tmp_path / "run", tmp_path / "peft")
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "peft"),
                 "--format", "peft"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err and "--format delta" in err
    assert not (tmp_path / "peft").exists() and not (tmp_path / "peft.partial").exists()


def test_supertuning_sparsity_gives_every_matrix_room():
    for pairs in ([(4096, 205), (2048, 102)], [(6144, 1), (4096, 4096)], [(7, 3), (11, 5), (13, 2)]):
        s = supertuning_sparsity(pairs)
        assert 0 <= s < 1
        got = [int(numel * (1 - s)) for numel, _ in pairs]
        assert all(g >= k for g, (_, k) in zip(got, pairs))
        # the fullest matrix gets exactly its count: no more padding than needed there
        assert min(g - k for g, (_, k) in zip(got, pairs)) == 0
