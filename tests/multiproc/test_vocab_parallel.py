"""The vocab-parallel embedding on 2 gloo ranks: the same output and table gradient as one nn.Embedding, with
the gradient left as each rank's rows (torch's RowwiseParallel leaves a replicated [V, D] on every rank).

Both output layouts in one process group: Replicate (plain tp) and Shard(1) (sequence parallelism).
Run: .venv/bin/pytest -q tests/multiproc/test_vocab_parallel.py
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import parallelize_module

from moeyard.parallel.tensor import VocabParallelEmbedding
from tests.helpers import free_port, local_rank_env, spawn

TP, VOCAB, DIM = 2, 16, 4


def _rank(rank: int, port: int, out: str) -> None:
    local_rank_env(rank, TP, port)
    mesh = init_device_mesh("cpu", (TP,), mesh_dim_names=("tp",))
    results = {}
    for name, layout in (("replicate", Replicate()), ("sequence", Shard(1))):
        torch.manual_seed(0)
        whole = torch.nn.Embedding(VOCAB, DIM)
        split = torch.nn.Embedding(VOCAB, DIM)
        split.load_state_dict(whole.state_dict())
        parallelize_module(split, mesh, VocabParallelEmbedding(layout))
        ids = torch.randint(0, VOCAB, (2, 6))  # same on every rank (same seed)
        weights = torch.randn(2, 6, DIM)
        (whole(ids) * weights).sum().backward()
        got = split(ids)
        mine = weights.chunk(TP, dim=1)[rank] if name == "sequence" else weights
        (got * mine).sum().backward()
        grad = split.weight.grad
        results[name] = {
            "out": got.detach() * 1,  # a plain tensor, whatever the style returned
            "want_out": whole(ids).chunk(TP, dim=1)[rank] if name == "sequence" else whole(ids).detach(),
            "grad_placements": tuple(str(p) for p in grad.placements),
            "grad_local_shape": tuple(grad.to_local().shape),
            "grad": grad.full_tensor(),
            "want_grad": whole.weight.grad,
        }
    if rank == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.multiproc
@pytest.mark.timeout(120)
def test_vocab_parallel_embedding_matches_and_keeps_its_gradient_split(tmp_path: Path) -> None:
    out = str(tmp_path / "out.pt")
    spawn(_rank, (free_port(), out), TP)
    results = torch.load(out, weights_only=True)
    for name, r in results.items():
        torch.testing.assert_close(r["out"].detach(), r["want_out"].detach(), rtol=0, atol=0, msg=name)
        assert r["grad"].abs().sum() > 0, name
        torch.testing.assert_close(r["grad"], r["want_grad"], rtol=1e-6, atol=1e-6, msg=name)
        assert r["grad_placements"] == ("S(0)",), name
        assert r["grad_local_shape"] == (VOCAB // TP, DIM), name
