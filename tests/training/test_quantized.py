"""Quantized frozen bases (model.quantization) and 8-bit optimizer state (train.optimizer): bad
combinations fail before loading; every method that can work on an NF4 base computes what it computes
on the dequantized base; a quantized run trains only its values, leaves the packed weights
byte-identical and exports a plain bf16 model that reproduces it."""
import json

import pytest
import torch

import sparse_ft
from sparse_ft.config import load_config
from sparse_ft.errors import ConfigError
from sparse_ft.methods import config_from_dict
from sparse_ft.quant import bnb_status, dequantize, is_quantized_linear
from helpers import base_run_tree, make_model_dir, make_sentiment_data, write_yaml
from method_cases import CASES

needs_bnb = pytest.mark.skipif(bnb_status() is not None, reason=str(bnb_status()))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quantized")
    return {"llama": make_model_dir(tmp / "llama", "llama"), "data": make_sentiment_data(tmp / "data", 160, 64)}


def config_file(assets, tmp_path, model=None, method=None, deepspeed=None, **train):
    tree = base_run_tree(assets["llama"], assets["data"], tmp_path / "out", **train)
    tree["model"].update(model or {})
    if method is not None:
        tree["method"] = method
    if deepspeed is not None:
        tree["deepspeed"]["config"] = deepspeed
    return write_yaml(tmp_path / "cfg.yaml", tree)


def load_quantized(model_dir, kind="nf4"):
    from transformers import AutoModelForCausalLM

    from sparse_ft.quant import bnb_config

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, device_map="cpu",
                                                quantization_config=bnb_config(kind, True, torch.float32)).eval()


# -- validation: before any model is loaded -----------------------------------------------------------
@pytest.fixture
def no_loading(monkeypatch):
    """Any attempt to load a model fails the test: the checks must come first."""
    import transformers

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the config was rejected")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


@pytest.mark.parametrize("model,method,deepspeed,train,message", [
    ({"quantization": "nf3"}, None, None, {}, "model.quantization = 'nf3'; allowed: none, nf4, int8"),
    ({"quantization": "nf4"}, {"name": "full"}, None, {}, "method.name = full with model.quantization = nf4"),
    ({"quantization": "nf4"}, None, "zero3_offload", {}, "offloads parameters and optimizer"),
    ({"quantization": "int8"}, None, "zero3", {}, "model.quantization = int8 with ZeRO-3"),
    ({"quantization": "nf4"}, {"name": "dsee", "prune": "unstructured"}, None, {}, "method.prune = unstructured"),
    ({"quantization": "nf4", "gguf_file": None, "quant_compute_dtype": "fp8"}, None, None, {},
     "model.quant_compute_dtype = 'fp8'; allowed: auto, bf16, fp16, fp32"),
    ({}, None, None, {"optimizer": "adam8"}, "train.optimizer = 'adam8'; allowed: adamw, adamw8bit, paged_adamw8bit"),
    ({}, None, "zero3_offload", {"optimizer": "adamw8bit"}, "offloads the optimizer"),
])
def test_bad_combinations_fail_before_loading(assets, tmp_path, no_loading, model, method, deepspeed, train,
                                              message):
    from sparse_ft.training.trainer import train as run_training

    cfg = config_file(assets, tmp_path, model=model, method=method, deepspeed=deepspeed, **train)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run_training(load_config(cfg))


def test_without_bitsandbytes_the_message_says_so(assets, tmp_path, no_loading, monkeypatch):
    import sparse_ft.quant as quant

    monkeypatch.setattr(quant, "bnb_status", lambda: "bitsandbytes is not importable (ModuleNotFoundError)")
    for overrides, field in ((["train.optimizer=adamw8bit"], "train.optimizer = adamw8bit"),
                             (["model.quantization=nf4"], "model.quantization = nf4")):
        with pytest.raises(ConfigError, match=f"{field} needs bitsandbytes: bitsandbytes is not importable"):
            load_config(config_file(assets, tmp_path), overrides)


# -- every method that can work on a quantized base: same result as on the dequantized base ---------
QUANTIZABLE = [c for c in CASES if "llama" in c.archs and c.id not in ("full", "dsee-prune")]


def trained_pair(model_dir, method: dict, cache_dir):
    """(NF4 model, plain fp32 model holding exactly the dequantized NF4 weights), both with
    ``method`` applied and the same random values in every trained tensor."""
    from transformers import AutoModelForCausalLM

    quantized = load_quantized(model_dir)
    dense = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    modules = dict(dense.named_modules())
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if is_quantized_linear(module):
                modules[name].weight.copy_(dequantize(module.weight))
    if method["name"] == "dsee":
        method = {**method, "omega_cache_dir": str(cache_dir)}
    pair = []
    for model in (quantized, dense):
        sparse_ft.apply(model, config_from_dict(method))
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for _, p in sparse_ft.trainable_parameters(model):
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
        pair.append(model)
    return pair


