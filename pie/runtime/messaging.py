"""Messages between clients and instances, and between instances.

Two mechanisms, as in Pie (spec §4.1–4.2), with Pie's bugs fixed:

- `Inboxes`: each instance's FIFO of client messages (signal_instance). A
  push goes to the oldest *live* waiting receive() or is queued; a receive
  takes the oldest queued message or waits. A waiter that was cancelled (its
  instance was killed while parked) is skipped, never fed.
- `PubSub`: topics between instances. A subscription is a stream: every
  message broadcast on its topic after it was made is queued for it, and
  subscription_next() returns them one by one in order (Pie delivered only the
  first). If a subscriber falls more than `max_pending` messages (or
  `max_bytes` of them) behind, later messages are dropped for it and its next
  read reports how many, rather than losing them silently.

Both are bounded in count and in bytes (UTF-8), so that messages nobody reads
cannot grow the daemon without bound (issue 17: 1,000 x 1 MB signals took 950 MB).

Everything an instance holds here is dropped by `drop_instance` when it ends.
All of this runs on the reactor thread; Deferreds are fired after the state
is updated, so a resumed instance may call back in at once.
"""

from __future__ import annotations

import itertools
from collections import deque

from twisted.internet.defer import Deferred, fail, succeed

from pie.interfaces import PieError

DEFAULT_MAX_PENDING = 65536
DEFAULT_INBOX_BYTES = 8 * 1024 * 1024  # unread client messages of one instance
DEFAULT_SUBSCRIPTION_BYTES = 8 * 1024 * 1024  # unread broadcasts of one subscription


class _Waiters:
    """A FIFO of Deferreds waiting for one message each; cancelled ones leave it."""

    def __init__(self) -> None:
        self._queue: deque[Deferred] = deque()

    def wait(self) -> Deferred:
        d: Deferred = Deferred(self._cancelled)
        self._queue.append(d)
        return d

    def _cancelled(self, d: Deferred) -> None:
        try:
            self._queue.remove(d)
        except ValueError:
            pass

    def pop_live(self) -> Deferred | None:
        while self._queue:
            d = self._queue.popleft()
            if not d.called:
                return d
        return None

    def clear(self) -> None:
        self._queue.clear()

    def __bool__(self) -> bool:
        return bool(self._queue)


class _Mailbox:
    """Queued messages plus waiting readers; a FIFO bounded in count and in bytes."""

    def __init__(self, max_pending: int, max_bytes: int) -> None:
        self.messages: deque[tuple[str, int]] = deque()  # (message, its UTF-8 size)
        self.waiters = _Waiters()
        self.max_pending = max_pending
        self.max_bytes = max_bytes
        self.bytes = 0
        self.dropped = 0

    def put(self, message: str) -> bool:
        """Hand to the oldest live reader or queue; False (nothing done) when full."""
        waiter = self.waiters.pop_live()
        if waiter is not None:
            waiter.callback(message)
            return True
        size = len(message.encode("utf-8", "surrogatepass"))
        if len(self.messages) >= self.max_pending or self.bytes + size > self.max_bytes:
            return False
        self.messages.append((message, size))
        self.bytes += size
        return True

    def limit_text(self) -> str:
        return f"{self.max_pending} messages or {self.max_bytes} bytes"

    def take(self, what: str) -> Deferred:
        if self.dropped:
            dropped, self.dropped = self.dropped, 0
            return fail(
                PieError(
                    f"{what} dropped {dropped} messages: more than {self.limit_text()} were waiting"
                )
            )
        if self.messages:
            message, size = self.messages.popleft()
            self.bytes -= size
            return succeed(message)
        return self.waiters.wait()

    def close(self) -> None:
        self.messages.clear()
        self.bytes = 0
        self.waiters.clear()


