"""Saving a retriever as one folder, and pushing it through a Hub and loading it back without the package.

The Hub is the loopback server of tests/hub_server.py; both sides use the real huggingface_hub/transformers clients in
their own processes (they read HF_ENDPOINT at import time; this test process stays offline).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from hub_server import client_env, running_hub_server
from huggingface_hub import ModelCard
from subprocess_utils import run_without_package
from test_model_card import TINY_QUERY, build_tiny_retriever

from modeling_gcmr import GcmrForRetrieval
from modeling_gcmr.publishing.checkpoint import save_retriever
from modeling_gcmr.publishing.model_card import build_model_card, extract_usage_snippet
from tokenization_gcmr import ImageIdTokenizer, build_identifiers

CONTRACT_REPO = "tester/gcmr-contract"  # pushed with model.push_to_hub + tokenizer.push_to_hub + the card
ONE_COMMIT_REPO = "tester/gcmr-one-commit"  # pushed with push_retriever_to_hub
TEMPLATE_MARK = "This is the model card of a 🤗 transformers model"

PUSH_SCRIPT = r"""
import json, sys
from huggingface_hub import HfApi, ModelCard, hf_hub_download
from modeling_gcmr import GcmrForRetrieval
from modeling_gcmr.publishing.checkpoint import push_retriever_to_hub
from tokenization_gcmr import ImageIdTokenizer

local, card_contract, card_one_commit = sys.argv[1:4]
model = GcmrForRetrieval.from_pretrained(local)
tokenizer = ImageIdTokenizer.from_pretrained(local)
api = HfApi()
out = {}

model.push_to_hub("__CONTRACT__")
tokenizer.push_to_hub("__CONTRACT__")
with open(hf_hub_download("__CONTRACT__", "README.md"), encoding="utf-8") as f:
    out["readme_before_card"] = f.read()
api.upload_file(path_or_fileobj=card_contract, path_in_repo="README.md", repo_id="__CONTRACT__",
                commit_message="Add the model card")
out["contract_files"] = sorted(api.list_repo_files("__CONTRACT__"))

info = push_retriever_to_hub(model, tokenizer, "__ONE__", card=ModelCard.load(card_one_commit))
out["one_commit_oid"] = info.oid
out["one_commit_head"] = api.model_info("__ONE__").sha
out["one_commit_files"] = sorted(api.list_repo_files("__ONE__"))
print(json.dumps(out))
""".replace("__CONTRACT__", CONTRACT_REPO).replace("__ONE__", ONE_COMMIT_REPO)

LOAD_SCRIPT = r"""
import json
from huggingface_hub import hf_hub_download
from transformers import AutoModel, AutoTokenizer

