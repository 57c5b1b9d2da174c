"""The `l4m` wire between the daemon and a `pie worker`: frames, handshake proof, tokens.

A `pie worker` process owns a model (the same IModelWorker as in-process)
and serves it over a WebSocket (pie.remote.server); the daemon holds a
RemoteWorker (pie.remote.client), an IModelWorker whose jobs travel as
msgpack maps in binary frames. The jobs are pie.engine.batch's plain
dataclasses (`to_wire`/`from_wire`), so this module adds only the envelope,
the handshake proof and the shapes msgpack flattens. docs/remote-workers.md
is the reference for the frames.

Handshake (protocol PROTOCOL_VERSION): the worker speaks first with a random
nonce; the daemon proves it knows the shared secret with HMAC-SHA256(secret,
nonce) (the secret never crosses the wire); the worker answers `welcome` with
its WorkerInfo (model, page size, dist size, capacity) and its tokenizer.
A worker serves one daemon at a time: everything else is refused.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets

import msgpack
from tokenizers import Tokenizer as HFTokenizer
from twisted.logger import Logger

from pie.engine import batch
from pie.engine.tokenizer import Tokenizer, _byte_level_bytes
from pie.interfaces import PieError

log = Logger()

PROTOCOL_VERSION = 1
SUBPROTOCOL = "pie-l4m.v1"
MAX_FRAME_BYTES = 64 * 1024 * 1024  # a prefill of thousands of tokens with masks fits easily
HELLO_TIMEOUT_S = 10.0  # the worker drops a peer that has not authenticated by then
HANDSHAKE_TIMEOUT_S = 30.0  # the daemon gives up on a worker that has not said welcome
PING_INTERVAL_S = 10.0  # the daemon pings an idle worker this often ...
PING_TIMEOUT_S = 30.0  # ... and drops it (lost) when a pong takes longer

WORKER_TOKEN_ENV = "PIE_WORKER_TOKEN"
WORKER_TOKEN_FILE = "worker_token"

CLOSE_REFUSED = 4001  # bad token, wrong protocol, or attached to another daemon
CLOSE_BAD_FRAME = 4003  # text frame, bad msgpack, or a message out of place


def pack(message: dict) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def unpack(payload: bytes) -> dict:
    message = msgpack.unpackb(payload, raw=False)
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ValueError("not a msgpack map with a 'type'")
    return message


def proof(secret: bytes, nonce: bytes) -> bytes:
    """What the daemon sends to show it holds the secret, without sending the secret."""
    return hmac.new(secret, b"pie-l4m-hello:" + nonce, hashlib.sha256).digest()


def worker_token(home: str, *, create: bool = False) -> bytes:
    """The secret shared by a daemon and its workers: $PIE_WORKER_TOKEN, else HOME/worker_token.

    `create` makes the file (mode 0600, 32 random bytes in hex) when it is
    missing, as `pie worker` does; copy it to the daemon's host (or set the
    variable on both sides) to let that daemon attach the worker.
    """
    token = os.environ.get(WORKER_TOKEN_ENV, "")
    if token:
        return token.encode()
    path = os.path.join(home, WORKER_TOKEN_FILE)
    if create and not os.path.exists(path):
        os.makedirs(home, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
    if not os.path.exists(path):
        return b""
    return read_token_file(path)


def read_token_file(path: str) -> bytes:
    """A worker token file's secret: UTF-8 text, surrounding whitespace stripped.

    A file that cannot be read, is not UTF-8 or holds only whitespace raises
    PieError naming the file (the token is text: `pie worker` writes it in hex).
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise PieError(f"cannot read the worker token file {path}: {e.strerror}") from None
    try:
        token = raw.decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise PieError(
            f"the worker token file {path} is not UTF-8 text (byte {e.start}); "
            "write the token as text, e.g. the hex that `pie worker` creates"
        ) from None
    if not token:
        raise PieError(f"the worker token file {path} is empty")
    return token.encode()


_ENDPOINT = re.compile(r"^(?:(?:ws|tcp)://)?(?P<host>\[[0-9a-fA-F:]+\]|[^:/\s]+):(?P<port>\d+)/?$")


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """(host, port) of 'ws://host:port', 'tcp://host:port' (Pie's form) or 'host:port'."""
    match = _ENDPOINT.match(endpoint.strip())
    if not match or not 0 < int(match["port"]) < 65536:
        raise PieError(f"bad worker endpoint {endpoint!r}: expected ws://HOST:PORT")
    return match["host"].strip("[]"), int(match["port"])


# --------------------------------------------------------------------------- tokenizer and results


def tokenizer_to_wire(tokenizer: Tokenizer) -> dict:
    """The served model's tokenizer as msgpack-ready data: the `tokenizers` pipeline
    (tokenizer.json text) plus what pie.engine.tokenizer.Tokenizer adds around it."""
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    regular = [(text, i) for text, i in vocab.items() if i not in tokenizer.special_ids]
    byte_level = all(tokenizer.token_bytes([i]) == _byte_level_bytes(text) for text, i in regular)
    return {
        "backend": tokenizer.backend.to_str(),
        "byte_level": byte_level,
        "special_ids": sorted(tokenizer.special_ids),
        "chat_template": tokenizer.chat_template,
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "eos_token_ids": list(tokenizer.eos_token_ids),
        "bos_token_id": tokenizer.bos_token_id,
    }


def tokenizer_from_wire(data: dict) -> Tokenizer:
    """The daemon's ITokenizer, rebuilt from a worker's handshake."""
    return Tokenizer(
        HFTokenizer.from_str(data["backend"]),
        byte_level=data["byte_level"],
        special_ids=set(data["special_ids"]),
        chat_template=data["chat_template"],
        bos_token=data["bos_token"],
        eos_token=data["eos_token"],
        eos_token_ids=data["eos_token_ids"],
        bos_token_id=data["bos_token_id"],
    )


def result_from_wire(job: object, result: object) -> object:
    """Restore the shapes msgpack flattens (a Distribution is a tuple of two lists)."""
    if isinstance(job, batch.Forward):
        return [
            outputs if item.sampling is not None else [tuple(dist) for dist in outputs]
            for item, outputs in zip(job.items, result, strict=True)
        ]
    if isinstance(job, batch.GetDistributions):
        return [tuple(dist) for dist in result]
    return result
