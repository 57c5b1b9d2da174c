"""The host table: every row of pie.runtime.hostcalls implemented, arguments checked (issue 4 point 1)."""

from __future__ import annotations

import threading

from twisted.internet.defer import Deferred
from twisted.trial import unittest

import pie
from pie.interfaces import InstanceFault, PieError
from pie.runtime.grammar import MAX_MATCHERS
from pie.runtime.hostcalls import HOST_CALLS
from pie.runtime.instances import NORMAL_FINISH
from tests.runtime_doubles import FakeModelService, launched, make_runtime

Q, SUB, G = "<queue>", "<subscription>", "<grammar matcher>"

SAMPLE_ARGS = {
    "get_version": (),
    "get_instance_id": (),
    "get_arguments": (),
    "set_return": ("r",),
    "debug_query": ("ping",),
    "time_ms": (),
    "sleep": (1,),
    "get_all_models": (),
    "get_model": ("fake-model",),
    "model_info": (0,),
    "create_queue": (0,),
    "set_priority": (Q, "low"),
    "synchronize": (Q,),
    "queue_debug_query": (Q, "ping"),
    "get_kv_page_size": (Q,),
    "get_all_exported_kv_pages": (Q,),
    "allocate_kv_pages": (Q, [1, 2]),
    "deallocate_kv_pages": (Q, [2]),
    "allocate_embeds": (Q, [5]),
    "deallocate_embeds": (Q, [5]),
    "copy_kv_page": (Q, 1, 1, 0, 1, 1),
    "mask_kv_page": (Q, 1, [True, False]),
    "export_kv_pages": (Q, [1], "p", False),
    "unexport_kv_pages": (Q, "p"),
    "import_kv_pages": (Q, [9], "p"),
    "forward_text": (Q, 1, [1], [3], [0], [[1]], [0]),
    "forward_text_no_output": (Q, 1, [1], [3], [0], []),
    "embed_text": (Q, [5], [3], [0]),
    "forward": (Q, 1, [1], [5], [6]),
    "get_next_token_distribution": (Q, [6]),
    "generate": (Q, 1, [1], [3], [0], [2], 0.5, 0, 1.0, None, 3, [7], None),
    "tokenize": (0, "hi"),
    "detokenize": (0, [104, 105]),
    "apply_chat_template": (0, '[{"role": "user", "content": "hi"}]', True, None, None, None),
    "get_vocabs": (0,),
    "grammar_create": (0, "regex", "ab"),
    "grammar_allowed": (G,),
    "grammar_consume": (G, [97]),
    "grammar_is_accepting": (G,),
    "grammar_is_stopped": (G,),
    "grammar_rollback": (G, 1),
    "grammar_drop": (G,),
    "send": ("m",),
    "outbound_drained": (),
    "receive": (),
    "broadcast": ("t", "b"),
    "subscribe": ("t",),
    "subscription_next": (SUB,),
    "unsubscribe": (SUB,),
    "store_get": ("k",),
    "store_set": ("k", "v"),
    "store_delete": ("k",),
    "store_exists": ("k",),
    "store_list_keys": (),
    "fetch": ("http://example.com/", "GET", [("accept", "*/*")], b"", 0),
    "http_response_start": (200, [("content-type", "text/plain")]),
    "http_response_write": (b"chunk",),
    "http_response_finish": (),
}
NOT_A_REQUEST = "this instance is not handling an HTTP request"
"""What the http_response_* calls answer outside a server instance (tests/test_runtime_http.py
covers them inside one)."""


