"""Target selection: suffixes, ``re:`` regular expressions and ``all-linear`` pick the layers they
should on tiny LLaMA and OPT, for every method that targets modules; the log lists them."""
import logging

import pytest
from torch import nn

import sparse_ft
from sparse_ft.errors import ConfigError
from sparse_ft.methods import DeltaLinear, config_from_dict
from sparse_ft.methods.base import find_targets
from helpers import tiny_model
from method_cases import CASES

LAYERS = range(2)
# The Linear layers each architecture has, written out by hand (the head excluded).
LINEAR = {
    "llama": [f"model.layers.{i}.{m}" for i in LAYERS for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")],
    "opt": [f"model.decoder.layers.{i}.{m}" for i in LAYERS for m in (
        "self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj", "fc1", "fc2")],
}


def names(model, targets):
    return sorted(n for n, _ in find_targets(model, targets))


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_all_linear_is_every_linear_but_the_head(arch):
    model = tiny_model(arch)
    assert isinstance(model.lm_head, nn.Linear)
    assert names(model, ["all-linear"]) == sorted(LINEAR[arch])


@pytest.mark.parametrize("arch, pattern, expected", [
    ("llama", r"re:.*layers\.1\.self_attn\.(q|v)_proj", ["model.layers.1.self_attn.q_proj",
                                                         "model.layers.1.self_attn.v_proj"]),
    ("llama", r"re:.*\.mlp\..*", [n for n in LINEAR["llama"] if ".mlp." in n]),
    ("opt", r"re:.*layers\.0\.fc[12]", ["model.decoder.layers.0.fc1", "model.decoder.layers.0.fc2"]),
    ("opt", r"re:.*_proj", [n for n in LINEAR["opt"] if n.endswith("_proj")]),
])
def test_regex_matches_the_whole_name(arch, pattern, expected):
    assert names(tiny_model(arch), [pattern]) == sorted(expected)


def test_regex_is_a_full_match_and_mixes_with_suffixes():
    model = tiny_model("llama")
    # "q_proj" alone as a regex matches no full dotted name; as a suffix it matches both layers.
    with pytest.raises(ConfigError, match=r"\['re:q_proj'\] matched no nn.Linear"):
        find_targets(model, ["re:q_proj"])
    assert names(model, ["o_proj", r"re:model\.layers\.0\.mlp\.up_proj"]) == sorted(
        ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj", "model.layers.0.mlp.up_proj"])


def test_bad_regex_is_a_config_error():
    with pytest.raises(ConfigError, match=r"method.target_modules: 're:\(q' is not a valid regular expression"):
        config_from_dict({"name": "lora", "target_modules": "re:(q"})


def test_log_lists_what_matched(caplog):
    caplog.set_level(logging.INFO, logger="sparse_ft")
    find_targets(tiny_model("llama"), ["all-linear"])
    assert "method.target_modules matched 14 layers: model.layers.*.self_attn.q_proj x2" in caplog.text
    assert "model.layers.*.mlp.down_proj x2" in caplog.text


TARGETING = [c for c in CASES if config_from_dict(c.method).target_modules]  # full fine-tuning targets nothing


@pytest.mark.parametrize("case, arch", [(c, a) for c in TARGETING for a in c.archs],
                         ids=lambda v: getattr(v, "id", v))
def test_every_method_adapts_all_linear(case, arch):
    model = tiny_model(arch)
    method = {**case.method, "target_modules": "all-linear"}
    sparse_ft.apply(model, config_from_dict(method))
    adapted = sorted(n for n, m in model.named_modules() if isinstance(m, DeltaLinear))
    assert adapted == sorted(LINEAR[arch]), case.id
    assert isinstance(model.lm_head, nn.Linear) and not model.lm_head.weight.requires_grad
