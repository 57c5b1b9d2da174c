"""pie.inferlet.Context and friends, run by the real guest driver on pie's host over a fake model.

FakeWorld (pie.inferlet.testing) is the real runtime and model service on a
fake worker: real page bookkeeping, masks checked, and it never sends a
queue's commands before something on that queue is awaited,
so wrong sharing, masks, positions or missing synchronisation show up here
as errors or wrong tokens. References are computed straight from the fake
model's definition.
"""

from __future__ import annotations

import json

import jinja2.sandbox
from twisted.trial import unittest

from pie.inferlet import (
    Brle,
    Context,
    EmptyDrafter,
    Greedy,
    Length,
    NoChatTemplate,
    Subscription,
    TopK,
    broadcast,
    gather,
    get_auto_model,
    receive,
    send,
    sleep,
    store_get,
    store_list_keys,
    store_set,
    subscribe,
    time_ms,
)
from pie.inferlet.testing import (
    SMOLLM2_TEMPLATE,
    FakeModel,
    FakeWorld,
    greedy_reference,
    reference_distribution,
)

PROMPT = "The quick brown fox"  # 19 tokens: pages of 4 end partial


def run(main, world=None, args=None):
    world = world or FakeWorld()
    return world, world.run(main, args)


class GenerationTests(unittest.TestCase):
    def test_generate_matches_the_model(self):
        async def main(args):
            ctx = get_auto_model().create_context()
            ctx.fill(PROMPT)
            await ctx.flush()
            return await ctx.generate(Greedy(), Length(9))

        world, text = run(main)
        model = world.model
        self.assertEqual(text, model.detokenize(greedy_reference(model, model.tokenize(PROMPT), 9)))

    def test_pages_grow_one_at_a_time_and_are_freed(self):
        async def main(args):
            ctx = get_auto_model().create_context()
            ctx.fill("abcdef")  # 6 tokens, page size 4
            await ctx.flush()
            assert ctx.pages == [0, 1] and ctx.last_page_len == 1, ctx
            await ctx.generate(Greedy(), Length(4))
            assert len(ctx.tokens) == 9 and ctx.pages == [0, 1, 2], ctx
            ctx.close()

        world = FakeWorld()
        world.run(main)
        self.assertEqual(world.live_pages, 0)
        allocs = [a[1] for n, a in world.instances[0].calls if n == "allocate_kv_pages"]
        self.assertEqual(allocs, [[0, 1], [2]])

    def test_causal_masks_go_out_empty_and_custom_ones_as_brle(self):
        async def main(args):
            ctx = get_auto_model().create_context()
            ctx.fill("ab")
            ctx.fill_tokens(
                [30, 31],
                masks=[
                    Brle.from_list([True, False, False]),
                    Brle.from_list([True, True, False, False]),
                ],
            )
            dist = await ctx.decode_step()
            return ",".join(map(str, dist.ids))

        world, ids = run(main)
        forwards = [a for n, a in world.instances[0].calls if n == "forward_text"]
        self.assertEqual(forwards[0][5], [[1], [2], [0, 1, 2], [0, 2, 2]])
        want = world.model.distribution([(30, 2), (31, 3)], 3)[0]
        self.assertEqual(ids, ",".join(map(str, want)))

    def test_bad_calls_say_what_is_wrong(self):
        async def main(args):
            model = get_auto_model()
            ctx = model.create_context()
            ctx.fill("ab")
            errors = []
            for attempt in (
                lambda: ctx.fill_tokens([5], masks=[Brle(7)]),
                lambda: ctx.fill_tokens([5, 6], masks=[Brle(3)]),
                lambda: ctx.mask_token_range(1, 99),
                lambda: model.create_queue().set_priority("urgent"),
                lambda: ctx.keep_window(0, 0),
            ):
                try:
                    attempt()
                except (ValueError, IndexError) as error:
                    errors.append(str(error))
            assert len(ctx) == 2 and len(ctx.mask) == 2, "a refused fill changed the context"
            try:
                await ctx.generate_with_beam(model.dist_size + 1, Length(2))
            except ValueError as error:
                errors.append(str(error))
            ctx.close()
            try:
                ctx.fill("x")
            except RuntimeError as error:
                errors.append(str(error))
            return repr(errors)

        errors = eval(run(main)[1])
        self.assertEqual(len(errors), 7, errors)
        self.assertIn("covers 7 tokens, expected 3", errors[0])
        self.assertIn("2 tokens but 1 masks", errors[1])
        self.assertIn("out of bounds", errors[2])
        self.assertIn("priority", errors[3])
        self.assertIn("exceeds the distribution size", errors[5])
        self.assertIn("closed", errors[6])

    def test_decode_step_without_a_pending_token_is_an_error(self):
        async def main(args):
            ctx = get_auto_model().create_context()
            await ctx.decode_step()

        world = FakeWorld()
        instance = world.finish(main)
        self.assertEqual(instance.status, "failed")
        self.assertIn("needs a pending token", instance.error)


