"""Launchers: exact dry-run commands, SLURM node lists, and every input check, without launching.

``sparse_ft.launch.common._launch`` is replaced for every test, so nothing here can start a real
launch; the thin ``launch/*.py`` scripts run as subprocesses with ``--dry-run`` only.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sparse_ft.errors import ConfigError
from sparse_ft.launch import common, hostfile as hostfiles, multinode
from sparse_ft.config import parse_overrides, set_dotted
from sparse_ft.launch.multinode import multinode_main
from sparse_ft.launch.slurm import expand_nodelist, slurm_main
from sparse_ft.launch.torchrun import torchrun_main

ROOT = Path(__file__).resolve().parents[2]
TRAIN = str(common.TRAIN_SCRIPT)  # tests run from tmp dirs, so the script shows as an absolute path
SLURM_VARS = ("SLURM_JOB_NODELIST", "SLURM_NODELIST", "SLURM_NNODES", "SLURM_JOB_NUM_NODES", "SLURM_JOB_ID",
              "SLURM_JOBID", "SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE", "SLURM_CPUS_PER_TASK")
TWO_NODES = "# two nodes of 8 GPUs\nworker-1 slots=8\n\nworker-2 slots=8  # spare\n"


class Launched(Exception):
    """Raised by the stand-in for subprocess.run: a test reached a launch it did not expect."""


@pytest.fixture(autouse=True)
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DS_ENV_FILE", raising=False)
    for name in SLURM_VARS:
        monkeypatch.delenv(name, raising=False)

    def no_launch(command, env):
        raise Launched(command)

    monkeypatch.setattr(common, "_launch", no_launch)
    # The default rendezvous port of a deepspeed launch is a free port of this machine.
    monkeypatch.setattr(multinode, "free_port", lambda: 29555)
    return tmp_path


@pytest.fixture
def config(workdir) -> Path:
    tree = {"model": {"name_or_path": "/models/llama-13b"}, "train": {"lr": 1e-3},
            "deepspeed": {"config": "zero3", "overrides": {"zero_optimization": {"stage3_max_live_parameters": 1e8}}}}
    path = workdir / "run.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.fixture
def hostfile(workdir) -> Path:
    path = workdir / "hostfile"
    path.write_text(TWO_NODES)
    return path


class FakeLaunch(list):
    """Stands in for the launch: records (command, env) and returns ``code``."""

    code = 0

    def __call__(self, command: list[str], env: dict[str, str]) -> int:
        self.append((command, env))
        return self.code


@pytest.fixture
def fake_run(monkeypatch) -> FakeLaunch:
    fake = FakeLaunch()
    monkeypatch.setattr(common, "_launch", fake)
    monkeypatch.setattr(common.shutil, "which", lambda name: f"/usr/bin/{name}")
    return fake


def call(main, argv, capsys, **kwargs) -> tuple[int, str, str]:
    code = main([str(a) for a in argv], **kwargs)
    out, err = capsys.readouterr()
    return code, out, err


def slurm_env(monkeypatch, nodelist="gpu[001-002]", nnodes="2", job_id="4242", gpus="8") -> None:
    for name, value in (("SLURM_JOB_NODELIST", nodelist), ("SLURM_NNODES", nnodes), ("SLURM_JOB_ID", job_id),
                        ("SLURM_GPUS_ON_NODE", gpus)):
        if value is not None:
            monkeypatch.setenv(name, value)


# --------------------------------------------------------------------------- deepspeed launcher


def test_multinode_dry_run_prints_env_file_and_exact_command(hostfile, config, capsys, workdir):
    code, out, err = call(multinode_main, [
        "--hostfile", "hostfile", "--include", "worker-1:0,1@worker-2", "--master-addr", "10.0.0.1",
        "--master-port", "29600", "--env", "NCCL_SOCKET_IFNAME=eth0", "--env", "NCCL_IB_DISABLE=1",
        "--dry-run", "--config", "run.yaml", "train.lr=1e-2"], capsys)
    assert (code, err) == (0, "")
    env_file = workdir / "runs/default/launch/deepspeed_env"  # the run's own, under train.output_dir
    assert out == (
        "# runs/default/launch/deepspeed_env\nNCCL_SOCKET_IFNAME=eth0\nNCCL_IB_DISABLE=1\n"
        "# command\n"
        f"DS_ENV_FILE={env_file} NCCL_SOCKET_IFNAME=eth0 NCCL_IB_DISABLE=1 deepspeed --hostfile hostfile "
        "--include worker-1:0,1@worker-2 "
        f"--master_addr 10.0.0.1 --master_port 29600 {TRAIN} --config run.yaml train.lr=1e-2\n")
    assert not (workdir / "runs").exists(), "a dry run writes nothing"


def test_multinode_plan_command_list(hostfile, config):
    launch = multinode.DeepSpeedLaunch(hostfile="hostfile", num_nodes=2, num_gpus=4)
    plan = multinode.deepspeed_plan(launch, hostfiles.read_hostfile("hostfile"), ["--config", "run.yaml"], {})
    assert plan.command == ["deepspeed", "--hostfile", "hostfile", "--num_nodes", "2", "--num_gpus", "4",
                            "--master_port", "29555", TRAIN, "--config", "run.yaml"]
    env_file = Path("runs/default/launch/deepspeed_env").resolve()
    assert plan.env == {"DS_ENV_FILE": str(env_file)} and plan.files == {env_file: ""}
    assert plan.status_file == Path("runs/default/exit_status.json")


def test_multinode_writes_the_runs_own_env_file_and_returns_exit_code(hostfile, config, capsys, workdir, fake_run):
    # A stale file where deepspeed looks by default is never read: DS_ENV_FILE names the run's own.
    (workdir / ".deepspeed_env").write_text("OMP_NUM_THREADS=4\nNCCL_IB_DISABLE=0\n")
    fake_run.code = 3
    code, _, err = call(multinode_main, ["--hostfile", "hostfile", "--env", "NCCL_IB_DISABLE=1",
                                         "--config", "run.yaml"], capsys)
    assert code == 3
    env_file = workdir / "runs/default/launch/deepspeed_env"
    assert env_file.read_text() == "NCCL_IB_DISABLE=1\n"
    [(command, env)] = fake_run
    assert command == ["deepspeed", "--hostfile", "hostfile", "--master_port", "29555", TRAIN, "--config", "run.yaml"]
    assert env["NCCL_IB_DISABLE"] == "1" and env["DS_ENV_FILE"] == str(env_file)
    assert f"DS_ENV_FILE={env_file} NCCL_IB_DISABLE=1 deepspeed --hostfile hostfile" in err


def test_killed_launch_reports_128_plus_signal(hostfile, config, capsys, fake_run):
    fake_run.code = -9
    assert call(multinode_main, ["--hostfile", "hostfile", "--config", "run.yaml"], capsys)[0] == 137


def test_missing_launcher_executable_is_a_clear_error(hostfile, config, capsys, monkeypatch):
    monkeypatch.setattr(common.shutil, "which", lambda name: None)
    code, _, err = call(multinode_main, ["--hostfile", "hostfile", "--config", "run.yaml"], capsys)
    assert code == 2 and "deepspeed: command not found on PATH" in err


def test_script_path_is_relative_when_run_from_the_repository(hostfile, config, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    code, out, _ = call(multinode_main, ["--hostfile", hostfile, "--dry-run", "--config", config], capsys)
    assert code == 0
    assert out.splitlines()[-1].endswith(f"deepspeed --hostfile {hostfile} --master_port 29555 launch/train.py "
                                         f"--config {config}")


# --------------------------------------------------------------------------- node-local checkpoints


def test_node_local_checkpoints_adds_override_that_merges(hostfile, config, capsys):
    code, out, _ = call(multinode_main, ["--hostfile", "hostfile", "--node-local-checkpoints", "--dry-run",
                                         "--config", "run.yaml", "train.lr=1e-2"], capsys)
    assert code == 0
    assert out.splitlines()[-1].endswith(
        "--config run.yaml train.lr=1e-2 deepspeed.overrides.checkpoint.use_node_local_storage=true")
    # Apply the overrides as sparse_ft.config.load_config does: the YAML's own overrides survive.
    tree = yaml.safe_load(config.read_text())
    for key, value in parse_overrides(["train.lr=1e-2", common.NODE_LOCAL_CHECKPOINT_OVERRIDE]):
        set_dotted(tree, key, value)
    assert tree["deepspeed"]["overrides"] == {"zero_optimization": {"stage3_max_live_parameters": 1e8},
                                              "checkpoint": {"use_node_local_storage": True}}


def test_flow_mapping_override_would_replace_yaml_overrides(config):
    """Why the launcher uses the dotted key rather than ``deepspeed.overrides={checkpoint: ...}``."""
    tree = yaml.safe_load(config.read_text())
    for key, value in parse_overrides(["deepspeed.overrides={checkpoint: {use_node_local_storage: true}}"]):
        set_dotted(tree, key, value)
    assert tree["deepspeed"]["overrides"] == {"checkpoint": {"use_node_local_storage": True}}


# --------------------------------------------------------------------------- torchrun


def test_torchrun_single_node_dry_run(config, capsys):
    code, out, _ = call(torchrun_main, ["--nproc-per-node", "8", "--dry-run", "--config", "run.yaml", "train.lr=1e-2"],
                        capsys)
    assert code == 0
    assert out == f"# command\ntorchrun --standalone --nnodes 1 --nproc_per_node 8 {TRAIN} --config run.yaml train.lr=1e-2\n"


def test_torchrun_multi_node_dry_run_with_env(config, capsys):
    code, out, _ = call(torchrun_main, ["--nnodes", "2", "--node-rank", "1", "--master-addr", "node0",
                                        "--nproc-per-node", "8", "--env", "NCCL_SOCKET_IFNAME=ib0", "--dry-run",
                                        "--config", "run.yaml"], capsys)
    assert code == 0
    assert out.splitlines()[-1] == ("NCCL_SOCKET_IFNAME=ib0 torchrun --nnodes 2 --node_rank 1 --master_addr node0 "
                                    f"--master_port 29500 --nproc_per_node 8 {TRAIN} --config run.yaml")


@pytest.mark.parametrize("argv, message", [
    (["--nnodes", "2", "--master-addr", "node0"], "--node-rank is required with --nnodes 2"),
    (["--nnodes", "2", "--node-rank", "0"], "--master-addr is required with --nnodes 2"),
    (["--nnodes", "2", "--node-rank", "2", "--master-addr", "node0"], "--node-rank = 2; allowed: 0-1 for --nnodes 2"),
    (["--nproc-per-node", "0"], "--nproc-per-node = '0'; allowed: a positive integer, gpu, cpu or auto"),
    (["--nnodes", "0"], "--nnodes = 0; allowed: a positive integer"),
    (["--master-port", "70000"], "--master-port = 70000; allowed: a TCP port 1-65535"),
])
def test_torchrun_bad_arguments(config, capsys, argv, message):
    code, out, err = call(torchrun_main, [*argv, "--dry-run", "--config", "run.yaml"], capsys)
    assert (code, out) == (2, "")
    assert err.startswith("launch/torchrun.py: error: ") and message in err


# --------------------------------------------------------------------------- SLURM


def test_slurm_torchrun_dry_run(config, capsys, monkeypatch):
    slurm_env(monkeypatch)
    code, out, _ = call(slurm_main, ["--dry-run", "--config", "run.yaml", "train.lr=1e-2"], capsys)
    assert code == 0
    assert out == ("# command\nsrun --nodes=2 --ntasks-per-node=1 --kill-on-bad-exit=1 torchrun --nnodes 2 "
                   "--nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint gpu001:24242 --rdzv_id 4242 "
                   f"{TRAIN} --config run.yaml train.lr=1e-2\n")


def test_slurm_torchrun_passes_cpus_per_task_to_srun(config, capsys, monkeypatch):
    slurm_env(monkeypatch, nodelist="gpu[001-003,007]", nnodes="4", gpus="4")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "64")
    code, out, _ = call(slurm_main, ["--master-port", "29411", "--dry-run", "--config", "run.yaml"], capsys)
    assert code == 0
    assert out.splitlines()[-1] == (
        "srun --nodes=4 --ntasks-per-node=1 --kill-on-bad-exit=1 --cpus-per-task=64 torchrun --nnodes 4 "
        f"--nproc_per_node 4 --rdzv_backend c10d --rdzv_endpoint gpu001:29411 --rdzv_id 4242 {TRAIN} --config run.yaml")


def test_slurm_deepspeed_dry_run_prints_hostfile_and_command(config, capsys, monkeypatch, workdir):
    slurm_env(monkeypatch)
    code, out, _ = call(slurm_main, ["--launcher", "deepspeed", "--dry-run", "--config", "run.yaml", "train.lr=1e-2"],
                        capsys)
    assert code == 0
    env_file = workdir / "runs/default/launch/deepspeed_env"
    assert out == ("# runs/default/launch/deepspeed_env\n# runs/default/launch/hostfile.4242\ngpu001 slots=8\ngpu002 slots=8\n"
                   f"# command\nDS_ENV_FILE={env_file} deepspeed --hostfile runs/default/launch/hostfile.4242 "
                   "--master_addr gpu001 --master_port 24242 "
                   f"{TRAIN} --config run.yaml train.lr=1e-2\n")
    assert not (workdir / "runs").exists()


def test_slurm_deepspeed_writes_hostfile_and_env_file_when_run(config, capsys, monkeypatch, workdir, fake_run):
    slurm_env(monkeypatch, gpus=None)  # no SLURM_GPUS_ON_NODE: --gpus-per-node decides
    code, _, _ = call(slurm_main, ["--launcher", "deepspeed", "--gpus-per-node", "4", "--hostfile-out", "hosts.txt",
                                   "--env", "NCCL_IB_DISABLE=1", "--config", "run.yaml"], capsys)
    assert code == 0
    assert (workdir / "hosts.txt").read_text() == "gpu001 slots=4\ngpu002 slots=4\n"
    assert (workdir / "runs/default/launch/deepspeed_env").read_text() == "NCCL_IB_DISABLE=1\n"
    assert fake_run[0][0][:3] == ["deepspeed", "--hostfile", "hosts.txt"]


@pytest.mark.parametrize("env, message", [
    (dict(nodelist=None), "SLURM_JOB_NODELIST is not set: launch/slurm.py runs inside a SLURM job"),
    (dict(job_id=None), "SLURM_JOB_ID is not set"),
    (dict(nnodes=None), "SLURM_NNODES is not set"),
    (dict(nnodes="3"), "SLURM_NNODES='3' does not match the 2 hosts in SLURM_JOB_NODELIST='gpu[001-002]'"),
    (dict(gpus=None), "--gpus-per-node not given and neither SLURM_GPUS_ON_NODE nor SLURM_GPUS_PER_NODE is set"),
    (dict(nodelist="gpu[001-"), "SLURM_JOB_NODELIST='gpu[001-': unbalanced brackets"),
])
def test_slurm_missing_or_bad_variables(config, capsys, monkeypatch, env, message):
    slurm_env(monkeypatch, **env)
    code, out, err = call(slurm_main, ["--dry-run", "--config", "run.yaml"], capsys)
    assert (code, out) == (2, "")
    assert err.startswith("launch/slurm.py: error: ") and message in err


def test_slurm_gpus_per_node_with_gres_type(config, capsys, monkeypatch):
    slurm_env(monkeypatch, gpus=None)
    monkeypatch.setenv("SLURM_GPUS_PER_NODE", "h100:4")
    code, out, _ = call(slurm_main, ["--dry-run", "--config", "run.yaml"], capsys)
    assert code == 0 and "--nproc_per_node 4 " in out


@pytest.mark.parametrize("nodelist, hosts", [
    ("gpu[001-003,007],cpu5", ["gpu001", "gpu002", "gpu003", "gpu007", "cpu5"]),
    ("gpu[001-002]", ["gpu001", "gpu002"]),
    ("node7", ["node7"]),
    ("a,b,c", ["a", "b", "c"]),
    ("n[9-11]", ["n9", "n10", "n11"]),
    ("n[08-10]", ["n08", "n09", "n10"]),
    ("rack[1-2]-gpu[01-02]", ["rack1-gpu01", "rack1-gpu02", "rack2-gpu01", "rack2-gpu02"]),
    ("gpu-a[1,3],gpu-b[2-3],login", ["gpu-a1", "gpu-a3", "gpu-b2", "gpu-b3", "login"]),
    ("node-1.cluster[5]", ["node-1.cluster5"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("nodelist, message", [
    ("", "SLURM_JOB_NODELIST is empty"),
    ("gpu[3-1]", "range 3-1 runs backwards"),
    ("gpu[a-b]", "[a-b] is not a list of numbers and ranges"),
    ("gpu[1]]", "unbalanced or nested brackets"),
    ("gpu[1,1]", "lists gpu1 more than once"),
    ("gpu1,,gpu2", "empty host name"),
])
def test_expand_nodelist_rejects(nodelist, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        expand_nodelist(nodelist)


# --------------------------------------------------------------------------- input checks


@pytest.mark.parametrize("content, message", [
    (None, "--hostfile: file hostfile does not exist"),
    ("worker-1 slots=8\nworker-2 8\n", "--hostfile hostfile line 2: 'worker-2 8' does not parse; expected 'HOST slots=N'"),
    ("worker-1 slots=abc\n", "--hostfile hostfile line 1: slots='abc' for host worker-1 is not a positive integer"),
    ("worker-1 slots=0\n", "--hostfile hostfile line 1: slots='0' for host worker-1 is not a positive integer"),
    ("worker-1 slots=-2\n", "slots='-2' for host worker-1 is not a positive integer"),
    ("worker-1 slots=8 gpus=8\n", "line 1: 'worker-1 slots=8 gpus=8' does not parse"),
    ("worker-1 slots=8\n# c\nworker-1 slots=4\n", "--hostfile hostfile line 3: duplicate host worker-1 "
                                                  "(already listed on line 1)"),
    ("# only a comment\n\n", "--hostfile hostfile: no hosts found"),
])
def test_bad_hostfile(config, capsys, workdir, content, message):
    if content is not None:
        (workdir / "hostfile").write_text(content)
    code, out, err = call(multinode_main, ["--hostfile", "hostfile", "--dry-run", "--config", "run.yaml"], capsys)
    assert (code, out) == (2, "")
    assert err.startswith("launch/multinode.py: error: ") and message in err


@pytest.mark.parametrize("flags, message", [
    (["--include", "worker-9"], "--include 'worker-9': host worker-9 is not in the hostfile (hosts: worker-1, worker-2)"),
    (["--include", "worker-1:0@worker-3:1"], "host worker-3 is not in the hostfile"),
    (["--include", "worker-1:8"], "host worker-1 has no slot 8 (the hostfile gives slots=8, so 0-7)"),
    (["--include", "worker-1:x"], "slot 'x' of host worker-1 is not an integer"),
    (["--exclude", "worker-7"], "--exclude 'worker-7': host worker-7 is not in the hostfile"),
    (["--exclude", "worker-1@worker-2"], "excludes every slot in the hostfile"),
    (["--include", "worker-1", "--exclude", "worker-2"], "--include and --exclude cannot be combined"),
    (["--include", "worker-1", "--num-gpus", "2"], "--num-gpus/--num-nodes cannot be combined with --include/--exclude"),
    (["--num-gpus", "16"], "--num-gpus = 16 is more than the hostfile gives worker-1 (slots=8), worker-2 (slots=8)"),
    (["--num-nodes", "3"], "--num-nodes = 3 but the hostfile lists 2 hosts"),
    (["--master-port", "0"], "--master-port = 0; allowed: a TCP port 1-65535"),
    (["--env", "NCCL_IB_DISABLE"], "--env 'NCCL_IB_DISABLE': expected KEY=VALUE"),
    (["--env", "1BAD=x"], "--env '1BAD=x': expected KEY=VALUE"),
    (["--env", "NCCL_SOCKET_IFNAME=$IF"], "the value may not contain quotes, $"),
])
def test_bad_launcher_arguments(hostfile, config, capsys, flags, message):
    code, out, err = call(multinode_main, ["--hostfile", "hostfile", *flags, "--dry-run", "--config", "run.yaml"], capsys)
    assert (code, out) == (2, "")
    assert err.startswith("launch/multinode.py: error: ") and message in err


@pytest.mark.parametrize("config_arg, overrides, message", [
    ("missing.yaml", [], "--config: file missing.yaml does not exist"),
    ("run.yaml", ["train.lr"], "override 'train.lr' must look like section.key=value"),
    ("run.yaml", ["train.bogus=1"], "train.bogus is not a config key"),
    ("run.yaml", ["train.lr=abc"], "train.lr = 'abc'; allowed: a number"),
    ("run.yaml", ["trian.lr=1"], "'trian' is not a config section"),
    ("list.yaml", [], "--config: list.yaml must hold a mapping"),
])
def test_bad_training_arguments_fail_before_launch(hostfile, config, capsys, workdir, fake_run, config_arg,
                                                   overrides, message):
    (workdir / "list.yaml").write_text("- a\n- b\n")
    code, _, err = call(multinode_main, ["--hostfile", "hostfile", "--config", config_arg, *overrides], capsys)
    assert code == 2 and message in err
    assert fake_run == [], "nothing may run when an input is bad"


def test_config_is_checked_for_every_launcher(capsys, monkeypatch):
    slurm_env(monkeypatch)
    for main in (torchrun_main, slurm_main):
        code, _, err = call(main, ["--dry-run", "--config", "nope.yaml"], capsys)
        assert code == 2 and "--config: file nope.yaml does not exist" in err


def test_hostfile_accepts_comments_and_blank_lines(hostfile):
    assert hostfiles.read_hostfile(hostfile) == {"worker-1": 8, "worker-2": 8}
    assert hostfiles.format_hostfile({"worker-1": 8, "worker-2": 8}) == "worker-1 slots=8\nworker-2 slots=8\n"


# --------------------------------------------------------------------------- the scripts themselves


def test_multinode_script_as_subprocess(tmp_path):
    """The thin entry point as users run it: a new interpreter, PYTHONPATH at the worktree root."""
    (tmp_path / "hostfile").write_text(TWO_NODES)
    (tmp_path / "run.yaml").write_text("model: {name_or_path: /models/llama-13b}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "DS_ENV_FILE"))}
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run(
        [sys.executable, "launch/multinode.py", "--hostfile", str(tmp_path / "hostfile"), "--include", "worker-1:0,1",
         "--master-port", "29600", "--env", "NCCL_IB_DISABLE=1", "--dry-run", "--config", str(tmp_path / "run.yaml"),
         f"train.output_dir={tmp_path}/run", "train.lr=1e-2"],
        cwd=ROOT, env=env, text=True, capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr
    # One host left: deepspeed is told to ssh to it anyway (--force_multi), and says so.
    assert "one host left (worker-1): launching on it over ssh" in result.stderr
    assert result.stdout.splitlines()[-1] == (
        f"DS_ENV_FILE={tmp_path}/run/launch/deepspeed_env NCCL_IB_DISABLE=1 deepspeed --hostfile {tmp_path}/hostfile "
        f"--include worker-1:0,1 --master_port 29600 --force_multi "
        f"launch/train.py --config {tmp_path}/run.yaml train.output_dir={tmp_path}/run train.lr=1e-2")


def run_script(name: str, argv: list, monkeypatch, capsys) -> tuple[int, str, str]:
    """Execute launch/<name> as __main__ in this process: the thin entry point, without a new
    interpreter importing torch again."""
    import runpy

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", [f"launch/{name}", *map(str, argv)])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "launch" / name), run_name="__main__")
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def test_multinode_script_reports_missing_hostfile(config, monkeypatch, capsys, workdir):
    code, out, err = run_script("multinode.py", ["--hostfile", workdir / "nope", "--dry-run", "--config", config],
                                monkeypatch, capsys)
    assert (code, out) == (2, "")
    assert err == f"launch/multinode.py: error: --hostfile: file {workdir}/nope does not exist\n"


def test_torchrun_script_dry_run(config, monkeypatch, capsys):
    code, out, err = run_script("torchrun.py", ["--nproc-per-node", "2", "--dry-run", "--config", config],
                                monkeypatch, capsys)
    assert code == 0, err
    assert out.splitlines()[-1] == f"torchrun --standalone --nnodes 1 --nproc_per_node 2 launch/train.py --config {config}"


def test_slurm_script_dry_run(config, monkeypatch, capsys):
    slurm_env(monkeypatch, job_id="99")
    code, out, err = run_script("slurm.py", ["--dry-run", "--config", config, "--node-local-checkpoints"],
                                monkeypatch, capsys)
    assert code == 0, err
    assert out.splitlines()[-1] == (
        "srun --nodes=2 --ntasks-per-node=1 --kill-on-bad-exit=1 torchrun --nnodes 2 --nproc_per_node 8 "
        "--rdzv_backend c10d --rdzv_endpoint gpu001:20099 --rdzv_id 99 launch/train.py "
        f"--config {config} deepspeed.overrides.checkpoint.use_node_local_storage=true")


def test_slurm_script_outside_slurm_exits_2(config, monkeypatch, capsys):
    code, out, err = run_script("slurm.py", ["--dry-run", "--config", config], monkeypatch, capsys)
    assert (code, out) == (2, "")
    assert "launch/slurm.py: error: SLURM_JOB_NODELIST is not set" in err


@pytest.mark.parametrize("name", ["multinode.py", "torchrun.py", "slurm.py", "slurm_submit.py"])
def test_scripts_start_with_the_command_that_runs_them(name):
    import ast

    doc = ast.get_docstring(ast.parse((ROOT / "launch" / name).read_text()))
    assert doc.splitlines()[0].startswith(f"python launch/{name} ")


def test_sbatch_template():
    text = (ROOT / "launch" / "slurm_train.sbatch").read_text()
    lines = text.splitlines()
    assert lines[0] == "#!/bin/bash" and lines[1].startswith("# python launch/slurm_submit.py ")
    directives = [line for line in lines if line.startswith("#SBATCH")]
    assert "#SBATCH --ntasks-per-node=1" in directives
    # Resources come from launch/slurm_submit.py's arguments, not from lines users must edit.
    assert not any(d.startswith(("#SBATCH --gpus", "#SBATCH --cpus", "#SBATCH --nodes")) for d in directives)
    first_command = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
    assert all(lines.index(d) < first_command for d in directives), "sbatch ignores #SBATCH after a command"
    assert 'python launch/slurm.py "$@"' in text
    subprocess.run(["bash", "-n", str(ROOT / "launch" / "slurm_train.sbatch")], check=True)


# --------------------------------------------------------------------------- deepspeed's own parsing


def test_hostfile_and_filters_agree_with_deepspeeds_runner(hostfile):
    """What the launcher checks is what deepspeed.launcher.runner will compute (issue 17 part 5)."""
    from deepspeed.launcher import runner

    hosts = hostfiles.read_hostfile(hostfile)
    assert hosts == dict(runner.fetch_hostfile(str(hostfile)))
    for include, exclude in (("worker-1:0,2@worker-2", None), (None, "worker-2:7"), ("worker-2", None)):
        expected = runner.parse_inclusion_exclusion(runner.fetch_hostfile(str(hostfile)), include or "", exclude or "")
        assert hostfiles.active_slots(hosts, include, exclude) == {h: list(s) for h, s in expected.items()}
    assert hostfiles.active_slots(hosts, num_nodes=1, num_gpus=2) == {"worker-1": [0, 1]}


@pytest.mark.parametrize("flags", [["--include", "worker-2"], ["--exclude", "worker-1"], ["--num-nodes", "1"]])
def test_one_host_left_is_launched_over_ssh(hostfile, config, capsys, flags):
    """deepspeed runs a lone host's share on the launching machine unless told --force_multi."""
    code, out, err = call(multinode_main, ["--hostfile", "hostfile", *flags, "--dry-run", "--config", "run.yaml"],
                          capsys)
    assert code == 0 and "--force_multi" in out.splitlines()[-1].split()
    assert "one host left" in err
    code, out, _ = call(multinode_main, ["--hostfile", "hostfile", "--dry-run", "--config", "run.yaml"], capsys)
    assert "--force_multi" not in out


