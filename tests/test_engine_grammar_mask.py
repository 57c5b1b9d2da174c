"""The engine side of grammar masks (issue 13): a packed bitmask in Sampling.allowed limits
every sampler to the allowed tokens over the full vocabulary, and crosses the remote wire."""

from __future__ import annotations

import threading
from concurrent.futures import Future

import torch
from twisted.trial import unittest

from pie.engine.batch import Forward, ForwardItem, Sampling, from_wire, to_wire
from pie.engine.sampling import sample, unpack_bits
from pie.remote.wire import pack, unpack

VOCAB = 1000


def mask_of(allowed: set[int], vocab: int = VOCAB) -> bytes:
    data = bytearray((vocab + 31) // 32 * 4)
    for t in allowed:
        data[t >> 3] |= 1 << (t & 7)
    return bytes(data)


class MaskTests(unittest.TestCase):
    def setUp(self):
        generator = torch.Generator().manual_seed(0)
        self.logits = torch.randn(4, VOCAB, generator=generator)
        self.logits[:, 7] = 50.0  # the model's overwhelming favourite
        self.generator = generator

    def test_unpack_matches_the_bit_layout(self):
        keep = unpack_bits(mask_of({0, 9, 999}), VOCAB)
        self.assertEqual(keep.nonzero()[0].tolist(), [0, 9, 999])
        short = unpack_bits(mask_of({3}, 64), VOCAB)
        self.assertEqual(short.nonzero()[0].tolist(), [3])  # past the mask: refused

    def test_every_sampler_draws_only_allowed_tokens(self):
        allowed = {123, 456, 998}  # far from the top of the distribution
        samplers = [
            Sampling(allowed=mask_of(allowed)),
            Sampling(temperature=1.0, allowed=mask_of(allowed)),
            Sampling(temperature=2.0, top_k=2, allowed=mask_of(allowed)),
            Sampling(temperature=1.5, top_p=0.5, seed=3, allowed=mask_of(allowed)),
        ]
        for _ in range(20):
            ids = sample(self.logits, samplers, self.generator)
            self.assertTrue(set(ids) <= allowed, ids)
        greedy = max(allowed, key=lambda t: self.logits[0, t].item())
        self.assertEqual(sample(self.logits, samplers[:1] * 4, self.generator)[0], greedy)

    def test_unmasked_rows_are_untouched(self):
        params = [Sampling(), Sampling(allowed=mask_of({5})), Sampling(), Sampling()]
        self.assertEqual(sample(self.logits, params, self.generator), [7, 5, 7, 7])
        self.assertEqual(self.logits[1].argmax().item(), 7)  # the caller's logits unchanged

    def test_the_mask_crosses_the_wire_as_bytes(self):
        item = ForwardItem(
            pages=[0], last_page_len=1, positions=[0], tokens=[1], output_indices=[0],
            sampling=Sampling(temperature=0.5, allowed=mask_of({1, 2})),
        )  # fmt: skip
        message = unpack(pack({"type": "job", "id": 1, "job": to_wire(Forward([item]))}))
        back = from_wire(message["job"])
        self.assertEqual(back.items[0].sampling, item.sampling)

    def test_a_mask_still_being_computed_crosses_the_wire_as_its_bytes(self):
        pending: Future = Future()
        item = ForwardItem(
            pages=[0], last_page_len=1, positions=[0], tokens=[1], output_indices=[0],
            sampling=Sampling(allowed=pending),
        )  # fmt: skip
        computing = threading.Thread(target=pending.set_result, args=(mask_of({2}),))
        computing.start()  # to_wire waits for it, whenever it lands
        message = unpack(pack({"type": "job", "id": 1, "job": to_wire(Forward([item]))}))
        back = from_wire(message["job"])
        computing.join()
        self.assertEqual(back.items[0].sampling.allowed, mask_of({2}))
