"""Context: a token sequence whose KV cache lives in pages on the model.

The semantics are Pie 0.1.1's (pie-inferlets-sdk-paper §2.2):

- `fill*` appends tokens to a *pending* buffer; each pending token records a
  snapshot of the attention mask (a Brle, True = masked) as it was when the
  token was added: what that token may attend to.
- `flush()` prefills every pending token but the last; the last stays
  pending as the *seed* of the next decode step.
- `decode_step()` forwards all pending tokens, returns the distribution after
  the last one; they are then committed (their KV is in the pages).
- `generate()` loops decode_step -> sample -> fill_token -> stop check; the
  last sampled token stays pending, so the context stays ready to continue.

Invariants: committed token i sits in page i // page_size at slot
i % page_size; `len(pages) == ceil(len(tokens) / page_size)`; pages shared
with other contexts (fork, import) are always *full*, so nobody writes into
a shared page.

Pie's known pitfalls, fixed here:

- fork on an exact page boundary with nothing pending (Pie PR #287) left the
  child without a seed token. Here the child recomputes the last page
  instead, so it always has a seed.
- a context opened from an export whose last page was partial appended into
  the *shared* page in place (concurrent importers overwrote each other).
  Here the partial tail is recomputed in a private page.
- flush() then fork() (Pie #48): the child's queue is not ordered with the
  parent's, so the child could read pages whose prefill had not run yet.
  Here the child waits for the parent queue (synchronize) before its first
  forward, only when the parent has commands in flight.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from pie.inferlet import fastpath
from pie.inferlet.brle import Brle
from pie.inferlet.drafter import Drafter
from pie.inferlet.grammar import Grammar, Matcher
from pie.inferlet.messaging import store_delete, store_get, store_set
from pie.inferlet.model import Distribution, Model, Queue
from pie.inferlet.sampling import (
    Greedy,
    Length,
    SamplerLike,
    StopLike,
    Until,
    UntilAny,
    any_of,
    sample_with,
    should_stop,
)

if TYPE_CHECKING:
    from pie.inferlet.beam import Beam

EXPORT_META_PREFIX = "pie.kv/"
"""KV-store key prefix under which save() records an export's tokens and masks."""