class ForkTests(unittest.TestCase):
    def _check_fork(self, prompt: str, generate_first: int):
        async def main(args):
            ctx = get_auto_model().create_context()
            ctx.fill(prompt)
            await ctx.flush()
            head = (
                await ctx.generate_tokens(Greedy(), Length(generate_first))
                if generate_first
                else []
            )
            children = [ctx.fork() for _ in range(3)]
            outs = await gather(*(c.generate_tokens(Greedy(), Length(6)) for c in children))
            own = await ctx.generate_tokens(Greedy(), Length(6))
            for c in children:
                c.close()
            ctx.close()
            return repr((head, outs, own))

        world, result = run(main)
        head, outs, own = eval(result)
        model = world.model
        want = greedy_reference(model, model.tokenize(prompt), generate_first + 6)
        self.assertEqual(head + own, want)
        for out in outs:
            self.assertEqual(head + out, want)
        self.assertEqual(world.live_pages, 0)
        return world

    def test_fork_with_a_partial_last_page_recomputes_it(self):
        world = self._check_fork(PROMPT, 0)
        instance = world.instances[0]
        first_child_forward = [a for n, a in instance.calls if n in ("forward_text", "generate")][0]
        # 18 committed tokens = 4 full pages shared, 2 recomputed, then the seed
        self.assertEqual(first_child_forward[2][:4], [0, 1, 2, 3])
        self.assertEqual(len(first_child_forward[3]), 3)

    def test_fork_on_a_page_boundary_with_nothing_pending(self):
        """Pie #287: the child of a page-aligned context with no pending token had no seed."""

        async def main(args):
            ctx = get_auto_model().create_context()
            ctx.fill("abcdefgh")  # exactly 2 pages once decoded
            await ctx.decode_step()
            assert not ctx.pending and ctx.last_page_len == 4
            child = ctx.fork()
            return await child.generate(Greedy(), Length(5))

        world, text = run(main)
        model = world.model
        self.assertEqual(
            text, model.detokenize(greedy_reference(model, model.tokenize("abcdefgh"), 5))
        )

    def test_fork_right_after_flush_waits_for_the_parent_queue(self):
        """Pie #48: the child's queue is not ordered with the parent's prefill."""
        world = self._check_fork("x" * 40, 0)
        syncs = [a for n, a in world.instances[0].calls if n == "synchronize"]
        self.assertEqual(len(syncs), 1)  # one wait for the parent's queue, by the first child

    def test_fork_after_generation(self):
        self._check_fork("hello there", 3)

    def test_fork_shares_full_pages_physically(self):
        async def main(args):
            ctx = get_auto_model().create_context()
            ctx.fill("abcdefghij")
            await ctx.flush()
            child = ctx.fork()
            await gather(ctx.decode_step(), child.decode_step())
            return repr((ctx.pages, child.pages))

        world, result = run(main)
        parent, child = eval(result)
        kv = world.instances[0].kv_at_end
        self.assertEqual(parent[:2], child[:2])  # 9 committed -> 2 full pages shared
        self.assertNotEqual(kv[parent[2]], kv[child[2]])  # partial page private
        allocs = [a[1] for n, a in world.instances[0].calls if n == "allocate_kv_pages"]
        self.assertEqual(allocs.count([0, 1, 2]), 1)


