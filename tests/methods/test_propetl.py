"""ProPETL in one process: exact top-k masks, the straight-through gradient, masks that move as
scores train, hybrid (OR) masks, Bit-Level Storage against a hand count, the score learning rate,
multi-task deltas and config errors."""
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import sparse_ft
from sparse_ft.errors import ConfigError
from sparse_ft.methods.propetl import ProPETLConfig, set_task, task_delta
from sparse_ft.methods.propetl.layer import (SHARED_ATTR, _ProPETLLayer, hybrid_mask, pack_bits,
                                             topk_mask, unpack_bits)
from helpers import tiny_model

INPUT = torch.tensor([[2, 5, 9, 17, 33, 12, 40, 7], [2, 44, 31, 48, 25, 8, 48, 3]])


def layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _ProPETLLayer)]


def masks_of(model, tensor="lora_A"):
    """name -> the binary mask the layer uses now (prototype replaced by ones would give the same)."""
    out = {}
    for name, layer in layers(model):
        proto = getattr(layer.prototype, tensor)
        out[name] = layer.masks.mask(tensor, proto).detach().clone()
    return out


def randomize(model, scale=0.5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sparse_ft.trainable_parameters(model):
            p.add_(scale * torch.randn(p.shape, generator=gen))


def test_topk_mask_exact_even_with_ties():
    scores = torch.tensor([[0.5, -0.5, 0.5], [0.1, 0.0, -0.5]])
    for k in range(7):
        m = topk_mask(scores, k)
        assert m.sum() == k and set(m.unique().tolist()) <= {0.0, 1.0}
    m = topk_mask(scores, 2)
    assert m[1, 0] == 0 and m[1, 1] == 0  # the kept ones are among the largest |s|
    bits = torch.rand(3, 37) > 0.5
    assert torch.equal(unpack_bits(pack_bits(bits), (3, 37)), bits.float()) and pack_bits(bits).numel() == 14


@pytest.mark.parametrize("prototype,keep", [("lora", 0.1), ("lora", 0.37), ("adapter", 0.5)])
def test_layer_masks_keep_exactly_k_per_tensor(prototype, keep):
    model = sparse_ft.apply(tiny_model("llama"), ProPETLConfig(prototype=prototype, r=4, bottleneck=8,
                                                               keep_ratio=keep))
    randomize(model)
    for name, layer in layers(model):
        for tensor in layer.prototype.masked:
            proto = getattr(layer.prototype, tensor)
            scores = getattr(layer.masks, f"scores_{tensor}")
            m = layer.masks.mask(tensor, proto)
            assert m.sum().item() == round(keep * proto.numel()), (name, tensor)
            kept, dropped = scores.abs()[m == 1], scores.abs()[m == 0]
            assert dropped.numel() == 0 or kept.min() >= dropped.max()


def test_straight_through_gradient_reaches_scores():
    cfg = ProPETLConfig(r=4, alpha=6, keep_ratio=0.5)
    model = sparse_ft.apply(tiny_model("llama"), cfg)
    randomize(model)  # B != 0, so every masked entry matters
    name, layer = layers(model)[0]
    model(input_ids=INPUT).logits.square().mean().backward()
    for tensor in ("lora_A", "lora_B"):
        scores = getattr(layer.masks, f"scores_{tensor}")
        assert scores.grad is not None and scores.grad.abs().sum() > 0
    # Straight-through: d loss / d scores = d loss / d mask = (d loss / d (P * m)) * P.
    x = torch.randn(3, layer.in_features)
    a, b = layer.prototype.lora_A, layer.prototype.lora_B
    m_a = layer.masks.mask("lora_A", a).detach().requires_grad_(True)
    m_b = layer.masks.mask("lora_B", b).detach().requires_grad_(True)
    (x @ (a * m_a).t() @ (b * m_b).t() * layer.scale).sum().backward()
    layer.masks.scores_lora_A.grad = None
    layer.masks.scores_lora_B.grad = None
    (layer(x) - torch.nn.functional.linear(x, layer.weight)).sum().backward()
    torch.testing.assert_close(layer.masks.scores_lora_A.grad, m_a.grad)
    torch.testing.assert_close(layer.masks.scores_lora_B.grad, m_b.grad)


def test_masks_change_as_scores_train_and_scores_get_their_own_lr():
    cfg = ProPETLConfig(r=4, alpha=6, keep_ratio=0.5, score_lr=0.05)
    model = sparse_ft.apply(tiny_model("llama"), cfg)
    randomize(model, scale=0.1)
    train = type("Train", (), {"lr": 1e-3})()
    groups = cfg.optimizer_groups(model, train)
    scores = {id(p) for _, l in layers(model) for p in l.masks.parameters()}
    assert {id(p) for p in groups[1]["params"]} == scores and groups[1]["lr"] == 0.05
    assert not scores & {id(p) for p in groups[0]["params"]} and groups[0]["params"]
    assert ProPETLConfig().optimizer_groups(model, train)[1]["lr"] == pytest.approx(1e-2)  # default: 10x
    before = masks_of(model)
    opt = torch.optim.AdamW(groups, lr=train.lr)
    labels = INPUT.clone()
    losses = []
    for _ in range(12):
        loss = model(input_ids=INPUT, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    after = masks_of(model)
    changed = sum(int((before[n] != after[n]).sum()) for n in before)
    assert changed > 0 and losses[-1] < losses[0]
    for n in after:  # still exactly k
        assert after[n].sum() == before[n].sum()


def test_hybrid_mask_is_or_of_task_and_layer_masks():
    cfg = ProPETLConfig(prototype="adapter", bottleneck=8, tasks=["sst2", "rte"])
    assert cfg.keep_ratio == 0.3 and cfg.task_keep_ratio == 0.3
    model = sparse_ft.apply(tiny_model("llama"), cfg)
    randomize(model)
    shared = getattr(model, SHARED_ATTR)
    for task in ("sst2", "rte"):
        set_task(model, task)
        for name, layer in layers(model):
            proto = layer.prototype.down
            layer_m = layer.masks.mask("down", proto).bool()
            task_m = shared.tasks[task]["adapter"].mask("down", proto).bool()
            with torch.no_grad():
                used = layer.masked("down", torch.float32) != 0
            assert torch.equal(used, (layer_m | task_m) & (proto != 0))
            assert torch.equal(hybrid_mask(layer_m.float(), task_m.float()).bool(), layer_m | task_m)
    assert task_m.sum() == round(0.3 * proto.numel())
    # the two tasks give different models
    set_task(model, 0)
    with torch.no_grad():
        a = model(input_ids=INPUT).logits
        set_task(model, "rte")
        b = model(input_ids=INPUT).logits
    assert not torch.allclose(a, b)
    with pytest.raises(ConfigError, match="not one of this model's tasks"):
        set_task(model, "cb")


def test_multitask_delta_and_single_task_extraction(tmp_path):
    cfg = ProPETLConfig(r=4, alpha=6, tasks=["sst2", "rte"])
    model = sparse_ft.apply(tiny_model("llama"), cfg)
    randomize(model)
    path = sparse_ft.save_delta(model, tmp_path / "mt.safetensors")
    loaded = sparse_ft.load_delta(tiny_model("llama"), path)
    for task in ("sst2", "rte"):
        set_task(model, task)
        set_task(loaded, task)
        with torch.no_grad():
            want = model(input_ids=INPUT).logits
            torch.testing.assert_close(loaded(input_ids=INPUT).logits, want, rtol=0, atol=1e-6)
        single = sparse_ft.load_delta(tiny_model("llama"), task_delta(path, tmp_path / f"{task}.safetensors", task))
        with torch.no_grad():
            torch.testing.assert_close(single(input_ids=INPUT).logits, want, rtol=0, atol=1e-6)
        sparse_ft.merge(single)  # a single-task LoRA delta merges
        with torch.no_grad():
            torch.testing.assert_close(single(input_ids=INPUT).logits, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="task_delta"):
        cfg.layer_delta("model.layers.0.self_attn.q_proj", {}, (64, 64))


def test_single_task_extraction_that_fails_keeps_the_old_file(tmp_path, monkeypatch):
    """A write that dies midway (disk full, kill) leaves the file already at the destination as it
    was, and no temporary file beside it."""
    import safetensors.torch

    model = sparse_ft.apply(tiny_model("llama"), ProPETLConfig(r=4, alpha=6, tasks=["sst2", "rte"]))
    randomize(model)
    path = sparse_ft.save_delta(model, tmp_path / "mt.safetensors")
    dst = task_delta(path, tmp_path / "sst2.safetensors", "sst2")
    before = dst.read_bytes()

    def dies_midway(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", dies_midway)
    with pytest.raises(OSError, match="No space left"):
        task_delta(path, dst, "rte")
    assert dst.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mt.safetensors", "sst2.safetensors"]


def test_bit_level_storage_equals_hand_count(tmp_path):
    # tiny LLaMA: hidden 64, 2 layers, q_proj 64x64, v_proj 32x64 (grouped-query attention).
    L, d, r, bn = 2, 64, 4, 8
    lora = ProPETLConfig(r=r, alpha=6)
    model = sparse_ft.apply(tiny_model("llama"), lora)
    proto = (r * d + d * r) + (r * d + 32 * r)  # q: A 4x64, B 64x4; v: A 4x64, B 32x4
    masks = L * proto  # one bit per prototype entry per layer (all multiples of 8: no padding)
    s = lora.storage(model)
    base = sum(p.numel() for p in tiny_model("llama").parameters())
    assert (s["prototype_parameters"], s["score_parameters"], s["base_parameters"]) == (proto, L * proto, base)
    assert s["trainable_parameters"] == proto + L * proto
    assert s["bit_level_storage_bits"] == 32 * proto + masks
    assert s["bit_level_storage_percent"] == pytest.approx(100 * (32 * proto + masks) / (32 * base))
    assert f"{32 * proto + masks:,} bits" in lora.describe(model)

    adapter = ProPETLConfig(prototype="adapter", bottleneck=bn)
    model_a = sparse_ft.apply(tiny_model("llama"), adapter)
    # paper 003, eq. 14: 32 (2 bn d + bn + d) + 2 bn d L
    assert adapter.storage(model_a)["bit_level_storage_bits"] == 32 * (2 * bn * d + bn + d) + 2 * bn * d * L

    # the compact delta holds exactly that: fp32 prototype + uint8 packed masks, nothing else
    for cfg, m in ((lora, model), (adapter, model_a)):
        path = sparse_ft.save_delta(m, tmp_path / f"{cfg.prototype}.safetensors")
        with safe_open(str(path), framework="pt") as f:
            stored = {k: f.get_tensor(k) for k in f.keys()}
        assert sum(t.numel() * t.element_size() * 8 for t in stored.values()) == cfg.storage(m)["bit_level_storage_bits"]
        assert all(t.dtype == (torch.uint8 if ".mask_" in k else torch.float32) for k, t in stored.items())
        assert not any("scores" in k for k in stored)

    # an odd shape pads each packed mask to whole bytes, and the count says so
    odd = ProPETLConfig(r=3, alpha=6, target_modules=["v_proj"])
    m_odd = sparse_ft.apply(tiny_model("llama"), odd)
    per_layer = math.ceil(3 * 64 / 8) * 8 + math.ceil(32 * 3 / 8) * 8
    assert odd.storage(m_odd)["mask_bits"] == L * per_layer


def test_adapter_sits_after_the_feed_forward_block():
    for arch, suffix in (("llama", "mlp.down_proj"), ("opt", "fc2")):
        model = sparse_ft.apply(tiny_model(arch), ProPETLConfig(prototype="adapter", bottleneck=8))
        names = [n for n, _ in layers(model)]
        assert len(names) == 2 and all(n.endswith(suffix) for n in names)
        shared = getattr(model, SHARED_ATTR)
        assert list(shared.prototypes) == ["adapter"]
        # one prototype object read by every layer; its parameters appear once in the model
        assert len({id(l.prototype) for _, l in layers(model)}) == 1
        assert sum(1 for n, _ in model.named_parameters() if n.endswith("prototypes.adapter.down")) == 1


@pytest.mark.parametrize("section,match", [
    ({"prototype": "prefix"}, r"method\.prototype = 'prefix'; allowed: lora, adapter"),
    ({"keep_ratio": 0}, r"method\.keep_ratio = 0.0 is out of range; allowed: \(0.0, 1.0\]"),
    ({"keep_ratio": 1.5}, r"method\.keep_ratio"),
    ({"task_keep_ratio": -1}, r"method\.task_keep_ratio"),
    ({"r": 0}, r"method\.r = 0; allowed: an integer >= 1"),
    ({"bottleneck": 2.5}, r"method\.bottleneck"),
    ({"activation": "swish"}, r"method\.activation = 'swish'; allowed: relu, gelu, silu, tanh"),
    ({"tasks": ["sst2", "nope"]}, r"method\.tasks: \['nope'\] are not tasks"),
    ({"score_lr": "fast"}, r"method\.score_lr = 'fast'; allowed: a number"),
    ({"scores_lr": 1}, r"method\.scores_lr is not a field of the propetl method \(did you mean 'score_lr'\?\)"),
])
def test_config_errors_name_the_field(section, match):
    from sparse_ft.config import TrainConfig, check_method
    from sparse_ft.methods import config_from_dict

    with pytest.raises(ConfigError, match=match):
        # check_method: the run-level checks (task names against the registry) the config runs
        check_method(config_from_dict({"name": "propetl", **section}), TrainConfig())


def test_yaml_strings_become_numbers_and_defaults_follow_the_kind():
    from sparse_ft.methods import config_from_dict

    cfg = config_from_dict({"name": "propetl", "score_lr": "3e-2", "keep_ratio": "0.2"})
    assert cfg.score_lr == 0.03 and cfg.keep_ratio == 0.2 and cfg.target_modules == ["q_proj", "v_proj"]
    assert (cfg.r, cfg.alpha) == (32, 48.0)
    assert ProPETLConfig(prototype="adapter").keep_ratio == 0.5 and ProPETLConfig().keep_ratio == 0.1
    with pytest.raises(ConfigError, match="keeps none"):
        sparse_ft.apply(tiny_model("llama"), ProPETLConfig(r=1, keep_ratio=0.001))


# -- through the trainer: exact resume, export of the trained model --------------------------------
@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from helpers import make_entailment_data, make_model_dir, make_sentiment_data

    tmp = tmp_path_factory.mktemp("propetl")
    data = make_sentiment_data(tmp / "data", 96, 32)
    make_entailment_data(tmp / "data", 96, 32)
    return {"model": make_model_dir(tmp / "llama", "llama"), "data": data}


def run_config(assets, out_dir, method, *overrides, **train_kw):
    from helpers import base_run_tree, write_yaml

    from sparse_ft.config import load_config

    tree = base_run_tree(assets["model"], assets["data"], out_dir / "out", epochs=1, lr=1e-2, schedule="linear",
                         warmup_steps=2, **train_kw)
    tree["method"] = method
    tree["task"].update(num_train=64, num_test=32)
    return load_config(write_yaml(out_dir / "cfg.yaml", tree), list(overrides))


def metric_rows(out_dir):
    import json

    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def straight_and_resumed(assets, tmp_path, method, stop_at):
    """Train straight (returning the Trainer, whose model stays in memory) and, in another directory,
    stop at ``stop_at`` and resume to the end."""
    from sparse_ft.training.trainer import Trainer, train

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    trainer = Trainer(run_config(assets, tmp_path / "a", method))
    trainer.run()
    split = run_config(assets, tmp_path / "b", method, f"train.stop_after_steps={stop_at}", save_every=100)
    assert train(split) == {"stopped_at_step": stop_at}
    train(run_config(assets, tmp_path / "b", method, "train.resume_from=latest", save_every=100))
    return trainer, tmp_path / "a" / "out", tmp_path / "b" / "out"


def assert_same_run(a, b):
    """Same metrics rows (loss curve, learning rates, storage, evaluations) and the same delta, bit for bit."""
    from safetensors.torch import load_file

    assert strip_speed(metric_rows(a)) == strip_speed(metric_rows(b))
    da, db = load_file(str(a / "delta.safetensors")), load_file(str(b / "delta.safetensors"))
    assert da.keys() == db.keys() and all(torch.equal(da[k], db[k]) for k in da)


def strip_speed(rows):
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "peak_mem_gib")} for r in rows]


