"""The demo's reads survive a dropped keep-alive connection and give up on a server that stays away."""

import asyncio

import httpx
import pytest

from bench.stack_observer import send_retrying


def flaky_transport(failures: int) -> tuple[httpx.MockTransport, list[int]]:
    calls = []

    def handle(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        if len(calls) <= failures:
            raise httpx.ReadError("connection closed", request=request)
        return httpx.Response(200, json={"data": []})

    return httpx.MockTransport(handle), calls


async def get(transport: httpx.MockTransport) -> httpx.Response:
    async with httpx.AsyncClient(transport=transport, base_url="http://serving") as http:
        return await send_retrying(http, "GET", "/v1/models")


def test_a_dropped_connection_is_retried():
    transport, calls = flaky_transport(failures=1)
    assert asyncio.run(get(transport)).status_code == 200 and len(calls) == 2


def test_a_server_that_stays_away_fails_after_three_tries():
    transport, calls = flaky_transport(failures=3)
    with pytest.raises(httpx.ReadError):
        asyncio.run(get(transport))
    assert len(calls) == 3
