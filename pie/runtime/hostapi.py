"""The host table: one implementation of every row of pie.runtime.hostcalls.

Both executors (dev and wasm) give the guest a binding made here and forward
each inferlet call as `host.call(name, args)`:

- "sync" calls return their value;
- "async" calls return a Deferred the guest awaits;
- "command" calls return None at once; the command is queued on its model
  queue in order, and if it fails later the instance is terminated with the
  failure's text (Pie's fire-and-forget semantics, without the silent loss).

Arguments are checked against the WIT types of the table before anything
runs. An unknown name, a wrong number of arguments or a wrongly typed one is a
broken guest, not a user mistake: the call raises InstanceFault and that
instance (and only it) is terminated with the reason. Errors a program can
reasonably expect and handle (an unknown queue, subscription or model id, a
bad priority) raise PieError into the guest. Calls of an instance that has
ended raise InstanceFault.
"""

from __future__ import annotations

import functools
import itertools
import math
import time
from collections.abc import Callable

from twisted.internet.task import deferLater
from twisted.logger import Logger

import pie
from pie.interfaces import IModelService, InstanceFault, PieError
from pie.runtime.hostcalls import HOST_CALLS, MODEL_COMMANDS
from pie.runtime.instances import Instance

PRIORITIES = ("low", "normal", "high")

log = Logger()


# --------------------------------------------------------------------------- argument checks


class _BadArgument(Exception):
    pass


def _check_string(value):
    if not isinstance(value, str):
        raise _BadArgument(f"expected a string, got {type(value).__name__}")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise _BadArgument(f"string is not valid Unicode ({e.reason})") from None
    return value


def _check_bool(value):
    if not isinstance(value, bool):
        raise _BadArgument(f"expected a bool, got {type(value).__name__}")
    return value


def _check_f32(value):
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _BadArgument(f"expected a number (f32), got {type(value).__name__}")
    if not math.isfinite(value):
        raise _BadArgument(f"{value} is not a finite number")
    return float(value)


def _unsigned(bits: int) -> Callable[[object], int]:
    top = (1 << bits) - 1

    def check(value):
        if isinstance(value, bool) or not isinstance(value, int):
            raise _BadArgument(f"expected an integer (u{bits}), got {type(value).__name__}")
        if not 0 <= value <= top:
            raise _BadArgument(f"{value} is out of range for u{bits}")
        return int(value)

    return check


def _check_bytes(value):
    """list<u8> arrives as bytes from both executors (componentize-py lowers it so)."""
    if not isinstance(value, bytes | bytearray):
        raise _BadArgument(f"expected bytes, got {type(value).__name__}")
    return bytes(value)


def _u32_list(value):
    """list<u32>, the hot path of every forward call: one pass, no per-item function call."""
    if not isinstance(value, list | tuple):
        raise _BadArgument(f"expected a list, got {type(value).__name__}")
    if not all(type(x) is int and 0 <= x <= 0xFFFFFFFF for x in value):
        for i, x in enumerate(value):
            try:
                _unsigned(32)(x)
            except _BadArgument as e:
                raise _BadArgument(f"item {i}: {e}") from None
    return list(value)


def _list_of(item: Callable[[object], object]) -> Callable[[object], list]:
    def check(value):
        if not isinstance(value, list | tuple):
            raise _BadArgument(f"expected a list, got {type(value).__name__}")
        out = []
        for i, x in enumerate(value):
            try:
                out.append(item(x))
            except _BadArgument as e:
                raise _BadArgument(f"item {i}: {e}") from None
        return out

    return check


def _split_top_level(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts]


def _checker(wit_type: str) -> Callable[[object], object]:
    """A checker-and-normaliser for a WIT parameter type of the host table."""
    t = wit_type.strip()
    if t == "string":
        return _check_string
    if t == "bool":
        return _check_bool
    if t == "f32":
        return _check_f32
    if t in ("u8", "u32", "u64"):
        return _unsigned(int(t[1:]))
    if t == "list<u32>":
        return _u32_list
    if t == "list<u8>":
        return _check_bytes
    if t.startswith("list<") and t.endswith(">"):
        return _list_of(_checker(t[5:-1]))
    if t.startswith("option<") and t.endswith(">"):
        inner = _checker(t[7:-1])
        return lambda value: None if value is None else inner(value)
    if t.startswith("tuple<") and t.endswith(">"):
        items = [_checker(p) for p in _split_top_level(t[6:-1])]

        def check_tuple(value):
            if not isinstance(value, list | tuple) or len(value) != len(items):
                raise _BadArgument(f"expected a tuple of {len(items)}")
            return tuple(c(v) for c, v in zip(items, value, strict=True))

        return check_tuple
    raise ValueError(f"no checker for WIT type {wit_type!r}")


