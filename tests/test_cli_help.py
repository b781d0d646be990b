"""`sparse-ft --help` is fast (no torch) and teaches: subcommands with a sentence, every config key
with its default and docstring, export's options with their defaults."""
import dataclasses
import subprocess
import sys

import pytest

from helpers import ROOT

from sparse_ft import cli
from sparse_ft.config_docs import sections


def run_cli(args: list[str]) -> tuple[str, list[str]]:
    """The CLI's help in a fresh interpreter: (stdout, modules imported that matter)."""
    code = ("import sys\nfrom sparse_ft.cli import main\ntry:\n    main(%r)\nexcept SystemExit:\n    pass\n"
            "print('IMPORTED', [m for m in ('torch', 'transformers', 'deepspeed') if m in sys.modules])" % args)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, check=True).stdout
    text, imported = out.rsplit("IMPORTED", 1)
    return text, eval(imported)


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"], ["export", "--help"]])
def test_help_does_not_import_torch(args):
    text, imported = run_cli(args)
    assert "usage: sparse-ft" in text
    assert imported == [], f"sparse-ft {' '.join(args)} imported {imported}"


def test_top_level_help_lists_every_command_with_a_sentence(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        summary = cli.SUMMARIES[name]
        assert len(summary.split()) > 5
        assert name in out and " ".join(summary.split()[:4]) in " ".join(out.split())


def live_sections():
    from sparse_ft.config import SECTIONS
    from sparse_ft.methods import METHODS

    yield from ((name, None, cls) for name, cls in SECTIONS.items())
    yield from (("method", name, cls) for name, cls in sorted(METHODS.items()))


def default_repr(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return repr(f.default_factory())
    return "required"


def test_source_docs_match_the_live_dataclasses():
    """config_docs reads the source with ast; the imported dataclasses must agree key for key."""
    docs = {(s.section, s.method): s for s in sections()}
    live = list(live_sections())
    assert [(s, m) for s, m, _ in live] == list(docs)
    for section, method, cls in live:
        keys = docs[section, method].keys
        assert [k.name for k in keys] == [f.name for f in dataclasses.fields(cls)], (section, method)
        for key, f in zip(keys, dataclasses.fields(cls)):
            assert key.default == default_repr(f), (section, method, f.name)
            assert len(key.doc) > 10, f"{section}.{f.name} ({method}) has no docstring"


def test_train_help_lists_sections_keys_defaults_and_docstrings(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    out = capsys.readouterr().out
    flat = " ".join(out.split())
    for section, method, cls in live_sections():
        assert (f"{section}:" if method is None else f"method (name: {method}):") in out
        for f in dataclasses.fields(cls):
            assert f"{section}.{f.name} = {default_repr(f)}" in out
    assert "train.lr = 0.001 Peak learning rate." in flat
    assert "method.density = 0.001" in out


def test_export_help_shows_each_default(capsys):
    with pytest.raises(SystemExit):
        cli.main(["export", "--help"])
    flat = " ".join(capsys.readouterr().out.split())
    for option, default in (("--format", "hf"), ("--dtype", "bf16"), ("--max-shard-size", "5GB")):
        assert f"(default: {default})" in flat.split(option)[-1].split("--")[0], option
    assert "(default: the one recorded in the delta)" in flat
