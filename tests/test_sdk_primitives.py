"""Brle, samplers, stop conditions and the chat-template renderer of pie.inferlet."""

from __future__ import annotations

import json
import random

import jinja2.sandbox
from twisted.trial import unittest

from pie.inferlet.brle import Brle
from pie.inferlet.sampling import (
    Greedy,
    Length,
    Temperature,
    TopK,
    TopP,
    Typical,
    Until,
    UntilAny,
    any_of,
    sample_with,
)
from pie.inferlet.template import Template, TemplateError
from pie.inferlet.testing import SMOLLM2_TEMPLATE

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
CHATML_TOOLS_TEMPLATE = """{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are helpful.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == "user" or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>assistant' }}
        {%- if message.content %}{{- '\\n' + message.content }}{%- endif %}
        {%- for call in message.tool_calls | default([]) %}
            {%- if call.function is defined %}{%- set call = call.function %}{%- endif %}
            {{- '\\n<tool_call>' + call.name + ' ' + call.arguments | tojson + '</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""

CONVERSATIONS = [
    [{"role": "user", "content": "Hi  "}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Yo"},
        {"role": "user", "content": "x"},
    ],
    [
        {"role": "user", "content": "q"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "f", "arguments": {"a": 1}}}],
        },
    ],
]


class BrleTests(unittest.TestCase):
    def test_round_trip_and_buffer_starts_with_visible_run(self):
        flags = [True, True, False, True, False, False]
        b = Brle.from_list(flags)
        self.assertEqual(b.buffer, [0, 2, 1, 1, 2])
        self.assertEqual(b.to_list(), flags)
        self.assertEqual(Brle.from_buffer(b.buffer), b)
        self.assertEqual(Brle(3).buffer, [3])

    def test_edits_match_a_plain_list(self):
        rng = random.Random(7)
        for _ in range(300):
            flags = [rng.random() < 0.4 for _ in range(rng.randrange(0, 20))]
            b = Brle.from_list(flags)
            op = rng.randrange(4)
            start = rng.randrange(len(flags) + 1)
            end = rng.randrange(start, len(flags) + 1)
            value = rng.random() < 0.5
            if op == 0:
                b.mask_range(start, end, value)
                flags[start:end] = [value] * (end - start)
            elif op == 1:
                b.remove_range(start, end)
                del flags[start:end]
            elif op == 2:
                b.append(value)
                flags.append(value)
            else:
                self.assertEqual(
                    b.is_range_all_value(start, end, value),
                    all(f == value for f in flags[start:end]),
                )
            self.assertEqual(b.to_list(), flags)
            self.assertEqual(len(b), len(flags))
            self.assertEqual(sum(b.buffer), len(flags))
            self.assertTrue(all(r > 0 for r in b.buffer[1:]), b.buffer)

    def test_bad_input_is_refused(self):
        self.assertRaises(IndexError, Brle(3).mask_range, 2, 5)
        self.assertRaises(ValueError, Brle.from_buffer, [1, -1])
        self.assertRaises(IndexError, Brle(2).__getitem__, 2)


class SamplerTests(unittest.TestCase):
    ids = [10, 11, 12, 13]
    probs = [0.5, 0.3, 0.15, 0.05]

    def test_greedy_and_zero_temperature(self):
        self.assertEqual(Greedy().sample(self.ids, self.probs), 10)
        self.assertEqual(Temperature(0).sample(self.ids, self.probs), 10)

    def test_top_k_and_top_p_stay_inside_their_set(self):
        seen_k = {TopK(2, seed=s).sample(self.ids, self.probs) for s in range(200)}
        self.assertEqual(seen_k, {10, 11})
        seen_p = {TopP(0.8, seed=s).sample(self.ids, self.probs) for s in range(200)}
        self.assertEqual(seen_p, {10, 11})
        seen_t = {Temperature(1.0, seed=s).sample(self.ids, self.probs) for s in range(400)}
        self.assertEqual(seen_t, set(self.ids))

    def test_seeded_samplers_are_reproducible(self):
        a = [TopP(0.95, seed=3).sample(self.ids, self.probs) for _ in range(5)]
        b = [TopP(0.95, seed=3).sample(self.ids, self.probs) for _ in range(5)]
        self.assertEqual(a, b)

    def test_typical_drops_the_atypical_head(self):
        ids = [1, 2, 3]
        probs = [0.98, 0.01, 0.01]
        self.assertEqual({Typical(0.5, seed=s).sample(ids, probs) for s in range(50)}, {1})

    def test_callables_are_samplers(self):
        self.assertEqual(sample_with(lambda ids, probs: ids[-1], self.ids, self.probs), 13)
        self.assertRaises(TypeError, sample_with, 5, self.ids, self.probs)
        self.assertRaises(ValueError, sample_with, Greedy(), [], [])


class StopTests(unittest.TestCase):
    def test_until_length_any(self):
        self.assertTrue(Until([3, 4])([1, 3, 4]))
        self.assertFalse(Until([3, 4])([3, 4, 1]))
        self.assertTrue(Length(2)([1, 2]))
        self.assertFalse(Length(3)([1, 2]))
        stop = any_of(Length(5), UntilAny([9]))
        self.assertTrue(stop([1, 9]))
        self.assertTrue((Length(1) | Until([7]))([2]))
        self.assertRaises(ValueError, Until, [])


class TemplateTests(unittest.TestCase):
    def test_matches_jinja2_on_real_chat_templates(self):
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.filters["tojson"] = lambda v: json.dumps(v, ensure_ascii=False)  # as transformers
        for source in (SMOLLM2_TEMPLATE, LLAMA3_TEMPLATE, CHATML_TOOLS_TEMPLATE):
            for messages in CONVERSATIONS:
                for prompt in (False, True):
                    want = env.from_string(source).render(
                        messages=messages, add_generation_prompt=prompt, bos_token="<s>"
                    )
                    got = Template(source).render(
                        messages=messages, add_generation_prompt=prompt, bos_token="<s>"
                    )
                    self.assertEqual(got, want)

    def test_expressions(self):
        t = Template(
            "{{ (1 + 2) * 3 }}|{{ 'a' ~ 5 }}|{{ x is defined }}|{{ [1,2,3][1:] | length }}"
            "|{{ 'y' if not x else 'n' }}|{% for a, b in d | items %}{{ a }}={{ b }}"
            "{% endfor %}|{{ ' s '.strip() }}"
        )
        self.assertEqual(t.render(d={"k": 1}), "9|a5|False|2|y|k=1|s")

    def test_unsupported_and_raised(self):
        self.assertRaises(TemplateError, Template, "{% macro m() %}{% endmacro %}")
        self.assertRaises(TemplateError, Template, "{% if x %}")
        t = Template("{{ raise_exception('no system role') }}")
        self.assertRaisesRegex(TemplateError, "no system role", t.render)
