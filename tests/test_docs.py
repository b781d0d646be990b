"""The docs site and README: the site builds under ``mkdocs build --strict``, the configuration page is
current, every shell command in a fenced block of README.md or docs/ is either run here (the ones that
need no GPU, hub model or hours) or listed with the reason it is not, and every YAML config shown is
accepted by the config loader."""
import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
PAGES = [p for p in PAGES if "results" not in p.relative_to(ROOT).parts]


def fenced(lang: str) -> list[tuple[Path, str]]:
    blocks = []
    for page in PAGES:
        for m in re.finditer(rf"^ *```{lang}\n(.*?)^ *```", page.read_text(), flags=re.S | re.M):
            blocks.append((page, m.group(1)))
    return blocks


def documented_commands() -> list[tuple[Path, str]]:
    """Each command line of the bash blocks, continuation lines joined, comments dropped."""
    out = []
    for page, body in fenced("bash"):
        for line in body.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                out.append((page, re.sub(r"\s+", " ", line)))
    return out


def run_cli(args: list[str], capsys, monkeypatch):
    """``sparse-ft ARGS`` in this process, from the repository root: (exit code, stdout, stderr)."""
    from sparse_ft.cli import main

    monkeypatch.chdir(ROOT)
    capsys.readouterr()
    try:
        code = main(args)
    except SystemExit as e:  # argparse's --help and usage errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


# -- the generated configuration reference ------------------------------------------------------------

def test_configuration_page_is_current():
    fresh = subprocess.run([sys.executable, str(ROOT / "scripts" / "config_reference.py")], capture_output=True,
                           text=True, check=True).stdout
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert page == fresh, "docs/configuration.md is out of date: run python scripts/config_reference.py --write"


def test_configuration_page_lists_every_key():
    """Independently of the generator: every dataclass field of every section and method has its row."""
    import dataclasses

    from sparse_ft.config import SECTIONS
    from sparse_ft.methods import METHODS

    page = (ROOT / "docs" / "configuration.md").read_text()
    titles = [(f"`{n}`", c) for n, c in SECTIONS.items()] + [(f"`method` (name: {n})", c) for n, c in METHODS.items()]
    for title, cls in titles:
        assert f"## {title}\n" in page, f"docs/configuration.md lacks the section {title}"
        block = page.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
        for f in dataclasses.fields(cls):
            row = re.search(rf"^\| `{f.name}` \| `[^`]*` \| (.*) \|$", block, flags=re.M)
            assert row, f"docs/configuration.md's {title} lacks the key {f.name}"
            assert row.group(1).strip(), f"{title}.{f.name} has no docstring"


# -- the site ---------------------------------------------------------------------------------------

def test_mkdocs_build_strict(tmp_path):
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None:
        pytest.skip("mkdocs and mkdocs-material are not installed (pip install -e '.[docs]')")
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    # the contributor page embeds the example method's tested source
    html = (tmp_path / "site" / "contributing" / "index.html").read_text()
    text = re.sub(r"<[^>]+>", "", html)
    assert "class RowDeltaLinear(DeltaLinear):" in text and "class RowDeltaConfig(MethodConfig):" in text


def test_readme_is_a_landing_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= 12 * 1024, f"README.md is {len(readme.encode())} bytes; move detail to docs/"
    for link in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (ROOT / link).is_file(), f"README links to {link}, which does not exist"


# -- documented commands ----------------------------------------------------------------------------

# Commands run by a test, by their start: where.
EXERCISED = {
    "python3 -m venv .venv": "tests/test_readme.py runs its last part (the demo); .ci/run runs the install",
    "python -m pytest -q": "CI (.ci/run) runs it",
    "sparse-ft sweep --config configs/": "test_documented_sweeps_plan_their_grid (with --print-commands)",
    "sparse-ft train --config configs/sst2_random_mask.yaml": "test_quick_start_config_loads (config and overrides)",
    "python launch/multinode.py": "tests/launch (checks and --dry-run plans); tests/cluster (over ssh, -m cluster)",
    "python launch/torchrun.py": "tests/launch (--dry-run); tests/cluster (two-node torchrun, -m cluster)",
    "python launch/slurm_submit.py": "tests/launch (fit check, --dry-run); tests/cluster (sbatch on a local SLURM)",
    "SLURM_JOB_NODELIST=": "tests/launch (the SLURM launcher's dry run)",
    "for h in $(awk": "tests/cluster: the rsync merge of node-local checkpoints, then a one-node resume",
    "sudo scripts/local_cluster.sh": "tests/cluster's fixture runs the local cluster (-m cluster, as root; .ci/run runs it)",
    'eval "$(scripts/local_cluster.sh env)"': "tests/cluster's fixture",
    "python scripts/demo.py": "tests/test_readme.py runs the demo (slow)",
    "python scripts/demo.py --prepare": "tests/test_quickstart.py runs the README's offline commands as written",
    "sparse-ft train --config configs/demo_smollm2_sst2.yaml": "tests/test_quickstart.py (offline quick start)",
    "sparse-ft export --checkpoint runs/demo-smollm2-sst2": "tests/test_quickstart.py (offline quick start)",
}
# Commands not run by the suite, and why.
NOT_RUN = {
    "cat hostfile": "shows a hostfile's content",
    "worker-1 slots": "a hostfile line, not a command",
    "worker-2 slots": "a hostfile line, not a command",
    "sinfo": "SLURM's own command",
    "bash scripts/gpu_wheels.sh": "downloads wheels for the GPU machine from PyPI",
    "SMOKE=1 BENCH_OUT=": "the GPU benchmark's CPU smoke run (about 2 minutes), run by hand",
    "TORCH_VERSION=2.14.0 scripts/refresh_pins.sh": "as refresh_pins.sh below, with another torch",
    "scripts/refresh_pins.sh": "builds a fresh venv from PyPI and runs the whole suite; tests/test_pins.py checks the pins",
    "deepspeed --num_gpus 8": "needs 8 GPUs (multi-rank ZeRO-3 runs on CPU in tests/training/test_zero3.py)",
    "sparse-ft export --checkpoint runs/opt-1.3b-sst2-random-mask": "needs the trained quick-start run (export: tests/test_export.py)",
    "python scripts/reproduce.py": "an hour of CPU on ../shared/data (the script: tests/scripts/test_reproduce.py)",
}


