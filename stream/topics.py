"""Topic names and their creation (topics exist before workers start, with fixed partitions)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import faust
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from enforcer.control import ControlTopics
from enforcer.errors import ArmorstreamError
from stream.app import StreamSettings

__all__ = ["StreamTopics", "TopicError", "ensure_topics"]


class TopicError(ArmorstreamError):
    pass


@dataclass(frozen=True)
class StreamTopics:
    raw: faust.TopicT
    control: ControlTopics

    @classmethod
    def declare(cls, app: faust.App, s: StreamSettings) -> StreamTopics:
        raw = app.topic(s.raw_topic, key_type=bytes, value_type=bytes, partitions=s.partitions)
        return cls(raw, ControlTopics(s.control_prefix))


def wanted_topics(s: StreamSettings) -> dict[str, int]:
    """Topic -> partitions. Control topics have one partition so snapshot markers stay in order."""
    ctl = ControlTopics(s.control_prefix)
    out = {s.raw_topic: s.partitions, s.alerts_topic: s.siem_partitions, s.logs_topic: s.siem_partitions,
           s.dead_letter_topic: 1, ctl.cgroups: 1}
    out.update({t: 1 for t in ctl.all()})
    return out


async def ensure_topics(s: StreamSettings) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=s.broker, request_timeout_ms=10_000)
    try:
        await admin.start()
        existing = set(await admin.list_topics())
        new = [NewTopic(t, n, 1) for t, n in wanted_topics(s).items() if t not in existing]
        if new:
            with contextlib.suppress(TopicAlreadyExistsError):  # another worker raced us
                await admin.create_topics(new)
    except KafkaError as e:
        raise TopicError(f"cannot create topics on {s.broker}: {e}") from e
    finally:
        await admin.close()
