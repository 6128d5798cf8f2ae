"""kombu's Redis transport, with the unacknowledged-message record off the critical path.

When a worker takes a message off a queue, kombu's Redis QoS records it as unacknowledged
(ZADD to the index, HSET of the message) so that it is restored if the worker dies before
acknowledging it, and waits for Redis to confirm before the message reaches Celery. EZTinker's
QoS sends the same two commands without waiting (``eztinker_tasks.deferred``) and reads the
replies before anything that depends on them: rejecting or restoring a message. Acknowledging
(ZREM, HDEL) is sent the same way: the worker goes back to its queues without waiting. What
Redis holds is the same; the operation starts one round trip sooner.

Selected by ``broker_transport`` in ``eztinker_tasks.celery_app``.
"""

from __future__ import annotations

from time import time
from typing import Any

import redis
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.json import dumps

from eztinker_tasks.deferred import DeferredReplies


class QoS(kombu_redis.QoS):
    _replies: DeferredReplies | None = None

    def _send(self, commands: list[tuple[Any, ...]]) -> bool:
        """Send ``commands`` without waiting; False where the stock path must be taken."""
        channel: Any = self.channel
        if channel.global_keyprefix:  # keys need the prefix the stock pipeline adds
            return False
        if self._replies is None:
            self._replies = DeferredReplies(channel.pool)
        try:
            self._replies.send(commands)
        except redis.RedisError:
            return False
        return True

    def append(self, message: Any, delivery_tag: Any) -> None:
        delivery = message.delivery_info
        record = dumps([message._raw, delivery["exchange"], delivery["routing_key"]])
        unacked = [
            ("ZADD", self.unacked_index_key, time(), delivery_tag),
            ("HSET", self.unacked_key, delivery_tag, record),
        ]
        if not self._send(unacked):
            return super().append(message, delivery_tag)
        virtual.QoS.append(self, message, delivery_tag)

    def settle(self) -> None:
        """Wait for the replies of every record sent so far."""
        if self._replies is not None:
            self._replies.drain()

    def ack(self, delivery_tag: Any) -> None:
        # Forgetting the record can wait too: if it is lost, the message is restored after the
        # visibility timeout and its operation is answered from its stored result (seq_id).
        acked = [
            ("ZREM", self.unacked_index_key, delivery_tag),
            ("HDEL", self.unacked_key, delivery_tag),
        ]
        if not self._send(acked):
            self.settle()
            return super().ack(delivery_tag)
        virtual.QoS.ack(self, delivery_tag)

    def reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        self.settle()
        super().reject(delivery_tag, requeue)

    def restore_unacked(self, client: Any = None) -> None:
        self.settle()
        super().restore_unacked(client)

    def restore_visible(self, start: int = 0, num: int = 10, interval: int = 10) -> None:
        self.settle()
        super().restore_visible(start, num, interval)

    def close_replies(self) -> None:
        if self._replies is not None:
            self._replies.close()


class Channel(kombu_redis.Channel):
    QoS = QoS

    def close(self) -> None:
        super().close()
        qos = self._qos
        if isinstance(qos, QoS):
            qos.close_replies()


class Transport(kombu_redis.Transport):
    Channel = Channel
