"""Tensor parallelism inside one `pie worker`, on torch.distributed (gloo on CPU, NCCL on GPU).

Megatron-style sharding of pie.engine.llama's LlamaModel, without touching it:
rank r keeps its slice of the attention heads (q, and the k/v heads they
share under GQA) and of the MLP's intermediate features, and a LlamaModel is
built over that slice with a config whose head and feature counts are the
per-rank ones. The two row-parallel projections (attention output `o` and
MLP `down`) produce partial sums, so they are wrapped to all-reduce their
output; embeddings, norms and the LM head are replicated. Each rank also
holds only its heads' share of the KV cache.

Rank 0 is the worker the daemon talks to: TPEngine broadcasts every job to
the other ranks, which run `follow` and execute the same jobs in the same
order, so the collectives inside the forward pass line up.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import os
import signal

import torch
import torch.distributed as dist

from pie.engine import batch
from pie.engine.llama import LlamaConfig, LlamaModel
from pie.engine.memory import KvSizing
from pie.interfaces import PieError

PR_SET_PDEATHSIG = 1


def shard_config(config: LlamaConfig, world: int) -> LlamaConfig:
    """The per-rank architecture: 1/world of the heads and of the MLP features."""
    for what, count in (
        ("attention heads", config.num_attention_heads),
        ("key/value heads", config.num_key_value_heads),
        ("MLP features (intermediate_size)", config.intermediate_size),
    ):
        if count % world:
            raise PieError(f"tensor parallel size {world} does not divide the {count} {what}")
    return dataclasses.replace(
        config,
        num_attention_heads=config.num_attention_heads // world,
        num_key_value_heads=config.num_key_value_heads // world,
        intermediate_size=config.intermediate_size // world,
    )


def shard_weights(
    config: LlamaConfig, weights: dict[str, torch.Tensor], rank: int, world: int
) -> dict[str, torch.Tensor]:
    """Rank `rank`'s slice of the Hugging Face-named weights (views, no copies)."""
    part = shard_config(config, world)
    d = config.head_dim
    q_rows = slice(rank * part.num_attention_heads * d, (rank + 1) * part.num_attention_heads * d)
    kv_rows = slice(rank * part.num_key_value_heads * d, (rank + 1) * part.num_key_value_heads * d)
    mlp_rows = slice(rank * part.intermediate_size, (rank + 1) * part.intermediate_size)
    rows = {
        "q_proj": q_rows,
        "k_proj": kv_rows,
        "v_proj": kv_rows,
        "gate_proj": mlp_rows,
        "up_proj": mlp_rows,
    }
    columns = {"o_proj": q_rows, "down_proj": mlp_rows}
    sharded = {}
    for name, tensor in weights.items():
        kind = name.rsplit(".", 2)[-2] if name.endswith(".weight") else ""
        if kind in rows:
            tensor = tensor[rows[kind], :]
        elif kind in columns:
            tensor = tensor[:, columns[kind]]
        sharded[name] = tensor
    return sharded


class AllReduced:
    """A row-parallel linear: this rank's partial product, summed over the group."""

    def __init__(self, linear: object, group: object = None) -> None:
        self.linear = linear
        self.group = group

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        dist.all_reduce(y, group=self.group)
        return y


def sharded_model(
    config: LlamaConfig,
    weights: dict[str, torch.Tensor],
    *,
    device: str | torch.device,
    dtype: torch.dtype,
    group: object = None,
) -> LlamaModel:
    """This rank's LlamaModel; the process group must be initialised."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    model = LlamaModel(
        shard_config(config, world),
        shard_weights(config, weights, rank, world),
        device=device,
        dtype=dtype,
        use_int4=False,  # Q4_1 blocks are not split by rank; the shards run dense
    )
    for layer in model.layers:
        layer.o = AllReduced(layer.o, group)
        layer.down = AllReduced(layer.down, group)
    return model


def init_group(rank: int, world: int, init_method: str, device: torch.device) -> None:
    """Join the worker's process group: NCCL for CUDA devices, gloo otherwise."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world)


def agree_kv_sizing(sizing: KvSizing, device: torch.device) -> KvSizing:
    """The smallest pool any rank sized from its own memory: every rank must hold the same pages."""
    pages = torch.tensor([sizing.pages], dtype=torch.int64, device=device)
    dist.all_reduce(pages, op=dist.ReduceOp.MIN)
    agreed = int(pages.item())
    if agreed == sizing.pages:
        return sizing
    world = dist.get_world_size()
    return KvSizing(agreed, sizing.page_bytes, f"{agreed} pages, the least of {world} TP ranks")


def _object_device(engine: object) -> torch.device | None:
    """Where broadcast_object_list stages its bytes: NCCL only moves CUDA tensors, and the
    current CUDA device is per thread, so name this rank's device explicitly."""
    return engine.model.device if dist.get_backend() == "nccl" else None


class TPEngine:
    """Rank 0's engine: every job goes to all ranks, then runs here; rank 0 answers."""

    def __init__(self, engine: object) -> None:
        self.engine = engine
        self.name = engine.name
        self.info = engine.info
        self.tokenizer = engine.tokenizer

    def run(self, job: object) -> object:
        dist.broadcast_object_list([batch.to_wire(job)], src=0, device=_object_device(self.engine))
        return self.engine.run(job)

    def close(self) -> None:
        """Release the followers (they leave `follow`) and leave the group."""
        dist.broadcast_object_list([None], src=0, device=_object_device(self.engine))
        dist.destroy_process_group()


def die_with_parent() -> None:
    """Linux: have the kernel kill this follower when rank 0's process dies (even by SIGKILL);
    a collective waiting for a dead rank 0 might otherwise wait for a long time."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux: rank 0's close() or the collective's own error ends the follower
    if os.getppid() == 1:  # rank 0 died before the prctl
        os._exit(1)


def follow(engine: object) -> None:
    """Ranks 1..N-1: run rank 0's jobs until it closes.

    Errors are rank 0's to report; every rank validates the same job the same
    way, so a job that fails here failed there too.
    """
    while True:
        box: list = [None]
        dist.broadcast_object_list(box, src=0, device=_object_device(engine))
        if box[0] is None:
            break
        try:
            engine.run(batch.from_wire(box[0]))
        except PieError:
            pass
    dist.destroy_process_group()