class MaskTests(unittest.TestCase):
    def test_windowed_attention_drops_pages_and_keeps_positions(self):
        async def main(args):
            ctx = get_auto_model().create_context()
            ctx.fill("0123456789abcdef")  # 16 tokens = 4 pages
            await ctx.flush()
            ctx.mask_token_range(4, 12)  # hide pages 1 and 2
            dropped = ctx.drop_masked_kv_pages()
            dist = await ctx.decode_step()
            return repr((dropped, ctx.pages, ctx.positions, dist.ids))

        world, result = run(main)
        dropped, pages, positions, ids = eval(result)
        self.assertEqual(dropped, 2)
        self.assertEqual(pages, [0, 3])
        self.assertEqual(positions, [0, 1, 2, 3, 12, 13, 14, 15])
        tokens = world.model.tokenize("0123456789abcdef")
        keep = [0, 1, 2, 3, 12, 13, 14, 15]
        want = world.model.distribution([(tokens[i], i) for i in keep], 15)[0]
        self.assertEqual(ids, want)
        instance = world.instances[0]
        self.assertEqual(sorted(instance.kv_at_end), [0, 3])  # pages 1, 2 deallocated on the host

    def test_masked_tokens_added_later_do_not_see_the_range(self):
        async def main(args):
            ctx = get_auto_model().create_context()
            ctx.fill("abcdef")
            ctx.mask_token_range(1, 3)
            ctx.fill("g")
            dist = await ctx.decode_step()
            return dist.ids

        world, ids = run(main)
        t = world.model.tokenize("abcdefg")
        attended = [(t[i], i) for i in (0, 3, 4, 5, 6)]
        self.assertEqual(eval(ids), world.model.distribution(attended, 6)[0])


class SpeculationTests(unittest.TestCase):
    def test_drafter_output_equals_greedy_and_accepts_drafts(self):
        model = FakeModel()
        prompt = model.tokenize("speculate")
        truth = greedy_reference(model, prompt, 14)

        class OracleDrafter:
            """Drafts a wrong sibling first, then the true 3 next tokens (a trie)."""

            def update(self, tokens):
                self.done = len(tokens) - len(prompt)

            def draft(self):
                nxt = truth[self.done : self.done + 3]
                if len(nxt) < 3:
                    return [], []
                wrong = 3 if nxt[0] != 3 else 4
                return [wrong, nxt[0], nxt[1], nxt[2]], [1, 1, 2, 3]

        async def main(args):
            ctx = get_auto_model().create_context()
            ctx.fill_tokens(prompt)
            stats = {}
            text = await ctx.generate_with_drafter(OracleDrafter(), Greedy(), Length(12), stats)
            tail = await ctx.generate_tokens(Greedy(), Length(2))
            return repr((text, stats, tail))

        world, result = run(main, FakeWorld(model))
        text, stats, tail = eval(result)
        self.assertEqual(text, model.detokenize(truth[:12]))
        self.assertEqual(tail, truth[12:14])  # the context is consistent afterwards
        self.assertGreater(stats["accepted"], 6)
        self.assertLess(stats["steps"], 12)
        masks = [a[5] for n, a in world.instances[0].calls if n == "forward_text"][0]
        # the wrong sibling (index 1) is hidden from the true chain (rows 2..4)
        self.assertEqual(masks[2][-2:], [1, 1])

    def test_empty_drafter_is_plain_generation(self):
        async def main(args):
            ctx = get_auto_model().create_context()
            ctx.fill("plain")
            return await ctx.generate_with_drafter(EmptyDrafter(), Greedy(), Length(6))

        world, text = run(main)
        model = world.model
        self.assertEqual(
            text, model.detokenize(greedy_reference(model, model.tokenize("plain"), 6))
        )

    def test_bad_trie_is_refused(self):
        async def main(args):
            ctx = get_auto_model().create_context()
            ctx.fill("ab")
            try:
                await ctx.verify_drafts([5, 6], [1, 3])
            except ValueError as error:
                send(str(error))
            await ctx.verify_drafts([5, 6, 7], [1, 1, 2])
            ctx.accept_drafts([0, 2], 9)  # 2 is a child of 1, not of 0

        world = FakeWorld()
        instance = world.finish(main)
        self.assertIn("invalid draft depths", instance.sent[0])
        self.assertIn("not a path from the seed", instance.error)


