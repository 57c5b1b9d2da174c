"""Chat templates, rendered on the host by jinja2's sandbox, the way transformers does.

A model's chat template is a jinja2 program shipped with the model (GGUF
metadata or tokenizer_config.json). Inferlets ask the host to render it (the
`apply_chat_template` host call) instead of carrying a Jinja interpreter into
the sandbox, so every model's own template works as it does under
transformers' `apply_chat_template`: macros, filters, namespaces, loop
controls, `raise_exception`, `strftime_now`.

The environment is transformers' (utils/chat_template_utils.py): an
ImmutableSandboxedEnvironment with trim_blocks and lstrip_blocks, the
loopcontrols extension and a `{% generation %}` tag that renders its body;
`tojson` without HTML escaping; `raise_exception`, `strftime_now`, and `dict`
and `namespace` that refuse underscore-prefixed names. The template sees what
transformers passes it: `messages` (keys whose value is null dropped; a
reasoning given as `thinking` or `reasoning` also as `reasoning_content`, and
as `thinking`), `tools`, `documents`, `add_generation_prompt`, the model's
`bos_token` and `eos_token`, and the caller's own variables, which win over
the special tokens. Every input arrives as JSON text, so the template only
ever sees plain data.

A template compiles once per text (an LRU cache, shared by every model with
that template), so a request pays for rendering only. Rendering runs on the
reactor thread and is streamed: past `max_chars` characters of output it
stops, so a runaway template cannot build an unbounded string.
"""

from __future__ import annotations

import functools
import json
import traceback
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

DEFAULT_MAX_CHARS = 4 * 1024 * 1024
"""Default limit on the rendered text and on the JSON of the inputs (config: max_chat_chars)."""

COMPILED_CACHE_SIZE = 32
"""Distinct template texts kept compiled (a daemon serves a handful of models)."""

_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_OWN_ARGUMENTS = frozenset({"messages", "tools", "documents", "add_generation_prompt"})


class ChatTemplateError(Exception):
    """The template refused the messages (`raise_exception`), failed, or does not compile.

    The text is what the inferlet's TemplateError says: the template's own
    message for a refusal, otherwise the error with its template line.
    """


class _Refused(jinja2.exceptions.TemplateError):
    """`raise_exception(message)` in a template: the message is the whole story."""


# --------------------------------------------------------------------------- the environment


def _raise_exception(message: object) -> None:
    raise _Refused(str(message))


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """transformers' tojson: plain json.dumps (jinja2's own escapes <, >, & and ' for HTML)."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """`dict(...)` for templates: builds dicts, exposes nothing else of the type."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore-prefixed attributes (no way to CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 (jinja2's signature trick)
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore-prefixed attributes on a namespace: {name!r}"
            )


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: transformers marks the assistant's text
    with it for training masks; rendering, it is its body (in its own scope, as there)."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        call = self.call_method("_body")
        return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


_ENV = _environment()


# --------------------------------------------------------------------------- compiling and rendering


@functools.lru_cache(maxsize=COMPILED_CACHE_SIZE)
def _compile(source: str) -> jinja2.Template | ChatTemplateError:
    """The compiled template, or the error (cached too: a broken template fails fast)."""
    try:
        return _ENV.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        return ChatTemplateError(f"chat template syntax error, line {e.lineno}: {e.message}")


def compiled(source: str) -> jinja2.Template:
    """The template compiled from `source` (once per text); raises ChatTemplateError."""
    result = _compile(source)
    if isinstance(result, ChatTemplateError):
        raise result
    return result


def _template_line(error: BaseException) -> int | None:
    """The template line an error was raised at (jinja2 rewrites tracebacks to template frames)."""
    lines = [
        f.lineno for f in traceback.extract_tb(error.__traceback__) if f.filename == "<template>"
    ]
    return lines[-1] if lines else None


def _describe(error: Exception) -> str:
    if isinstance(error, _Refused):
        return str(error)
    line = _template_line(error)
    where = f", line {line}" if line is not None else ""
    return f"chat template failed{where}: {type(error).__name__}: {error}"


