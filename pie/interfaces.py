"""The contracts between pie's layers.

Each layer depends on the one below it only through these interfaces, so that
tests can put a double in any seat and so that a model worker may live in this
process, in another one, or on another host:

    server  --IRuntime-->  runtime  --IModelService-->  model service  --IModelWorker-->  worker
        ^                     |
        +--IInstanceOwner-----+        (events flow back up to the owning connection)

Everything here is called on the reactor thread. Methods that wait for
something return a Deferred; none of them block.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface


class PieError(Exception):
    """An error whose message is safe and useful to show to a client."""


class InstanceFault(PieError):
    """A command of an instance failed; the runtime terminates that instance with str(self)."""


# --------------------------------------------------------------------------- server <-> runtime


class IInstanceOwner(Interface):
    """Receives the events of instances it launched (one per client connection)."""

    def instance_message(instance_id: str, message: str) -> bool | None:
        """The instance called send(message).

        An owner that also provides IBackpressure returns True when its outbound
        buffer is past its high-water mark (the message is queued all the same).
        """

    def instance_terminated(instance_id: str, reason: str) -> None:
        """The instance ended; called exactly once per instance, last."""


class IBackpressure(Interface):
    """An instance owner that can tell a sending instance to wait for its client."""

    def when_drained() -> object:
        """Deferred firing once the outbound buffer is back under its low-water mark.

        Fires at once when it is not backed up, and when the connection goes away.
        """


class IRuntime(Interface):
    """What the protocol layer needs from the inferlet runtime."""

    def program_exists(program_hash: str) -> bool:
        """True if a program with this blake3 hex digest is stored."""

    def add_program(data: bytes) -> object:
        """Validate and store a program; Deferred firing with its blake3 hex digest.

        Errbacks with PieError (message for the client) if the program is not valid.
        """

    def launch(program_hash: str, arguments: list[str], owner: IInstanceOwner) -> object:
        """Start an instance; Deferred firing with its id (a UUID string).

        The owner is registered before the instance runs, so no event is lost.
        Errbacks with PieError for an unknown program or a program that fails to load.
        """

    def launch_server(
        program_hash: str, port: int, arguments: list[str], owner: IInstanceOwner
    ) -> object:
        """Serve HTTP on 127.0.0.1:port, one fresh instance per request; Deferred -> server id."""

    def signal(instance_id: str, message: str) -> None:
        """Queue a message for the instance's receive()."""

    def terminate(instance_id: str, reason: str) -> None:
        """End the instance (owner gets instance_terminated(reason)); unknown ids are ignored."""

    def model_status() -> list[dict]:
        """One dict per model service, the seed's model_status entries."""

    def kv_exports() -> list[dict]:
        """Every KV export of every model: {"model", "name", "pages"} (admin query kv_exports)."""

    def remove_kv_export(model: str, name: str) -> bool:
        """Drop one export whoever owns it (admin query kv_unexport); False if there is none."""

    def attach_remote_service(endpoint: str, service_type: str, service_name: str) -> object:
        """Deferred firing with a success text; errbacks with PieError."""


# --------------------------------------------------------------------------- runtime <-> model


class ITokenizer(Interface):
    def tokenize(text: str) -> list[int]:
        """Encode; special-token strings in the text map to their ids."""

    def detokenize(ids: list[int]) -> str:
        """Decode (invalid UTF-8 replaced); unknown ids raise PieError."""

    def vocabs() -> tuple[list[int], list[bytes]]:
        """Every regular token id and its bytes."""

    def token_table() -> tuple[list[bytes | None], frozenset[int]]:
        """Every id's bytes (a special token's text; None for an unused id) and the
        special ids: what a grammar matcher needs (pie.runtime.grammar)."""

    chat_template = Attribute("The model's jinja2 chat template text, or '' if none.")
    eos_token_ids = Attribute("list[int]: ids that end a turn / the text.")
    bos_token = Attribute(
        "str: the text of the begin-of-sequence token, or '' (chat templates use it)."
    )
    eos_token = Attribute(
        "str: the text of the end-of-sequence token, or '' (chat templates use it)."
    )
    bos_token_id = Attribute(
        "int | None: the token a prompt must start with (the tokenizer's add_bos), or None."
    )