def loss_and_grads(model):
    ids = torch.tensor([[2, 5, 9, 17, 33, 12, 40, 7], [2, 44, 31, 48, 25, 8, 48, 3]])
    model.zero_grad()
    logits = model(input_ids=ids).logits
    (logits.float() ** 2).mean().backward()
    return logits.detach(), {n: p.grad for n, p in sparse_ft.trainable_parameters(model)}


# Tolerances, on either bitsandbytes CPU path (the ``bnb_cpu_path`` fixture forces each): both models
# hold bit-identical fp32 weights (the NF4 model dequantizes the very bytes the dense copy was made
# from), so the only difference is the order of fp32 sums inside matmuls (bnb's matmul vs nn.Linear,
# the sparse ops' transient weight vs an in-place one). One dot product of width K <= 96 then differs
# by at most K * 2^-24 * sum|x_i w_i| (< 6e-6 relative to that sum); two decoder layers of about six
# matmuls each, RMSNorm and softmax in between, compound it to well under 1e-4 of the logits' and
# gradients' scale. A path that computed in bf16 (bitsandbytes' AVX512-BF16 kernel) would miss by
# 2^-9 per rounded input, ~100x more, which is what these tolerances are there to catch.
@needs_bnb
@pytest.mark.parametrize("case", QUANTIZABLE, ids=lambda c: c.id)
def test_method_on_nf4_base_equals_dequantized_base(assets, tmp_path, case, bnb_cpu_path):
    quantized, dense = trained_pair(assets["llama"], case.method, tmp_path)
    names = [n for n, _ in sparse_ft.trainable_parameters(quantized)]
    assert names == [n for n, _ in sparse_ft.trainable_parameters(dense)]
    assert all(not is_quantized_linear(m) or not m.weight.requires_grad for m in quantized.modules())
    lq, gq = loss_and_grads(quantized)
    ld, gd = loss_and_grads(dense)
    torch.testing.assert_close(lq, ld, rtol=1e-4, atol=1e-5)
    for name in names:
        assert gq[name] is not None, f"no gradient reached {name}"
        torch.testing.assert_close(gq[name], gd[name], rtol=1e-4, atol=1e-6, msg=name)


@needs_bnb
def test_loreml_stage2_on_nf4_base_adds_the_fold(assets, tmp_path, bnb_cpu_path):
    """Stage 2 cannot fold alpha2 U V into packed weights; the quantized layer adds it transiently."""
    method = {"name": "loreml", "r": 4, "alpha": 4, "rho": 0.05, "alpha2": 0.5}
    quantized, dense = trained_pair(assets["llama"], method, tmp_path)
    config = sparse_ft.api.method_config(quantized)
    results = [config.stage1_result_of(m) for m in (quantized, dense)]
    for model, result in zip((quantized, dense), results):
        config.to_stage2(model, result)
        with torch.no_grad():
            for _, p in sparse_ft.trainable_parameters(model):
                p.copy_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    lq, gq = loss_and_grads(quantized)
    ld, gd = loss_and_grads(dense)
    torch.testing.assert_close(lq, ld, rtol=1e-4, atol=1e-5)
    assert gq.keys() == gd.keys() and all(k.endswith(".values") for k in gq)
    for name in gq:
        torch.testing.assert_close(gq[name], gd[name], rtol=1e-4, atol=1e-6, msg=name)


