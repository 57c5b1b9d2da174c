"""Chat templates rendered by the host (pie.runtime.chat_template) as transformers renders them.

Every model family pie knows is rendered with pie's renderer and with
transformers' `apply_chat_template(..., tokenize=False)` on a
PreTrainedTokenizerFast built from a tiny tokenizer (nothing is downloaded),
over several conversations, with and without the generation prompt, and the
texts must be equal. SmolLM2's template is the one in the served GGUF; the
others are in tests/fixtures/chat_templates/ (see its README).
"""

from __future__ import annotations

import copy
import json
import re
from datetime import datetime
from pathlib import Path

import jinja2
import pytest
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast
from twisted.trial import unittest

from pie.config import default_home
from pie.inferlet import TemplateError, get_auto_model
from pie.inferlet.testing import SMOLLM2_TEMPLATE, FakeModel, FakeWorld
from pie.runtime import chat_template
from pie.runtime.chat_template import ChatTemplateError, compiled, render, render_json

FIXTURES = Path(__file__).parent / "fixtures" / "chat_templates"
SMOLLM2_GGUF = (
    Path(default_home()) / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
)
BOS, EOS = "<s>", "</s>"

SYSTEM = {"role": "system", "content": "You are terse. Answer in <= 5 words."}
CHATS = {
    "one user turn": [{"role": "user", "content": "  What is the capital of France?  "}],
    "system first": [SYSTEM, {"role": "user", "content": "Hi there"}],
    "multi-turn": [
        SYSTEM,
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another, in French: « é »?"},
    ],
    "ends on the assistant": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ],
}

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather now.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "e.g. Paris"},
                    "days": {"type": "integer"},
                    "units": {"type": ["string", "null"]},
                    "hours": {"type": "array", "items": {"type": "number"}},
                    "flags": {"type": "object", "additionalProperties": {"type": "boolean"}},
                },
                "required": ["city"],
            },
        },
    }
]
TOOL_CHAT = [
    SYSTEM,
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "call12345",
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call12345", "content": "18 C, sunny"},
    {"role": "assistant", "content": "18 C and sunny."},
    {"role": "user", "content": "Thanks!"},
]
DOCUMENTS = [
    {"title": "Paris", "text": "Paris is the capital of France."},
    {"text": "An untitled note."},
    {"title": "Lyon", "text": "Lyon is on the Rhône."},
    {"title": "Cut", "text": "The template stops before this fourth one."},
]
SHORT_ID_CALL = {**TOOL_CHAT[2]["tool_calls"][0], "id": "short"}  # Mistral wants 9 characters
REASONING_CHAT = [
    {"role": "user", "content": "Is 7 prime?"},
    {"role": "assistant", "content": "Yes.", "reasoning_content": "7 has no divisors but 1, 7."},
    {"role": "user", "content": "And 9?"},
    {"role": "assistant", "content": "No.", "thinking": "9 = 3 * 3."},
]

TOOL_TEMPLATES = ("llama3.1", "qwen2.5", "qwen3", "mistral_v0.3", "chatml_tools_macros")


def fixture(name: str) -> str:
    return (FIXTURES / f"{name}.jinja").read_text(encoding="utf-8").removesuffix("\n")


def smollm2_template() -> str:
    """The chat template stored in the served SmolLM2 GGUF."""
    from gguf import GGUFReader

    field = GGUFReader(str(SMOLLM2_GGUF)).fields["tokenizer.chat_template"]
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def reference(template: str) -> PreTrainedTokenizerFast:
    """A transformers tokenizer with this chat template and pie's test bos/eos tokens."""
    vocab = {"<unk>": 0, BOS: 1, EOS: 2}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS)
    tokenizer.chat_template = template
    return tokenizer