class IModelService(Interface):
    """One served model as seen by inferlets: virtual resources, queues, batching.

    ids passed in are the calling instance's virtual ids. Commands on one queue
    execute in submission order. Every command returns a Deferred; a command
    that fails errbacks with InstanceFault, and the runtime terminates the
    instance (the seed's fire-and-forget semantics, without the silent loss).
    """

    name = Attribute("str: the model name inferlets ask for.")
    service_id = Attribute("int: the model service's id (stable for the daemon's life).")
    kv_page_size = Attribute("int")
    dist_size = Attribute("int: entries in each returned distribution (top-k).")
    instance_terminator = Attribute(
        "callable(instance_id, reason) or None: how the service ends an instance it must evict; "
        "the runtime sets it when the service is added."
    )
    metrics = Attribute(
        "pie.metrics.ModelMetrics: the hooks the service reports its forward batches to; "
        "the runtime sets it when the service is added (a service may ignore it)."
    )
    tokenizer = Attribute("ITokenizer")

    def status() -> dict:
        """The model_status entry for this model."""

    def create_queue(instance_id: str, user: str | None = None) -> int:
        """A new queue id (unique in the process); user: the instance's token subject, whose
        KV page cap and export quota its pages count against (None: nobody's)."""

    def set_priority(instance_id: str, queue_id: int, priority: str) -> None:
        """'low' | 'normal' | 'high'."""

    def submit(instance_id: str, queue_id: int, op: str, *args) -> object:
        """Queue one host-API model command; Deferred with its result.

        op is a model operation name of the host-call table (pie.runtime.hostapi),
        e.g. 'forward_text', 'allocate_kv_pages', 'export_kv_pages'.
        """

    def list_exports() -> list[tuple[str, int]]:
        """(name, number of pages) of every exported KV page set."""

    def remove_export(name: str) -> bool:
        """Drop the export `name` whoever owns it (the admin's `kv_unexport` query); False if none."""

    def destroy_instance(instance_id: str) -> None:
        """Free everything the instance holds; drop its non-persistent exports."""


# --------------------------------------------------------------------------- model service <-> worker


class IModelWorker(Interface):
    """Executes batches on a device. Owns the weights and the physical KV cache.

    Called on the reactor thread; the work runs elsewhere (a thread, another
    process, another host) and results come back as Deferreds. Jobs run in the
    order they were submitted. The batch types are in pie.engine.batch and are
    plain data, so a remote worker can ship them over the network.
    """

    info = Attribute("pie.engine.batch.WorkerInfo")
    tokenizer = Attribute(
        "ITokenizer of the served model (a remote worker ships it in its handshake)."
    )

    def execute(job: object) -> object:
        """Run one pie.engine.batch job; Deferred with its result."""

    def close() -> object:
        """Stop the worker; Deferred fired when it has stopped."""


# --------------------------------------------------------------------------- extension points


class IInferletExecutor(Interface):
    """Runs inferlet programs (the sandbox, or in-process dev mode)."""

    name = Attribute("str: 'wasm' or 'dev'.")

    def check(program: bytes) -> object:
        """The program made ready to run, or a Deferred of it; PieError (with the message)
        if it cannot run (e.g. a syntax error). Slow work must not happen on the reactor
        thread. The runtime keeps the result and passes it to `run` in place of the bytes."""

    def run(program: object, arguments: list[str], host: object) -> object:
        """Start the program's main(args) against a bound host (pie.runtime.hostapi).

        `program` is what `check` made of it, or the program's bytes. Returns an IExecution.
        """


class IExecution(Interface):
    finished = Attribute("Deferred: fires with the return value (str or None) or errbacks.")

    def kill(reason: str) -> None:
        """Stop now; `finished` errbacks with InstanceFault(reason)."""


class IRemoteServiceType(Interface):
    """A service type for attach_remote_service, found with twisted.plugin.getPlugins."""

    typeName = Attribute("str: the service_type clients name.")
    description = Attribute("str: one line for docs and errors.")

    def attach(runtime: object, endpoint: str, service_name: str) -> object:
        """Deferred firing with a success text; errbacks with PieError."""


class IModelLoader(Interface):
    """Loads a model format (GGUF, safetensors, ...), found with getPlugins."""

    formatName = Attribute("str")

    def can_load(path: str) -> bool:
        """True if this loader recognises the file or folder."""

    def load(path: str, device: str, dtype: str) -> object:
        """Return a pie.engine.loaders.LoadedModel (config, state dict, tokenizer)."""
