"""Daemon settings: one table, read from command-line flags and a TOML file.

Every setting has a TOML key (underscores) and a flag (dashes): `num_pages` in
the file is `--num-pages` on the command line. A flag given on the command line
wins over the file, the file wins over the default. docs/configuration.md
documents each key; tests check that it names every one.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.python import usage


@dataclass(frozen=True)
class Setting:
    key: str
    default: Any
    kind: type
    help: str

    @property
    def flag(self) -> str:
        return self.key.replace("_", "-")


def default_home() -> str:
    """$PIE_HOME, else ~/.cache/pie (where Pie keeps models and programs)."""
    return os.environ.get("PIE_HOME") or str(Path.home() / ".cache" / "pie")


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "port",
        "tcp:8080:interface=127.0.0.1",
        str,
        "Endpoint to listen on for clients (a bare number N means tcp:N).",
    ),
    Setting(
        "metrics",
        "",
        str,
        "Endpoint to serve Prometheus metrics on, at /metrics (e.g. tcp:9464:interface=127.0.0.1; "
        "a bare number N means tcp:N). Empty: no metrics.",
    ),
    Setting(
        "listen_backlog",
        1024,
        int,
        "Connections the kernel queues before the daemon accepts them (unless the endpoint says backlog=).",
    ),
    Setting(
        "max_connections",
        0,
        int,
        "Client connections open at once; more get HTTP 503 (0: the fd limit less a quarter, at most 16384).",
    ),
    Setting(
        "max_connections_per_address",
        0,
        int,
        "Client connections open at once from one address; more get HTTP 503 (0: half of max_connections).",
    ),
    Setting(
        "openai",
        "",
        str,
        "Endpoint serving the OpenAI API (e.g. tcp:8000:interface=127.0.0.1; a bare number N "
        "means tcp:N); empty: off.",
    ),
    Setting("auth", True, bool, "Require a JWT before any request (--no-auth disables)."),
    Setting(
        "auth_secret", "", str, "HS256 secret for tokens (default: read/create HOME/auth_secret)."
    ),
    Setting("auth_secret_file", "", str, "File holding the HS256 secret."),
    Setting(
        "auth_failures_per_minute",
        10,
        int,
        "Failed authenticate attempts one client address may make per minute; then refused.",
    ),
    Setting("home", "", str, "Pie home: models, programs, secret ($PIE_HOME, ~/.cache/pie)."),
    Setting(
        "model",
        "smollm2-135m-instruct",
        str,
        "Model to serve: a name under HOME/models, a path, or none (only attached workers).",
    ),
    Setting("device", "auto", str, "Torch device for the model worker (auto, cpu, cuda, cuda:1)."),
    Setting("dtype", "auto", str, "Torch dtype of the weights (auto, float32, bfloat16, float16)."),
    Setting(
        "cpu_kernels",
        "auto",
        str,
        "pie's compiled CPU kernels, built with gcc at first use (auto: all of them, int4 "
        "linears with two-int8 activations with AVX512-VNNI or AVX2; fp32: float32 "
        "activations everywhere; off: torch's kernels and the layer loop).",
    ),
    Setting("page_size", 16, int, "Tokens per KV-cache page."),
    Setting(
        "num_pages",
        0,
        int,
        "KV-cache pages to allocate (0: as many as the memory left after the weights allows).",
    ),
    Setting(
        "kv_headroom_bytes",
        2 << 30,
        int,
        "CPU, num_pages 0: memory left free after the KV pool (for activations and sandboxes).",
    ),
    Setting(
        "kv_memory_fraction",
        0.8,
        float,
        "CUDA, num_pages 0: share of the free device memory the KV pool takes.",
    ),
    Setting(
        "max_kv_pages",
        0,
        int,
        "num_pages 0: most KV pages the pool gets (0: 1024 on CPU, no cap on CUDA).",
    ),
    # instance quotas (issue 17): launches refused past them
    Setting(
        "max_instances_per_connection",
        256,
        int,
        "Instances one client connection may run (or be launching) at once.",
    ),
    Setting(
        "max_instances_per_user",
        1024,
        int,
        "Instances one user (token subject; one anonymous user without auth) may run at once.",
    ),
    Setting(
        "inferlet_output_bytes",
        256 * 1024,
        int,
        "Characters of stdout/stderr one instance may write to the log; the rest is dropped.",
    ),
    # upload quotas (issue 17): partial programs are held in memory until complete
    Setting(
        "upload_bytes_in_flight",
        256 * 1024 * 1024,
        int,
        "Bytes all unfinished uploads together may hold; a chunk past it fails its upload.",
    ),
    Setting(
        "upload_idle_timeout_s",
        60,
        int,
        "Seconds an unfinished upload may wait for its next chunk before it is dropped.",
    ),
    # message quotas (issue 17): unread messages held per instance / per subscription
    Setting(
        "inbox_bytes",
        8 * 1024 * 1024,
        int,
        "Bytes of unread signal_instance messages one instance may hold; more are refused.",
    ),
    Setting(
        "subscription_bytes",
        8 * 1024 * 1024,
        int,
        "Bytes of unread broadcasts one subscription may hold; more are dropped and reported.",
    ),
    # fair KV (issue 17): per-instance page cap
    Setting(
        "kv_instance_pages",
        0,
        int,
        "Most KV pages one instance may map (allocated or imported); 0: three quarters of the pool.",
    ),
    # per-user KV quotas (issue 17): pages one user's instances map, pages its exports hold
    Setting(
        "kv_user_pages",
        0,
        int,
        "Most KV pages one user's instances may map together; 0: seven eighths of the pool.",
    ),
    Setting(
        "kv_user_export_pages",
        0,
        int,
        "Most KV pages one user's exports (persistent or not) may hold; 0: a quarter of the pool.",
    ),
    # key-value store quotas (issue 17)
    Setting(
        "kv_store_user_bytes",
        256 * 2**20,
        int,
        "Bytes of keys and values one user may keep in the key-value store.",
    ),
    Setting(
        "kv_store_value_bytes",
        16 * 2**20,
        int,
        "Bytes one key-value store value may hold.",
    ),
    Setting("dist_size", 64, int, "Entries in each returned next-token distribution (top-k)."),
    Setting(
        "batching", "adaptive", str, "Forward batching policy: adaptive, k:N, t:MS, kort:N:MS."
    ),
    Setting(
        "max_batch_tokens",
        0,
        int,
        "New tokens one forward batch may hold; longer prefills are chunked (0: 256 on CPU, 16384 on GPU).",
    ),
    Setting("executor", "wasm", str, "Inferlet executor: wasm (sandboxed) or dev (in-process)."),
    Setting(
        "inferlet_memory_limit",
        256 * 1024 * 1024,
        int,
        "Memory one sandboxed inferlet may use, in bytes (wasm executor).",
    ),
    Setting(
        "inferlet_deadline_ms",
        500,
        int,
        "Time a sandboxed inferlet may compute without a host call, in ms (wasm executor).",
    ),
    Setting(
        "inferlet_slice_ms",
        50,
        int,
        "Longest a sandboxed inferlet runs before the daemon serves others again, in ms.",
    ),
    Setting(
        "inferlet_cpu_percent",
        50,
        int,
        "CPU share of one sandboxed instance, in percent of a core (over inferlet_cpu_window_s).",
    ),
    Setting(
        "inferlet_cpu_window_s",
        10,
        int,
        "Window of the CPU share, in seconds: an instance may burst this times its share.",
    ),
    Setting(
        "inferlet_cpu_policy",
        "throttle",
        str,
        "An instance over its CPU share is slowed to it (throttle) or ended (end).",
    ),
    Setting(
        "inferlet_max_paused",
        256,
        int,
        "Sandboxed instances that may be paused mid-computation at once (one thread each).",
    ),
    Setting(
        "inferlet_http_allow",
        "",
        str,
        "URL patterns inferlets may fetch (scheme://host[:port][/path], space or comma "
        "separated; *.example.com for subdomains). Empty: no outgoing HTTP.",
    ),
    Setting(
        "inferlet_http_max_bytes",
        8 * 1024 * 1024,
        int,
        "Largest request or response body of an inferlet's fetch, in bytes.",
    ),
    Setting(
        "inferlet_http_timeout_ms",
        30_000,
        int,
        "Longest an inferlet's fetch may take (lookup, redirects, body), in ms.",
    ),
    Setting(
        "inferlet_http_concurrency", 4, int, "Fetches one inferlet instance may have in flight."
    ),
    Setting(
        "inferlet_server_max_requests",
        64,
        int,
        "Requests one server instance handles at once; more are answered 429.",
    ),
    Setting(
        "inferlet_server_max_body",
        16 * 1024 * 1024,
        int,
        "Largest request body a server instance accepts, in bytes; larger is answered 413.",
    ),
    Setting(
        "inferlet_server_header_timeout_ms",
        30_000,
        int,
        "Time a client of a server instance has to send a request's head, in ms; then 408.",
    ),
    Setting(
        "inferlet_server_idle_timeout_ms",
        60_000,
        int,
        "Silence allowed while a client sends a request to a server instance, in ms; then 408.",
    ),
    Setting(
        "inferlet_server_max_connections",
        0,
        int,
        "Connections open at once to all server instances together; more get 503 (0: half the descriptors the client listener leaves, at most 16384).",
    ),
    Setting(
        "inferlet_server_max_connections_per_address",
        0,
        int,
        "Connections open at once to all server instances from one address; more get 503 (0: inferlet_server_max_connections).",
    ),
    Setting(
        "max_program_size", 32 * 1024 * 1024, int, "Largest program upload accepted, in bytes."
    ),
    Setting(
        "max_program_source",
        4 * 1024 * 1024,
        int,
        "Largest source one program may have once unzipped, in bytes.",
    ),
    Setting("max_program_files", 1000, int, "Most members one program archive may have."),
    Setting("max_message_size", 1024 * 1024, int, "Largest WebSocket frame/message, in bytes."),
    Setting(
        "max_chat_chars",
        4 * 1024 * 1024,
        int,
        "Longest text a chat template may render for an inferlet (and longest JSON it is given), in characters.",
    ),
    Setting(
        "memory_trim_interval_s",
        10,
        int,
        "Seconds between returns of freed heap memory to the OS (glibc malloc_trim); 0: never.",
    ),
    Setting(
        "shutdown_timeout_s",
        10,
        int,
        "After SIGTERM, the longest the daemon waits for its parts to stop before it exits.",
    ),
    Setting(
        "max_outbound",
        16 * 1024 * 1024,
        int,
        "Unread bytes queued for one client before it is dropped.",
    ),
)
SETTINGS_BY_KEY = {s.key: s for s in SETTINGS}
EXECUTORS = ("wasm", "dev")
CPU_POLICIES = ("throttle", "end")
POOL_SHARES = {
    "kv_instance_pages": (3, 4),
    "kv_user_pages": (7, 8),
    "kv_user_export_pages": (1, 4),
}
"""Page caps whose 0 means a share (numerator, denominator) of the pool the worker got."""


class ConfigError(usage.UsageError):
    """A setting is unknown or has the wrong type; the message names it."""


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML file of settings, checking every key and type."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    values = {}
    for key, value in raw.items():
        setting = SETTINGS_BY_KEY.get(key)
        if setting is None:
            raise ConfigError(
                f"{path}: unknown setting {key!r} (known: {', '.join(SETTINGS_BY_KEY)})"
            )
        if setting.kind is float and type(value) is int:
            value = float(value)  # `kv_memory_fraction = 1` in TOML is an integer
        if (setting.kind is int and type(value) is not int) or not isinstance(value, setting.kind):
            raise ConfigError(f"{path}: {key} must be a {setting.kind.__name__}, got {value!r}")
        values[key] = value
    return values


def resolve(cli: dict[str, Any], file_values: dict[str, Any]) -> dict[str, Any]:
    """Merge defaults < file < command line (cli holds None for flags not given)."""
    merged: dict[str, Any] = {}
    for setting in SETTINGS:
        value = cli.get(setting.key)
        if value is None:
            value = file_values.get(setting.key, setting.default)
        merged[setting.key] = value
    if not merged["home"]:
        merged["home"] = default_home()
    port = str(merged["port"])
    merged["port"] = f"tcp:{port}" if port.isdigit() else port
    metrics = str(merged["metrics"])
    merged["metrics"] = f"tcp:{metrics}" if metrics.isdigit() else metrics
    openai = str(merged["openai"])
    merged["openai"] = f"tcp:{openai}" if openai.isdigit() else openai
    if merged["executor"] not in EXECUTORS:
        raise ConfigError(
            f"executor must be one of {', '.join(EXECUTORS)}, not {merged['executor']!r}"
        )
    for key in (
        "page_size",
        "dist_size",
        "max_program_size",
        "max_message_size",
        "max_chat_chars",
        "inferlet_memory_limit",
        "inferlet_deadline_ms",
        "inferlet_slice_ms",
        "inferlet_cpu_percent",
        "inferlet_cpu_window_s",
        "inferlet_max_paused",
        "max_program_source",
        "max_program_files",
        "shutdown_timeout_s",
        "inferlet_http_max_bytes",
        "inferlet_http_timeout_ms",
        "inferlet_http_concurrency",
        "inferlet_server_max_requests",
        "inferlet_server_max_body",
        "inferlet_server_header_timeout_ms",
        "inferlet_server_idle_timeout_ms",
        "max_instances_per_connection",
        "max_instances_per_user",
        "inbox_bytes",
        "subscription_bytes",
        "upload_bytes_in_flight",
        "upload_idle_timeout_s",
        "inferlet_output_bytes",
        "kv_store_user_bytes",
        "kv_store_value_bytes",
        "auth_failures_per_minute",
        "listen_backlog",
    ):
        if merged[key] < 1:
            raise ConfigError(f"{key} must be positive, not {merged[key]}")
    for key in (
        "max_connections",
        "max_connections_per_address",
        "inferlet_server_max_connections",
        "inferlet_server_max_connections_per_address",
    ):
        if merged[key] < 0:
            raise ConfigError(f"{key} must be 0 (automatic) or more, not {merged[key]}")
    for key in (
        "num_pages",
        "kv_headroom_bytes",
        "max_kv_pages",
        "memory_trim_interval_s",
        *POOL_SHARES,
    ):
        if merged[key] < 0:
            raise ConfigError(f"{key} must be 0 or more, not {merged[key]}")
    if not 0 < merged["kv_memory_fraction"] <= 1:
        raise ConfigError(
            f"kv_memory_fraction must be in (0, 1], not {merged['kv_memory_fraction']}"
        )
    if merged["inferlet_cpu_percent"] > 100:
        raise ConfigError("inferlet_cpu_percent is a share of one core: at most 100")
    if merged["inferlet_cpu_policy"] not in CPU_POLICIES:
        raise ConfigError(
            f"inferlet_cpu_policy must be one of {', '.join(CPU_POLICIES)}, "
            f"not {merged['inferlet_cpu_policy']!r}"
        )
    from pie.runtime.outbound import parse_patterns

    try:
        parse_patterns(merged["inferlet_http_allow"])
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if merged["max_message_size"] < 300 * 1024:
        raise ConfigError("max_message_size must be at least 307200 (a 256 KiB upload chunk)")
    return merged


def kv_page_cap(config: dict[str, Any], key: str, pool_pages: int) -> int:
    """The setting `key` (one of POOL_SHARES), or its share of the pool when it is 0.

    Resolved once the worker has sized its pool (num_pages 0 is only known then).
    """
    numerator, denominator = POOL_SHARES[key]
    return config[key] or max(1, pool_pages * numerator // denominator)


def auth_secret(config: dict[str, Any]) -> str | None:
    """The secret the daemon checks tokens with, or None when auth is off."""
    from pie.server.auth import load_or_create_secret

    if not config["auth"]:
        return None
    if config["auth_secret"]:
        return config["auth_secret"]
    path = config["auth_secret_file"] or os.path.join(config["home"], "auth_secret")
    return load_or_create_secret(Path(path))
