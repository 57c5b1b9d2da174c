"""JWT authentication, compatible with Pie 0.1.1's tokens (HS256; claims sub, role, exp).

Validation matches the seed's jsonwebtoken defaults: HS256 only, `exp` required
and checked with 60 s leeway, `nbf` not checked. The secret is shared by the
daemon and whoever mints tokens (`pie token`); when none is configured the
daemon keeps one in a file under its home so that local tools can read it.
"""

from __future__ import annotations

import math
import os
import secrets
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import jwt
from twisted.internet.interfaces import IReactorTime

from pie.interfaces import PieError

ALGORITHM = "HS256"
LEEWAY_SECONDS = 60
ROLES = ("User", "Admin")
DEFAULT_AUTH_FAILURES_PER_MINUTE = 10
FAILURE_WINDOW_SECONDS = 60.0
DEFAULT_LIFETIME_SECONDS = 365 * 24 * 3600  # Pie mints tokens valid for a year
MIN_SECRET_BYTES = 32  # PyJWT warns about shorter HS256 keys


class AuthError(PieError):
    """A token was refused; str(self) says why."""


@dataclass(frozen=True)
class Claims:
    subject: str
    role: str

    @property
    def is_admin(self) -> bool:
        return self.role == "Admin"


def issue_token(
    secret: str,
    subject: str = "default",
    role: str = "User",
    lifetime_seconds: int = DEFAULT_LIFETIME_SECONDS,
    now: float | None = None,
) -> str:
    """Mint a token as Pie's CLI does."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    issued = int(time.time() if now is None else now)
    claims = {"sub": subject, "role": role, "exp": issued + lifetime_seconds}
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def validate_token(secret: str, token: str) -> Claims:
    """Return the token's claims or raise AuthError with a reason a user can act on."""
    options = {"require": ["exp", "sub"], "verify_nbf": False, "verify_aud": False}
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            leeway=LEEWAY_SECONDS,
            options=options,
        )
    except jwt.ExpiredSignatureError:
        raise AuthError("token has expired") from None
    except jwt.InvalidSignatureError:
        raise AuthError("token signature does not match this server's secret") from None
    except jwt.InvalidAlgorithmError:
        raise AuthError(f"token algorithm is not {ALGORITHM}") from None
    except jwt.MissingRequiredClaimError as e:
        raise AuthError(f"token lacks the required {e.claim!r} claim") from None
    except jwt.DecodeError as e:
        raise AuthError(f"malformed token: {e}") from None
    except jwt.InvalidTokenError as e:
        raise AuthError(f"invalid token: {e}") from None
    exp = claims["exp"]
    if isinstance(exp, bool) or not isinstance(exp, (int, float)):
        # PyJWT converts a string with int(); RFC 7519 says NumericDate, a JSON number.
        raise AuthError("token 'exp' claim must be a number (seconds since the epoch)")
    subject, role = claims.get("sub"), claims.get("role", "User")
    if not isinstance(subject, str):
        raise AuthError("token 'sub' claim must be a string")
    if role not in ROLES:
        raise AuthError(f"token 'role' claim must be one of {', '.join(ROLES)}")
    return Claims(subject=subject, role=role)


class FailureLimiter:
    """Counts failed `authenticate` attempts per client address over a sliding minute.

    Once an address has `limit` failures in the last FAILURE_WINDOW_SECONDS, its
    further attempts are refused without looking at the token until the oldest
    failure leaves the window, so a token cannot be guessed at wire speed. Only
    addresses with failures in the window are kept.
    """

    def __init__(self, limit: int, clock: IReactorTime) -> None:
        self.limit = limit
        self._clock = clock
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, address: str) -> deque[float] | None:
        failures = self._failures.get(address)
        if failures is None:
            return None
        horizon = self._clock.seconds() - FAILURE_WINDOW_SECONDS
        while failures and failures[0] <= horizon:
            failures.popleft()
        if not failures:
            del self._failures[address]
            return None
        return failures

    def refusal(self, address: str) -> str | None:
        """Why this address may not try now, or None."""
        failures = self._recent(address)
        if failures is None or len(failures) < self.limit:
            return None
        wait = failures[0] + FAILURE_WINDOW_SECONDS - self._clock.seconds()
        return (
            f"too many failed authentications from {address}: {len(failures)} in the last "
            f"{FAILURE_WINDOW_SECONDS:.0f} s (auth_failures_per_minute = {self.limit}); "
            f"try again in {math.ceil(wait)} s"
        )

    def failed(self, address: str) -> None:
        failures = self._recent(address)
        if failures is None:
            failures = self._failures[address] = deque()
        failures.append(self._clock.seconds())


def load_or_create_secret(path: Path) -> str:
    """Read the secret file, creating it (mode 0600, random) if it does not exist."""
    try:
        secret = path.read_text().strip()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        secret = secrets.token_urlsafe(MIN_SECRET_BYTES)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process created it first: use theirs
            return load_or_create_secret(path)
        with os.fdopen(fd, "w") as f:
            f.write(secret + "\n")
        return secret
    if not secret:
        raise AuthError(f"secret file {path} is empty")
    return secret
