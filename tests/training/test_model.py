"""Model loading: ZeRO-3 partitioned loading applies only to the load that asked for it."""
import torch

from sparse_ft.config import ModelConfig
from sparse_ft.training import runtime
from sparse_ft.training import model as model_mod
from sparse_ft.training.ds_config import build_ds_config
from sparse_ft.zero import is_partitioned
from helpers import make_model_dir


def test_plain_load_after_a_zero3_load_is_not_partitioned(tmp_path, monkeypatch):
    from transformers.integrations import deepspeed as hf_ds

    # The ZeRO-3 load leaves transformers' HfDeepSpeedConfig pointer set; restore it afterwards.
    monkeypatch.setattr(hf_ds, "_hf_deepspeed_config_weak_ref", hf_ds._hf_deepspeed_config_weak_ref)
    monkeypatch.setattr(model_mod, "_live_hf_ds_configs", [])
    _, world, _ = runtime.init_distributed()
    mc = ModelConfig(name_or_path=str(make_model_dir(tmp_path / "llama")))
    ds = build_ds_config("zero3", {}, micro_batch_size=2, grad_accum=1, world_size=world, max_grad_norm=1.0,
                         precision="fp32", hidden_size=64)
    zero3 = model_mod.load_model(mc, torch.float32, ds)
    assert is_partitioned(zero3.get_input_embeddings().weight)
    plain = model_mod.load_model(mc, torch.float32, None)
    assert not any(is_partitioned(p) for p in plain.parameters())
    assert plain.get_input_embeddings().weight.numel() == plain.config.vocab_size * plain.config.hidden_size
