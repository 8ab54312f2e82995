"""docs/api.md stays true to the code: every signature it shows is the real one, and every public name is in it.

How api.md is read (the conventions its introduction states):

- `## `dotted.module`` opens the section of the module a name is imported from (`from dotted.module import name`);
  any other `##` heading closes it.
- `### `Name(params)`` (or `### `Name``) documents a class, function or constant of that module and makes
  `Name` the current class; any other `###` heading clears it.
- A bullet `- `name(params)` ...` documents a name of the module; `- `.member(params)` ...` a member of the
  current class. `NAME = value` documents a constant (the value is compared when it is a literal).

For every entry that shows a signature, the name is imported from the documented module and the documented
parameters (names, order, `*` / `**` markers, and which ones have defaults; literal defaults by value) must equal
`inspect.signature`'s. Every public name (a module's `__all__`, else the classes and functions it defines) of both
packages and of every module below them, except the model internals in `INTERNAL_MODULES`, must be documented as
an entry of a module it can be imported from.
"""
from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
API_MD = ROOT / "docs" / "api.md"
PACKAGES = ("modeling_gcmr", "tokenization_gcmr")
# Flat Hub files whose functions only the model itself calls (their arguments are the model's internals).
INTERNAL_MODULES = {
    "modeling_gcmr.encoding_gcmr",
    "modeling_gcmr.identifier_loss_gcmr",
    "modeling_gcmr.text_head_gcmr",
}

MODULE_HEADING = re.compile(r"^## `([A-Za-z_][\w.]*)`")
CLASS_HEADING = re.compile(r"^### `([^`]+)`")
BULLET = re.compile(r"^- `([^`]+)`")
# name(params) -> annotation | .member(params) | NAME = value | bare name
SPAN = re.compile(r"^(?P<member>\.)?(?P<name>[A-Za-z_]\w*)(?:\((?P<params>.*)\)(?:\s*->.*)?|\s*=\s*(?P<value>.+)|)$")


@dataclass(frozen=True)
class Entry:
    line: int
    module: str
    owner: str | None  # the class of a `.member` entry
    name: str
    params: tuple[str, ...] | None  # None: no signature shown
    value: str | None

    @property
    def label(self) -> str:
        where = f"{self.owner}." if self.owner else ""
        return f"api.md:{self.line} {self.module}.{where}{self.name}"


def _split_params(text: str) -> list[str]:
    """Top-level comma split: commas inside brackets or string literals do not count."""
    parts, depth, quote, current = [], 0, None, ""
    for char in text:
        if quote:
            quote = None if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(current.strip())
            current = ""
            continue
        current += char
    if current.strip():
        parts.append(current.strip())
    return parts


def parse_api_md(text: str) -> list[Entry]:
    entries: list[Entry] = []
    module: str | None = None
    owner: str | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        if line.startswith("## "):
            match = MODULE_HEADING.match(line)
            module, owner = (match.group(1) if match else None), None
            continue
        if line.startswith("### "):
            match = CLASS_HEADING.match(line)
            owner = None
            if match and module:
                span = SPAN.match(match.group(1))
                assert span and not span.group("member"), f"api.md:{number}: unreadable heading {line!r}"
                entries.append(_entry(number, module, None, span))
                owner = span.group("name")
            continue
        match = BULLET.match(line)
        if not match or module is None:
            continue
        span = SPAN.match(match.group(1))
        if span is None:
            continue  # a bullet that starts with an example, not an entry
        if span.group("member"):
            assert owner, f"api.md:{number}: member entry {match.group(1)!r} outside a class section"
            entries.append(_entry(number, module, owner, span))
        else:
            entries.append(_entry(number, module, None, span))
    return entries


def _entry(number: int, module: str, owner: str | None, span: re.Match) -> Entry:
    params = span.group("params")
    return Entry(number, module, owner, span.group("name"),
                 None if params is None else tuple(_split_params(params)), span.group("value"))


ENTRIES = parse_api_md(API_MD.read_text(encoding="utf-8"))
SIGNATURE_ENTRIES = [entry for entry in ENTRIES if entry.params is not None]
VALUE_ENTRIES = [entry for entry in ENTRIES if entry.value is not None]


def _resolve(entry: Entry):
    """(the documented object, whether its signature includes the `self` of an unbound method)."""
    module = importlib.import_module(entry.module)
    if entry.owner is None:
        assert hasattr(module, entry.name), f"{entry.label}: `from {entry.module} import {entry.name}` fails"
        return getattr(module, entry.name), False
    cls = getattr(module, entry.owner)
    assert hasattr(cls, entry.name), f"{entry.label}: {entry.owner} has no member {entry.name!r}"
    static = inspect.getattr_static(cls, entry.name)
    assert not isinstance(static, property) or entry.params is None, f"{entry.label}: a property, shown as a call"
    return getattr(cls, entry.name), inspect.isfunction(static)