# --------------------------------------------------------------------------- rendezvous ports


def test_slurm_jobs_get_different_ports_and_skip_busy_ones():
    from sparse_ft.launch.slurm import PORT_RANGE, job_port

    ports = {job_port(str(job)) for job in range(1000, 1100)}
    assert len(ports) == 100 and all(PORT_RANGE[0] <= p < PORT_RANGE[1] for p in ports)
    assert job_port("4242") == 24242 and job_port("4242_7") == job_port("42427")
    busy = {24242, 24243}
    assert job_port("4242", lambda p: p in busy) == 24244


def test_slurm_checks_the_port_on_the_first_node(config, capsys, monkeypatch):
    import socket

    from sparse_ft.launch import slurm

    slurm_env(monkeypatch, nodelist=socket.gethostname(), nnodes="1", job_id="1234")
    with socket.socket() as held:  # another job's rendezvous on this node
        held.bind(("", 21234))
        held.listen()
        code, out, _ = call(slurm_main, ["--dry-run", "--config", "run.yaml"], capsys)
    assert code == 0 and "--rdzv_endpoint" in out
    assert f"{socket.gethostname()}:21235" in out
    assert slurm.PORT_RANGE == (20000, 30000)


def test_torchrun_node0_refuses_a_port_in_use(config, capsys, fake_run):
    import socket

    with socket.socket() as held:
        held.bind(("", 0))
        held.listen()
        port = held.getsockname()[1]
        code, _, err = call(torchrun_main, ["--nnodes", "2", "--node-rank", "0", "--master-addr", "127.0.0.1",
                                            "--master-port", port, "--config", "run.yaml"], capsys)
    assert code == 2 and f"rendezvous port {port} is in use on this machine" in err
    assert fake_run == []
    # Node rank 1 connects to node 0's port: nothing to check there.
    with socket.socket() as held:
        held.bind(("", port))
        held.listen()
        code, _, _ = call(torchrun_main, ["--nnodes", "2", "--node-rank", "1", "--master-addr", "127.0.0.1",
                                          "--master-port", port, "--config", "run.yaml"], capsys)
    assert code == 0 and len(fake_run) == 1