class TransformersParityTests(unittest.TestCase):
    """pie's render equals transformers' apply_chat_template, template by template."""

    def assertSameAsTransformers(self, template: str, messages: list[dict], **kwargs) -> str:
        want = reference(template).apply_chat_template(
            copy.deepcopy(messages), tokenize=False, **kwargs
        )
        tools, documents = kwargs.pop("tools", None), kwargs.pop("documents", None)
        prompt = kwargs.pop("add_generation_prompt", False)
        got = render(
            template,
            json.loads(json.dumps(messages)),  # what crosses the host call: JSON
            add_generation_prompt=prompt,
            tools=tools,
            documents=documents,
            bos_token=BOS,
            eos_token=EOS,
            variables=kwargs,
        )
        self.assertEqual(got, want)
        return got

    def assertConversationsMatch(self, template: str) -> None:
        for label, messages in CHATS.items():
            for prompt in (False, True):
                with self.subTest(chat=label, add_generation_prompt=prompt):
                    self.assertSameAsTransformers(template, messages, add_generation_prompt=prompt)

    @pytest.mark.slow  # loads the real model
    def test_smollm2_from_the_gguf(self):
        if not SMOLLM2_GGUF.exists():
            raise unittest.SkipTest(f"{SMOLLM2_GGUF} is not there (pie pull smollm2-135m-instruct)")
        template = smollm2_template()
        self.assertEqual(template, SMOLLM2_TEMPLATE)  # the fake model's template is the real one
        self.assertConversationsMatch(template)
        text = self.assertSameAsTransformers(
            template, CHATS["one user turn"], add_generation_prompt=True
        )
        self.assertTrue(text.startswith("<|im_start|>system\nYou are a helpful AI assistant"))

    def test_llama3(self):
        self.assertConversationsMatch(fixture("llama3"))

    def test_llama3_1(self):
        self.assertConversationsMatch(fixture("llama3.1"))

    def test_qwen2_5(self):
        self.assertConversationsMatch(fixture("qwen2.5"))

    def test_qwen3(self):
        self.assertConversationsMatch(fixture("qwen3"))

    def test_gemma3(self):
        self.assertConversationsMatch(fixture("gemma3"))

    def test_mistral(self):
        self.assertConversationsMatch(fixture("mistral_v0.2"))
        self.assertConversationsMatch(fixture("mistral_v0.3"))

    def test_phi3(self):
        self.assertConversationsMatch(fixture("phi3"))

    def test_template_with_macros(self):
        self.assertConversationsMatch(fixture("chatml_tools_macros"))

    def test_tools(self):
        for name in TOOL_TEMPLATES:
            for prompt in (False, True):
                with self.subTest(template=name, add_generation_prompt=prompt):
                    self.assertSameAsTransformers(
                        fixture(name), TOOL_CHAT, tools=TOOLS, add_generation_prompt=prompt
                    )
        text = self.assertSameAsTransformers(fixture("chatml_tools_macros"), TOOL_CHAT, tools=TOOLS)
        # the recursive macro named every parameter's type
        self.assertIn(
            "get_weather(city: str, days: int, units: Union[str,Any], hours: list[float], "
            "flags: dict[str, bool]) - The weather now.",
            text,
        )
        self.assertIn(
            '<|im_start|>assistant\n<tool_call>{"name": "get_weather", "arguments": '
            '{"city": "Paris"}}</tool_call><|im_end|>',
            text,
        )

    def test_documents_and_loop_controls(self):
        text = self.assertSameAsTransformers(
            fixture("chatml_tools_macros"), CHATS["multi-turn"], documents=DOCUMENTS
        )
        self.assertIn("Document 2: untitled\nAn untitled note.", text)
        self.assertNotIn("fourth", text)  # {% break %} after three
        self.assertEqual(text.count("<|im_start|>system"), 1)  # {% continue %} skipped the system

    def test_reasoning_and_template_variables(self):
        qwen3 = fixture("qwen3")
        text = self.assertSameAsTransformers(qwen3, REASONING_CHAT)
        self.assertIn("<think>\n9 = 3 * 3.\n</think>", text)  # `thinking` read as reasoning_content
        for thinking in (False, True):
            with self.subTest(enable_thinking=thinking):
                text = self.assertSameAsTransformers(
                    qwen3,
                    CHATS["system first"],
                    add_generation_prompt=True,
                    enable_thinking=thinking,
                )
                self.assertEqual(text.endswith("<think>\n\n</think>\n\n"), not thinking)
        text = self.assertSameAsTransformers(
            fixture("llama3.1"), CHATS["system first"], date_string="1 Jan 2030"
        )
        self.assertIn("Today Date: 1 Jan 2030", text)

    def test_variables_win_over_the_special_tokens(self):
        text = self.assertSameAsTransformers(
            fixture("llama3"), CHATS["one user turn"], bos_token="[BOS]"
        )
        self.assertTrue(text.startswith("[BOS]<|start_header_id|>user"))

    def test_null_values_are_dropped_as_transformers_does(self):
        messages = [{"role": "user", "content": "hi", "name": None}]
        text = self.assertSameAsTransformers(
            "{% for m in messages %}{{ m.name is defined }}{% endfor %}", messages
        )
        self.assertEqual(text, "False")

    def test_strftime_now(self):
        text = self.assertSameAsTransformers("{{ strftime_now('%Y') }}", CHATS["one user turn"])
        self.assertEqual(text, str(datetime.now().year))

    def test_refusals_carry_the_templates_message(self):
        cases = [
            ("gemma3", [{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "?"}]),
            ("mistral_v0.2", [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}]),
            ("mistral_v0.3", [*TOOL_CHAT[:2], {**TOOL_CHAT[2], "tool_calls": [SHORT_ID_CALL]}]),
        ]
        for name, messages in cases:
            with self.subTest(template=name):
                template = fixture(name)
                with self.assertRaises(jinja2.TemplateError) as theirs:
                    reference(template).apply_chat_template(messages, tokenize=False)
                with self.assertRaises(ChatTemplateError) as ours:
                    render(template, messages, bos_token=BOS, eos_token=EOS)
                self.assertEqual(str(ours.exception), str(theirs.exception))


