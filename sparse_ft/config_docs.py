"""The config's documentation, read from the source: every section's keys with their defaults and
the docstrings written under the dataclass fields.

It parses ``sparse_ft/config.py`` and ``sparse_ft/methods/**.py`` with :mod:`ast` and imports
neither, so ``sparse-ft train --help`` lists the keys without importing torch (the method configs'
modules import it). ``scripts/config_reference.py`` prints the same data as Markdown, and a test
checks it against the live dataclasses.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


@dataclass
class KeyDoc:
    name: str
    default: str
    """The default as ``repr`` shows it (``'auto'``, ``None``, ``[]``), or ``required``."""
    doc: str
    """The field's docstring, whitespace collapsed to single spaces."""


@dataclass
class SectionDoc:
    section: str
    """``model``, ``task``, ``train``, ``deepspeed`` or ``method``."""
    method: str | None
    """For ``method``: the method's name (``method.name``); its keys differ per method."""
    keys: list[KeyDoc]

    @property
    def title(self) -> str:
        return f"`{self.section}`" + (f" (name: {self.method})" if self.method else "")


def _is_classvar(annotation: ast.expr) -> bool:
    target = annotation.value if isinstance(annotation, ast.Subscript) else annotation
    return ast.unparse(target).split(".")[-1] == "ClassVar"


def _render_default(value: ast.expr | None) -> str:
    if value is None:
        return "required"
    if isinstance(value, ast.Call) and ast.unparse(value.func).split(".")[-1] == "field":
        kw = {k.arg: k.value for k in value.keywords}
        if "default" in kw:
            return _render_default(kw["default"])
        factory = kw.get("default_factory")
        if isinstance(factory, ast.Name) and factory.id in ("dict", "list", "tuple", "set"):
            return repr({"dict": {}, "list": [], "tuple": (), "set": set()}[factory.id])
        if isinstance(factory, ast.Lambda):
            return _render_default(factory.body)
        return ast.unparse(factory) + "()" if factory is not None else "required"
    try:
        return repr(ast.literal_eval(value))
    except (ValueError, TypeError, SyntaxError):
        return ast.unparse(value)


def class_keys(node: ast.ClassDef) -> dict[str, KeyDoc]:
    """The fields a class body declares (ClassVars left out), in order, with default and docstring."""
    keys: dict[str, KeyDoc] = {}
    body = node.body
    for i, stmt in enumerate(body):
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)) or _is_classvar(stmt.annotation):
            continue
        nxt = body[i + 1] if i + 1 < len(body) else None
        doc = ""
        if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
            doc = " ".join(nxt.value.value.split())
        keys[stmt.target.id] = KeyDoc(stmt.target.id, _render_default(stmt.value), doc)
    return keys


def _classes(path: Path) -> dict[str, ast.ClassDef]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}


def _method_name(node: ast.ClassDef) -> str | None:
    for stmt in node.body:
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.target.id == "method" \
                and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str):
            return stmt.value.value
    return None


def _merged_keys(name: str, classes: dict[str, ast.ClassDef]) -> dict[str, KeyDoc]:
    """Fields in dataclass order: the bases' first; a redeclared field keeps its place and takes the
    subclass's default (and its docstring, when it has one)."""
    node = classes[name]
    keys: dict[str, KeyDoc] = {}
    for base in node.bases:
        base_name = ast.unparse(base).split(".")[-1]
        if base_name in classes:
            keys.update(_merged_keys(base_name, classes))
    for key, own in class_keys(node).items():
        if key in keys and not own.doc:
            own = KeyDoc(key, own.default, keys[key].doc)
        keys[key] = own
    return keys


def sections(package: Path = PACKAGE) -> list[SectionDoc]:
    """Every config section (in ``SECTIONS`` order), then each method's ``method`` section by name."""
    config_src = package / "config.py"
    tree = ast.parse(config_src.read_text(), filename=str(config_src))
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    out: list[SectionDoc] = []
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "SECTIONS" for t in stmt.targets):
            for k, v in zip(stmt.value.keys, stmt.value.values):
                out.append(SectionDoc(ast.literal_eval(k), None, list(_merged_keys(v.id, classes).values())))
    method_classes: dict[str, ast.ClassDef] = {}
    for path in sorted((package / "methods").rglob("*.py")):
        method_classes.update(_classes(path))
    named = {}
    for cls_name, node in method_classes.items():
        method = _method_name(node)
        if method:  # the base's ``method = ""`` is no method
            named[method] = cls_name
    for method in sorted(named):
        out.append(SectionDoc("method", method, list(_merged_keys(named[method], method_classes).values())))
    return out
