"""Tensor parallelism inside a worker: TP=2 on two gloo CPU processes equals TP=1 (issue 6, point 5)."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

import msgpack
import pytest
import torch
from twisted.internet.defer import gatherResults
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest

from pie.engine import tp
from pie.engine.llama import LlamaConfig, LlamaModel
from pie.engine.loaders import load_model
from pie.interfaces import PieError
from tests.fixtures.tp_rank import engine_for, jobs
from tests.model_fixtures import write_tiny_model

pytestmark = pytest.mark.slow


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def by_id(dist: tuple[list[int], list[float]]) -> torch.Tensor:
    """A distribution as a dense probability vector indexed by token id (order-free)."""
    ids, probs = dist
    dense = torch.zeros(max(ids) + 1, dtype=torch.float64)
    dense[torch.tensor(ids)] = torch.tensor(probs, dtype=torch.float64)
    return dense


class ShardingTests(unittest.TestCase):
    def test_shards_partition_every_sharded_weight(self):
        """Concatenating the ranks' q/k/v/gate/up rows and o/down columns gives back the weights."""
        folder = tempfile.mkdtemp(prefix="pie-tiny-")
        self.addCleanup(shutil.rmtree, folder, True)
        write_tiny_model(folder)
        loaded = load_model(folder)
        shards = [tp.shard_weights(loaded.config, loaded.weights, r, 2) for r in range(2)]
        for name, full in loaded.weights.items():
            parts = [s[name] for s in shards]
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                self.assertTrue(torch.equal(torch.cat(parts, dim=1), full), name)
            else:
                self.assertTrue(
                    torch.equal(torch.cat(parts, dim=0), full)
                    or all(torch.equal(p, full) for p in parts),
                    name,
                )
        self.assertEqual(shards[0]["model.layers.0.self_attn.k_proj.weight"].shape, (16, 64))

    def test_indivisible_heads_are_refused(self):
        """A TP size that does not divide the heads fails with a clear error."""
        config = LlamaConfig(
            vocab_size=8,
            hidden_size=12,
            intermediate_size=8,
            num_hidden_layers=1,
            num_attention_heads=3,
            num_key_value_heads=3,
            head_dim=4,
        )
        with self.assertRaises(PieError) as caught:
            tp.shard_config(config, 2)
        self.assertIn("does not divide the 3 attention heads", str(caught.exception))


class TwoRankTests(unittest.TestCase):
    timeout = 240

    async def test_tp2_on_gloo_equals_tp1(self):
        """Two CPU ranks (gloo) give the same full-vocabulary softmax (so the same logits) as one
        process, job after job: prefill, masks, gaps, decode."""
        tmp = tempfile.mkdtemp(prefix="pie-tp-test-")
        self.addCleanup(shutil.rmtree, tmp, True)
        folder = os.path.join(tmp, "tiny")
        write_tiny_model(folder)
        out = os.path.join(tmp, "tp2.msgpack")
        init = f"file://{os.path.join(tmp, 'rendezvous')}"  # no port to race for
        env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
        ranks = [
            getProcessOutputAndValue(
                sys.executable,
                ["-m", "tests.fixtures.tp_rank", str(r), "2", init, folder, out],
                env=env,
                path=ROOT,
            )
            for r in range(2)
        ]
        for _stdout, stderr, code in await gatherResults(ranks):
            self.assertEqual(code, 0, stderr.decode()[-2000:])
        with open(out, "rb") as f:
            tp2 = msgpack.unpackb(f.read())

        loaded = load_model(folder)
        single = engine_for(
            LlamaModel(loaded.config, loaded.weights, dtype=torch.float32), loaded.tokenizer
        )
        tp1 = [single.run(job) for job in jobs()]
        self.assertEqual(len(tp2), len(tp1))
        compared = 0
        for got_job, want_job in zip(tp2, tp1, strict=True):
            for got_item, want_item in zip(got_job, want_job, strict=True):
                for got, want in zip(got_item, want_item, strict=True):
                    self.assertEqual(len(got[0]), loaded.config.vocab_size)  # the full softmax
                    self.assertEqual(got[0][0], want[0][0])  # the same argmax
                    torch.testing.assert_close(by_id(got), by_id(want), rtol=1e-4, atol=1e-7)
                    compared += 1
        self.assertEqual(compared, 7)