class Context:
    """A sequence being generated on one model, with its own command queue."""

    def __init__(self, model: Model, queue: Queue | None = None) -> None:
        self.model = model
        self.queue = queue or model.create_queue()
        self.tokenizer = model.tokenizer
        self.page_size = model.kv_page_size
        self.tokens: list[int] = []  # committed: KV is in the pages
        self.positions: list[int] = []
        self.pages: list[int] = []
        self.pending: list[int] = []
        self.pending_positions: list[int] = []
        self.pending_masks: list[Brle] = []
        self.mask = Brle()  # the current mask over committed + pending tokens
        self.next_position = 0
        self._after: list[tuple[Queue, int]] = []  # queues our shared pages wait for
        self._closed = False
        self._chat: list[dict[str, Any]] = []
        self._chat_text = ""  # what the chat helpers believe they have written
        self._cued = False
        self._draft_state: tuple | None = None

    def __repr__(self) -> str:
        return (
            f"Context(committed={len(self.tokens)}, pending={len(self.pending)}, "
            f"pages={self.pages}, queue={self.queue.id})"
        )

    # ------------------------------------------------------------------ accessors
    @property
    def last_page_len(self) -> int:
        if not self.pages:
            return 0
        return len(self.tokens) - self.page_size * (len(self.pages) - 1)

    def get_token_ids(self) -> list[int]:
        """Every token, committed then pending."""
        return self.tokens + self.pending

    def get_text(self) -> str:
        return self.tokenizer.detokenize(self.get_token_ids())

    text = property(get_text)

    def get_kv_page_ids(self) -> list[int]:
        return list(self.pages)

    def get_kv_page_last_len(self) -> int:
        return self.last_page_len

    def __len__(self) -> int:
        return len(self.tokens) + len(self.pending)

    # ------------------------------------------------------------------ filling
    def fill(self, text: str) -> None:
        """Tokenize text and append it (pending).

        The first text of an empty context starts with the model's BOS token
        when its tokenizer asks for one (Gemma, Llama 2) and the text does not
        already begin with it (chat templates write `{{ bos_token }}`
        themselves): what transformers' `tokenizer(text)` and llama.cpp's
        prompt tokenization do, so raw prompts see what the model was trained on.
        """
        tokens = self.tokenizer.tokenize(text)
        bos = self.model.bos_token_id
        if bos is not None and len(self) == 0 and not self.pages and tokens[:1] != [bos]:
            tokens.insert(0, bos)
        self.fill_tokens(tokens)

    def fill_token(self, token: int) -> None:
        self.fill_tokens([token])

    def fill_tokens(self, tokens: Sequence[int], masks: Sequence[Brle] | None = None) -> None:
        """Append tokens (pending). Each attends to everything not masked in the
        current mask, or, with `masks`, exactly to its own mask: masks[i] covers
        every token before it and itself (len(self) + i + 1 entries)."""
        self._check_open()
        tokens = [int(t) for t in tokens]
        own: list[Brle] | None = None
        if masks is not None:  # check them all before changing anything
            if len(masks) != len(tokens):
                raise ValueError(f"{len(tokens)} tokens but {len(masks)} masks")
            own = [m.copy() if isinstance(m, Brle) else Brle.from_list(m) for m in masks]
            for i, snapshot in enumerate(own):
                expected = len(self.mask) + i + 1
                if len(snapshot) != expected:
                    raise ValueError(f"mask {i} covers {len(snapshot)} tokens, expected {expected}")
        for i, token in enumerate(tokens):
            self.mask.append(False)
            snapshot = self.mask.copy() if own is None else own[i]
            self.pending.append(token)
            self.pending_positions.append(self.next_position)
            self.pending_masks.append(snapshot)
            self.next_position += 1

    # ------------------------------------------------------------------ forward passes
    async def flush(self) -> None:
        """Prefill every pending token but the last (which stays as the seed)."""
        self._check_open()
        if len(self.pending) < 2:
            return
        await self._wait_for_shared_pages()
        n = len(self.pending) - 1
        args = self._commit(n)
        self.queue.forward_text_no_output(*args)

    async def decode_step(self) -> Distribution:
        """Forward every pending token; the distribution of the token after them."""
        self._check_open()
        if not self.pending:
            raise RuntimeError("decode_step needs a pending token: fill one first")
        await self._wait_for_shared_pages()
        n = len(self.pending)
        args = self._commit(n)
        dists = await self.queue.forward_text(*args, [n - 1])
        return dists[0]

    async def forward_pending(self, output_indices: Sequence[int]) -> list[Distribution]:
        """Forward every pending token and return the distributions after the given
        pending indices (several outputs per pass, e.g. Jacobi decoding)."""
        self._check_open()
        n = len(self.pending)
        if not n:
            raise RuntimeError("forward_pending needs pending tokens")
        if any(not 0 <= i < n for i in output_indices):
            raise ValueError(f"output indices {list(output_indices)} out of range 0..{n - 1}")
        await self._wait_for_shared_pages()
        args = self._commit(n)
        return await self.queue.forward_text(*args, list(output_indices))

    def _commit(self, n: int) -> tuple[int, list[int], list[int], list[int], list[list[int]]]:
        """Move the first n pending tokens to committed, growing pages; the
        forward arguments (last_page_len, pages, tokens, positions, masks)."""
        tokens = self.pending[:n]
        positions = self.pending_positions[:n]
        masks = self.pending_masks[:n]
        del self.pending[:n], self.pending_positions[:n], self.pending_masks[:n]
        self.tokens.extend(tokens)
        self.positions.extend(positions)
        self._grow_pages()
        causal = all(m.buffer == [len(m)] for m in masks)
        wire_masks = [] if causal else [list(m.buffer) for m in masks]
        return self.last_page_len, list(self.pages), tokens, positions, wire_masks

    def _grow_pages(self) -> None:
        need = math.ceil(len(self.tokens) / self.page_size) - len(self.pages)
        if need > 0:
            self.pages.extend(self.model.kv_pages.acquire(self.queue, need))

    def _shrink_pages(self) -> None:
        keep = math.ceil(len(self.tokens) / self.page_size)
        if len(self.pages) > keep:
            extra = self.pages[keep:]
            del self.pages[keep:]
            self.model.kv_pages.release(self.queue, extra)

    async def _wait_for_shared_pages(self) -> None:
        after, self._after = self._after, []
        for queue, seq in after:
            if queue is not self.queue:
                await queue.wait_for(seq)

    # ------------------------------------------------------------------ generation
    async def generate(
        self, sampler: SamplerLike, stop: StopLike, grammar: Grammar | Matcher | None = None
    ) -> str:
        """Sample tokens until `stop` says so (or `grammar` is complete); the generated
        text (stop tokens included)."""
        tokens = await self.generate_tokens(sampler, stop, grammar)
        return self.tokenizer.detokenize(tokens)

    async def generate_tokens(
        self, sampler: SamplerLike, stop: StopLike, grammar: Grammar | Matcher | None = None
    ) -> list[int]:
        """Sampled tokens until `stop`. A standard sampler and stop condition run in the
        engine (pie.inferlet.fastpath: one host call, no round trip per token); anything
        else runs here, one decode_step per token.

        With a grammar (a Grammar, or a Matcher to go on with), the engine masks each
        step's full-vocabulary logits to the tokens it allows and ends when it is
        complete; that needs the engine path (a standard sampler, a Length bound, no
        attention mask). A custom sampler uses a Matcher itself (Grammar.matcher)."""
        engine = fastpath.plan(sampler, stop, self.model.dist_size) if self._causal() else None
        if grammar is not None:
            if engine is None:
                raise ValueError(
                    "grammar= runs on the engine's fast path: it needs Greedy, Temperature, "
                    "TopK or TopP, a Length bound and no attention mask (a custom sampler "
                    "can use Grammar.matcher(model) token by token)"
                )
            matcher = grammar if isinstance(grammar, Matcher) else await grammar.matcher(self.model)
            try:
                generated = await self._generate_in_engine(engine, sampler, stop, matcher)
            finally:
                if matcher is not grammar:
                    matcher.close()
        elif engine is not None:
            generated = await self._generate_in_engine(engine, sampler, stop)
        else:
            generated = await self._decode_tokens(sampler, stop)
        self._record_generated(generated)
        return generated

    async def _decode_tokens(
        self, sampler: SamplerLike, stop: StopLike, after_each: Callable[[], None] | None = None
    ) -> list[int]:
        """One decode_step per token: sample it, feed it back, run `after_each`,
        until `stop`; the tokens sampled."""
        generated: list[int] = []
        while True:
            dist = await self.decode_step()
            token = sample_with(sampler, dist.ids, dist.probs)
            generated.append(token)
            self.fill_token(token)
            if after_each is not None:
                after_each()
            if should_stop(stop, generated):
                return generated

    def _causal(self) -> bool:
        """Nothing is masked: every pending and future token attends to all before it."""
        return bool(self.pending) and all(
            m.buffer == [len(m)] for m in (self.mask, *self.pending_masks)
        )

    async def _generate_in_engine(
        self,
        engine: fastpath.EnginePlan,
        sampler: SamplerLike,
        stop: StopLike,
        matcher: Matcher | None = None,
    ) -> list[int]:
        """generate_tokens through the `generate` host call; the same end state (the last
        sampled token pending). The engine stops at a candidate stop token, the guest
        decides with `stop` itself (e.g. a multi-token Until) and goes on if it is not.
        The engine also stops when the grammar matcher is complete."""
        generated: list[int] = []
        while True:
            await self._wait_for_shared_pages()
            step = min(engine.limit - len(generated), fastpath.MAX_STEP)
            last_page_len, pages, tokens, positions, _ = self._commit(len(self.pending))
            room = math.ceil((len(self.tokens) + step - 1) / self.page_size) - len(self.pages)
            spare = self.model.kv_pages.acquire(self.queue, room) if room > 0 else []
            self.pages.extend(spare)
            out = await self.queue.call(
                "generate", last_page_len, pages, tokens, positions, spare,
                *engine.sampling_args(sampler), step, list(engine.stop_tokens),
                None if matcher is None else matcher.id,
            )  # fmt: skip
            out = [int(t) for t in out]
            engine.drew(sampler, len(out))
            generated.extend(out)
            self.fill_tokens(out)
            self._commit(len(out) - 1)  # the engine forwarded all but the last
            self._shrink_pages()
            if should_stop(stop, generated) or (matcher is not None and matcher.is_stopped()):
                return generated

    async def generate_until(
        self,
        stop: str | None = None,
        max_tokens: int = 256,
        sampler: SamplerLike | None = None,
        grammar: Grammar | Matcher | None = None,
    ) -> str:
        """Greedy (or `sampler`) generation until the text `stop`, the model's
        end-of-turn tokens (when stop is None), max_tokens, or the end of `grammar`.
        The returned text leaves out the stop text / end-of-turn token (the context
        keeps it)."""
        stop_tokens = self.tokenizer.tokenize(stop) if stop else []
        condition: StopLike = Length(max_tokens)
        if stop_tokens:
            condition = any_of(condition, Until(stop_tokens))
        else:
            condition = any_of(condition, UntilAny(self.model.eos_token_ids))
        tokens = await self.generate_tokens(sampler or Greedy(), condition, grammar)
        if stop_tokens and tokens[-len(stop_tokens) :] == stop_tokens:
            tokens = tokens[: -len(stop_tokens)]
        elif not stop_tokens and tokens and tokens[-1] in self.model.eos_token_ids:
            tokens = tokens[:-1]
        return self.tokenizer.detokenize(tokens)

    def eos_stop(self, max_tokens: int) -> StopLike:
        """Stop at the model's end-of-turn tokens or after max_tokens."""
        return any_of(Length(max_tokens), UntilAny(self.model.eos_token_ids))

    # ------------------------------------------------------------------ forking
    def fork(self) -> Context:
        """A copy-on-write child with its own queue.

        Full pages are shared (reference counted). The last page is shared only
        if it is full *and* there is a pending seed; otherwise its tokens are
        recomputed by the child (with the current mask), which also gives the
        child a seed when the parent has nothing pending (Pie #287).
        """
        self._check_open()
        child = Context(self.model)
        share = self._shareable_pages(len(self.tokens), bool(self.pending))
        child._adopt(
            pages=self.pages[:share],
            tokens=self.tokens,
            positions=self.positions,
            mask=self.mask,
            pending=(self.pending, self.pending_positions, self.pending_masks),
            next_position=self.next_position,
            after=[*self._after, (self.queue, self.queue.seq)],
        )
        child._chat = [dict(m) for m in self._chat]
        child._chat_text = self._chat_text
        child._cued = self._cued
        return child

    def _shareable_pages(self, committed: int, has_pending: bool) -> int:
        """How many leading pages of a prefix another context may share: the full
        ones, but not the last page when nothing is pending after it (the new
        context recomputes that page to get a seed token, Pie #287)."""
        share = committed // self.page_size
        if share and committed % self.page_size == 0 and not has_pending:
            share -= 1
        return share

    def _adopt(
        self,
        pages: list[int],
        tokens: list[int],
        positions: list[int],
        mask: Brle,
        pending: tuple[list[int], list[int], list[Brle]],
        next_position: int,
        after: list[tuple[Queue, int]],
        retain: bool = True,
    ) -> None:
        """Take over a prefix: `pages` (full, shared) hold the first
        len(pages)*page_size tokens; the rest of `tokens` are recomputed."""
        kept = len(pages) * self.page_size
        if retain:
            self.model.kv_pages.retain(pages)
        self.pages = list(pages)
        self.tokens = list(tokens[:kept])
        self.positions = list(positions[:kept])
        self.mask = mask.copy()
        recompute = range(kept, len(tokens))
        self.pending = [tokens[i] for i in recompute] + list(pending[0])
        self.pending_positions = [positions[i] for i in recompute] + list(pending[1])
        self.pending_masks = [_prefix(mask, i + 1) for i in recompute]
        self.pending_masks += [m.copy() for m in pending[2]]
        self.next_position = next_position
        self._after = list(after)

    async def fork_many(self, n: int) -> list[Context]:
        """n forks sharing as much as possible: pending tokens but the seed are
        prefilled once here first, instead of once per child."""
        await self.flush()
        return [self.fork() for _ in range(n)]

    # ------------------------------------------------------------------ masking
    def mask_token(self, index: int, masked: bool = True) -> None:
        self.mask.mask_range(index, index + 1, masked)

    def mask_tokens(self, indices: Sequence[int], masked: bool = True) -> None:
        self.mask.mask(indices, masked)

    def mask_token_range(self, start: int, end: int, masked: bool = True) -> None:
        """Hide tokens [start, end) from every token added from now on."""
        self.mask.mask_range(start, end, masked)

    def drop_masked_kv_pages(self) -> int:
        """Free every full committed page whose tokens are all masked, and forget
        those tokens (positions of the rest are kept, so there are gaps). Returns
        the number of pages dropped."""
        self._check_open()
        full = len(self.tokens) // self.page_size
        ps = self.page_size
        drop = [p for p in range(full) if self.mask.is_range_all_value(p * ps, (p + 1) * ps, True)]
        for page in reversed(drop):
            start, end = page * ps, (page + 1) * ps
            del self.tokens[start:end], self.positions[start:end]
            self.mask.remove_range(start, end)
            for snapshot in self.pending_masks:
                snapshot.remove_range(start, end)
        if drop:
            freed = [self.pages[p] for p in drop]
            self.pages = [vid for p, vid in enumerate(self.pages) if p not in set(drop)]
            self.model.kv_pages.release(self.queue, freed)
        return len(drop)

    def keep_window(self, sink: int, window: int) -> int:
        """StreamingLLM-style eviction: hide every token but the first `sink`
        and the last `window` from tokens added later, and free the pages that
        became fully hidden. Returns the number of pages freed."""
        if sink < 0 or window < 1:
            raise ValueError("keep_window needs sink >= 0 and window >= 1")
        end = len(self.mask) - window
        if end > sink:
            self.mask_token_range(sink, end)
        return self.drop_masked_kv_pages()

    async def generate_windowed(
        self,
        sampler: SamplerLike,
        stop: StopLike,
        sink: int,
        window: int,
        stats: dict | None = None,
    ) -> str:
        """Generation in bounded KV memory (StreamingLLM): before every step only
        the first `sink` tokens and the last `window` stay visible, and pages
        that became fully hidden are freed (keep_window). `stats` (optional dict)
        receives 'max_pages' and 'pages_freed'."""
        freed = self.keep_window(sink, window)
        max_pages = len(self.pages)

        def evict() -> None:
            nonlocal freed, max_pages
            freed += self.keep_window(sink, window)
            max_pages = max(max_pages, len(self.pages))

        generated = await self._decode_tokens(sampler, stop, evict)
        if stats is not None:
            stats.update(max_pages=max_pages, pages_freed=freed)
        self._record_generated(generated)
        return self.tokenizer.detokenize(generated)

    # ------------------------------------------------------------------ speculation
    async def verify_drafts(
        self, drafts: Sequence[int], depths: Sequence[int]
    ) -> list[Distribution]:
        """Forward the seed and a draft trie in one pass, with a tree mask.

        `drafts` is a trie flattened in depth-first order and `depths[i]` the
        depth of drafts[i] (1 = child of the seed). Each draft attends to the
        context, the seed, its ancestors and itself; its position is the seed's
        plus its depth. Returns a distribution for the seed and every draft.
        Follow with accept_drafts().
        """
        if not self.pending:
            raise RuntimeError("verify_drafts needs a pending seed token: fill one first")
        if len(self.pending) != 1:
            await self.flush()
        if len(drafts) != len(depths):
            raise ValueError("drafts and depths differ in length")
        parents = _trie_parents(depths)
        seed_mask = self.pending_masks[0]
        seed_position = self.pending_positions[0]
        masks = []
        for i in range(len(drafts)):
            row = seed_mask.copy()
            ancestors = set()
            node = i
            while node >= 0:
                ancestors.add(node)
                node = parents[node]
            for j in range(i + 1):
                row.append(j not in ancestors)
            masks.append(row)
        seed = (self.pending[0], seed_position, seed_mask)
        self.fill_tokens(drafts, masks=masks)
        for i, depth in enumerate(depths):
            self.pending_positions[1 + i] = seed_position + depth
        self._draft_state = (seed, list(drafts), list(depths))
        self.next_position = seed_position + 1
        return await self.forward_pending(list(range(len(drafts) + 1)))

    def accept_drafts(self, accepted: Sequence[int], next_token: int) -> None:
        """After verify_drafts: keep the seed, the accepted drafts (indices of a
        root-to-node path) and then `next_token` as the new seed. KV of rejected
        drafts is dropped; accepted drafts that are not a prefix of the
        depth-first order are recomputed with the next step."""
        if self._draft_state is None:
            raise RuntimeError("accept_drafts() without verify_drafts()")
        seed, drafts, depths = self._draft_state
        parents = _trie_parents(depths)
        for k, node in enumerate(accepted):
            if not 0 <= node < len(drafts) or parents[node] != (accepted[k - 1] if k else -1):
                raise ValueError(f"accepted drafts {list(accepted)} are not a path from the seed")
        self._draft_state = None
        n = len(drafts)
        keep = 0  # accepted drafts whose KV already sits right after the seed
        while keep < len(accepted) and accepted[keep] == keep:
            keep += 1
        drop = n - keep
        del self.tokens[len(self.tokens) - drop :]
        del self.positions[len(self.positions) - drop :]
        self.mask.remove_range(len(self.mask) - drop, len(self.mask))
        self._shrink_pages()
        base = seed[1]
        self.next_position = base + 1 + keep
        self.fill_tokens([drafts[i] for i in accepted[keep:]] + [next_token])

    async def generate_with_drafter(
        self, drafter: Drafter, sampler: SamplerLike, stop: StopLike, stats: dict | None = None
    ) -> str:
        """Speculative decoding: the drafter proposes a trie, one forward pass
        verifies it, and every draft token the sampler agrees with is accepted.

        `drafter` follows pie.inferlet.drafter.Drafter: update(tokens) with the
        full token history, then draft() -> (tokens, depths). The output equals
        plain generate() with the same deterministic sampler. `stats` (optional dict) receives
        'steps' and 'accepted'.
        """
        generated: list[int] = []
        steps = accepted_total = 0
        done = False
        while not done:
            drafter.update(self.get_token_ids())
            drafts, depths = drafter.draft()
            dists = await self.verify_drafts(list(drafts), list(depths))
            steps += 1
            children = _trie_children(list(depths))
            node = -1  # the seed
            path: list[int] = []
            while True:
                dist = dists[node + 1]
                token = sample_with(sampler, dist.ids, dist.probs)
                generated.append(token)
                if should_stop(stop, generated):
                    done = True
                    break
                match = next((c for c in children[node] if drafts[c] == token), None)
                if match is None:
                    break
                path.append(match)
                node = match
            accepted_total += len(path)
            self.accept_drafts(path, generated[-1])
        if stats is not None:
            stats.update(steps=steps, accepted=accepted_total)
        self._record_generated(generated)
        return self.tokenizer.detokenize(generated)

    # ------------------------------------------------------------------ beam search
    async def generate_with_beam(self, beam_size: int, stop: StopLike) -> str:
        """Beam search: keep the `beam_size` best sequences by summed log-prob,
        each candidate on its own fork; stop at the best-ranked beam that meets
        `stop` and adopt it. Candidates come from the top-k distribution."""
        return (await self.beam_search(beam_size, stop)).text

    async def beam_search(self, beam_size: int, stop: StopLike) -> Beam:
        """generate_with_beam, answering the adopted beam's text, tokens and score
        (summed log-probability) as a pie.inferlet.beam.Beam."""
        from pie.inferlet.beam import beam_search

        return await beam_search(self, beam_size, stop)

    def _become(self, other: Context) -> None:
        """Take over another context's state (its queue and pages) and close it."""
        self.release()
        for name in (
            "queue",
            "tokens",
            "positions",
            "pages",
            "pending",
            "pending_positions",
            "pending_masks",
            "mask",
            "next_position",
            "_after",
        ):
            setattr(self, name, getattr(other, name))
        other.pages = []
        other._closed = True
        self._closed = False

    # ------------------------------------------------------------------ export / import
    async def save(self, name: str, persistent: bool = True) -> None:
        """Export this context's KV pages under `name` (zero-copy for importers)
        and record its tokens in the KV store so that open() can rebuild it."""
        self._check_open()
        await self.flush()
        if not self.pages:
            raise RuntimeError("nothing to export: the context has no committed tokens")
        self.queue.command("export_kv_pages", list(self.pages), name, persistent)
        meta = {
            "tokens": self.tokens,
            "positions": self.positions,
            "mask": self.mask.buffer,
            "pending": self.pending,
            "pending_positions": self.pending_positions,
            "pending_masks": [m.buffer for m in self.pending_masks],
            "next_position": self.next_position,
            "page_size": self.page_size,
            "num_pages": len(self.pages),
            "chat": self._chat,
            "chat_text": self._chat_text,
            "cued": self._cued,
        }
        await store_set(EXPORT_META_PREFIX + name, json.dumps(meta))
        await self.queue.synchronize()  # the export is visible to others from now on

    @classmethod
    async def open(cls, model: Model, name: str) -> Context | None:
        """A new context continuing from an export made by save(), or None if
        there is no such export. Full pages are imported (shared, no copy); a
        partial last page is recomputed privately. If the pages are gone (e.g.
        after a restart) but the record is there, every token is recomputed."""
        raw = await store_get(EXPORT_META_PREFIX + name)
        if raw is None:
            return None
        meta = json.loads(raw)
        ctx = cls(model)
        exports = dict(ctx.queue.exported_kv_pages())
        mask = Brle.from_buffer(meta["mask"])
        pending = (
            meta["pending"],
            meta["pending_positions"],
            [Brle.from_buffer(b) for b in meta["pending_masks"]],
        )
        shared: list[int] = []
        if exports.get(name) == meta["num_pages"] and meta["page_size"] == ctx.page_size:
            imported = model.kv_pages.reserve(ctx.queue, meta["num_pages"])
            ctx.queue.command("import_kv_pages", imported, name)
            share = ctx._shareable_pages(len(meta["tokens"]), bool(meta["pending"]))
            if len(imported) > share:
                model.kv_pages.release(ctx.queue, imported[share:])
            shared = imported[:share]
        ctx._adopt(
            shared,
            meta["tokens"],
            meta["positions"],
            mask,
            pending,
            meta["next_position"],
            after=[],
            retain=False,
        )
        ctx._chat = meta.get("chat", [])
        ctx._chat_text = meta.get("chat_text", "")
        ctx._cued = meta.get("cued", False)
        return ctx

    @staticmethod
    async def delete(model: Model, name: str) -> None:
        """Remove an export made by save() (its pages live on in importers)."""
        queue = model.create_queue()
        if name in dict(queue.exported_kv_pages()):
            queue.command("unexport_kv_pages", name)
        await store_delete(EXPORT_META_PREFIX + name)

    # ------------------------------------------------------------------ chat
    def system(self, text: str) -> None:
        self._chat_message("system", text)

    def user(self, text: str) -> None:
        self._chat_message("user", text)

    def assistant(self, text: str) -> None:
        self._chat_message("assistant", text)

    def cue(self) -> None:
        """Open the assistant's turn (the template's generation prompt); the next
        generate() call's output is recorded as the assistant message."""
        self._chat_fill(self.model.render_chat(self._chat, add_generation_prompt=True))
        self._cued = True

    def _chat_message(self, role: str, text: str) -> None:
        self._chat.append({"role": role, "content": text})
        self._cued = False
        self._chat_fill(self.model.render_chat(self._chat))

    def _chat_fill(self, target: str) -> None:
        if not target.startswith(self._chat_text):
            raise RuntimeError(
                "the chat template re-rendered earlier turns differently; "
                "fill the rendered text yourself with model.render_chat()"
            )
        delta = target[len(self._chat_text) :]
        self._chat_text = target
        if delta:
            self.fill(delta)

    def _record_generated(self, generated: list[int]) -> None:
        if not self._cued:
            return
        text = self.tokenizer.detokenize(generated)
        self._chat_text += text
        content = text
        for eos in self.model.eos_tokens:
            if eos and content.endswith(eos):
                content = content[: -len(eos)]
        self._chat.append({"role": "assistant", "content": content})
        self._cued = False

    # ------------------------------------------------------------------ lifetime
    def release(self) -> None:
        """Give back this context's pages (shared pages live on in other contexts)."""
        if self.pages:
            pages, self.pages = self.pages, []
            self.model.kv_pages.release(self.queue, pages)

    def close(self) -> None:
        if not self._closed:
            self.release()
            self._closed = True

    def __enter__(self) -> Context:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this context is closed")


def _prefix(mask: Brle, n: int) -> Brle:
    out = mask.copy()
    out.remove_range(n, len(out))
    return out


def _trie_parents(depths: Sequence[int]) -> list[int]:
    """Parent index of each node of a DFS-flattened trie (-1 = the seed)."""
    parents: list[int] = []
    stack: list[int] = []  # stack[d-1] = index of the latest node at depth d
    for i, depth in enumerate(depths):
        if depth < 1 or depth > len(stack) + 1:
            raise ValueError(f"invalid draft depths {list(depths)}: node {i} has depth {depth}")
        del stack[depth - 1 :]
        parents.append(stack[-1] if stack else -1)
        stack.append(i)
    return parents


def _trie_children(depths: Sequence[int]) -> dict[int, list[int]]:
    children: dict[int, list[int]] = {-1: []}
    for i, parent in enumerate(_trie_parents(depths)):
        children.setdefault(parent, []).append(i)
        children.setdefault(i, [])
    return children
