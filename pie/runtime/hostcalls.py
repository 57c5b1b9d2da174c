"""The inferlet host API, declared once.

Every call an inferlet can make is one row of HOST_CALLS. The WIT world
(pie/runtime/inferlet.wit) is generated from this table and checked against it
by a test; the host table (pie.runtime.hostapi) implements exactly these
names; both executors (dev, wasm) and the guest SDK's ABI (pie.inferlet._abi)
dispatch by these names. Types are WIT type expressions.

Modes:
- "sync":   answered at once by the host (no waiting), e.g. get_arguments.
- "async":  the guest parks until the result is ready (a model forward, a
            receive); in the guest this is `await _abi.call_async(name, *args)`.
- "command": a model command queued in order on its queue; the guest does not
            wait. If it fails later, the instance is terminated with the reason
            (Pie's fire-and-forget semantics; `synchronize` waits for them).
"""

from __future__ import annotations

from dataclasses import dataclass

DIST = "tuple<list<u32>, list<f32>>"
_Q = "queue: u32;"

PRIORITIES = ("low", "normal", "high")
"""The values of set_priority, least urgent first."""


@dataclass(frozen=True)
class HostCall:
    name: str
    params: tuple[tuple[str, str], ...]
    result: str | None
    mode: str  # "sync" | "async" | "command"
    doc: str
    model: bool = False  # a model command: runs on the model, in its queue's order (see below)


def _c(
    name: str, params: str, result: str | None, mode: str, doc: str, *, model: bool = False
) -> HostCall:
    pairs = tuple(tuple(p.strip().split(":", 1)) for p in params.split(";") if p.strip())
    params_ = tuple((n.strip(), t.strip()) for n, t in pairs)
    return HostCall(name, params_, result, mode, doc, model)


def _m(name: str, params: str, result: str | None, mode: str, doc: str) -> HostCall:
    """A model command: its first parameter is the queue it is ordered on."""
    return _c(name, _Q + params, result, mode, doc, model=True)


