"""Sharded embeddings: owner routing, the per-step exchange plan, and the table facade.

Data moves data-parallel -> model-parallel on pull (each rank's unique keys go to their owner
ranks, rows come back) and model-parallel -> data-parallel on push (row gradients go back to the
owners along the same plan). Tables never import mpi4py; the exchange talks to hybridps.comm.
"""
from hybridps.embedding.routing import owner_ranks
from hybridps.embedding.table import EmbeddingHashTable, make_table
from hybridps.embedding.sharded import ExchangePlan, ShardedEmbedding

__all__ = ["EmbeddingHashTable", "ExchangePlan", "ShardedEmbedding", "make_table", "owner_ranks"]