# --------------------------------------------------------------------------- exit status


class StatusWritingLaunch(FakeLaunch):
    """A launch that, like a failed training job, writes exit_status.json and exits 1 (torchrun)."""

    def __init__(self, path, record):
        super().__init__()
        self.path, self.record, self.code = path, record, 1

    def __call__(self, command, env):
        import json

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.record))
        return super().__call__(command, env)


@pytest.mark.parametrize("record, expected", [({"exit_code": 2, "rank": 1, "host": "n2", "error": "ConfigError: x"}, 2),
                                              ({"exit_code": 3}, 3), ({"exit_code": 0}, 1)])
def test_launchers_return_the_runs_exit_status(config, capsys, monkeypatch, workdir, record, expected):
    fake = StatusWritingLaunch(workdir / "runs/default/exit_status.json", record)
    monkeypatch.setattr(common, "_launch", fake)
    monkeypatch.setattr(common.shutil, "which", lambda name: f"/usr/bin/{name}")
    code, _, err = call(torchrun_main, ["--nproc-per-node", "2", "--config", "run.yaml"], capsys)
    assert code == expected
    if "error" in record:
        assert "rank 1 on host n2 failed: ConfigError: x" in err


def test_the_launchs_own_status_file_when_the_run_directory_has_none(config, capsys, monkeypatch, workdir):
    """A node whose ranks were stopped while starting writes no exit_status.json in the run directory,
    only the file the launcher named in SPARSE_FT_LAUNCH_STATUS: its code is returned, the file removed."""
    from sparse_ft.training.jobstatus import LAUNCH_STATUS_ENV, JobWatch

    seen = []

    def launch(command, env):
        watch = JobWatch()  # local rank 0 of a node, never attached to the run directory
        monkeypatch.setenv(LAUNCH_STATUS_ENV, env[LAUNCH_STATUS_ENV])
        watch._record({"exit_code": 2, "rank": 1, "host": "n2", "error": "ConfigError: x"})
        seen.append(Path(env[LAUNCH_STATUS_ENV]))
        return 1

    monkeypatch.setattr(common, "_launch", launch)
    monkeypatch.setattr(common.shutil, "which", lambda name: f"/usr/bin/{name}")
    code, _, err = call(torchrun_main, ["--nproc-per-node", "2", "--config", "run.yaml"], capsys)
    assert code == 2 and "rank 1 on host n2 failed: ConfigError: x" in err
    assert not (workdir / "runs/default/exit_status.json").exists() and not seen[0].exists()


