"""`python -m serving`: the chat API on vLLM, configured from the environment (see serving/settings.py)."""

import logging

import uvicorn

from serving.app import build_app
from serving.event_log import KafkaEventLog
from serving.settings import ServingSettings


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = ServingSettings()

    def make_engine():
        from serving.engine.vllm_engine import VllmEngine  # imports vLLM: only in the real server

        return VllmEngine(settings)

    def make_events():
        return KafkaEventLog.from_settings(settings)

    app = build_app(settings, make_engine, make_events)
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level="info", timeout_graceful_shutdown=10
    )
    # Bind before the lifespan starts the engine: uvicorn would bind only after it, and vLLM picks free
    # ports for its own processes meanwhile, so the port we were given could be gone by then.
    listening = config.bind_socket()
    uvicorn.Server(config).run(sockets=[listening])


if __name__ == "__main__":
    main()
