"""The FastAPI application: routers, error handlers, middleware, and the life cycle of its parts."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from common.registry import open_registry
from serving.auth import announce_mode, require_admin_key, require_api_key
from serving.chat import ChatService
from serving.completion_ids import CompletionIds
from serving.engine import EngineClient
from serving.errors import install_error_handlers
from serving.event_log import EventSink
from serving.feedback_intake import FeedbackIntake
from serving.middleware import BodySizeLimit, RequestMetrics
from serving.page_sessions import PageSessions
from serving.policy import PolicyFollower, PolicyManager
from serving.routes import admin, chat, feedback, health, models, page
from serving.settings import ServingSettings

log = logging.getLogger(__name__)


async def _review_canary(policies: PolicyManager, interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        try:
            await policies.review()
        except Exception:  # a registry write that failed: the next review tries again
            log.exception("canary review failed")


def _settle_garbage_collector() -> None:
    """Once started: what start-up built (engine, models, settings) goes to a generation the collector never
    walks again, and the youngest generation is collected less often. Otherwise its collections, walking
    every live object, stall the event loop: feedback's p99 was 126 ms with Python's default and 33 ms with
    this (bench/feedback_bench.py, 64 clients). Request garbage is mostly freed by reference counting."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNGEST_THRESHOLD, *gc.get_threshold()[1:])


GC_YOUNGEST_THRESHOLD = 100_000  # allocations between collections of the youngest generation (default 700)


def build_app(
    settings: ServingSettings,
    make_engine: Callable[[], EngineClient],
    make_events: Callable[[], EventSink],
) -> FastAPI:
    """The app, with its engine and event sink built at start-up (vLLM needs the running event loop)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        ids = CompletionIds.from_settings(settings)  # first: a bad key fails before the engine loads
        app.state.page_sessions = PageSessions.from_settings(settings)
        announce_mode(settings)
        engine = make_engine()
        events = make_events()
        policies = PolicyManager(engine, open_registry(settings), settings.served_model_name,
                                 settings.canary, events.announce_policy, base_model=settings.base_model)
        follower = None
        if settings.follow_policy_topic:
            follower = PolicyFollower(settings, policies, asyncio.get_running_loop())
            await asyncio.to_thread(follower.start)
        await policies.start()
        reviews = asyncio.create_task(_review_canary(policies, settings.canary.check_interval_s))
        app.state.engine, app.state.events, app.state.policies = engine, events, policies
        app.state.completion_ids = ids
        app.state.feedback_intake = FeedbackIntake(settings, events, policies)
        app.state.chat = ChatService(engine, policies, events, ids, max_n=settings.max_n)
        log.info("serving %s at policy %s", settings.served_model_name, policies.current.name)
        _settle_garbage_collector()
        try:
            yield
        finally:
            reviews.cancel()
            if follower:
                await asyncio.to_thread(follower.stop)
            await asyncio.to_thread(events.close)
            engine.shutdown()

    app = FastAPI(title="RLHF service", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    for module in (chat, models, feedback):
        app.include_router(module.router, dependencies=[Depends(require_api_key)])
    app.include_router(admin.router, dependencies=[Depends(require_admin_key)])
    app.include_router(health.router)
    app.include_router(page.router)
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestMetrics)
    return app
