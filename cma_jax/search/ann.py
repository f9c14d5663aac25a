"""Candidates for large indexes: an HNSW graph (faiss) over each video's mean-pooled, L2-normalised
frame embedding, searched by inner product with the normalised query; the head then re-scores them."""

from __future__ import annotations

import faiss
import numpy as np

M = 32  # graph degree: faiss's usual choice for ~512-d embeddings


def mean_pooled(frame_emb: np.ndarray, frame_mask: np.ndarray) -> np.ndarray:
    """[N, T, D], [N, T] -> [N, D] float32, the masked mean of each video's frames, L2-normalised."""
    m = frame_mask[..., None].astype(np.float32)
    v = (frame_emb.astype(np.float32) * m).sum(1) / np.maximum(m.sum(1), 1.0)
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-6)


EF_CONSTRUCTION = 80


class MeanPooledIndex:
    """Approximate top-C videos by cosine with the mean-pooled video embedding."""

    KIND = f"hnsw{M}-ef{EF_CONSTRUCTION}"  # how the graph is built: part of a saved graph's key

    def __init__(self, graph: faiss.Index):
        self.graph = graph

    @classmethod
    def build(cls, frame_emb: np.ndarray, frame_mask: np.ndarray) -> "MeanPooledIndex":
        vectors = mean_pooled(frame_emb, frame_mask)
        graph = faiss.IndexHNSWFlat(vectors.shape[1], M, faiss.METRIC_INNER_PRODUCT)
        graph.hnsw.efConstruction = EF_CONSTRUCTION
        graph.add(vectors)
        return cls(graph)

    @classmethod
    def from_bytes(cls, data: bytes) -> "MeanPooledIndex":
        return cls(faiss.deserialize_index(np.frombuffer(data, np.uint8)))

    def to_bytes(self) -> bytes:
        return faiss.serialize_index(self.graph).tobytes()

    def nbytes(self) -> int:
        return int(faiss.serialize_index(self.graph).nbytes)

    def candidates(self, text_emb: np.ndarray, count: int) -> np.ndarray:
        """text_emb [Nt, D] -> [Nt, C] video indices (C = min(count, N)), best first."""
        count = min(count, self.graph.ntotal)
        self.graph.hnsw.efSearch = max(count, 64)  # HNSW returns at most efSearch results
        q = text_emb / np.maximum(np.linalg.norm(text_emb, axis=-1, keepdims=True), 1e-6)
        q = np.ascontiguousarray(q, np.float32)
        _, idx = self.graph.search(q, count)
        short = (idx < 0).any(axis=1)  # the graph walk found fewer than `count`: those rows by brute force
        if short.any():
            _, idx[short] = faiss.downcast_index(self.graph.storage).search(q[short], count)
        return idx