class BeamTests(unittest.TestCase):
    def test_beam_of_one_is_greedy_and_pages_are_returned(self):
        async def main(args):
            ctx = get_auto_model().create_context()
            ctx.fill(PROMPT)
            text = await ctx.generate_with_beam(1, Length(5))
            more = await ctx.generate(Greedy(), Length(2))
            ctx.close()
            return text + more

        world, text = run(main)
        model = world.model
        self.assertEqual(text, model.detokenize(greedy_reference(model, model.tokenize(PROMPT), 7)))
        self.assertEqual(world.live_pages, 0)

    def test_wider_beam_scores_at_least_greedy(self):
        async def main(args):
            ctx = get_auto_model().create_context()
            ctx.fill("beam")
            beam = await ctx.beam_search(3, Length(4))
            return json.dumps([beam.text, beam.tokens, beam.score])

        world, answer = run(main)
        model = world.model
        text, tokens, beam_score = json.loads(answer)

        def score(tokens):
            seq, total = model.tokenize("beam"), 0.0
            for t in tokens:
                ids, probs = reference_distribution(model, seq)
                total += __import__("math").log(probs[ids.index(t)])
                seq = seq + [t]
            return total

        greedy = greedy_reference(model, model.tokenize("beam"), 4)
        self.assertEqual(model.tokenize(text), tokens)
        self.assertAlmostEqual(beam_score, score(tokens), places=5)
        self.assertGreaterEqual(beam_score, score(greedy) - 1e-9)


class ExportTests(unittest.TestCase):
    def test_open_recomputes_a_partial_tail_instead_of_writing_the_shared_page(self):
        world = FakeWorld()

        async def saver(args):
            ctx = get_auto_model().create_context()
            ctx.fill(PROMPT)
            await ctx.save("prefix")
            return ctx.get_text()

        async def opener(args):
            model = get_auto_model()
            a, b = await gather(Context.open(model, "prefix"), Context.open(model, "prefix"))
            outs = await gather(
                a.generate(Greedy(), Length(5)), b.generate(TopK(3, seed=1), Length(5))
            )
            again = await Context.open(model, "prefix")
            return repr((a.get_text(), outs, await again.generate(Greedy(), Length(5))))

        self.assertEqual(world.run(saver), PROMPT)
        exported = list(world.exports["prefix"])
        before = [list(world.pages[p]) for p in exported]
        text, outs, again = eval(world.run(opener))
        model = world.model
        want = model.detokenize(greedy_reference(model, model.tokenize(PROMPT), 5))
        self.assertEqual(outs[0], want)
        self.assertEqual(again, want)  # b's sampling did not disturb the shared prefix
        self.assertEqual([list(world.pages[p]) for p in exported], before)
        self.assertIn("pie.kv/prefix", world.store)

    def test_open_of_unknown_name_is_none_and_lost_pages_are_recomputed(self):
        world = FakeWorld()

        async def saver(args):
            ctx = get_auto_model().create_context()
            ctx.fill("persist me")
            await ctx.save("p")

        async def opener(args):
            model = get_auto_model()
            assert await Context.open(model, "missing") is None
            ctx = await Context.open(model, "p")
            return await ctx.generate(Greedy(), Length(3))

        world.run(saver)
        self.assertTrue(world.service.remove_export("p"))  # the record stays, its pages go
        model = world.model
        self.assertEqual(
            world.run(opener),
            model.detokenize(greedy_reference(model, model.tokenize("persist me"), 3)),
        )

    def test_open_keeps_the_chat_state(self):
        world = FakeWorld()

        async def saver(args):
            ctx = get_auto_model().create_context()
            ctx.system("Be brief.")
            await ctx.save("chat")

        async def opener(args):
            ctx = await Context.open(get_auto_model(), "chat")
            ctx.user("Hi")
            ctx.cue()
            return ctx.get_text()

        world.run(saver)
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        want = env.from_string(SMOLLM2_TEMPLATE).render(
            messages=[
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
            ],
            add_generation_prompt=True,
        )
        self.assertEqual(world.run(opener), want)

    def test_delete_removes_export_and_record(self):
        world = FakeWorld()

        async def main(args):
            model = get_auto_model()
            ctx = model.create_context()
            ctx.fill("abcdefgh")
            await ctx.save("gone", persistent=False)
            await Context.delete(model, "gone")
            return repr(await store_list_keys())

        self.assertEqual(eval(world.run(main)), [])
        self.assertNotIn("gone", world.exports)


