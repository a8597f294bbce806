"""A real ``redis-server`` for the Redis session-store tests (services/local_redis.py).

Import the fixture into a test module (``from tests.redis_fixtures import redis_server``). When
Debian's ``redis-server`` cannot be started, each test that needs it is skipped with the reason;
``.ci/run`` installs it, so CI runs them.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from services.local_redis import RedisServer


def start_or_skip(directory, **options) -> RedisServer:
    try:
        return RedisServer(directory, **options).start()
    except (RuntimeError, OSError) as exc:
        pytest.skip(f"Redis session-store tests need Debian's redis-server, which could not be started "
                    f"({exc}); install it with `apt-get install redis-server` (.ci/run does)")


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server (AOF on, appendfsync always) for the tests of one module."""
    server = start_or_skip(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()