class ErrorAndLimitTests(unittest.TestCase):
    """What the host call answers when rendering cannot give a text."""

    def call(self, template: str, messages: object = (), **kwargs) -> tuple[bool, str]:
        return render_json(
            template,
            messages if isinstance(messages, str) else json.dumps(list(messages)),
            kwargs.pop("add_generation_prompt", False),
            kwargs.pop("tools", None),
            kwargs.pop("documents", None),
            kwargs.pop("variables", None),
            bos_token=BOS,
            eos_token=EOS,
            **kwargs,
        )

    def test_syntax_and_runtime_errors_name_the_template_line(self):
        self.assertEqual(
            self.call("ok\n{% if messages %}"),
            (
                False,
                "chat template syntax error, line 2: Unexpected end of template. Jinja was "
                "looking for the following tags: 'elif' or 'else' or 'endif'. The innermost "
                "block that needs to be closed is 'if'.",
            ),
        )
        ok, why = self.call("a\nb\n{{ messages[0].content + 1 }}", [{"content": "x"}])
        self.assertEqual((ok, why.split(": ")[0]), (False, "chat template failed, line 3"))
        self.assertIn("TypeError", why)

    def test_the_sandbox_refuses_mutation_and_internals(self):
        for template, text in [
            ("{% set _ = messages.append(1) %}", "access to attribute 'append' of 'list'"),
            ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "SecurityError"),
            ("{% set ns = namespace(_x=1) %}", "underscore-prefixed attributes"),
        ]:
            with self.subTest(template=template):
                ok, why = self.call(template, [{"role": "user", "content": "x"}])
                self.assertFalse(ok)
                self.assertIn(text, why)

    def test_bad_inputs_are_answers_not_faults(self):
        self.assertEqual(
            self.call("x", "not json")[1],
            "messages is not valid JSON: Expecting value: line 1 column 1 (char 0)",
        )
        self.assertEqual(
            self.call("x", '{"role": "user"}')[1], "messages must be a list of objects"
        )
        self.assertEqual(
            self.call("x", tools='{"a": 1}')[1], "tools must be a list of objects (JSON schemas)"
        )
        self.assertEqual(self.call("x", variables="[1]")[1], "variables must be a JSON object")
        self.assertEqual(
            self.call("x", variables='{"messages": []}')[1],
            "template variables ['messages'] have their own arguments",
        )
        self.assertEqual(self.call("")[1], "the model has no chat template")

    def test_rendered_size_is_limited_while_rendering(self):
        runaway = "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}"
        self.assertEqual(
            self.call(runaway, max_chars=10_000),
            (False, "the rendered chat is over 10000 characters (max_chat_chars)"),
        )
        self.assertEqual(self.call("{{ 'x' * 10000 }}", max_chars=10_000), (True, "x" * 10000))

    def test_input_size_is_limited(self):
        messages = [{"role": "user", "content": "x" * 100}]
        self.assertEqual(
            self.call("{{ messages | length }}", messages, max_chars=50),
            (False, "the chat's JSON is over 50 characters (max_chat_chars)"),
        )