def _aliased(message: dict) -> dict:
    """transformers' message normalisation: null values dropped, reasoning under every name."""
    message = {key: value for key, value in message.items() if value is not None}
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return message


def render(
    source: str,
    messages: list[dict],
    *,
    add_generation_prompt: bool = False,
    tools: list[dict] | None = None,
    documents: list[dict] | None = None,
    bos_token: str = "",
    eos_token: str = "",
    variables: dict[str, Any] | None = None,
    max_chars: int = DEFAULT_MAX_CHARS,
) -> str:
    """Render a chat template as transformers' `apply_chat_template(..., tokenize=False)`.

    Inputs are plain JSON data. Raises ChatTemplateError when the template
    refuses the messages, fails, does not compile, or renders more than
    `max_chars` characters.
    """
    if not source:
        raise ChatTemplateError("the model has no chat template")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise ChatTemplateError("messages must be a list of objects")
    if tools is not None and not (
        isinstance(tools, list) and all(isinstance(t, dict) for t in tools)
    ):
        raise ChatTemplateError("tools must be a list of objects (JSON schemas)")
    if documents is not None and not (
        isinstance(documents, list) and all(isinstance(d, dict) for d in documents)
    ):
        raise ChatTemplateError("documents must be a list of objects")
    variables = dict(variables or {})
    clash = sorted(_OWN_ARGUMENTS & variables.keys())
    if clash:
        raise ChatTemplateError(f"template variables {clash} have their own arguments")
    template = compiled(source)
    context = {
        "bos_token": bos_token,
        "eos_token": eos_token,
        **variables,
        "messages": [_aliased(m) for m in messages],
        "tools": tools,
        "documents": documents,
        "add_generation_prompt": add_generation_prompt,
    }
    parts: list[str] = []
    size = 0
    try:
        for part in template.generate(**context):
            size += len(part)
            if size > max_chars:
                raise ChatTemplateError(
                    f"the rendered chat is over {max_chars} characters (max_chat_chars)"
                )
            parts.append(part)
    except ChatTemplateError:
        raise
    except Exception as error:  # the template's code is the model's: any failure is its own
        raise ChatTemplateError(_describe(error)) from error
    return "".join(parts)


def render_for(tokenizer: Any, messages: list[dict], **options: Any) -> str:
    """render() with an ITokenizer's own template and bos/eos tokens (tests, benches, tools)."""
    return render(
        tokenizer.chat_template,
        messages,
        bos_token=tokenizer.bos_token,
        eos_token=tokenizer.eos_token,
        **options,
    )


def _decoded(name: str, text: str | None) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError as e:
        raise ChatTemplateError(f"{name} is not valid JSON: {e}") from None


def render_json(
    source: str,
    messages: str,
    add_generation_prompt: bool,
    tools: str | None,
    documents: str | None,
    variables: str | None,
    *,
    bos_token: str,
    eos_token: str,
    max_chars: int = DEFAULT_MAX_CHARS,
) -> tuple[bool, str]:
    """The apply_chat_template host call: JSON texts in, (True, the text) or (False, why) out.

    A refusal is an answer, not a fault: the inferlet gets a TemplateError it
    can handle (e.g. a 400 to its own HTTP client) and goes on.
    """
    given = len(messages) + sum(len(t) for t in (tools, documents, variables) if t is not None)
    if given > max_chars:
        return False, f"the chat's JSON is over {max_chars} characters (max_chat_chars)"
    try:
        extra = _decoded("variables", variables)
        if extra is not None and not isinstance(extra, dict):
            raise ChatTemplateError("variables must be a JSON object")
        return True, render(
            source,
            _decoded("messages", messages),
            add_generation_prompt=add_generation_prompt,
            tools=_decoded("tools", tools),
            documents=_decoded("documents", documents),
            bos_token=bos_token,
            eos_token=eos_token,
            variables=extra,
            max_chars=max_chars,
        )
    except ChatTemplateError as e:
        return False, str(e)
