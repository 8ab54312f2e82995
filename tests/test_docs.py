"""The documentation stays true: the README's quickstart runs as written, and no relative link is dead."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC_PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CODE_BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
# [text](target) links; images too. Targets with a scheme (https:, mailto:) or only an anchor are not files.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")

# Appended to the quickstart in the same process: what the README says about its output must hold.
QUICKSTART_CHECKS = """
import json as _json
_again = model.retrieve(["a dog in the park", "a bird in flight"], tokenizer, top_k=3)
_reloaded = reloaded.retrieve(["a dog in the park", "a bird in flight"], reloaded_tokenizer, top_k=3)
print(_json.dumps({"keys": keys, "hits": hits, "again": _again, "reloaded": _reloaded,
                   "reloaded_class": type(reloaded).__name__}))
"""


def _code_blocks(text: str) -> list[tuple[str, str]]:
    return [(match.group(1), match.group(2)) for match in CODE_BLOCK.finditer(text)]


def _without_code(text: str) -> str:
    """The page with fenced code blocks and inline code removed (links inside code are examples, not links)."""
    return re.sub(r"`[^`\n]*`", "", CODE_BLOCK.sub("", text))


def test_readme_starts_with_the_two_commands():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    lines = text.splitlines()
    assert lines[0].startswith("# ") and lines[1] == "" and lines[2] == "```bash", lines[:3]
    language, first_block = _code_blocks(text)[0]
    commands = [line.split("#")[0].strip() for line in first_block.splitlines()]
    assert language == "bash" and commands == ["make demo", "make test"], first_block


def test_readme_quickstart_runs_as_written(tmp_path):
    python_blocks = [code for language, code in _code_blocks((ROOT / "README.md").read_text(encoding="utf-8")) if language == "python"]
    assert python_blocks, "README.md has no ```python block"
    script = tmp_path / "quickstart.py"
    script.write_text(python_blocks[0] + textwrap.dedent(QUICKSTART_CHECKS), encoding="utf-8")
    # The environment of the test process: conftest made it offline with a throw-away HF_HOME.
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=dict(os.environ), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"the README quickstart failed:\n{proc.stdout}\n{proc.stderr}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])

    keys = set(result["keys"])
    assert len(result["hits"]) == 2
    for hits in result["hits"]:
        ranked = [key for key, _ in hits]
        scores = [score for _, score in hits]
        assert 1 <= len(hits) <= 3 and set(ranked) <= keys and len(set(ranked)) == len(ranked), hits
        assert scores == sorted(scores, reverse=True) and all(abs(score) < 1e6 for score in scores), hits
    # Decoding is deterministic, and the folder reloaded through its own code gives the same answers.
    assert result["again"] == result["hits"]
    assert result["reloaded_class"] == "GcmrForRetrieval"
    for reloaded, original in zip(result["reloaded"], result["hits"]):
        assert [key for key, _ in reloaded] == [key for key, _ in original]
        assert all(abs(a - b) < 1e-4 for (_, a), (_, b) in zip(reloaded, original))
    saved = {path.name for path in (tmp_path / "my_retriever").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer_config.json", "identifier_table.json",
            "modeling_gcmr.py", "tokenization_gcmr.py"} <= saved, saved


def test_relative_links_point_to_existing_files():
    dead = []
    for page in DOC_PAGES:
        for target in LINK.findall(_without_code(page.read_text(encoding="utf-8"))):
            if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("#"):
                continue
            path = target.split("#", 1)[0]
            if not (page.parent / path).exists():
                dead.append(f"{page.relative_to(ROOT)}: {target}")
    assert not dead, "dead relative links:\n" + "\n".join(dead)
    assert any(page.name == "user_guide.md" for page in DOC_PAGES) and any(page.name == "api.md" for page in DOC_PAGES)