def test_every_documented_command_is_accounted_for():
    commands = documented_commands()
    assert len(commands) >= 8
    for page, cmd in commands:
        known = [k for k in (*EXERCISED, *NOT_RUN) if cmd.startswith(k)]
        assert known, (f"{page.relative_to(ROOT)}: `{cmd}` is neither exercised by a test nor listed in "
                       "tests/test_docs.py's NOT_RUN with a reason")


def test_documented_sweeps_plan_their_grid(tmp_path, capsys, monkeypatch):
    """Each `sparse-ft sweep` command of the docs, as written plus --print-commands (runs nothing) and a
    temporary --out: it accepts the flags and the config, and plans lr x setting x seed points."""
    sweeps = sorted({cmd for _, cmd in documented_commands() if cmd.startswith("sparse-ft sweep ")})
    assert len(sweeps) >= 2
    for i, cmd in enumerate(sweeps):
        args = shlex.split(cmd)[1:]
        code, stdout, stderr = run_cli([*args, "--out", str(tmp_path / str(i)), "--print-commands"], capsys, monkeypatch)
        assert code == 0, stderr[-2000:]
        grid = 1
        for flag in ("--lr", "--density", "--method", "--seeds"):
            if flag in args:
                grid *= len(args[args.index(flag) + 1].split(","))
        points = [l for l in stdout.splitlines() if l.startswith("sparse-ft train --config")]
        assert len(points) == grid, stdout


def test_quick_start_config_loads(capsys, monkeypatch):
    """The quick start's config with its override loads (the training itself needs the hub model)."""
    from sparse_ft.config import load_config

    cmd = next(c for _, c in documented_commands() if c.startswith("sparse-ft train --config configs/sst2_random_mask.yaml"))
    args = shlex.split(cmd)[2:]
    config, overrides = args[1], args[2:]
    run = load_config(ROOT / config, overrides)
    assert run.train.lr == 3e-2 and run.method.method == "random_mask"
    code, _, err = run_cli(["train", "--config", config, *overrides, "method.density=2"], capsys, monkeypatch)
    assert code == 2 and "method.density" in err


@pytest.mark.parametrize("command", ["train", "export", "sweep", "rpca"])
def test_subcommand_help(command, capsys, monkeypatch):
    code, out, err = run_cli([command, "--help"], capsys, monkeypatch)
    assert code == 0, err[-2000:]
    assert out.startswith("usage: sparse-ft " + command)
    code, out, _ = run_cli(["--help"], capsys, monkeypatch)
    assert code == 0 and command in out


# -- documented configs -----------------------------------------------------------------------------

def test_documented_configs_load(tmp_path, monkeypatch):
    """Every YAML block made of config sections loads: local paths are pointed at temporary folders
    (the config loader checks they exist; the model itself is not loaded)."""
    from sparse_ft.config import from_dict

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    sections = {"model", "method", "task", "train", "deepspeed"}
    checked = 0
    for page, body in fenced("yaml"):
        tree = yaml.safe_load(body)
        if not isinstance(tree, dict) or not set(tree) <= sections:
            continue
        model = tree.setdefault("model", {})
        model.setdefault("name_or_path", str(model_dir))  # a snippet of the other sections
        if str(model.get("name_or_path", "")).startswith(("/", "./")):
            model["name_or_path"] = str(model_dir)
        task = tree.get("task") or {}
        if task.get("data_dir"):
            data = tmp_path / "data" / str(checked)
            (data / task["name"]).mkdir(parents=True)
            (data / task["name"] / "train.jsonl").write_text("")
            task["data_dir"] = str(data)
        files = task.get("data_files")
        if files:  # make the files it names (relative to the working directory), empty
            monkeypatch.chdir(tmp_path)
            for pattern in files.values() if isinstance(files, dict) else [files]:
                path = tmp_path / str(pattern).replace("**/", "").replace("*", "x")
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()
        try:
            from_dict(tree)
        except Exception as e:  # noqa: BLE001
            pytest.fail(f"{page.relative_to(ROOT)}: a YAML config does not load: {e}")
        checked += 1
    assert checked >= 2