def test_lora_run_resumes_exactly_and_exports_the_trained_model(assets, tmp_path):
    from transformers import AutoModelForCausalLM

    from sparse_ft.export import export_hf

    method = {"name": "propetl", "r": 4, "alpha": 6, "keep_ratio": 0.5}
    trainer, a, b = straight_and_resumed(assets, tmp_path, method, stop_at=3)
    assert_same_run(a, b)
    storage = [r for r in metric_rows(a) if "storage/bit_level_storage_bits" in r]
    assert len(storage) == 1 and storage[0]["storage/bit_level_storage_bits"] == 32 * 896 + 2 * 896
    want = logits_of(trainer.model)
    exported = AutoModelForCausalLM.from_pretrained(str(export_hf(a, tmp_path / "hf", dtype="fp32")))
    torch.testing.assert_close(logits_of(exported), want, rtol=1e-5, atol=1e-5)


def test_multitask_adapter_run_resumes_exactly_and_exports_delta_with_loader(assets, tmp_path):
    import importlib.util
    import json

    from sparse_ft.export import export_hf

    method = {"name": "propetl", "prototype": "adapter", "bottleneck": 8, "tasks": ["sst2", "rte"]}
    trainer, a, b = straight_and_resumed(assets, tmp_path, method, stop_at=5)
    assert_same_run(a, b)
    results = json.loads((a / "results.json").read_text())
    assert {"sst2/accuracy", "rte/accuracy", "accuracy"} <= set(results["test"])
    assert results["steps"] == 2 * 64 // 8  # batches from both tasks
    out = export_hf(a, tmp_path / "export", dtype="fp32")
    spec = importlib.util.spec_from_file_location("load_model", out / "load_model.py")
    loader = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loader)
    loaded = loader.load(dtype=torch.float32).eval()
    for task in ("sst2", "rte"):
        set_task(trainer.model, task)
        set_task(loaded, task)
        torch.testing.assert_close(logits_of(loaded), logits_of(trainer.model), rtol=1e-5, atol=1e-5)


def logits_of(model):
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model(input_ids=INPUT).logits.float()
    model.train(was)
    return out


@pytest.mark.parametrize("name", ["propetl_sst2", "propetl_multitask"])
def test_example_configs_load(assets, name):
    from helpers import ROOT

    from sparse_ft.config import load_config

    path = ROOT / "configs" / f"{name}.yaml"
    assert path.read_text().startswith("# deepspeed ") and "--config configs/" in path.read_text().splitlines()[0]
    run = load_config(path, [f"model.name_or_path={assets['model']}", f"task.data_dir={assets['data']}"])
    assert isinstance(run.method, ProPETLConfig)