class Inboxes:
    """User → instance messages: one FIFO per running instance."""

    def __init__(
        self, max_pending: int = DEFAULT_MAX_PENDING, max_bytes: int = DEFAULT_INBOX_BYTES
    ) -> None:
        self._boxes: dict[str, _Mailbox] = {}
        self._max_pending = max_pending
        self._max_bytes = max_bytes

    def open(self, instance_id: str) -> None:
        self._boxes[instance_id] = _Mailbox(self._max_pending, self._max_bytes)

    def push(self, instance_id: str, message: str) -> None:
        """Deliver or queue; messages for instances that are gone are ignored.

        Raises PieError when the message would take the instance past `max_pending`
        messages or `max_bytes` bytes it has not read (setting inbox_bytes).
        """
        box = self._boxes.get(instance_id)
        if box is None:
            return
        if not box.put(message):
            raise PieError(
                f"instance {instance_id} has {len(box.messages)} unread messages of "
                f"{box.bytes} bytes (at most {box.limit_text()}, inbox_bytes); message refused"
            )

    def pull(self, instance_id: str) -> Deferred:
        box = self._boxes.get(instance_id)
        if box is None:
            raise PieError(f"instance {instance_id} has no inbox")
        return box.take("inbox")

    def pending(self, instance_id: str) -> int:
        box = self._boxes.get(instance_id)
        return 0 if box is None else len(box.messages)

    def drop_instance(self, instance_id: str) -> None:
        box = self._boxes.pop(instance_id, None)
        if box is not None:
            box.close()

    def __len__(self) -> int:
        return len(self._boxes)


class _Subscription:
    def __init__(self, sub_id: int, instance_id: str, topic: str, mailbox: _Mailbox) -> None:
        self.id = sub_id
        self.instance_id = instance_id
        self.topic = topic
        self.mailbox = mailbox


class PubSub:
    """Instance ⇄ instance broadcast: topics, subscriptions as streams."""

    def __init__(
        self, max_pending: int = DEFAULT_MAX_PENDING, max_bytes: int = DEFAULT_SUBSCRIPTION_BYTES
    ) -> None:
        self._topics: dict[str, dict[int, _Subscription]] = {}
        self._subscriptions: dict[int, _Subscription] = {}
        self._ids = itertools.count(1)
        self._max_pending = max_pending
        self._max_bytes = max_bytes

    def subscribe(self, instance_id: str, topic: str) -> int:
        sub_id = next(self._ids)
        if sub_id > 0xFFFFFFFF:
            raise PieError("subscription ids exhausted")
        sub = _Subscription(
            sub_id, instance_id, topic, _Mailbox(self._max_pending, self._max_bytes)
        )
        self._subscriptions[sub_id] = sub
        self._topics.setdefault(topic, {})[sub_id] = sub
        return sub_id

    def broadcast(self, topic: str, message: str) -> int:
        """Queue the message for every current subscriber of the topic; returns how many."""
        subscribers = list(self._topics.get(topic, {}).values())
        for sub in subscribers:
            if not sub.mailbox.put(message):
                sub.mailbox.dropped += 1
        return len(subscribers)

    def next(self, instance_id: str, sub_id: int) -> Deferred:
        """The subscription's next message, in broadcast order (waits if none is queued)."""
        return self._own(instance_id, sub_id).mailbox.take(f"subscription {sub_id}")

    def unsubscribe(self, instance_id: str, sub_id: int) -> None:
        self._remove(self._own(instance_id, sub_id))

    def drop_instance(self, instance_id: str) -> None:
        for sub in [s for s in self._subscriptions.values() if s.instance_id == instance_id]:
            self._remove(sub)

    def subscriber_count(self, topic: str | None = None) -> int:
        if topic is None:
            return len(self._subscriptions)
        return len(self._topics.get(topic, {}))

    def _own(self, instance_id: str, sub_id: int) -> _Subscription:
        sub = self._subscriptions.get(sub_id)
        if sub is None or sub.instance_id != instance_id:
            raise PieError(f"unknown subscription {sub_id}")
        return sub

    def _remove(self, sub: _Subscription) -> None:
        del self._subscriptions[sub.id]
        topic = self._topics[sub.topic]
        del topic[sub.id]
        if not topic:
            del self._topics[sub.topic]
        sub.mailbox.close()