_CHECKERS: dict[str, tuple[tuple[str, Callable], ...]] = {
    name: tuple((pname, _checker(ptype)) for pname, ptype in call.params)
    for name, call in HOST_CALLS.items()
}


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
    `reactor`.
    """

    def __init__(self, runtime) -> None:
        self._runtime = runtime
        self._handlers: dict[str, Callable] = {}
        self._vocab_sizes: dict[int, int] = {}  # service id -> number of regular tokens
        self._vocabs: dict[int, tuple[list[int], bytes, list[int]]] = {}  # by service id
        for name in HOST_CALLS:
            if name in MODEL_COMMANDS:
                self._handlers[name] = functools.partial(self._model_command, name)
            else:
                self._handlers[name] = getattr(self, "_" + name)

    def bind(self, instance: Instance) -> HostBinding:
        return HostBinding(self, instance)

    # ------------------------------------------------------------------ dispatch

    def call(self, instance: Instance, name: str, args: tuple):
        if instance.ended or instance.fault is not None:
            raise InstanceFault(instance.fault or instance.reason or "instance has ended")
        spec = HOST_CALLS.get(name) if isinstance(name, str) else None
        if spec is None:
            self._broken(instance, f"unknown host call {name!r}")
        if not isinstance(args, tuple | list):
            self._broken(instance, f"{name}: arguments must be a tuple, not {type(args).__name__}")
        checkers = _CHECKERS[name]
        if len(args) != len(checkers):
            wanted = ", ".join(p for p, _ in checkers) or "none"
            self._broken(
                instance, f"{name} takes {len(checkers)} arguments ({wanted}), got {len(args)}"
            )
        checked = []
        for (pname, check), value in zip(checkers, args, strict=True):
            try:
                checked.append(check(value))
            except _BadArgument as e:
                self._broken(instance, f"{name}: argument {pname!r}: {e}")
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

    def _broken(self, instance: Instance, detail: str):
        reason = f"Runtime error: invalid host call: {detail}"
        self._runtime.instances.fault(instance, reason)
        raise InstanceFault(reason)

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
        return self._runtime.debug_query(query)

    def _time_ms(self, instance: Instance) -> int:
        return int(time.monotonic() * 1000)

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
        if service_id not in self._vocab_sizes:  # every Model() asks; the vocabulary is big
            status_size = (service.status() or {}).get("vocab_size")
            self._vocab_sizes[service_id] = status_size or len(service.tokenizer.vocabs()[0])
        return model_info(service, self._vocab_sizes[service_id])

    def _create_queue(self, instance: Instance, service_id: int) -> int:
        service = self._service(service_id)
        queue = service.create_queue(instance.id)
        instance.queues[queue] = service
        return queue

    def _set_priority(self, instance: Instance, queue: int, priority: str) -> None:
        if priority not in PRIORITIES:
            raise PieError(f"priority must be one of {', '.join(PRIORITIES)}, not {priority!r}")
        self._queue(instance, queue).set_priority(instance.id, queue, priority)

    def _get_kv_page_size(self, instance: Instance, queue: int) -> int:
        return self._queue(instance, queue).kv_page_size

    def _get_all_exported_kv_pages(self, instance: Instance, queue: int) -> list[tuple[str, int]]:
        return [(name, count) for name, count in self._queue(instance, queue).list_exports()]

    def _model_command(self, name: str, instance: Instance, queue: int, *args):
        return self._queue(instance, queue).submit(instance.id, queue, name, *args)

    # ------------------------------------------------------------------ tokenizer

    def _tokenize(self, instance: Instance, service_id: int, text: str) -> list[int]:
        return self._service(service_id).tokenizer.tokenize(text)

    def _detokenize(self, instance: Instance, service_id: int, tokens: list[int]) -> str:
        return self._service(service_id).tokenizer.detokenize(tokens)

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

    def _send(self, instance: Instance, message: str) -> None:
        if instance.owner is None:
            return
        try:
            instance.owner.instance_message(instance.id, message)
        except Exception:  # the owner's trouble (a broken connection) is not the program's
            log.failure("delivering a message of {id} failed", id=instance.id)

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

    def _store_get(self, instance: Instance, key: str):
        return self._runtime.kvstore.get(key)

    def _store_set(self, instance: Instance, key: str, value: str):
        return self._runtime.kvstore.set(key, value)

    def _store_delete(self, instance: Instance, key: str):
        return self._runtime.kvstore.delete(key)

    def _store_exists(self, instance: Instance, key: str):
        return self._runtime.kvstore.exists(key)

    def _store_list_keys(self, instance: Instance):
        return self._runtime.kvstore.list_keys()

    # ------------------------------------------------------------------ outgoing HTTP

    def _fetch(self, instance: Instance, url, method, headers, body, timeout_ms):
        return self._runtime.http.fetch(instance, url, method, headers, body, timeout_ms)


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
        ("kv_page_size", str(service.kv_page_size)),
        ("dist_size", str(service.dist_size)),
        ("vocab_size", str(vocab_size)),
    ]
