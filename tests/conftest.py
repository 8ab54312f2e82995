"""Test-wide settings: offline, a throw-away HF_HOME, and helpers shared by the test modules.

The environment is set at import time, before transformers or huggingface_hub read it.
"""
import os
import sys
import tempfile

_HF_HOME = tempfile.mkdtemp(prefix="gcmr-hf-home-")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HOME"] = _HF_HOME
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

sys.path.insert(0, os.path.dirname(__file__))
