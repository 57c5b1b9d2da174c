"""The host table: one implementation of every row of pie.runtime.hostcalls.

Both executors (dev and wasm) give the guest a binding made here and forward
each inferlet call as `host.call(name, args)`:

- "sync" calls return their value;
- "async" calls return a Deferred the guest awaits;
- "command" calls return None at once; the command is queued on its model
  queue in order, and if it fails later the instance is terminated with the
  failure's text (Pie's fire-and-forget semantics, without the silent loss).

Arguments are checked against the WIT types of the table before anything
runs (pie.runtime.witcheck). An unknown name, a wrong number of arguments or a wrongly typed one is a
broken guest, not a user mistake: the call raises InstanceFault and that
instance (and only it) is terminated with "Runtime error: invalid host call: <what>". Errors a program can
reasonably expect and handle (an unknown queue, subscription or model id, a
bad priority) raise PieError into the guest. Calls of an instance that has
ended raise InstanceFault.
"""

from __future__ import annotations

import functools
import itertools
import time
from collections.abc import Callable

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

import pie
from pie.interfaces import IBackpressure, IModelService, InstanceFault, PieError
from pie.namespaces import instance_user, scoped, visible
from pie.runtime import chat_template, grammar
from pie.runtime.hostcalls import HOST_CALLS, MODEL_COMMANDS, PRIORITIES
from pie.runtime.instances import Instance
from pie.runtime.witcheck import InvalidCall, check_call

log = Logger()

_EXPORT_NAME_ARG = {"export_kv_pages": 1, "import_kv_pages": 1, "unexport_kv_pages": 0}
"""Model commands that name an export: the index of the name among their arguments."""


# --------------------------------------------------------------------------- the binding


class HostBinding:
    """What an executor hands to one instance's guest: `call(name, args)`."""

    __slots__ = ("_api", "_instance")

    def __init__(self, api: HostApi, instance: Instance) -> None:
        self._api = api
        self._instance = instance

    @property
    def instance_id(self) -> str:
        return self._instance.id

    def call(self, name: str, args: tuple):
        return self._api.call(self._instance, name, args)


