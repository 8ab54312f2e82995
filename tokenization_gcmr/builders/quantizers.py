"""K-means and residual quantizers behind the `structured` and `coarse_fine` identifiers, and numeric's digit tree.

K-means comes from faiss (seeded, trained on a seeded subsample, then every point assigned in
batches), so a million 512-d embeddings quantize in minutes on two cores. The RQ-VAE is a small
torch module trained deterministically (seeded generator, deterministic algorithms, a fixed thread
count) whose codebooks start from faiss k-means on the latents.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator

import faiss
import numpy as np
import torch
from torch import nn

ASSIGN_BATCH = 65_536
# Below this many multiply-adds faiss runs on one OpenMP thread: on small inputs (tests, the thousands of
# small nodes of a structured tree) thread start-up and spinning on shared cores cost 30x the work.
PARALLEL_WORK = 1 << 26


@contextlib.contextmanager
def faiss_threads(work: int) -> Iterator[None]:
    """One OpenMP thread for small work; the caller's thread count comes back afterwards."""
    if work >= PARALLEL_WORK:
        yield
        return
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


def sample_rows(num_rows: int, max_rows: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted row indices of a seeded subsample (all rows when there are few enough)."""
    if num_rows <= max_rows:
        return np.arange(num_rows)
    return np.sort(rng.choice(num_rows, size=max_rows, replace=False))


def kmeans_centroids(x: np.ndarray, k: int, seed: int, iterations: int) -> np.ndarray:
    """faiss k-means on all of ``x`` (callers subsample first); float32 (k, D) centroids."""
    kmeans = faiss.Kmeans(
        x.shape[1],
        k,
        niter=iterations,
        seed=seed,
        verbose=False,
        # The caller already chose the training set: no faiss-side resampling, no "too few points" warning.
        min_points_per_centroid=1,
        max_points_per_centroid=max(1, -(-len(x) // k)),
    )
    with faiss_threads(len(x) * k * x.shape[1] * iterations):
        kmeans.train(np.ascontiguousarray(x, dtype=np.float32))
    return np.ascontiguousarray(kmeans.centroids, dtype=np.float32)


def assign(x: np.ndarray, centroids: np.ndarray, batch_size: int = ASSIGN_BATCH) -> np.ndarray:
    """Nearest centroid of every row, int64; -1 where the distance is not a number."""
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(centroids)
    labels = np.empty(len(x), dtype=np.int64)
    for start in range(0, len(x), batch_size):
        block = np.ascontiguousarray(x[start : start + batch_size], dtype=np.float32)
        with faiss_threads(len(block) * centroids.shape[0] * centroids.shape[1]):
            _, found = index.search(block, 1)
        labels[start : start + batch_size] = found[:, 0]
    return labels


def residual_kmeans(
    train: np.ndarray,
    residual_blocks: Iterable[tuple[int, np.ndarray]],
    num_rows: int,
    num_levels: int,
    codebook_size: int,
    seed: int,
    iterations: int,
    on_step: Callable[[], object] = lambda: None,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Greedy residual k-means: each level quantizes what the previous levels left over.

    The codebooks train on ``train`` (the training rows' residuals, updated in place level after level);
    then one pass over ``residual_blocks`` ((first row, float32 residual block) that may be overwritten)
    encodes all ``num_rows`` rows, one block in memory at a time. Returns int64 codes (N, num_levels) and
    one codebook (k, D) per level; calls ``on_step`` after each level and after the pass.
    """
    codebooks = []
    k = min(codebook_size, len(train))
    for level in range(num_levels):
        codebook = kmeans_centroids(train, k, seed + level + 1, iterations)
        train -= codebook[assign(train, codebook)]
        codebooks.append(codebook)
        on_step()
    codes = np.empty((num_rows, num_levels), dtype=np.int64)
    for start, block in residual_blocks:
        for level, codebook in enumerate(codebooks):
            labels = assign(block, codebook)
            codes[start : start + len(block), level] = labels
            block -= codebook[labels]
    on_step()
    return codes, codebooks


@contextlib.contextmanager
def deterministic_torch(num_threads: int) -> Iterator[None]:
    """Deterministic algorithms, a fixed thread count and a private RNG state; the caller's come back."""
    previous_threads = torch.get_num_threads()
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(num_threads)
    torch.use_deterministic_algorithms(True)
    try:
        # fork_rng: seeding for the build must not change the caller's global torch random state.
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.use_deterministic_algorithms(previous_deterministic)
        torch.set_num_threads(previous_threads)


class ResidualQuantizerVAE(nn.Module):
    """RQ-VAE: an MLP encoder, ``num_levels`` residual codebooks in latent space, an MLP decoder."""

    def __init__(self, input_dim: int, hidden_dim: int, latent_dim: int, num_levels: int, codebook_size: int):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(input_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, latent_dim))
        self.decoder = nn.Sequential(nn.Linear(latent_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, input_dim))
        self.codebooks = nn.ParameterList(
            [nn.Parameter(torch.zeros(codebook_size, latent_dim)) for _ in range(num_levels)]
        )

    def quantize(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Codes (B, M), the quantized latent, and the codebook + commitment terms (unweighted pair)."""
        residual = latent
        quantized = torch.zeros_like(latent)
        codes, codebook_loss, commitment_loss = [], latent.new_zeros(()), latent.new_zeros(())
        for codebook in self.codebooks:
            code = torch.cdist(residual, codebook).argmin(dim=1)
            entry = codebook[code]
            codebook_loss = codebook_loss + (residual.detach() - entry).pow(2).mean()
            commitment_loss = commitment_loss + (residual - entry.detach()).pow(2).mean()
            quantized = quantized + entry
            residual = residual - entry.detach()
            codes.append(code)
        return torch.stack(codes, dim=1), quantized, torch.stack([codebook_loss, commitment_loss])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        latent = self.encoder(x)
        codes, quantized, (codebook_loss, commitment_loss) = self.quantize(latent)
        # Straight-through: the decoder's gradient reaches the encoder as if quantization were identity.
        reconstruction = self.decoder(latent + (quantized - latent).detach())
        return codes, torch.stack([(reconstruction - x).pow(2).mean(), codebook_loss, commitment_loss])

    @torch.no_grad()
    def init_codebooks(self, x: torch.Tensor, seed: int, iterations: int) -> None:
        """Start each level's codebook at faiss k-means of the latent residuals it will see."""
        residual = self.encoder(x).numpy()
        for level, codebook in enumerate(self.codebooks):
            k = codebook.shape[0]
            centroids = kmeans_centroids(residual, k, seed + level + 1, iterations)
            codebook.copy_(torch.from_numpy(centroids))
            residual = residual - centroids[assign(residual, centroids)]

    @torch.no_grad()
    def encode(self, x: np.ndarray) -> np.ndarray:
        return self.quantize(self.encoder(torch.from_numpy(x)))[0].numpy().astype(np.int64)


def train_rqvae(
    train: np.ndarray,
    residual_blocks: Iterable[tuple[int, np.ndarray]],
    num_rows: int,
    *,
    num_levels: int,
    codebook_size: int,
    hidden_dim: int,
    latent_dim: int,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    commitment_weight: float,
    num_threads: int,
    seed: int,
    iterations: int,
    on_step: Callable[[], object] = lambda: None,
) -> np.ndarray:
    """Train an RQ-VAE on ``train`` (the training rows' residuals), then encode ``residual_blocks``
    ((first row, float32 block) over all ``num_rows`` rows) into int64 codes (N, num_levels), a block at a time.
    Calls ``on_step`` after training and after encoding."""
    with deterministic_torch(num_threads):
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        train = torch.from_numpy(np.ascontiguousarray(train, dtype=np.float32))
        k = min(codebook_size, len(train))
        model = ResidualQuantizerVAE(train.shape[1], hidden_dim, latent_dim, num_levels, k)
        model.init_codebooks(train, seed, iterations)
        optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
        weights = torch.tensor([1.0, 1.0, commitment_weight])
        model.train()
        for _ in range(epochs):
            for batch in torch.randperm(len(train), generator=generator).split(batch_size):
                _, losses = model(train[batch])
                optimizer.zero_grad(set_to_none=True)
                (losses * weights).sum().backward()
                optimizer.step()
        model.eval()
        on_step()
        codes = np.empty((num_rows, num_levels), dtype=np.int64)
        for start, block in residual_blocks:
            codes[start : start + len(block)] = model.encode(block)
        on_step()
        return codes


def digit_tree_numbers(embeddings: np.ndarray, width: int, seed: int, iterations: int, train_sample: int,
                       on_done: Callable[[int], object] = lambda count: None) -> np.ndarray:
    """Running numbers whose digit prefixes are clusters: a balanced hierarchical k-means with 10 branches per digit.

    A node whose numbers have `r` free digits holds at most 10**r images; it is split by k-means into at most 10
    children of at most 10**(r-1) images each (capacity-constrained assignment), child j taking digit j. The digit
    trie is then a cluster tree, its dense-aware edge vectors are cluster means, and beam search over the digits is
    an approximate inner-product search; under an arbitrary order every prefix is a random set of images whose
    mean says nothing, and the beam prunes the gold at the second digit. `on_done(count)` reports finished images.
    """
    rng = np.random.default_rng(seed)
    index = np.zeros(len(embeddings), dtype=np.int64)
    stack = [(np.arange(len(embeddings)), width)]
    while stack:
        rows, free = stack.pop()
        capacity = 10 ** (free - 1) if free else 0
        if len(rows) <= 10 or capacity <= 1:
            # One image per child: which digit each takes changes no score (the child's edge is that image's).
            index[rows] += np.arange(len(rows)) * capacity
            on_done(len(rows))
            continue
        node = embeddings if len(rows) == len(embeddings) else embeddings[rows]
        centroids = kmeans_centroids(node[sample_rows(len(rows), train_sample, rng)], 10, seed, iterations)
        labels = capacity_assign(node, centroids, capacity)
        index[rows] += labels * capacity
        order = np.argsort(labels, kind="stable")
        children = np.split(rows[order], np.flatnonzero(np.diff(labels[order])) + 1)
        stack.extend((child, free - 1) for child in reversed(children))
    return index


def capacity_assign(x: np.ndarray, centroids: np.ndarray, capacity: int) -> np.ndarray:
    """Nearest centroid of every row, no centroid taking more than `capacity` rows (needs k * capacity >= rows).

    Greedy by regret: rows go to their nearest open centroid; a centroid offered more rows than it has room for keeps
    those that would lose the most by moving (second-nearest minus nearest distance) and closes; the others try
    again among the open centroids. At most k rounds.
    """
    distances = np.empty((len(x), len(centroids)))
    norms = (centroids.astype(np.float64) ** 2).sum(axis=1)
    for start in range(0, len(x), ASSIGN_BATCH):  # blockwise: no float64 copy of the whole node
        block = x[start : start + ASSIGN_BATCH].astype(np.float64)
        distances[start : start + ASSIGN_BATCH] = norms - 2 * block @ centroids.T.astype(np.float64)
    distances[~np.isfinite(distances)] = np.finfo(np.float64).max  # a NaN centroid is the last choice
    labels = np.full(len(x), -1, dtype=np.int64)
    room = np.full(len(centroids), capacity, dtype=np.int64)
    pending = np.arange(len(x))
    while len(pending):
        open_ = room > 0
        candidate = np.where(open_[None], distances[pending], np.inf)
        nearest = np.argmin(candidate, axis=1)
        two = np.partition(candidate, 1, axis=1)[:, :2] if candidate.shape[1] > 1 else np.c_[candidate, candidate]
        regret = two[:, 1] - two[:, 0]
        still = []
        for centre in np.flatnonzero(open_):
            offered = pending[nearest == centre]
            if len(offered) > room[centre]:
                by_regret = np.argsort(-regret[nearest == centre], kind="stable")
                still.append(offered[by_regret[room[centre] :]])
                offered = offered[by_regret[: room[centre]]]
            labels[offered] = centre
            room[centre] -= len(offered)
        pending = np.sort(np.concatenate(still)) if still else pending[:0]
    return labels
