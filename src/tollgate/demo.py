"""`tollgate demo`: the offline quick start, end to end through real Envoy and Postgres.

Starts the whole stack with the built-in fake provider as the upstream, sends chat
completions as several end users through the official `openai` SDK (plain and streamed),
waits for the ledger, and prints the per-user totals from Postgres.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import openai
from openai.types.chat import ChatCompletionUserMessageParam

from tollgate.app import Stack, StackOptions, stop_signal
from tollgate.config import Settings
from tollgate.ledger.queries import UsageFilter, UserTotals, fetch_user_totals
from tollgate.localstack import free_port

__all__ = ["DEMO_CALLS", "DemoCall", "DemoResult", "run_demo"]


@dataclass(frozen=True)
class DemoCall:
    user: str | None  # None: no user id sent (shows as "—" on the dashboard)
    prompt: str
    stream: bool


DEMO_CALLS: tuple[DemoCall, ...] = (
    DemoCall("alice", "Summarise the plot of Hamlet in two sentences.", stream=False),
    DemoCall("alice", "Write a haiku about Postgres.", stream=True),
    DemoCall("alice", "What is an Envoy ext_proc filter?", stream=False),
    DemoCall("bob", "Translate 'good morning' into French.", stream=False),
    DemoCall("bob", "List three prime numbers.", stream=True),
    DemoCall("carol", "Explain token-based pricing to a finance team.", stream=False),
    DemoCall(None, "A call from an app that sends no user id yet.", stream=False),
)


@dataclass(frozen=True)
class DemoResult:
    totals: list[UserTotals]
    envoy_url: str
    seconds: float
    dashboard_url: str = ""
    dashboard_token_file: Path | None = None


async def _send_calls(base_url: str) -> None:
    async with openai.AsyncOpenAI(
        base_url=base_url, api_key="sk-demo-not-a-real-key", max_retries=0
    ) as client:
        for call in DEMO_CALLS:
            headers = {"x-tollgate-user-id": call.user} if call.user else {}
            messages: list[ChatCompletionUserMessageParam] = [
                {"role": "user", "content": call.prompt}
            ]
            if call.stream:
                stream = await client.chat.completions.create(
                    model="gpt-4o-mini",
                    messages=messages,
                    stream=True,
                    stream_options={"include_usage": True},
                    extra_headers=headers,
                )
                async for _chunk in stream:
                    pass
            else:
                await client.chat.completions.create(
                    model="gpt-4o-mini",
                    messages=messages,
                    extra_headers=headers,
                )


async def run_demo(
    settings: Settings,
    report: Callable[[DemoResult], None] | None = None,
    *,
    wait: bool = False,
) -> DemoResult:
    """Run the demo against a fresh stack, hand the result to ``report``, then (with
    ``wait``) keep the stack and its dashboard up until SIGINT/SIGTERM; the stack is
    stopped before this returns."""
    began = time.monotonic()
    since = datetime.now(UTC)
    fake_port = free_port()
    settings = settings.with_overrides(upstream_url=f"http://127.0.0.1:{fake_port}")
    stack = Stack(settings, StackOptions(fake_provider_port=fake_port, run_dashboard=True))
    envoy_url = f"http://{settings.envoy_listen_address}:{settings.envoy_listen_port}/v1"
    with stop_signal() as stop:
        await stack.start()
        try:
            await _send_calls(envoy_url)
            await stack.wait_for_ledger()
            async with stack.pool.connection() as conn:
                totals = await fetch_user_totals(conn, UsageFilter(since=since))
            result = DemoResult(
                totals=totals,
                envoy_url=envoy_url,
                seconds=time.monotonic() - began,
                dashboard_url=stack.dashboard_url,
                dashboard_token_file=stack.dashboard_token_file,
            )
            if report is not None:
                report(result)
            if wait:
                await stop.wait()
        finally:
            await stack.stop()
    return result
