"""The identifier head scores only trie edges; its scores equal those of a full output layer over every edge.

Every test runs over all six id types (string and semantic: paths of text pieces).

A full head would score each step's query against every identifier edge vector (the analogue of an LM head over
the whole vocabulary) and read off the gold path's entries. The head instead scores only the candidates' own
edges (training with sampled candidates) or only a node's children (beam search). Both must give exactly the
numbers the full computation gives on the same rows.
"""
import numpy as np
import pytest
import torch
from test_retrieve import EMBED_DIM, HEAD_TYPES, embeddings, make_model, make_tokenizer

from modeling_gcmr.trie_beam_search_gcmr import trie_beam_search


def full_head_logits(head, queries: torch.Tensor) -> torch.Tensor:
    """(B, N) identifier logits from scoring every edge at every step, then summing each identifier's path."""
    per_edge = queries @ head.edge_vectors.T  # (B, T, E): every edge, every step
    paths = head.paths.long()
    total = torch.zeros(queries.shape[0], len(paths))
    for identifier, path in enumerate(paths):
        for step, edge in enumerate(path.tolist()):
            if edge >= 0:
                total[:, identifier] += per_edge[:, step, edge]
    return head.scale * total


@pytest.mark.parametrize("id_type", HEAD_TYPES)
def test_identifier_logits_equal_a_full_head_on_the_same_rows(text_tokenizer, caption_corpus, id_type):
    head = make_model(make_tokenizer(text_tokenizer, caption_corpus, id_type)).identifier_head
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(5, head.paths.shape[1], head.edge_vectors.shape[1], generator=generator)
    expected = full_head_logits(head, queries)
    with torch.no_grad():
        everything, _ = head.step_scores(queries, None)
        torch.testing.assert_close(head.scale * everything.sum(1), expected, rtol=1e-5, atol=1e-4)
        candidates = torch.tensor([0, 3, 7, len(head.paths) - 1])
        sampled, _ = head.step_scores(queries, candidates)
        torch.testing.assert_close(head.scale * sampled.sum(1), expected[:, candidates], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bf16 scores through their own CPU kernel
@pytest.mark.parametrize("id_type", HEAD_TYPES)
def test_beam_search_scores_of_children_equal_the_full_head(text_tokenizer, caption_corpus, id_type, dtype):
    tokenizer = make_tokenizer(text_tokenizer, caption_corpus, id_type)
    head = make_model(tokenizer).identifier_head.to(dtype)
    engine = tokenizer.prefix_trie.on("cpu")
    queries = torch.randn(4, head.edge_vectors.shape[1], generator=torch.Generator().manual_seed(1)).to(dtype)
    full = head.scale * (queries.float() @ head.edge_vectors.float().T)
    tolerance = {} if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)

    def check(scores: torch.Tensor, expected: torch.Tensor) -> None:
        assert scores.dtype == dtype
        torch.testing.assert_close(scores.float(), expected, **tolerance)

    with torch.no_grad():
        # the root step: every query against the root's children, one matrix product
        rows, edges = engine.edges_of(torch.zeros(4, dtype=torch.long))
        children = edges[: len(edges) // 4]
        check(head.shared_edge_scores(queries, children), full[:, children])
        # deeper steps: each row against its own node's children
        nodes = engine.next_node[children[: 4]].clamp(min=0)
        rows, edges = engine.edges_of(nodes)
        check(head.edge_scores(queries[rows], edges), full[rows, edges])
        # the lookahead's pairs, grouped by query or in any order: one product per query
        check(head.owned_edge_scores(queries, rows, edges), full[rows, edges])
        shuffled = torch.randperm(len(rows), generator=torch.Generator().manual_seed(2))
        check(head.owned_edge_scores(queries, rows[shuffled], edges[shuffled]), full[rows[shuffled], edges[shuffled]])


@pytest.mark.parametrize("id_type", ["structured", "coarse_fine"])
def test_the_loss_of_a_batch_is_the_mean_of_the_losses_of_its_halves(text_tokenizer, caption_corpus, id_type):
    """What DDP (each process a share of the batch, gradients averaged) and gradient accumulation rely on: the loss,
    prefix and distillation terms included, is a mean of per-row terms, also where identifiers differ in length and
    where some rows have no teacher."""
    head = make_model(make_tokenizer(text_tokenizer, caption_corpus, id_type)).identifier_head
    lengths = (head.paths >= 0).sum(1)
    by_length = torch.argsort(lengths, stable=True)
    # one half mostly long identifiers, the other mostly short ones: the halves' depth counts differ
    gold = torch.cat([by_length[-3:], by_length[:1], by_length[1:4], by_length[-4:-3]])
    assert len(lengths[gold[:4]].unique()) > 1 and lengths[gold[:4]].sum() != lengths[gold[4:]].sum()
    generator = torch.Generator().manual_seed(2)
    queries = torch.randn(8, head.paths.shape[1], head.edge_vectors.shape[1], generator=generator)
    teacher = torch.randn(8, len(head.paths), generator=generator)
    teacher[[1, 5, 6]] = float("nan")  # rows without a teacher, unevenly spread over the halves

    def loss_and_grad(rows: slice):
        loss, _ = head.loss(queries[rows], gold[rows], 1.0, teacher[rows], 2.0)
        return loss, torch.autograd.grad(loss, head.edge_vectors)[0]

    whole, whole_grad = loss_and_grad(slice(0, 8))
    (first, first_grad), (second, second_grad) = loss_and_grad(slice(0, 4)), loss_and_grad(slice(4, 8))
    torch.testing.assert_close(whole, (first + second) / 2)
    torch.testing.assert_close(whole_grad, (first_grad + second_grad) / 2)


def constrained_inner_product_search(tokenizer, features: torch.Tensor, query: torch.Tensor, num_beams: int,
                                     top_k: int) -> list[tuple[str, float]]:
    """The reference, written from the identifiers and features alone (no model): beam search over identifier
    prefixes where a prefix scores the inner product of the query with the mean feature of the images below it, and
    a complete identifier scores q . x_i; `num_beams` unfinished prefixes survive each depth."""
    rows = [tuple(tokenizer.identifier_ids(key)) for key in tokenizer.keys]
    beam, hits = [()], []
    while beam:
        extensions = {}
        for prefix in beam:
            for index, row in enumerate(rows):
                if row[: len(prefix)] != prefix:
                    continue
                if len(row) == len(prefix):
                    hits.append((tokenizer.keys[index], float(query @ features[index])))
                else:
                    extensions.setdefault(row[: len(prefix) + 1], []).append(index)
        scored = sorted(((float(query @ features[below].mean(0)), prefix) for prefix, below in extensions.items()),
                        reverse=True)
        beam = [prefix for _, prefix in scored[:num_beams]]
    return sorted(hits, key=lambda hit: -hit[1])[:top_k]


@pytest.mark.parametrize("id_type", HEAD_TYPES)
def test_step_zero_is_constrained_inner_product_search_for_every_id_type(text_tokenizer, caption_corpus, id_type):
    """Before any training step (dense-aware edge vectors, no decoder correction) the plain trie beam search
    (`lookahead=0`) is exactly the reference above: same hits, same order, scores scale * q . x_i. The default search
    (with its lookahead) still scores every hit by its exact inner product, and with a beam over every identifier it
    is exact inner-product search over the whole collection."""
    tokenizer = make_tokenizer(text_tokenizer, caption_corpus, id_type, count=30)
    model = make_model(tokenizer, trained_decoder=False)
    features = torch.as_tensor(embeddings(30))
    queries = torch.nn.functional.normalize(torch.randn(6, features.shape[1], generator=torch.Generator().manual_seed(5)),
                                            dim=-1)
    scale = model.identifier_head.scale.item()
    for num_beams, top_k in ((3, 3), (30, 5)):
        with torch.no_grad():
            plain = trie_beam_search(model, tokenizer.prefix_trie, model.encode(image_embeds=queries), num_beams, top_k,
                                     lookahead=0)
        for query, row in zip(queries, plain):
            expected = constrained_inner_product_search(tokenizer, features, query, num_beams, top_k)
            assert [tokenizer.keys[index] for index, _ in row] == [key for key, _ in expected]
            np.testing.assert_allclose([s for _, s in row], [scale * s for _, s in expected], rtol=1e-4, atol=1e-4)
        hits = model.retrieve(tokenizer=tokenizer, image_embeds=queries, top_k=top_k, num_beams=num_beams)
        for query, row in zip(queries, hits):
            exact = [scale * float(query @ features[tokenizer.keys.index(key)]) for key, _ in row]
            np.testing.assert_allclose([s for _, s in row], exact, rtol=1e-4, atol=1e-4)
        if num_beams == 30:
            brute = torch.topk(queries @ features.T, top_k).indices
            assert [[tokenizer.keys.index(key) for key, _ in row] for row in hits] == brute.tolist()


@pytest.mark.parametrize("id_type", HEAD_TYPES)
def test_a_search_without_a_decoder_term_runs_no_decoder_and_ranks_as_the_decoder_path(
        text_tokenizer, caption_corpus, id_type, monkeypatch):
    """With the step correction W h_t + b exactly zero (as initialised, or trained with --decoder_learning_rate 0)
    every step's query is the base query, so the search skips the decoder; forced through the decoder, the same
    model returns the same hits and scores. A non-zero correction brings the decoder back."""
    tokenizer = make_tokenizer(text_tokenizer, caption_corpus, id_type, count=30)
    model = make_model(tokenizer, trained_decoder=False)
    head = model.identifier_head
    queries = torch.nn.functional.normalize(torch.randn(6, EMBED_DIM, generator=torch.Generator().manual_seed(7)),
                                            dim=-1)
    decoder_runs = []
    decoder_states = model.decoder_states
    monkeypatch.setattr(model, "decoder_states", lambda *args, **kwargs: decoder_runs.append(1) or decoder_states(
        *args, **kwargs))

    def search():
        with torch.no_grad():
            return trie_beam_search(model, tokenizer.prefix_trie, model.encode(image_embeds=queries), 5, 5)

    assert not head.reads_decoder_states
    fast = search()
    assert decoder_runs == [] and all(len(row) == 5 for row in fast)
    with monkeypatch.context() as forced:
        forced.setattr(type(head), "reads_decoder_states", property(lambda self: True))
        through_decoder = search()
    assert decoder_runs, "the forced search ran the decoder"
    assert [[index for index, _ in row] for row in fast] == [[index for index, _ in row] for row in through_decoder]
    np.testing.assert_allclose([[s for _, s in row] for row in fast], [[s for _, s in row] for row in through_decoder],
                               rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        head.step_query.bias[0] = 0.5
    assert head.reads_decoder_states
    decoder_runs.clear()
    search()
    assert decoder_runs