class EveryRowTests(unittest.TestCase):
    def setUp(self):
        self.model = FakeModelService()
        self.runtime = make_runtime(self, services={"fake": self.model})

    def test_sample_covers_the_table(self):
        self.assertEqual(set(SAMPLE_ARGS), set(HOST_CALLS))

    async def test_every_call_answers_in_its_mode(self):
        """sync → a value, async → a Deferred, command → None; and the sync values are right."""
        results: dict[str, object] = {}

        async def script(host, args):
            queue = host.call("create_queue", (0,))
            # a subscription with one message waiting, for subscription_next / unsubscribe
            subscription = host.call("subscribe", ("t",))
            matcher, _ = await host.call("grammar_create", (0, "regex", "a+"))
            placeholders = {Q: queue, SUB: subscription, G: matcher}
            for name, sample in SAMPLE_ARGS.items():
                call_args = tuple(
                    placeholders.get(a, a) if isinstance(a, str) else a for a in sample
                )
                if name == "receive":
                    self.runtime.signal(host.instance_id, "from the user")
                if name.startswith("http_response_"):
                    try:
                        host.call(name, call_args)
                    except PieError as refused:
                        results[name] = str(refused)
                    continue
                value = host.call(name, call_args)
                mode = HOST_CALLS[name].mode
                if mode == "async":
                    assert isinstance(value, Deferred), name
                    value = await value
                elif mode == "command":
                    assert value is None, name
                else:
                    assert not isinstance(value, Deferred), name
                results[name] = value

        instance_id, owner = await launched(self.runtime, script, ["--x", "1"])
        self.assertEqual(await owner.ended(instance_id), NORMAL_FINISH)
        self.assertEqual(results["get_version"], pie.__version__)
        self.assertEqual(results["get_instance_id"], instance_id)
        self.assertEqual(results["get_arguments"], ["--x", "1"])
        self.assertEqual(results["debug_query"], "pong")
        for name in ("http_response_start", "http_response_write", "http_response_finish"):
            self.assertEqual(results[name], NOT_A_REQUEST)
        self.assertIsInstance(results["time_ms"], int)
        self.assertEqual(results["get_all_models"], ["fake-model"])
        self.assertEqual(results["get_model"], 0)
        info = dict(results["model_info"])
        self.assertEqual(
            (info["name"], info["kv_page_size"], info["dist_size"], info["vocab_size"]),
            ("fake-model", "16", "2", "128"),
        )
        self.assertEqual(
            (info["eos_token_ids"], info["bos_token"], info["bos_token_id"]), ("0", "<s>", "60")
        )
        self.assertEqual(results["synchronize"], True)
        self.assertEqual(results["queue_debug_query"], "pong")
        self.assertEqual(results["get_kv_page_size"], 16)
        self.assertEqual(results["get_all_exported_kv_pages"], [("prefix", 3)])
        self.assertEqual(results["forward_text"], [([1, 2], [0.75, 0.25])])
        self.assertEqual(results["generate"], [1, 1, 1])
        self.assertEqual(results["tokenize"], [104, 105])
        self.assertEqual(results["detokenize"], "hi")
        self.assertEqual(
            results["apply_chat_template"], (True, "[{'role': 'user', 'content': 'hi'}]")
        )
        self.assertEqual(len(results["get_vocabs"][0]), 128)
        self.assertEqual(results["grammar_create"][1], "")
        mask = results["grammar_allowed"]
        self.assertEqual(len(mask), 16)
        self.assertEqual([i for i in range(128) if mask[i // 8] >> (i % 8) & 1], [97])
        self.assertEqual(results["grammar_consume"], True)
        self.assertEqual(results["grammar_is_accepting"], True)  # "a" matches a+
        self.assertEqual(results["grammar_is_stopped"], False)
        self.assertEqual(results["grammar_rollback"], True)
        self.assertEqual(results["receive"], "from the user")
        self.assertEqual(results["subscription_next"], "b")
        self.assertEqual(results["store_get"], None)
        self.assertEqual(results["store_exists"], False)  # set, then deleted
        self.assertEqual(results["store_list_keys"], [])
        self.assertEqual(
            results["fetch"][0], "outgoing HTTP is off (the daemon's inferlet_http_allow is empty)"
        )
        self.assertEqual(owner.messages(instance_id), ["m", "r"])  # send, then the return value
        model_ops = [op for i, _, op, _ in self.model.submitted if i == instance_id]
        expected = [n for n in SAMPLE_ARGS if n in pie.runtime.hostcalls.MODEL_COMMANDS]
        self.assertEqual(model_ops, expected)  # in the order issued


class BadCallTests(unittest.TestCase):
    def setUp(self):
        self.runtime = make_runtime(self)

    async def outcome(self, name, args) -> tuple[str, str | None]:
        """Make one call; (termination reason, what the guest saw)."""
        seen = []

        async def script(host, _):
            try:
                host.call(name, args)
            except InstanceFault as e:
                seen.append(str(e))
                raise
            except PieError as e:
                seen.append("PieError: " + str(e))

        instance_id, owner = await launched(self.runtime, script)
        return await owner.ended(instance_id), (seen or [None])[0]

    async def test_broken_calls_terminate_only_that_instance(self):
        parked = Deferred()

        async def bystander(host, args):
            parked.callback(None)
            return await host.call("receive", ())

        bystander_id, bystander_owner = await launched(self.runtime, bystander)
        await parked
        cases = [
            ("no_such_call", (), "unknown host call 'no_such_call'"),
            ("send", (), "send takes 1 arguments (message), got 0"),
            ("send", ("a", "b"), "send takes 1 arguments (message), got 2"),
            ("send", (3,), "send: argument 'message': expected a string, got int"),
            ("send", ("\ud800",), "send: argument 'message': string is not valid Unicode"),
            ("create_queue", (True,), "argument 'service': expected an integer (u32), got bool"),
            ("create_queue", (-1,), "argument 'service': -1 is out of range for u32"),
            ("sleep", (2**32,), "out of range for u32"),
            ("allocate_kv_pages", (1, [1, "2"]), "argument 'ids': item 1: expected an integer"),
            ("mask_kv_page", (1, 1, [1]), "argument 'mask': item 0: expected a bool"),
            ("forward_text", (1, 1, [1], [1], [0], [[1, -2]], [0]), "argument 'masks': item 0"),
            ("send", "m", "arguments must be a tuple"),
            ("fetch", ("u", "GET", [], [1], 0), "argument 'body': expected bytes, got list"),
            ("fetch", ("u", "GET", [("a",)], b"", 0), "argument 'headers': item 0"),
        ]
        for name, args, text in cases:
            reason, seen = await self.outcome(name, args)
            self.assertTrue(reason.startswith("Runtime error: invalid host call: "), reason)
            self.assertIn(text, reason)
            self.assertEqual(seen, reason)
        self.runtime.signal(bystander_id, "still here")
        self.assertEqual(await bystander_owner.ended(bystander_id), NORMAL_FINISH)
        self.assertEqual(bystander_owner.messages(bystander_id), ["still here"])

    async def test_expected_errors_reach_the_guest(self):
        """Mistakes a program can handle are PieErrors it may catch; it goes on running."""
        for name, args, text in [
            ("set_priority", (999, "high"), "unknown queue 999"),
            ("allocate_kv_pages", (999, [1]), "unknown queue 999"),
            ("model_info", (7,), "unknown model service 7"),
            ("unsubscribe", (42,), "unknown subscription 42"),
            ("grammar_allowed", (42,), "unknown grammar matcher 42"),
        ]:
            reason, seen = await self.outcome(name, args)
            self.assertEqual((reason, seen), (NORMAL_FINISH, "PieError: " + text))

    async def test_bad_priority(self):
        async def script(host, _):
            queue = host.call("create_queue", (0,))
            try:
                host.call("set_priority", (queue, "urgent"))
            except PieError as e:
                return str(e)

        instance_id, owner = await launched(self.runtime, script)
        await owner.ended(instance_id)
        self.assertEqual(
            owner.messages(instance_id), ["priority must be one of low, normal, high, not 'urgent'"]
        )

    async def test_calls_after_the_end_fail(self):
        bindings = []

        async def script(host, _):
            bindings.append(host)

        instance_id, owner = await launched(self.runtime, script)
        await owner.ended(instance_id)
        self.assertRaises(InstanceFault, bindings[0].call, "send", ("late",))
        self.assertEqual(owner.messages(instance_id), [])

    async def test_debug_queries_list_instances(self):
        async def script(host, _):
            return host.call("debug_query", ("list_running_instances",))

        instance_id, owner = await launched(self.runtime, script)
        await owner.ended(instance_id)
        self.assertEqual(self.runtime.instances.running, {})
        [listing] = owner.messages(instance_id)
        self.assertTrue(listing.startswith(f"Instance ID: {instance_id}, Program Hash: "), listing)


# A value of the wrong shape for each WIT type of a model command's parameters.
_JUNK = {
    "u32": ["x", -1, 1 << 32, True, 1.5, None],
    "f32": ["hot", float("nan"), None],
    "bool": [1, None],
    "string": [3, None],
    "option<u64>": [-1, 1 << 64, "x"],
    "option<u32>": [-1, 1 << 32, "x"],
    "list<u32>": ["x", [None], [-1], [1.5], [True], None],
    "list<bool>": [[1], "x"],
    "list<list<u32>>": [[None], [[None]], [[-1]], [1]],
}


class ModelCommandArgumentTests(unittest.TestCase):
    """The binding is where model-command arguments are checked (the service trusts their types)."""

    def setUp(self):
        self.model = FakeModelService()
        self.runtime = make_runtime(self, services={"fake": self.model})

    async def test_every_model_command_is_declared_with_its_queue_first(self):
        for name in pie.runtime.hostcalls.MODEL_COMMANDS:
            self.assertTrue(HOST_CALLS[name].model)
            self.assertEqual(HOST_CALLS[name].params[0], ("queue", "u32"), name)

    async def test_junk_in_any_argument_is_a_clear_fault_that_reaches_no_service(self):
        cases = 0
        for name in sorted(pie.runtime.hostcalls.MODEL_COMMANDS):
            good = SAMPLE_ARGS[name][1:]
            for i, (pname, ptype) in enumerate(HOST_CALLS[name].params[1:]):
                for bad in _JUNK[ptype]:
                    args = list(good)
                    args[i] = bad

                    async def script(host, _, name=name, args=args):
                        queue = host.call("create_queue", (0,))
                        host.call(name, (queue, *args))

                    instance_id, owner = await launched(self.runtime, script)
                    reason = await owner.ended(instance_id)
                    self.assertIn(f"invalid host call: {name}: argument {pname!r}", reason, args)
                    cases += 1
        self.assertEqual(self.model.submitted, [])
        self.assertGreater(cases, 100)


class GrammarCallTests(unittest.TestCase):
    """Grammar matchers through the host table (issue 13, point 2)."""

    def setUp(self):
        self.model = FakeModelService()
        self.other = FakeModelService("other-model", service_id=1)
        self.runtime = make_runtime(self, services={"fake": self.model, "other": self.other})

    async def run_script(self, script):
        instance_id, owner = await launched(self.runtime, script)
        reason = await owner.ended(instance_id)
        return reason, owner.messages(instance_id)

    async def test_the_token_table_is_built_once_and_off_the_reactor(self):
        """The model's first grammars wait for one build of its token table, on a pool
        thread: the reactor (this test's thread) never runs it."""
        built_on = []
        table = self.model.tokenizer.token_table
        self.model.tokenizer.token_table = lambda: (
            built_on.append(threading.get_ident()),
            table(),
        )[1]

        async def script(host, _):
            first = host.call("grammar_create", (0, "regex", "a"))
            second = host.call("grammar_create", (0, "regex", "b"))
            host.call("send", (repr([(await first)[1], (await second)[1]]),))

        reason, messages = await self.run_script(script)
        self.assertEqual(reason, NORMAL_FINISH)
        self.assertEqual(messages, ["['', '']"])
        self.assertEqual(len(built_on), 1)
        self.assertNotEqual(built_on[0], threading.get_ident())

    async def test_a_malformed_grammar_answers_the_library_message(self):
        async def script(host, _):
            host.call("send", (repr(await host.call("grammar_create", (0, "regex", "[a-"))),))
            host.call(
                "send",
                (repr(await host.call("grammar_create", (0, "json_schema", '{"type": "objec"}'))),),
            )

        reason, messages = await self.run_script(script)
        self.assertEqual(reason, NORMAL_FINISH)
        self.assertIn("unclosed character class", messages[0])
        self.assertIn("Invalid type: objec", messages[1])
        self.assertTrue(all(m.startswith("(0, ") for m in messages))

    async def test_generate_hands_the_matcher_to_the_service(self):
        async def script(host, _):
            queue = host.call("create_queue", (0,))
            matcher, _ = await host.call("grammar_create", (0, "regex", "ab"))
            args = (queue, 1, [1], [3], [0], [2], 0.0, 0, 1.0, None, 3, [7], matcher)
            await host.call("generate", args)
            try:
                other = host.call("create_queue", (1,))
                host.call("generate", (other, *args[1:]))
            except PieError as e:
                host.call("send", (str(e),))

        reason, messages = await self.run_script(script)
        self.assertEqual(reason, NORMAL_FINISH)
        self.assertEqual(messages, ["grammar matcher 1 belongs to another model"])
        (generate,) = [a for _, _, op, a in self.model.submitted if op == "generate"]
        self.assertEqual(generate[-1].allowed(), bytes([0] * 12 + [2, 0, 0, 0]))  # only "a"

    async def test_matchers_per_instance_are_bounded_and_dropped(self):
        async def script(host, _):
            ids = [
                (await host.call("grammar_create", (0, "regex", "a")))[0]
                for _ in range(MAX_MATCHERS)
            ]
            host.call("send", ((await host.call("grammar_create", (0, "regex", "a")))[1],))
            host.call("grammar_drop", (ids[0],))
            host.call("send", (str((await host.call("grammar_create", (0, "regex", "a")))[0] > 0),))

        reason, messages = await self.run_script(script)
        self.assertEqual(reason, NORMAL_FINISH)
        self.assertEqual(
            messages, [f"this instance already holds {MAX_MATCHERS} grammar matchers", "True"]
        )