class HostApi:
    """Implements every host call against the runtime's parts.

    `runtime` provides: `instances` (pie.runtime.instances.Instances),
    `inboxes`, `pubsub`, `kvstore`, `http` (pie.runtime.outbound.OutboundHttp),
    `model_services()` (iterable of IModelService), `debug_query(text)` and
    `reactor`. `max_chat_chars` bounds a rendered chat template (and the JSON
    it is given).
    """

    def __init__(self, runtime, max_chat_chars: int = chat_template.DEFAULT_MAX_CHARS) -> None:
        self._runtime = runtime
        self._max_chat_chars = max_chat_chars
        self._handlers: dict[str, Callable] = {}
        self._vocab_sizes: dict[int, int] = {}  # service id -> number of regular tokens
        self._vocabs: dict[int, tuple[list[int], bytes, list[int]]] = {}  # by service id
        self.clock: Callable[[], float] = time.monotonic
        """Seconds that time_ms reads: monotonic (pie.inferlet.testing puts its virtual clock here)."""
        self._grammar_vocabs: dict[int, grammar.Vocabulary] = {}  # by service id
        self._grammar_builds: dict[int, list[Deferred]] = {}  # tables being built: waiters
        self._matcher_ids = itertools.count(1)
        for name in HOST_CALLS:
            if name in MODEL_COMMANDS:
                self._handlers[name] = functools.partial(self._model_command, name)
            else:
                self._handlers[name] = getattr(self, "_" + name)
        self._handlers["generate"] = self._generate

    def bind(self, instance: Instance) -> HostBinding:
        return HostBinding(self, instance)

    # ------------------------------------------------------------------ dispatch

    def call(self, instance: Instance, name: str, args: tuple):
        if instance.ended or instance.fault is not None:
            raise InstanceFault(instance.fault or instance.reason or "instance has ended")
        try:
            checked = check_call(name, args)
        except InvalidCall as invalid:
            reason = f"Runtime error: invalid host call: {invalid}"
            self._runtime.instances.fault(instance, reason)
            raise InstanceFault(reason) from None
        spec = HOST_CALLS[name]
        try:
            result = self._handlers[name](instance, *checked)
        except InstanceFault as fault:
            self._runtime.instances.fault(instance, str(fault))
            raise
        if spec.mode == "async":
            return result.addErrback(self._async_failed, instance)
        if spec.mode == "command":
            result.addErrback(self._command_failed, instance, name)
            return None
        return result

    def _async_failed(self, failure, instance: Instance):
        if failure.check(InstanceFault):
            self._runtime.instances.fault(instance, str(failure.value))
        return failure

    def _command_failed(self, failure, instance: Instance, name: str) -> None:
        if failure.check(InstanceFault):
            reason = str(failure.value)
        else:
            reason = f"Runtime error: {name} failed: {failure.value}"
        self._runtime.instances.fault(instance, reason)

    # ------------------------------------------------------------------ lookups

    def _service(self, service_id: int) -> IModelService:
        for service in self._runtime.model_services():
            if service.service_id == service_id:
                return service
        raise PieError(f"unknown model service {service_id}")

    @staticmethod
    def _queue(instance: Instance, queue: int) -> IModelService:
        service = instance.queues.get(queue)
        if service is None:
            raise PieError(f"unknown queue {queue}")
        return service

    # ------------------------------------------------------------------ runtime

    def _get_version(self, instance: Instance) -> str:
        return pie.__version__

    def _get_instance_id(self, instance: Instance) -> str:
        return instance.id

    def _get_arguments(self, instance: Instance) -> list[str]:
        return list(instance.arguments)

    def _set_return(self, instance: Instance, value: str) -> None:
        instance.return_value = value

    def _debug_query(self, instance: Instance, query: str) -> str:
        return self._runtime.debug_query(query, instance)

    def _time_ms(self, instance: Instance) -> int:
        return int(self.clock() * 1000)

    def _sleep(self, instance: Instance, ms: int):
        return instance.add_timer(deferLater(self._runtime.reactor, ms / 1000.0, lambda: None))

    # ------------------------------------------------------------------ models and queues

    def _get_all_models(self, instance: Instance) -> list[str]:
        return [service.name for service in self._runtime.model_services()]

    def _get_model(self, instance: Instance, name: str) -> int | None:
        for service in self._runtime.model_services():
            if service.name == name:
                return service.service_id
        return None

    def _model_info(self, instance: Instance, service_id: int) -> list[tuple[str, str]]:
        service = self._service(service_id)
        return model_info(service, self._vocab_size(service))

    def _vocab_size(self, service: IModelService) -> int:
        if service.service_id not in self._vocab_sizes:  # every Model() asks; it is big
            status_size = (service.status() or {}).get("vocab_size")
            size = status_size or len(service.tokenizer.vocabs()[0])
            self._vocab_sizes[service.service_id] = size
        return self._vocab_sizes[service.service_id]

    def _create_queue(self, instance: Instance, service_id: int) -> int:
        service = self._service(service_id)
        queue = service.create_queue(instance.id, instance_user(instance))
        instance.queues[queue] = service
        return queue

    def _set_priority(self, instance: Instance, queue: int, priority: str) -> None:
        if priority not in PRIORITIES:
            raise PieError(f"priority must be one of {', '.join(PRIORITIES)}, not {priority!r}")
        self._queue(instance, queue).set_priority(instance.id, queue, priority)

    def _get_kv_page_size(self, instance: Instance, queue: int) -> int:
        return self._queue(instance, queue).kv_page_size

    def _get_all_exported_kv_pages(self, instance: Instance, queue: int) -> list[tuple[str, int]]:
        """The exports the instance's user sees: its own and the shared ones, as it named them."""
        user = instance_user(instance)
        exports = self._queue(instance, queue).list_exports()
        return [
            (mine, count) for name, count in exports if (mine := visible(user, name)) is not None
        ]

    def _model_command(self, name: str, instance: Instance, queue: int, *args):
        where = _EXPORT_NAME_ARG.get(name)
        if where is not None:  # export names live in the user's namespace, like store keys
            args = list(args)
            args[where] = scoped(instance_user(instance), args[where])
        return self._queue(instance, queue).submit(instance.id, queue, name, *args)

    def _generate(self, instance: Instance, queue: int, *args):
        """generate, with its grammar matcher id resolved to the matcher itself."""
        *rest, matcher_id = args
        service = self._queue(instance, queue)
        matcher = None
        if matcher_id is not None:
            owner, matcher = self._matcher_entry(instance, matcher_id)
            if owner != service.service_id:
                raise PieError(f"grammar matcher {matcher_id} belongs to another model")
        return service.submit(instance.id, queue, "generate", *rest, matcher)

    # ------------------------------------------------------------------ grammar matchers

    def _grammar_create(
        self, instance: Instance, service_id: int, kind: str, source: str
    ) -> Deferred:
        """A matcher, or (0, why). The first grammar of a model builds its token table
        (about 0.1 s) on a reactor pool thread, never on the reactor; it is cached for the
        daemon's life, and calls made while it is built wait for the same build."""
        service = self._service(service_id)
        return self._grammar_vocab(service).addCallback(
            self._new_matcher, instance, service_id, kind, source
        )

    def _grammar_vocab(self, service: IModelService) -> Deferred:
        service_id = service.service_id
        if service_id in self._grammar_vocabs:
            return succeed(self._grammar_vocabs[service_id])
        waiter: Deferred = Deferred()
        waiters = self._grammar_builds.get(service_id)
        if waiters is None:
            waiters = self._grammar_builds[service_id] = []
            reactor = self._runtime.reactor
            size = self._vocab_size(service)
            build = deferToThreadPool(
                reactor, reactor.getThreadPool(), grammar.Vocabulary, service.tokenizer, size
            )
            build.addBoth(self._grammar_vocab_built, service_id)
        waiters.append(waiter)
        return waiter

    def _grammar_vocab_built(self, result: object, service_id: int) -> None:
        if not isinstance(result, Failure):  # (a failed build is tried again next time)
            self._grammar_vocabs[service_id] = result
        for waiter in self._grammar_builds.pop(service_id):
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)

    def _new_matcher(
        self, vocab: grammar.Vocabulary, instance: Instance, service_id: int, kind: str, source: str
    ) -> tuple[int, str]:
        if len(instance.grammars) >= grammar.MAX_MATCHERS:
            return 0, f"this instance already holds {grammar.MAX_MATCHERS} grammar matchers"
        try:
            matcher = vocab.matcher(kind, source)
        except grammar.GrammarError as e:
            return 0, str(e)
        matcher_id = next(self._matcher_ids)
        instance.grammars[matcher_id] = (service_id, matcher)
        return matcher_id, ""

    @staticmethod
    def _matcher_entry(instance: Instance, matcher_id: int) -> tuple[int, grammar.Matcher]:
        entry = instance.grammars.get(matcher_id)
        if entry is None:
            raise PieError(f"unknown grammar matcher {matcher_id}")
        return entry

    def _matcher(self, instance: Instance, matcher_id: int) -> grammar.Matcher:
        return self._matcher_entry(instance, matcher_id)[1]

    def _grammar_allowed(self, instance: Instance, matcher_id: int) -> bytes:
        return self._matcher(instance, matcher_id).allowed()

    def _grammar_consume(self, instance: Instance, matcher_id: int, tokens: list[int]) -> bool:
        return self._matcher(instance, matcher_id).consume(tokens)

    def _grammar_is_accepting(self, instance: Instance, matcher_id: int) -> bool:
        return self._matcher(instance, matcher_id).is_accepting()

    def _grammar_is_stopped(self, instance: Instance, matcher_id: int) -> bool:
        return self._matcher(instance, matcher_id).is_stopped()

    def _grammar_rollback(self, instance: Instance, matcher_id: int, count: int) -> bool:
        try:
            self._matcher(instance, matcher_id).rollback(count)
        except grammar.GrammarError:
            return False
        return True

    def _grammar_drop(self, instance: Instance, matcher_id: int) -> None:
        instance.grammars.pop(matcher_id, None)

    # ------------------------------------------------------------------ tokenizer

    def _tokenize(self, instance: Instance, service_id: int, text: str) -> list[int]:
        return self._service(service_id).tokenizer.tokenize(text)

    def _detokenize(self, instance: Instance, service_id: int, tokens: list[int]) -> str:
        return self._service(service_id).tokenizer.detokenize(tokens)

    def _apply_chat_template(
        self,
        instance: Instance,
        service_id: int,
        messages: str,
        add_generation_prompt: bool,
        tools: str | None,
        documents: str | None,
        variables: str | None,
    ) -> tuple[bool, str]:
        tokenizer = self._service(service_id).tokenizer
        return chat_template.render_json(
            tokenizer.chat_template,
            messages,
            add_generation_prompt,
            tools,
            documents,
            variables,
            bos_token=tokenizer.bos_token,
            eos_token=tokenizer.eos_token,
            max_chars=self._max_chat_chars,
        )

    def _get_vocabs(
        self, instance: Instance, service_id: int
    ) -> tuple[list[int], bytes, list[int]]:
        """(ids, their bytes concatenated, end offsets): flat, so it lifts as one buffer.

        A list of 49k small byte strings took the sandbox ~0.3-1 s to convert;
        this form takes milliseconds. Cached per service (ids are stable); the
        lists are copied because dev-mode guests get them without a boundary.
        """
        service = self._service(service_id)
        if service_id not in self._vocabs:
            ids, pieces = service.tokenizer.vocabs()
            ends = list(itertools.accumulate(len(piece) for piece in pieces))
            self._vocabs[service_id] = (list(ids), b"".join(pieces), ends)
        ids, data, ends = self._vocabs[service_id]
        return list(ids), data, list(ends)

    # ------------------------------------------------------------------ messaging

    def _send(self, instance: Instance, message: str) -> bool:
        """Deliver; True when the owner is backed up (IBackpressure) and the guest should wait."""
        if instance.owner is None:
            return False
        try:
            backed_up = instance.owner.instance_message(instance.id, message)
        except Exception:  # the owner's trouble (a broken connection) is not the program's
            log.failure("delivering a message of {id} failed", id=instance.id)
            return False
        return bool(backed_up) and IBackpressure.providedBy(instance.owner)

    def _outbound_drained(self, instance: Instance) -> Deferred:
        owner = instance.owner
        if owner is None or not IBackpressure.providedBy(owner):
            return succeed(None)
        return owner.when_drained()

    def _receive(self, instance: Instance):
        return self._runtime.inboxes.pull(instance.id)

    def _broadcast(self, instance: Instance, topic: str, message: str) -> None:
        self._runtime.pubsub.broadcast(topic, message)

    def _subscribe(self, instance: Instance, topic: str) -> int:
        return self._runtime.pubsub.subscribe(instance.id, topic)

    def _subscription_next(self, instance: Instance, subscription: int):
        return self._runtime.pubsub.next(instance.id, subscription)

    def _unsubscribe(self, instance: Instance, subscription: int) -> None:
        self._runtime.pubsub.unsubscribe(instance.id, subscription)

    # ------------------------------------------------------------------ key-value store

    # Each user has a namespace of its own (pie.namespaces); "shared/" keys are shared.

    def _store_get(self, instance: Instance, key: str):
        return self._runtime.kvstore.get(key, instance_user(instance))

    def _store_set(self, instance: Instance, key: str, value: str):
        return self._runtime.kvstore.set(key, value, instance_user(instance))

    def _store_delete(self, instance: Instance, key: str):
        return self._runtime.kvstore.delete(key, instance_user(instance))

    def _store_exists(self, instance: Instance, key: str):
        return self._runtime.kvstore.exists(key, instance_user(instance))

    def _store_list_keys(self, instance: Instance):
        return self._runtime.kvstore.list_keys(instance_user(instance))

    # ------------------------------------------------------------------ outgoing HTTP

    def _fetch(self, instance: Instance, url, method, headers, body, timeout_ms):
        return self._runtime.http.fetch(instance, url, method, headers, body, timeout_ms)

    # ------------------------------------------------------------------ streamed HTTP responses

    def _exchange(self, instance: Instance):
        server = self._runtime.servers.get(instance.server_id) if instance.server_id else None
        if server is None:
            raise PieError("this instance is not handling an HTTP request")
        return server.exchange(instance)

    def _http_response_start(self, instance: Instance, status: int, headers) -> None:
        self._exchange(instance).start(status, headers)

    def _http_response_write(self, instance: Instance, data: bytes):
        return self._exchange(instance).write(data)

    def _http_response_finish(self, instance: Instance) -> None:
        self._exchange(instance).finish()


def model_info(service: IModelService, vocab_size: int) -> list[tuple[str, str]]:
    """The model_info rows: from the service's status() where it says, Pie's defaults elsewhere."""
    status = service.status() or {}
    tokenizer = service.tokenizer
    traits = status.get("traits", ["input_text", "tokenize", "output_text"])
    return [
        ("name", service.name),
        ("description", str(status.get("description", "A large language model."))),
        ("version", str(status.get("model_version", "1.0"))),
        ("license", str(status.get("license", ""))),
        ("traits", traits if isinstance(traits, str) else ",".join(traits)),
        ("chat_template", tokenizer.chat_template or ""),
        ("eos_token_ids", ",".join(str(i) for i in tokenizer.eos_token_ids)),
        ("bos_token", tokenizer.bos_token),
        ("bos_token_id", "" if tokenizer.bos_token_id is None else str(tokenizer.bos_token_id)),
        ("kv_page_size", str(service.kv_page_size)),
        ("dist_size", str(service.dist_size)),
        ("vocab_size", str(vocab_size)),
    ]
