"""The example method of docs/contributing.md (tests/methods/example_method/, one folder plus one
registration) passes the method matrix's shared behaviours: zero-init identity and the trained set,
the compact delta's save and load, merge, and offline HF export read back by plain transformers."""
import pytest
import torch

import sparse_ft
import test_method_matrix as matrix
from example_method import RowDeltaConfig
from method_cases import MethodCase
from sparse_ft.errors import ConfigError
from sparse_ft.methods import METHODS, config_from_dict, register

CASE = MethodCase("row_delta", {"name": "row_delta", "row": 3, "target_modules": ["q_proj", "v_proj"]})


@pytest.fixture
def registered(monkeypatch):
    """``register`` is the one place a method is added (sparse_ft/methods/__init__.py calls it for the
    built-in ones); undone after the test so other tests see the real registry."""
    monkeypatch.setattr("sparse_ft.methods.METHODS", dict(METHODS))
    import sparse_ft.methods as methods

    register(RowDeltaConfig)
    assert methods.METHODS["row_delta"] is RowDeltaConfig
    return RowDeltaConfig


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_example_method_passes_the_matrix(registered, arch, tmp_path):
    matrix.test_zero_init_and_trainable_set(CASE, arch)
    matrix.test_delta_save_load_roundtrip(CASE, arch, tmp_path / "delta")
    matrix.test_merge_matches_and_saves_plain(CASE, arch, tmp_path / "merge")
    matrix.test_export_roundtrip(CASE, arch, tmp_path / "export")


def test_example_method_changes_only_its_row(registered):
    """The update is exactly row ``row`` of each target weight (not a no-op, not elsewhere)."""
    model = matrix.trained_copy(CASE, "llama")
    for _, layer in sparse_ft.api.delta_layers(model):
        dw = layer.delta_weight()
        assert dw[3].abs().sum() > 0 and dw[:3].abs().sum() == 0 and dw[4:].abs().sum() == 0
        x = torch.randn(2, layer.in_features)
        torch.testing.assert_close(layer(x), x @ (layer.weight + dw).t(), rtol=1e-5, atol=1e-5)


def test_example_method_bad_input(registered):
    with pytest.raises(ConfigError, match="method.row"):
        config_from_dict({"name": "row_delta", "row": -1})
    with pytest.raises(ConfigError, match="method.rows is not a field of the row_delta method"):
        config_from_dict({"name": "row_delta", "rows": 1})
