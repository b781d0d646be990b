"""A checkpoint holds what trains: its size is bounded by the trained tensors' bytes, whether the
output head is tied to the embeddings or not, at ZeRO 0, 2 and 3 (one process); a finished run leaves
no ``checkpoints/.partial/`` and DeepSpeed's ``zero_to_fp32.py`` sits beside the checkpoints."""
import pytest

import sparse_ft
from sparse_ft.config import load_config
from sparse_ft.training.trainer import Trainer
from helpers import base_run_tree, make_model_dir, make_sentiment_data, write_yaml

# A vocabulary much larger than the tokenizer's: the frozen embedding (and a tied head) is 8192 x 64
# fp32 = 2 MiB, far above the bound below, so one frozen copy in a checkpoint fails the test.
VOCAB = 8192


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from sparse_ft.training.model import _zero3_off

    tmp = tmp_path_factory.mktemp("ckpt_size")
    with _zero3_off():  # a ZeRO-3 run earlier in the process must not partition the tiny models as they are built
        models = {tied: make_model_dir(tmp / f"tied{tied}", "llama", vocab_size=VOCAB, tie_word_embeddings=tied)
                  for tied in (True, False)}
    return {"models": models, "data": make_sentiment_data(tmp / "data", 64, 16)}


@pytest.mark.parametrize("stage", [0, 2, 3])
@pytest.mark.parametrize("tied", [True, False], ids=["tied-head", "untied-head"])
def test_checkpoint_size_is_bounded_by_the_trained_tensors(assets, tmp_path, tied, stage):
    out = tmp_path / "out"
    tree = base_run_tree(assets["models"][tied], assets["data"], out, max_steps=2, save_every=2, epochs=0)
    tree["task"].update(num_train=32, num_test=8)
    tree["deepspeed"]["config"] = f"zero{stage}"
    trainer = Trainer(load_config(write_yaml(tmp_path / "cfg.yaml", tree)))
    trainer.run()
    model = trainer.engine.module
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied

    trained = sum(getattr(p, "ds_numel", p.numel()) * p.element_size()
                  for _, p in sparse_ft.trainable_parameters(model))
    frozen_head = VOCAB * 64 * 4
    assert trained * 100 < frozen_head  # the bound below could not hide a frozen copy of the head
    root = out / "checkpoints"
    step_dir = root / "step-000002"
    sizes = {p.name: p.stat().st_size for p in step_dir.iterdir()}
    # What a checkpoint holds per trained fp32 tensor: itself in the module state, Adam's fp32 master
    # copy and two moments (ZeRO-0 keeps the moments in the module-state file, ZeRO 1-3 in the
    # optimizer file), and in the delta the values plus their indices (int64 at most): at most
    # 1 + 3 + 1 + 2 = 7 times its bytes. Then a fixed part: the RNG state (~15 KB), trainer_state.json
    # and each file's pickle/safetensors framing and names (a few KB). 64 KiB covers that fixed part.
    bound = 7 * trained + 64 * 1024
    assert sum(sizes.values()) <= bound, (sizes, trained, bound)

    assert not (root / ".partial").exists()
    if stage > 0:
        assert (root / "zero_to_fp32.py").is_file() and not (step_dir / "zero_to_fp32.py").exists()