def test_a_stale_exit_status_is_ignored(config, capsys, workdir, fake_run):
    status = workdir / "runs/default/exit_status.json"
    status.parent.mkdir(parents=True)
    status.write_text('{"exit_code": 2}')
    os.utime(status, (1, 1))  # from an earlier run
    fake_run.code = 1
    assert call(torchrun_main, ["--nproc-per-node", "2", "--config", "run.yaml"], capsys)[0] == 1


# --------------------------------------------------------------------------- slurm_submit.py


SINFO = "debug*|2|2|(null)\ngpu|4|64|gpu:a100:8(S:0-1)\ngpu|2|128|gpu:a100:4\n"


def test_submit_dry_run_prints_every_resource_with_its_default(config, capsys, monkeypatch):
    from sparse_ft.launch.slurm import submit_main

    monkeypatch.setattr(common.shutil, "which", lambda name: None)  # no sinfo here
    code = submit_main(["--dry-run", "--config", "run.yaml", "--launcher", "deepspeed", "train.lr=1e-2"])
    out = capsys.readouterr().out
    assert code == 0
    assert out.splitlines()[-1] == (
        "sbatch --nodes=2 --ntasks-per-node=1 --cpus-per-task=16 --gpus-per-node=8 --output=runs/default/slurm-%j.out "
        f"{common.REPO_ROOT / 'launch/slurm_train.sbatch'} --gpus-per-node 8 --config run.yaml --launcher deepspeed "
        "train.lr=1e-2")