out = {}
for repo in (__REPOS__):
    model = AutoModel.from_pretrained(repo, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(repo, trust_remote_code=True)
    hits = model.retrieve([__QUERY__], tokenizer, top_k=5)[0]
    with open(hf_hub_download(repo, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    out[repo] = {"hits": [[k, float(s)] for k, s in hits], "readme": readme,
                 "classes": [type(model).__module__, type(model).__name__, type(tokenizer).__name__]}
# The usage snippet of the pushed card, run verbatim (the test checks the Hub's README is that card).
namespace = {}
exec(SNIPPET, namespace)
out["snippet_hits"] = [[k, float(s)] for k, s in namespace["hits"][0]]
print(json.dumps(out))
""".replace("__REPOS__", repr((CONTRACT_REPO, ONE_COMMIT_REPO))).replace("__QUERY__", repr(TINY_QUERY))


def _card(repo_id: str) -> ModelCard:
    return build_model_card(
        model_name=repo_id.split("/")[-1], id_type="numeric", corpus_size=8, dataset_name="synthetic-shapes",
        training_args={"learning_rate": 1e-3, "num_train_epochs": 1},
        metrics={"recall@1": 0.25, "recall@5": 0.5, "recall@10": 0.75, "mrr@10": 0.4},
        baseline_metrics={"recall@1": 0.125, "recall@5": 0.5, "recall@10": 0.625, "mrr@10": 0.3},
        repo_id=repo_id, example_query=TINY_QUERY,
    )


@pytest.fixture(scope="module")
def tiny_retriever(text_tokenizer):
    return build_tiny_retriever(text_tokenizer)


@pytest.fixture(scope="module")
def round_trip(tiny_retriever, tmp_path_factory) -> dict:
    """Push (one process, package installed) then load (another process, package blocked) through the server."""
    model, tokenizer = tiny_retriever
    work = tmp_path_factory.mktemp("push")
    save_retriever(model, tokenizer, work / "local")
    cards = {}
    for repo in (CONTRACT_REPO, ONE_COMMIT_REPO):
        cards[repo] = _card(repo)
        cards[repo].save(work / f"{repo.split('/')[-1]}.md")
    with running_hub_server() as url:
        push_env = {**os.environ, **client_env(url, str(work / "hf_home_push"))}
        proc = subprocess.run(
            [sys.executable, "-c", PUSH_SCRIPT, str(work / "local"),
             str(work / "gcmr-contract.md"), str(work / "gcmr-one-commit.md")],
            env=push_env, capture_output=True, text=True, timeout=240, cwd=str(work),
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        pushed = json.loads(proc.stdout.strip().splitlines()[-1])
        # A fresh HF_HOME: nothing cached by the pushing side, the code comes from the Hub.
        load_env = client_env(url, str(work / "hf_home_load"))
        snippet = extract_usage_snippet(cards[ONE_COMMIT_REPO])
        script = f"SNIPPET = {snippet!r}\n" + LOAD_SCRIPT
        loaded = run_without_package(script, cwd=str(work), env=load_env, timeout=240)
    expected = [[key, float(score)] for key, score in model.retrieve([TINY_QUERY], tokenizer, top_k=5)[0]]
    return {"pushed": pushed, "loaded": loaded, "expected": expected, "cards": cards}


def _assert_same_hits(got: list, expected: list) -> None:
    assert [k for k, _ in got] == [k for k, _ in expected] and len(expected) >= 1
    assert [s for _, s in got] == pytest.approx([s for _, s in expected], abs=1e-4)


@pytest.mark.parametrize("repo", [CONTRACT_REPO, ONE_COMMIT_REPO])
def test_loaded_from_the_hub_without_the_package_retrieves_the_same(round_trip, repo):
    loaded = round_trip["loaded"][repo]
    _assert_same_hits(loaded["hits"], round_trip["expected"])
    module, model_class, tokenizer_class = loaded["classes"]
    assert module.startswith("transformers_modules.") and model_class == "GcmrForRetrieval"
    assert tokenizer_class == "ImageIdTokenizer"


@pytest.mark.parametrize("repo", [CONTRACT_REPO, ONE_COMMIT_REPO])
def test_the_hub_readme_is_the_generated_card(round_trip, repo):
    readme = round_trip["loaded"][repo]["readme"]
    assert TEMPLATE_MARK not in readme
    assert readme == str(round_trip["cards"][repo])
    # Without the explicit card, transformers' push_to_hub leaves its template README: why the card is pushed.
    assert TEMPLATE_MARK in round_trip["pushed"]["readme_before_card"]


def test_the_cards_usage_snippet_runs_against_the_hub(round_trip):
    assert round_trip["loaded"][ONE_COMMIT_REPO]["readme"] == str(round_trip["cards"][ONE_COMMIT_REPO])
    _assert_same_hits(round_trip["loaded"]["snippet_hits"], round_trip["expected"])


def test_repo_holds_weights_tokenizer_table_and_code(round_trip):
    pushed = round_trip["pushed"]
    for files in (pushed["contract_files"], pushed["one_commit_files"]):
        for name in ("README.md", "config.json", "generation_config.json", "model.safetensors",
                     "tokenizer_config.json", "configuration_gcmr.py", "modeling_gcmr.py", "tokenization_gcmr.py"):
            assert name in files, (name, files)
        assert not any(name.endswith((".bin", ".pkl", ".pt")) for name in files)
    assert set(pushed["one_commit_files"]) == set(pushed["contract_files"])
    assert pushed["one_commit_oid"] == pushed["one_commit_head"]


# -- save_retriever (local, no Hub) -------------------------------------------------------------------------------


def test_save_retriever_writes_one_loadable_folder(tiny_retriever, tmp_path):
    model, tokenizer = tiny_retriever
    card = _card("tester/local")
    folder = save_retriever(model, tokenizer, tmp_path / "ckpt", card)
    assert (folder / "README.md").read_text(encoding="utf-8") == str(card)
    reloaded = GcmrForRetrieval.from_pretrained(folder).eval()
    reloaded_tokenizer = ImageIdTokenizer.from_pretrained(folder)
    _assert_same_hits(
        [[k, float(s)] for k, s in reloaded.retrieve([TINY_QUERY], reloaded_tokenizer, top_k=5)[0]],
        [[k, float(s)] for k, s in model.retrieve([TINY_QUERY], tokenizer, top_k=5)[0]],
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no staging folder left behind


def test_save_retriever_replaces_a_checkpoint_as_a_whole_and_refuses_other_folders(tiny_retriever, tmp_path):
    model, tokenizer = tiny_retriever
    folder = save_retriever(model, tokenizer, tmp_path / "ckpt")
    (folder / "model-00001-of-00002.safetensors").write_bytes(b"a shard of an older, sharded save")
    save_retriever(model, tokenizer, folder)
    assert not (folder / "model-00001-of-00002.safetensors").exists() and (folder / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "stale.txt").write_text("not a checkpoint")  # saving used to delete it with the folder
    with pytest.raises(ValueError, match="it holds stale.txt and is not a retriever checkpoint"):
        save_retriever(model, tokenizer, other)
    assert [p.name for p in other.iterdir()] == ["stale.txt"]


def test_a_crash_while_saving_leaves_the_previous_folder_intact(tiny_retriever, tmp_path):
    model, tokenizer = tiny_retriever
    folder = save_retriever(model, tokenizer, tmp_path / "ckpt", _card("tester/local"))
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    unwritable_card = ModelCard("---\nlicense: mit\n---\n\nA lone surrogate cannot be encoded: \ud800\n")
    with pytest.raises(UnicodeEncodeError):
        save_retriever(model, tokenizer, folder, unwritable_card)  # fails after model and tokenizer were written
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_save_retriever_refuses_a_tokenizer_the_model_was_not_sized_for(tiny_retriever, text_tokenizer, tmp_path):
    model, _ = tiny_retriever
    other = ImageIdTokenizer(text_tokenizer, build_identifiers([f"other-{i}" for i in range(5)], "atomic"))
    with pytest.raises(ValueError, match="identifier_signature"):
        save_retriever(model, other, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is not a directory"):
        save_retriever(model, tiny_retriever[1], tmp_path / "file")