HOST_CALLS: dict[str, HostCall] = {
    c.name: c
    for c in [
        # ---- runtime
        _c("get_version", "", "string", "sync", "Engine version."),
        _c("get_instance_id", "", "string", "sync", "This instance's UUID."),
        _c("get_arguments", "", "list<string>", "sync", "Launch arguments (argv style)."),
        _c("set_return", "value: string", None, "sync", "The instance's result text."),
        _c("debug_query", "query: string", "string", "sync", "Runtime debug query (Pie §3.6)."),
        _c("time_ms", "", "u64", "sync", "Monotonic milliseconds."),
        _c("sleep", "ms: u32", None, "async", "Park for ms milliseconds."),
        # ---- models and queues
        _c("get_all_models", "", "list<string>", "sync", "Names of served models."),
        _c("get_model", "name: string", "option<u32>", "sync", "Service id of a model by name."),
        _c(
            "model_info",
            "service: u32",
            "list<tuple<string, string>>",
            "sync",
            "name, description, version, license, traits (comma list), chat_template, "
            "eos_token_ids (comma list), bos_token, bos_token_id ('' if none), kv_page_size, dist_size, vocab_size.",
        ),
        _c("create_queue", "service: u32", "u32", "sync", "A new command queue on a model."),
        _c("set_priority", _Q + "priority: string", None, "sync", "low | normal | high."),
        _m("synchronize", "", "bool", "async", "Wait until every earlier command ran."),
        _m("queue_debug_query", "query: string", "string", "async", "Worker debug query."),
        # ---- KV pages and embeds (virtual ids chosen by the guest)
        _c("get_kv_page_size", _Q, "u32", "sync", "Tokens per KV page."),
        _c(
            "get_all_exported_kv_pages",
            _Q,
            "list<tuple<string, u32>>",
            "sync",
            "Exported page sets: (name, page count).",
        ),
        _m("allocate_kv_pages", "ids: list<u32>", None, "command", "Create pages."),
        _m("deallocate_kv_pages", "ids: list<u32>", None, "command", "Drop references."),
        _m("allocate_embeds", "ids: list<u32>", None, "command", "Create embed slots."),
        _m("deallocate_embeds", "ids: list<u32>", None, "command", "Free embed slots."),
        _m(
            "copy_kv_page",
            "src: u32; dst: u32; src_offset: u32; dst_offset: u32; size: u32",
            None,
            "command",
            "Copy token slots between pages.",
        ),
        _m(
            "mask_kv_page",
            "page: u32; mask: list<bool>",
            None,
            "command",
            "Slot validity for the embedding path.",
        ),
        _m(
            "export_kv_pages",
            "ids: list<u32>; name: string; persistent: bool",
            None,
            "command",
            "Publish pages under a name.",
        ),
        _m("unexport_kv_pages", "name: string", None, "command", "Remove an export."),
        _m(
            "import_kv_pages",
            "ids: list<u32>; name: string",
            None,
            "command",
            "Map exported pages under new ids (shared, no copy).",
        ),
        # ---- forward passes
        _m(
            "forward_text",
            "last_page_len: u32; pages: list<u32>; tokens: list<u32>; positions: list<u32>; "
            "masks: list<list<u32>>; output_indices: list<u32>",
            f"list<{DIST}>",
            "async",
            "Forward tokens; top-k distribution per output index.",
        ),
        _m(
            "forward_text_no_output",
            "last_page_len: u32; pages: list<u32>; tokens: list<u32>; positions: list<u32>; "
            "masks: list<list<u32>>",
            None,
            "command",
            "Prefill: forward without outputs.",
        ),
        _m(
            "embed_text",
            "embeds: list<u32>; tokens: list<u32>; positions: list<u32>",
            None,
            "command",
            "Fill input embed slots from tokens.",
        ),
        _m(
            "forward",
            "last_page_len: u32; pages: list<u32>; input_embeds: list<u32>; "
            "output_embeds: list<u32>",
            None,
            "command",
            "Forward input embeds; distributions of the last tokens go to output embeds.",
        ),
        _m(
            "get_next_token_distribution",
            "embeds: list<u32>",
            f"list<{DIST}>",
            "async",
            "Distributions stored in output embeds.",
        ),
        _m(
            "generate",
            "last_page_len: u32; pages: list<u32>; tokens: list<u32>; positions: list<u32>; "
            "spare_pages: list<u32>; temperature: f32; top_k: u32; top_p: f32; "
            "seed: option<u64>; max_tokens: u32; stop_tokens: list<u32>; grammar: option<u32>",
            "list<u32>",
            "async",
            "Host-side generation: forward tokens causally (pages and last_page_len as in "
            "forward_text), then sample in the engine (temperature 0 = greedy, top_k 0 = off) "
            "and forward each sampled token, writing on into spare_pages, until a stop token "
            "or max_tokens. With a grammar matcher, each step's logits are masked to the tokens "
            "it allows before sampling, each sampled token advances it, and generation also "
            "ends when it is stopped. The sampled ids; the last one is not forwarded yet.",
        ),
        # ---- tokenizer
        _c("tokenize", "service: u32; text: string", "list<u32>", "sync", "Encode text."),
        _c("detokenize", "service: u32; tokens: list<u32>", "string", "sync", "Decode tokens."),
        _c(
            "apply_chat_template",
            "service: u32; messages: string; add_generation_prompt: bool; "
            "tools: option<string>; documents: option<string>; variables: option<string>",
            "tuple<bool, string>",
            "sync",
            "The model's chat template rendered on the host by jinja2's sandbox, as "
            "transformers' apply_chat_template does. messages, tools and documents are JSON "
            "lists of objects, variables a JSON object of further template variables. "
            "(true, the text), or (false, why: the template refused the messages, failed or "
            "went over max_chat_chars); the instance goes on either way.",
        ),
        _c(
            "get_vocabs",
            "service: u32",
            "tuple<list<u32>, list<u8>, list<u32>>",
            "sync",
            "Regular token ids, all their bytes concatenated, and where each token's bytes "
            "end in them (one flat buffer: it crosses the sandbox boundary in milliseconds).",
        ),
        # ---- grammar matchers (pie.runtime.grammar; ids are the instance's own)
        _c(
            "grammar_create",
            "service: u32; kind: string; source: string",
            "tuple<u32, string>",
            "async",
            "A matcher over the model's vocabulary for a grammar (the model's first one waits "
            "while its token table is built, off the reactor): kind json_schema (source: "
            "the schema), json (any object; source ignored), regex, lark or choice (source: a "
            "JSON list of strings). (matcher id, '') or (0, the library's message) if the "
            "grammar is malformed or the instance holds too many matchers.",
        ),
        _c(
            "grammar_allowed",
            "matcher: u32",
            "list<u8>",
            "sync",
            "The tokens allowed next as a bitmask over the vocabulary (little-endian 32-bit "
            "words: token i is bit i % 8 of byte i // 8).",
        ),
        _c(
            "grammar_consume",
            "matcher: u32; tokens: list<u32>",
            "bool",
            "sync",
            "Advance over tokens; false at the first one not allowed (those before it stay).",
        ),
        _c("grammar_is_accepting", "matcher: u32", "bool", "sync", "The grammar may end here."),
        _c(
            "grammar_is_stopped",
            "matcher: u32",
            "bool",
            "sync",
            "Nothing more may follow (end of sequence consumed, or the grammar cannot go on).",
        ),
        _c(
            "grammar_rollback",
            "matcher: u32; count: u32",
            "bool",
            "sync",
            "Undo the last count consumed tokens; false if there are not that many.",
        ),
        _c("grammar_drop", "matcher: u32", None, "sync", "Free a matcher."),
        # ---- messaging and the key-value store
        _c(
            "send",
            "message: string",
            "bool",
            "sync",
            "To the owning client (instance_event). True when the client's connection is "
            "backed up (past its high-water mark): await outbound-drained before sending more.",
        ),
        _c(
            "outbound_drained",
            "",
            None,
            "async",
            "Resolves once the owning client's connection is no longer backed up.",
        ),
        _c("receive", "", "string", "async", "Next message from the client (signal_instance)."),
        _c("broadcast", "topic: string; message: string", None, "sync", "Publish to subscribers."),
        _c("subscribe", "topic: string", "u32", "sync", "Subscribe; returns a subscription id."),
        _c(
            "subscription_next",
            "subscription: u32",
            "string",
            "async",
            "Next message of a subscription (every message, in order).",
        ),
        _c("unsubscribe", "subscription: u32", None, "sync", "End a subscription."),
        _c("store_get", "key: string", "option<string>", "async", "Persistent KV store get."),
        _c("store_set", "key: string; value: string", None, "async", "Set (durable on return)."),
        _c("store_delete", "key: string", None, "async", "Delete."),
        _c("store_exists", "key: string", "bool", "async", "Membership."),
        _c("store_list_keys", "", "list<string>", "async", "All keys."),
        # ---- streamed responses of server instances (pie.runtime.http.Exchange)
        _c(
            "http_response_start",
            "status: u32; headers: list<tuple<string, string>>",
            None,
            "sync",
            "Send the status and headers of this request's response now (server instances "
            "only); the body follows in http_response_write calls and the return value is ignored.",
        ),
        _c(
            "http_response_write",
            "data: list<u8>",
            None,
            "async",
            "Send a chunk of the started response (flushed at once); resolves when the "
            "client's socket can take more (backpressure).",
        ),
        _c(
            "http_response_finish",
            "",
            None,
            "sync",
            "End the started response (else it ends when the instance does).",
        ),
        # ---- outgoing HTTP (pie.runtime.outbound: the daemon's inferlet_http_allow policy)
        _c(
            "fetch",
            "url: string; method: string; headers: list<tuple<string, string>>; body: list<u8>; "
            "timeout_ms: u32",
            "tuple<string, u16, list<tuple<string, string>>, list<u8>>",
            "async",
            "HTTP request made by the daemon if its policy allows the URL: (error, status, "
            "headers, body); error is empty on success, else why it was refused or failed. "
            "timeout_ms 0 = the daemon's limit.",
        ),
    ]
}

MODEL_COMMANDS = frozenset(name for name, c in HOST_CALLS.items() if c.model)
"""Calls the runtime forwards to IModelService.submit (everything that runs on the model, in queue order)."""
