"""Run Python code in a fresh process in which the gcmr packages cannot be imported.

That is how a Hub user loads a checkpoint: only the code files copied into the checkpoint exist.
Setting ``sys.modules[name] = None`` makes ``import name`` raise ImportError in that process, so a
checkpoint that still reached for the installed package would fail the test.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

BLOCKED_PACKAGES = ("modeling_gcmr", "tokenization_gcmr")

_PRELUDE = """
import importlib.util, sys
for _name in {blocked!r}:
    sys.modules[_name] = None
    try:
        importlib.import_module(_name)
    except ImportError:
        pass
    else:
        raise SystemExit("package " + _name + " is still importable")
"""


def run_without_package(code: str, cwd: str, env: dict | None = None, timeout: int = 300) -> dict:
    """Run ``code`` in a new interpreter without the gcmr packages; return the JSON it prints last.

    The code must print one JSON object as its last line of stdout.
    """
    script = _PRELUDE.format(blocked=BLOCKED_PACKAGES) + textwrap.dedent(code)
    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
