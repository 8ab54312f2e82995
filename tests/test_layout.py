"""The layout keeps its promises: each package's flat files are a self-contained Hub file set that a checkpoint
carries whole, imports flow one way (toolkit -> Hub files; tokenization_gcmr never imports modeling_gcmr), and no
module of the packages takes part in an import circle."""
from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest
from subprocess_utils import run_without_package

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("modeling_gcmr", "tokenization_gcmr")


def hub_files(package: str) -> list[Path]:
    """The flat files of a package: the ones the Hub copies into checkpoints."""
    return sorted(path for path in (ROOT / package).glob("*.py") if path.name != "__init__.py")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_imports(path: Path) -> set[str]:
    """Modules of the two packages that `path` imports, at module level or inside functions: a deferred import
    hides a circle at import time but is still one in the design."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(name for name in names if name.split(".")[0] in PACKAGES)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(path): path for package in PACKAGES for path in (ROOT / package).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        own_ancestors = _ancestors(name)
        edges = set()
        for target in module_imports(path):
            if target in modules:
                # Importing a.b.c first runs a/__init__ and a/b/__init__, unless the importer already lives there.
                edges |= {target, *(_ancestors(target) - own_ancestors)}
        graph[name] = {edge for edge in edges if edge in modules} - {name}
    return graph


def _ancestors(name: str) -> set[str]:
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def test_no_import_circle_inside_the_packages():
    graph = import_graph()
    state: dict[str, int] = {}
    circles = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                circles.append(trail[trail.index(target):] + [target] if target in trail else [node, target])
            elif target not in state:
                visit(target, trail + [target])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not circles, "import circles:\n" + "\n".join(" -> ".join(circle) for circle in circles)


def test_the_graph_sees_a_circle_when_there_is_one(tmp_path, monkeypatch):
    # The detector itself can fail: two modules that import each other are reported.
    package = tmp_path / "modeling_gcmr"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from .b import x\n")
    (package / "b.py").write_text("from modeling_gcmr.a import y\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    graph = import_graph()
    assert "modeling_gcmr.b" in graph["modeling_gcmr.a"] and "modeling_gcmr.a" in graph["modeling_gcmr.b"]


@pytest.mark.parametrize("package", PACKAGES)
def test_hub_files_import_only_their_flat_siblings(package):
    for path in hub_files(package):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1 and node.module and "." not in node.module, (
                    f"{path.name} line {node.lineno}: Hub files import only flat siblings (from .name import X)")
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            assert not any(name.split(".")[0] in PACKAGES for name in names), (
                f"{path.name} line {node.lineno} imports {names}: a Hub file never imports a package by name")


def test_tokenization_never_imports_modeling():
    for path in (ROOT / "tokenization_gcmr").rglob("*.py"):
        assert not any(target.startswith("modeling_gcmr") for target in module_imports(path)), path


@pytest.mark.parametrize("package", PACKAGES)
def test_each_hub_file_set_imports_alone(tmp_path, package):
    """Copied flat into a folder, as a checkpoint holds them, with both packages unimportable: every file imports."""
    folder = tmp_path / "hub_copy"
    folder.mkdir()
    (folder / "__init__.py").write_text("")
    for path in hub_files(package):
        shutil.copy(path, folder / path.name)
    names = [path.stem for path in hub_files(package)]
    result = run_without_package(
        f"""
        import importlib, json, sys
        sys.path.insert(0, {str(tmp_path)!r})
        loaded = [importlib.import_module("hub_copy." + name).__name__ for name in {names!r}]
        print(json.dumps({{"loaded": loaded}}))
        """,
        cwd=str(tmp_path),
    )
    assert result["loaded"] == [f"hub_copy.{name}" for name in names]


def test_a_checkpoint_carries_every_hub_file(tmp_path):
    """save_pretrained copies the flat files through their relative imports: all of them, so none is dead weight
    in the package and none is missing from a checkpoint."""
    import numpy as np
    import torch
    from conftest import synthetic_captions

    from modeling_gcmr import GcmrConfig, GcmrForRetrieval, save_retriever
    from tokenization_gcmr import ImageIdTokenizer, build_identifiers, train_text_tokenizer

    keys = [f"k{i}" for i in range(6)]
    table = build_identifiers(keys, "atomic", embeddings=np.eye(6, 4, dtype=np.float32), seed=0)
    tokenizer = ImageIdTokenizer(train_text_tokenizer(synthetic_captions(20), vocab_size=120), table)
    torch.manual_seed(0)
    model = GcmrForRetrieval(GcmrConfig(text_config=dict(model_type="t5", vocab_size=tokenizer.num_text_tokens,
                                                         d_model=16, d_ff=32, d_kv=4, num_heads=4, num_layers=1),
                                        image_embed_dim=4))
    model.set_identifier_vocabulary(tokenizer, image_embeds=np.eye(6, 4, dtype=np.float32))
    save_retriever(model, tokenizer, tmp_path / "checkpoint")
    carried = {path.name for path in (tmp_path / "checkpoint").glob("*.py")}
    expected = {path.name for package in PACKAGES for path in hub_files(package)}
    assert carried == expected