class ChatTests(unittest.TestCase):
    def test_generate_until_leaves_the_stop_out_of_the_text_only(self):
        async def main(args):
            ctx = get_auto_model().create_context()
            ctx.fill("x")
            first = await ctx.generate(Greedy(), Length(3))
            ctx2 = get_auto_model().create_context()
            ctx2.fill("x")
            cut = await ctx2.generate_until(first[-1], max_tokens=10)
            return repr((first, cut, ctx2.get_text()))

        world, result = run(main)
        first, cut, text = eval(result)
        self.assertEqual(cut, first[:-1])
        self.assertEqual(text, "x" + first)

    def test_chat_helpers_render_the_models_own_template(self):
        async def main(args):
            ctx = get_auto_model().create_context()
            ctx.user("Hi")
            ctx.cue()
            reply = await ctx.generate(Greedy(), Length(3))
            ctx.user("More")
            ctx.cue()
            return repr((ctx.get_text(), reply))

        world, result = run(main)
        text, reply = eval(result)
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        want = env.from_string(SMOLLM2_TEMPLATE).render(
            messages=[
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": reply},
                {"role": "user", "content": "More"},
            ],
            add_generation_prompt=True,
        )
        self.assertEqual(text, want)


class PoolTests(unittest.TestCase):
    def test_smallest_free_first_and_no_cross_queue_reuse_in_flight(self):
        async def main(args):
            model = get_auto_model()
            pool = model.kv_pages
            qa, qb = model.create_queue(), model.create_queue()
            first = pool.acquire(qa, 3)
            pool.release(qa, [first[1]])  # deallocate queued on qa, not yet run
            reuse_b = pool.acquire(qb, 1)  # must not be id 1
            reuse_a = pool.acquire(qa, 1)  # qa is ordered after its own deallocate
            await qb.synchronize()
            await qa.synchronize()
            pool.release(qa, [reuse_a[0]])
            await qa.synchronize()
            after_sync = pool.acquire(qb, 1)
            return repr((first, reuse_b, reuse_a, after_sync))

        world, result = run(main)
        self.assertEqual(eval(result), ([0, 1, 2], [3], [1], [1]))