# -- training, byte-identical base, export ----------------------------------------------------------
def losses(out_dir):
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@needs_bnb
def test_nf4_random_mask_trains_and_exports(assets, tmp_path, bnb_cpu_path):
    """Evaluation runs between epochs: on the AVX512-BF16 path bitsandbytes would repack the untargeted
    layers there (and fail on the tiny down_proj); the packed bytes must stay as loaded throughout."""
    from transformers import AutoModelForCausalLM

    from sparse_ft.export import export_hf
    from sparse_ft.training.trainer import Trainer

    cfg = config_file(assets, tmp_path, model={"quantization": "nf4", "quant_compute_dtype": "fp32"}, epochs=2)
    trainer = Trainer(load_config(cfg))
    trainer.run()
    out = tmp_path / "out"
    curve = losses(out)
    assert sum(curve[-5:]) / 5 < sum(curve[:5]) / 5 - 0.2, curve

    model = trainer.engine.module.eval()
    trained = [n for n, _ in sparse_ft.trainable_parameters(model)]
    assert trained and all(n.endswith(".values") for n in trained)
    fresh = dict(load_quantized(assets["llama"]).named_modules())
    quantized = [(n, m) for n, m in model.named_modules() if getattr(m, "weight", None) is not None
                 and type(m.weight).__name__ == "Params4bit"]
    assert len(quantized) == 14  # q, k, v, o, gate, up, down in both layers (lm_head stays unquantized)
    for name, module in quantized:
        # Packed bytes in fp32 storage include NaN bit patterns: compare the bytes, not the floats.
        got, want = module.weight.data.view(torch.uint8), fresh[name].weight.data.view(torch.uint8)
        assert torch.equal(got, want), f"{name}: packed weight changed"

    exported = export_hf(out, tmp_path / "hf", dtype="bf16")
    provenance = json.loads((exported / "sparse_ft_export.json").read_text())
    assert provenance["dequantized"]["scheme"] == "nf4"
    plain = AutoModelForCausalLM.from_pretrained(str(exported))
    assert plain.dtype == torch.bfloat16 and getattr(plain.config, "quantization_config", None) is None
    plain = plain.float().eval()
    ids = torch.tensor([[2, 5, 9, 17, 33, 12, 40, 7], [2, 44, 31, 48, 25, 8, 48, 3]])
    with torch.no_grad():
        want = model(input_ids=ids).logits
        got = plain(input_ids=ids).logits
    # The exported weights are the dequantized NF4 weights plus the delta, rounded to bf16 (8
    # significant bits: 2^-9 relative per weight); through this 2-layer model that moves the logits
    # (about 0.5 in size) by a few 1e-3. The tolerance is 2e-2; merging into the unquantized weights
    # instead would miss by the NF4 error itself (~1e-1 here), which the second check shows.
    err = (got - want).abs().max().item()
    assert err < 2e-2, err
    unquantized = AutoModelForCausalLM.from_pretrained(str(assets["llama"]), dtype=torch.float32).eval()
    sparse_ft.load_delta(unquantized, out / "delta.safetensors")  # fingerprint matches via re-quantization
    sparse_ft.merge(unquantized)
    with torch.no_grad():
        naive = (unquantized(input_ids=ids).logits - want).abs().max().item()
    assert naive > 3 * err, (naive, err)


@needs_bnb
def test_delta_of_quantized_run_loads_onto_the_quantized_base(assets, tmp_path, bnb_cpu_path):
    model = load_quantized(assets["llama"])
    sparse_ft.apply(model, config_from_dict({"name": "random_mask", "density": 0.05}))
    with torch.no_grad():
        for _, p in sparse_ft.trainable_parameters(model):
            p.normal_(0, 0.05)
    path = sparse_ft.save_delta(model, tmp_path / "delta.safetensors", base_model=str(assets["llama"]))
    _, meta = sparse_ft.delta.read_delta(path)
    assert meta["quantization"]["scheme"] == "nf4" and len(meta["quantization"]["modules"]) == 14
    again = sparse_ft.load_delta(load_quantized(assets["llama"]), path)
    ids = torch.tensor([[2, 5, 9, 17, 33, 12, 40, 7]])
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)
    from transformers import AutoModelForCausalLM

    other = AutoModelForCausalLM.from_pretrained(str(make_model_dir(tmp_path / "other", seed=5)), dtype=torch.float32,
                                                 device_map="cpu",
                                                 quantization_config=sparse_ft.quant.bnb_config("nf4", True, torch.float32))
    with pytest.raises(ConfigError, match="wrong base model"):
        sparse_ft.load_delta(other, path)


@needs_bnb
def test_int8_base_with_adamw8bit_trains(assets, tmp_path):
    """4096 values on one matrix: bitsandbytes keeps 8-bit state only for tensors of 4096+ entries."""
    from sparse_ft.training.trainer import Trainer

    method = {"name": "random_mask", "density": 1.0, "target_modules": ["q_proj"]}
    cfg = config_file(assets, tmp_path, model={"quantization": "int8"}, method=method, optimizer="adamw8bit",
                      lr=1e-2, epochs=2)
    trainer = Trainer(load_config(cfg))
    trainer.run()
    curve = losses(tmp_path / "out")
    assert sum(curve[-5:]) / 5 < sum(curve[:5]) / 5 - 0.2, curve
    optimizer = trainer.engine.optimizer
    import bitsandbytes as bnb

    assert isinstance(optimizer, bnb.optim.AdamW8bit)
    states = [s for s in optimizer.state.values() if "state1" in s]
    assert states and all(s["state1"].dtype == torch.uint8 for s in states)


@needs_bnb
def test_full_finetuning_with_adamw8bit_trains(assets, tmp_path):
    from sparse_ft.training.trainer import train

    cfg = config_file(assets, tmp_path, method={"name": "full"}, optimizer="adamw8bit", lr=1e-3, max_steps=12)
    train(load_config(cfg))
    curve = losses(tmp_path / "out")
    assert sum(curve[-4:]) / 4 < sum(curve[:4]) / 4 - 0.2, curve
