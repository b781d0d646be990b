import pytest

from fault_common import config, outcome
from helpers import make_model_dir, make_sentiment_data


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    return {"model": make_model_dir(tmp / "llama", "llama"), "data": make_sentiment_data(tmp / "data", 96, 32),
            "tmp": tmp}


@pytest.fixture(scope="session")
def reference(assets):
    """One uninterrupted run with checkpoints every 2 of its 8 steps: the outcome every interrupted
    and resumed run must reproduce bitwise, and the source of artifacts the corruption tests damage."""
    from sparse_ft.config import load_config
    from sparse_ft.training.trainer import train

    cfg = config(assets, assets["tmp"], "reference")
    train(load_config(cfg))
    out = assets["tmp"] / "reference"
    return {"cfg": cfg, "out": out, "outcome": outcome(out)}
