"""Export never deletes what it did not create: its own uniquely named staging directory, and
``--overwrite`` refuses the base model, the source run, any parent of them, the working directory
and any directory no export wrote. Every refusal is exit 2 with one line, and the files are intact."""
import os

import pytest

from sparse_ft.cli import main


def snapshot(directory):
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def export(capsys, source, out, *extra):
    code = main(["export", "--checkpoint", str(source), "--out", str(out), "--dtype", "fp32", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def test_user_partial_dir_is_untouched(reference, tmp_path, capsys):
    """A user's own ``newexp.partial/`` (the old fixed staging name) survives an export to newexp."""
    mine = tmp_path / "newexp.partial"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    code, _ = export(capsys, reference["out"], tmp_path / "newexp")
    assert code == 0 and (tmp_path / "newexp" / "model.safetensors").is_file()
    assert (mine / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["newexp", "newexp.partial"]  # no staging left


def test_failed_export_removes_only_its_staging(reference, tmp_path, capsys, monkeypatch):
    import sparse_ft.export as ex

    mine = tmp_path / "out.partial"
    mine.mkdir()
    (mine / "keep").write_text("x")

    def broken(*a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ex, "_copy_side_files", broken)
    with pytest.raises(OSError):
        export(capsys, reference["out"], tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.partial"] and (mine / "keep").read_text() == "x"


@pytest.fixture()
def protected(reference, assets, tmp_path):
    """Copies of the base model and of the finished run, under one parent, and an earlier export."""
    import shutil

    parent = tmp_path / "work"
    base = shutil.copytree(assets["model"], parent / "base")
    run = shutil.copytree(reference["out"], parent / "run")
    delta = run / "delta.safetensors"
    return {"parent": parent, "base": base, "run": run, "delta": delta}


@pytest.mark.parametrize("target", ["base", "run", "parent", "checkpoint-parent", "foreign", "cwd", "file"])
def test_overwrite_refuses_protected_paths(protected, tmp_path, capsys, monkeypatch, target):
    base, run, parent = protected["base"], protected["run"], protected["parent"]
    foreign = tmp_path / "papers"
    foreign.mkdir()
    (foreign / "draft.tex").write_text("work")
    a_file = tmp_path / "model.bin"
    a_file.write_text("x")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    out, source = {"base": (base, run), "run": (run, run), "parent": (parent, run),
                   "checkpoint-parent": (run / "checkpoints", run / "checkpoints" / "step-000008"),
                   "foreign": (foreign, run), "cwd": (".", run), "file": (a_file, run)}[target]
    before = snapshot(tmp_path)
    code, err = export(capsys, source, out, "--base-model", str(base), "--overwrite")
    assert code == 2 and len(err) == 1, err
    assert snapshot(tmp_path) == before  # nothing deleted, nothing added
    assert {"base": "is the base model", "run": "is the source run", "parent": "is the base model",
            "checkpoint-parent": "is the source run", "foreign": "no sparse-ft export wrote",
            "cwd": "working directory", "file": "is a file"}[target] in err[0], err


def test_overwrite_replaces_an_earlier_export(protected, tmp_path, capsys):
    out = tmp_path / "exp"
    assert export(capsys, protected["run"], out, "--base-model", str(protected["base"]))[0] == 0
    (out / "stale.txt").write_text("from before")
    assert export(capsys, protected["run"], out, "--base-model", str(protected["base"]))[0] == 2  # no --overwrite
    assert export(capsys, protected["run"], out, "--base-model", str(protected["base"]), "--overwrite")[0] == 0
    assert not (out / "stale.txt").exists() and (out / "sparse_ft_export.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "work") == ["exp"]


def test_delta_format_out_is_a_file(reference, tmp_path, capsys):
    a_file = tmp_path / "notes"
    a_file.write_text("mine")
    code, err = export(capsys, reference["out"], a_file, "--format", "delta")
    assert code == 2 and len(err) == 1 and "is a file" in err[0] and a_file.read_text() == "mine"
    assert os.listdir(tmp_path) == ["notes"]
