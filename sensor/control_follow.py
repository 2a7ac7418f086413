"""Follow control topics into a ControlView: the one consumer loop the sensor's parts share.

Group-less (every sensor reads every record from the start), reconnecting with a
one-second pause while the broker is away; malformed records are logged and skipped,
never fatal. `on_change(n)` runs after each poll that applied n > 0 records.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError

from enforcer.control import ControlError, ControlView

__all__ = ["follow_control"]

log = logging.getLogger(__name__)


async def follow_control(
    view: ControlView,
    topics: Sequence[str],
    *,
    broker: str,
    request_timeout_ms: int,
    stop: asyncio.Event,
    on_change: Callable[[int], Awaitable[None]],
    unreachable: str = "control topics not readable yet",
) -> None:
    while not stop.is_set():
        consumer = AIOKafkaConsumer(*topics, bootstrap_servers=broker, group_id=None,
                                    auto_offset_reset="earliest", fetch_max_wait_ms=200,
                                    metadata_max_age_ms=2000,
                                    request_timeout_ms=request_timeout_ms)  # fmt: skip
        try:
            await consumer.start()
            while not stop.is_set():
                got = await consumer.getmany(timeout_ms=200)
                n = 0
                for tp, msgs in got.items():
                    for m in msgs:
                        try:
                            view.apply(tp.topic, m.key, m.value)
                            n += 1
                        except ControlError as e:
                            log.warning("skipping control record at %s offset %d: %s", tp, m.offset, e)
                if n:
                    await on_change(n)
        except (KafkaError, OSError, TimeoutError) as e:
            log.info("%s: %s", unreachable, e)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
        finally:
            with contextlib.suppress(KafkaError, OSError, TimeoutError):
                await asyncio.wait_for(consumer.stop(), 5)