class EmbeddingPathTests(unittest.TestCase):
    def test_queue_wrappers_of_the_embedding_path(self):
        async def main(args):
            model = get_auto_model()
            queue = model.create_queue()
            pages = model.kv_pages.acquire(queue, 1)
            slots = model.embeds.acquire(queue, 4)
            queue.embed_text(slots[:3], [40, 41, 42], [0, 1, 2])
            queue.forward(3, pages, slots[:3], slots[3:])
            (dist,) = await queue.get_next_token_distribution(slots[3:])
            model.embeds.release(queue, slots)
            model.kv_pages.release(queue, pages)
            return repr((slots, dist.ids))

        world, result = run(main)
        slots, ids = eval(result)
        self.assertEqual(slots, [0, 1, 2, 3])
        self.assertEqual(ids, reference_distribution(world.model, [40, 41, 42])[0])
        self.assertEqual(world.live_pages, 0)

    def test_mask_kv_page_hides_slots_from_the_embedding_path(self):
        async def main(args):
            model = get_auto_model()
            queue = model.create_queue()
            pages = model.kv_pages.acquire(queue, 1)
            slots = model.embeds.acquire(queue, 5)
            queue.embed_text(slots[:3], [40, 41, 42], [0, 1, 2])
            queue.forward(3, pages, slots[:3], [])
            queue.mask_kv_page(pages[0], [True, False, True])
            queue.embed_text(slots[3:4], [43], [3])
            queue.forward(4, pages, slots[3:4], slots[4:])
            (dist,) = await queue.get_next_token_distribution(slots[4:])
            return repr(dist.ids)

        world, ids = run(main)
        want = world.model.distribution([(40, 0), (42, 2), (43, 3)], 3)[0]
        self.assertEqual(eval(ids), want)


class RuntimeTests(unittest.TestCase):
    def test_messaging_subscription_delivers_every_message(self):
        world = FakeWorld()

        async def listener(args):
            sub = subscribe("news")
            got = []
            async for message in sub:
                got.append(message)
                if len(got) == 3:
                    sub.close()
            first = await receive()
            send(f"{first}:{','.join(got)}")

        async def talker(args):
            for i in range(3):
                broadcast("news", str(i))
                await sleep(10)
            return str(time_ms())

        listen = world.spawn(listener)
        talk = world.spawn(talker)
        listen.signal("hello")
        world.run_until_idle()
        self.assertEqual(listen.sent, ["hello:0,1,2"])
        self.assertEqual(talk.outcome(), "30")
        self.assertIsInstance(Subscription, type)

    def test_store(self):
        async def main(args):
            await store_set("k", "v")
            return await store_get("k")

        self.assertEqual(run(main)[1], "v")


class NoTemplateTests(unittest.TestCase):
    """A base model (no chat template, BOS wanted first), as Gemma 3 270M is."""

    def test_chat_helpers_fail_naming_the_model(self):
        async def main(args):
            ctx = get_auto_model().create_context()
            try:
                ctx.user("Hi")
            except NoChatTemplate as e:
                return repr((str(e), e.model, len(ctx)))
            return None

        world = FakeWorld(FakeModel(chat_template=""))
        message, model, filled = eval(run(main, world)[1])
        self.assertIn("'fake-model' has no chat template", message)
        self.assertIn("Context.fill()", message)
        self.assertEqual((model, filled), ("fake-model", 0))

    def test_first_text_of_an_empty_context_gets_bos_once(self):
        async def main(args):
            plain = get_auto_model().create_context()
            plain.fill("ab")
            plain.fill("cd")
            written = get_auto_model().create_context()
            written.fill("<|endoftext|>ab")  # a template that writes {{ bos_token }} itself
            await plain.flush()
            forked = plain.fork()
            forked.fill("ef")
            return repr((plain.get_token_ids(), written.get_token_ids(), forked.get_token_ids()))

        model = FakeModel(chat_template="", bos_token_id=0)
        plain, written, forked = eval(run(main, FakeWorld(model))[1])
        self.assertEqual(plain, [0] + model.tokenize("abcd"))
        self.assertEqual(written, [0] + model.tokenize("ab"))
        self.assertEqual(forked, [0] + model.tokenize("abcdef"))

    def test_no_bos_when_the_tokenizer_does_not_ask(self):
        async def main(args):
            ctx = get_auto_model().create_context()
            ctx.fill("ab")
            return repr(ctx.get_token_ids())

        world, tokens = run(main)
        tokens = eval(tokens)
        self.assertEqual(tokens, world.model.tokenize("ab"))