def _real_params(obj, bound_self: bool) -> list[tuple[str, inspect.Parameter]]:
    parameters = list(inspect.signature(obj).parameters.values())
    if bound_self:
        parameters = parameters[1:]
    shown: list[tuple[str, inspect.Parameter]] = []
    keyword_only_marked = False
    for index, parameter in enumerate(parameters):
        if parameter.kind is parameter.KEYWORD_ONLY and not keyword_only_marked:
            shown.append(("*", parameter))
            keyword_only_marked = True
        if parameter.kind is parameter.VAR_POSITIONAL:
            shown.append(("*" + parameter.name, parameter))
            keyword_only_marked = True
        elif parameter.kind is parameter.VAR_KEYWORD:
            shown.append(("**" + parameter.name, parameter))
        else:
            shown.append((parameter.name, parameter))
        if parameter.kind is parameter.POSITIONAL_ONLY and (
            index + 1 == len(parameters) or parameters[index + 1].kind is not parameter.POSITIONAL_ONLY
        ):
            shown.append(("/", parameter))
    return shown


def test_api_md_has_entries():
    # A parser that silently finds nothing would pass every test below.
    assert len(SIGNATURE_ENTRIES) > 100 and len({entry.module for entry in ENTRIES}) > 20


@pytest.mark.parametrize("entry", SIGNATURE_ENTRIES, ids=lambda entry: entry.label)
def test_documented_signature_is_the_real_one(entry: Entry):
    obj, bound_self = _resolve(entry)
    real = _real_params(obj, bound_self)
    documented = [part.split("=", 1)[0].strip() for part in entry.params]
    real_names = [name for name, _ in real]
    assert documented == real_names, f"{entry.label}: documented {documented}, the code has {real_names}"
    for part, (name, parameter) in zip(entry.params, real):
        if name in ("*", "/") or name.startswith("*"):
            continue
        has_default = parameter.default is not inspect.Parameter.empty
        assert ("=" in part) == has_default, (
            f"{entry.label}: parameter {name!r} " + ("has a default" if has_default else "is required")
            + f" in the code, documented as {part!r}"
        )
        if has_default:
            shown = part.split("=", 1)[1].strip()
            try:
                value = ast.literal_eval(shown)
            except (ValueError, SyntaxError):
                continue  # an expression: the default is described, not quoted
            if value is Ellipsis:
                continue  # `...`: described, not quoted
            assert value == parameter.default, (
                f"{entry.label}: {name}={shown} documented, the default is {parameter.default!r}"
            )


@pytest.mark.parametrize("entry", VALUE_ENTRIES, ids=lambda entry: entry.label)
def test_documented_constant_has_its_value(entry: Entry):
    obj, _ = _resolve(entry)
    try:
        value = ast.literal_eval(entry.value)
    except (ValueError, SyntaxError):
        return  # an expression: described, not quoted
    if value is not Ellipsis:  # `NAME = ...`: described, not quoted
        assert value == obj, f"{entry.label}: documented {entry.value}, the value is {obj!r}"


def _public_modules() -> list[str]:
    names = list(PACKAGES)
    for package in PACKAGES:
        module = importlib.import_module(package)
        names += [info.name for info in pkgutil.walk_packages(module.__path__, package + ".")]
    return sorted(name for name in names if name not in INTERNAL_MODULES)


def _public_names(module) -> list[str]:
    if hasattr(module, "__all__"):
        return list(module.__all__)
    return [name for name, value in vars(module).items()
            if not name.startswith("_") and (inspect.isclass(value) or inspect.isfunction(value))
            and value.__module__ == module.__name__]


_MISSING = object()


def _same_constant(a, b) -> bool:
    return isinstance(b, (str, int, float, tuple)) and type(a) is type(b) and a == b


@pytest.mark.parametrize("module_name", _public_modules())
def test_every_public_name_is_documented(module_name: str):
    module = importlib.import_module(module_name)
    documented: dict[str, list[Entry]] = {}
    for entry in ENTRIES:
        if entry.owner is None:
            documented.setdefault(entry.name, []).append(entry)
    missing = []
    for name in _public_names(module):
        obj = getattr(module, name)
        # Documented under any module it can be imported from (the same object there).
        if not any(getattr(importlib.import_module(entry.module), name, _MISSING) is obj
                   or _same_constant(getattr(importlib.import_module(entry.module), name, _MISSING), obj)
                   for entry in documented.get(name, [])):
            missing.append(name)
    assert not missing, f"public names of {module_name} missing from docs/api.md: {missing}"


BARE_ENTRIES = [entry for entry in ENTRIES if entry.params is None and entry.value is None]


@pytest.mark.parametrize("entry", BARE_ENTRIES, ids=lambda entry: entry.label)
def test_documented_name_exists(entry: Entry):
    module = importlib.import_module(entry.module)
    if entry.owner is None:
        assert hasattr(module, entry.name), f"{entry.label}: `from {entry.module} import {entry.name}` fails"
        return
    cls = getattr(module, entry.owner)
    fields = getattr(cls, "__dataclass_fields__", {})
    assert hasattr(cls, entry.name) or entry.name in fields, (
        f"{entry.label}: {entry.owner} has no member {entry.name!r}"
    )
