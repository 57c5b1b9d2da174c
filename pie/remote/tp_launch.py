"""Tensor-parallel ranks of one `pie worker`: rank 0 serves, ranks 1..N-1 follow it.

The followers are child processes running the same `pie worker` command with
--tp-rank; they meet rank 0 through a file (torch's FileStore), so there is no
port to pick or race for. The sharding itself is pie.engine.tp.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from typing import Any

from pie.service.registry import resolve_model


def rank_engine(options: Any, path: str) -> Any:
    """The Engine this process runs: the whole model, or this rank's shard of it."""
    import torch

    from pie.engine import tp
    from pie.engine.engine import Engine, create_engine, kv_pool_size
    from pie.engine.loaders import load_model, resolve_device, resolve_dtype
    from pie.engine.memory import KvPolicy
    from pie.service.servicetypes import model_loaders

    device = resolve_device(options["device"])
    if device.type == "cuda" and options["tp"] > 1:
        device = torch.device("cuda", options["tp-rank"])
    dtype = resolve_dtype(options["dtype"], device)
    loaded = load_model(path, dtype=dtype, loaders=list(model_loaders().values()))
    policy = KvPolicy(
        headroom_bytes=options["kv-headroom-bytes"],
        cuda_fraction=options["kv-memory-fraction"],
        max_pages=options["max-kv-pages"],
    )
    sizes = dict(
        page_size=options["page-size"],
        num_embeds=options["num-embeds"],
        dist_size=options["dist-size"],
    )
    if options["tp"] == 1:
        return create_engine(
            loaded,
            device=str(device),
            dtype=dtype,
            name=options["model-name"],
            num_pages=options["num-pages"],
            kv_policy=policy,
            **sizes,
        )
    tp.init_group(options["tp-rank"], options["tp"], options["tp-init"], device)
    model = tp.sharded_model(loaded.config, loaded.weights, device=device, dtype=dtype)
    sizing = kv_pool_size(model, options["page-size"], options["num-pages"], policy)
    return Engine(
        model,
        loaded.tokenizer,
        name=options["model-name"] or loaded.name,
        num_pages=tp.agree_kv_sizing(sizing, device),
        **sizes,
    )


def leader(engine: Any) -> Any:
    from pie.engine import tp

    return tp.TPEngine(engine)


def start_followers(argv: list[str], options: Any) -> list[subprocess.Popen]:
    """Start ranks 1..tp-1 as children; options gains the rendezvous (tp-init, tp-dir)."""
    options["tp-dir"] = tempfile.mkdtemp(prefix="pie-tp-")
    options["tp-init"] = f"file://{os.path.join(options['tp-dir'], 'rendezvous')}"
    command = [sys.executable, "-m", "pie.cli", "worker", *argv, "--tp-init", options["tp-init"]]
    return [
        subprocess.Popen([*command, "--tp-rank", str(rank)]) for rank in range(1, options["tp"])
    ]


def follow(options: Any) -> int:
    """A follower rank's whole life: run rank 0's jobs until the group ends."""
    from pie.engine import tp

    tp.die_with_parent()
    tp.follow(rank_engine(options, resolve_model(options["model"], options["home"])))
    return 0