@pytest.mark.parametrize("args, problems", [
    (dict(), []),
    (dict(partition="gpu", nodes=6, cpus_per_task=128, gpus_per_node=8), []),
    (dict(partition="gpu", nodes=7), ["--nodes 7 but partition gpu has 6 nodes"]),
    (dict(partition="gpu", gpus_per_node=16), ["--gpus-per-node 16 but the nodes of gpu have 8 GPUs (sinfo GRES)"]),
    (dict(gpus_per_node=1), ["--gpus-per-node 1 but the nodes of debug have no GPUs (sinfo GRES)"]),
    (dict(cpus_per_task=4), ["--cpus-per-task 4 but the largest node of debug has 2 CPUs"]),
    (dict(partition="big"), ["partition 'big' does not exist (sinfo lists: debug, gpu)"]),
])
def test_submit_fit_check(args, problems):
    from sparse_ft.launch.slurm import SlurmResources, fit_problems

    res = SlurmResources(**{"gpus_per_node": 0, "cpus_per_task": 1, **args})
    assert fit_problems(res, SINFO) == problems


def test_submit_refuses_what_cannot_fit(config, capsys, monkeypatch, fake_run):
    from sparse_ft.launch import slurm

    monkeypatch.setattr(slurm.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(slurm.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, SINFO, ""))
    code = slurm.submit_main(["--config", "run.yaml"])
    err = capsys.readouterr().err
    assert code == 2 and fake_run == []
    assert "--cpus-per-task 16 but the largest node of debug has 2 CPUs" in err and "not submitted" in err
    code = slurm.submit_main(["--force", "--config", "run.yaml"])
    assert code == 0 and fake_run[0][0][0] == "sbatch"