class CompiledCacheTests(unittest.TestCase):
    def test_one_compilation_per_template_text(self):
        template = fixture("qwen3") + "{# cache test #}"
        chat_template._compile.cache_clear()
        first = compiled(template)
        for _ in range(3):
            render(template, CHATS["multi-turn"], add_generation_prompt=True)
        self.assertIs(compiled(template), first)
        self.assertIsNot(compiled(fixture("llama3")), first)
        info = chat_template._compile.cache_info()
        self.assertEqual((info.misses, info.hits), (2, 4))

    def test_a_broken_template_fails_from_the_cache_too(self):
        chat_template._compile.cache_clear()
        for _ in range(2):
            self.assertRaisesRegex(ChatTemplateError, "syntax error", compiled, "{% endfor %}")
        self.assertEqual(chat_template._compile.cache_info().misses, 1)


class OneRendererTests(unittest.TestCase):
    """Chat templates render in exactly one place (issue 10, point 7): this module."""

    def test_only_chat_template_imports_jinja2_and_the_tokenizer_carries_text_only(self):
        from pie.engine.tokenizer import Tokenizer

        package = Path(chat_template.__file__).resolve().parents[1]
        importers = sorted(
            str(path.relative_to(package.parent))
            for path in package.rglob("*.py")
            if re.search(r"^\s*(import|from) jinja2", path.read_text("utf-8"), re.MULTILINE)
        )
        self.assertEqual(importers, ["pie/runtime/chat_template.py"])
        self.assertFalse(hasattr(Tokenizer, "apply_chat_template"))

    def test_render_for_uses_the_tokenizers_template_and_tokens(self):
        class Tok:
            chat_template = "{{ bos_token }}{{ messages[0].content }}{{ eos_token }}"
            bos_token, eos_token = "<s>", "</s>"

        self.assertEqual(
            chat_template.render_for(Tok(), [{"role": "user", "content": "hi"}]), "<s>hi</s>"
        )


class SdkTests(unittest.TestCase):
    """Model.render_chat in an inferlet goes through the host call (FakeWorld renders it
    with the same module as the real host)."""

    def test_render_chat_with_tools_documents_and_variables(self):
        template = fixture("chatml_tools_macros")

        async def main(args):
            model = get_auto_model()
            return model.render_chat(
                TOOL_CHAT, True, tools=TOOLS, documents=DOCUMENTS[:1], bos_token="[B]"
            )

        got = FakeWorld(FakeModel(chat_template=template)).run(main)
        want = reference(template).apply_chat_template(
            TOOL_CHAT,
            tokenize=False,
            add_generation_prompt=True,
            tools=TOOLS,
            documents=DOCUMENTS[:1],
            bos_token="[B]",
            eos_token="<|im_end|>",
        )
        self.assertEqual(got, want)

    def test_a_refusal_is_a_template_error_the_inferlet_handles(self):
        async def main(args):
            try:
                get_auto_model().render_chat([{"role": "assistant", "content": "first"}])
            except TemplateError as e:
                return f"handled: {e}"

        world = FakeWorld(FakeModel(chat_template=fixture("gemma3")))
        self.assertEqual(
            world.run(main),
            "handled: Conversation roles must alternate user/assistant/user/assistant/...",
        )
