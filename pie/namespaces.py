"""Whose a key-value record or a KV export is: one namespace per user, plus an opt-in shared one.

Names an inferlet gives (store keys, export names) are scoped by the user of
the instance (its connection's token subject; the anonymous user without
auth) before they reach the store or a model service, so two users' names
never meet: another user can neither read nor overwrite them. A name that
starts with SHARED ("shared/") is in the one namespace every user sees, as
is: writing there is how an owner shares a record or an export on purpose.
An instance without a user (the daemon's own, or a test's) is trusted: its
names are used unscoped and it sees every name.

Internal form: "user:<percent-quoted subject>/<name>". The quoting leaves no
"/" in the subject, so no user's scope can reach into another's or into
SHARED; internal names are what admins see in `kv_exports`.
"""

from __future__ import annotations

from urllib.parse import quote

SHARED = "shared/"


def user_prefix(user: str) -> str:
    """The internal prefix of every name of `user` (shared names excluded)."""
    return f"user:{quote(user, safe='')}/"


def scoped(user: str | None, name: str) -> str:
    """The internal name behind `name` as `user` gave it."""
    if user is None or name.startswith(SHARED):
        return name
    return user_prefix(user) + name


def visible(user: str | None, internal: str) -> str | None:
    """`internal` as `user` sees it, or None if it is another user's."""
    if user is None or internal.startswith(SHARED):
        return internal
    prefix = user_prefix(user)
    return internal[len(prefix) :] if internal.startswith(prefix) else None


def shown(internal: str) -> str:
    """The name as its user gave it, for error messages (the user's own scope stripped)."""
    if internal.startswith("user:") and "/" in internal:
        return internal.split("/", 1)[1]
    return internal


def instance_user(instance: object) -> str | None:
    """The user an instance runs for: its owner connection's `user`, None if it has none."""
    return getattr(getattr(instance, "owner", None), "user", None)
