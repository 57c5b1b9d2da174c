"""Messages between clients and instances, and between instances.

Two mechanisms, as in Pie (spec §4.1–4.2), with Pie's bugs fixed:

- `Inboxes`: each instance's FIFO of client messages (signal_instance). A
  push goes to the oldest *live* waiting receive() or is queued; a receive
  takes the oldest queued message or waits. A waiter that was cancelled (its
  instance was killed while parked) is skipped, never fed.
- `PubSub`: topics between instances. A subscription is a stream: every
  message broadcast on its topic after it was made is queued for it, and
  subscription_next() returns them one by one in order (Pie delivered only the
  first). If a subscriber falls more than `max_pending` messages behind, later
  messages are dropped for it and its next read reports how many, rather
  than losing them silently.

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
    """Queued messages plus waiting readers; a bounded FIFO."""

    def __init__(self, max_pending: int) -> None:
        self.messages: deque[str] = deque()
        self.waiters = _Waiters()
        self.max_pending = max_pending
        self.dropped = 0

    def put(self, message: str) -> bool:
        """Hand to the oldest live reader or queue; False (nothing done) when full."""
        waiter = self.waiters.pop_live()
        if waiter is not None:
            waiter.callback(message)
            return True
        if len(self.messages) >= self.max_pending:
            return False
        self.messages.append(message)
        return True

    def take(self, what: str) -> Deferred:
        if self.dropped:
            dropped, self.dropped = self.dropped, 0
            return fail(
                PieError(
                    f"{what} dropped {dropped} messages: more than {self.max_pending} were waiting"
                )
            )
        if self.messages:
            return succeed(self.messages.popleft())
        return self.waiters.wait()

    def close(self) -> None:
        self.messages.clear()
        self.waiters.clear()


class Inboxes:
    """User → instance messages: one FIFO per running instance."""

    def __init__(self, max_pending: int = DEFAULT_MAX_PENDING) -> None:
        self._boxes: dict[str, _Mailbox] = {}
        self._max_pending = max_pending

    def open(self, instance_id: str) -> None:
        self._boxes[instance_id] = _Mailbox(self._max_pending)

    def push(self, instance_id: str, message: str) -> None:
        """Deliver or queue; messages for instances that are gone are ignored.

        Raises PieError when the instance has `max_pending` messages it has not read.
        """
        box = self._boxes.get(instance_id)
        if box is None:
            return
        if not box.put(message):
            raise PieError(
                f"instance {instance_id} has {box.max_pending} unread messages; message refused"
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
    def __init__(self, sub_id: int, instance_id: str, topic: str, max_pending: int) -> None:
        self.id = sub_id
        self.instance_id = instance_id
        self.topic = topic
        self.mailbox = _Mailbox(max_pending)


class PubSub:
    """Instance ⇄ instance broadcast: topics, subscriptions as streams."""

    def __init__(self, max_pending: int = DEFAULT_MAX_PENDING) -> None:
        self._topics: dict[str, dict[int, _Subscription]] = {}
        self._subscriptions: dict[int, _Subscription] = {}
        self._ids = itertools.count(1)
        self._max_pending = max_pending

    def subscribe(self, instance_id: str, topic: str) -> int:
        sub_id = next(self._ids)
        if sub_id > 0xFFFFFFFF:
            raise PieError("subscription ids exhausted")
        sub = _Subscription(sub_id, instance_id, topic, self._max_pending)
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
