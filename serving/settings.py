"""Serving settings, from SERVING_* environment variables (plus the shared KAFKA_/RLHF_ ones)."""

from pathlib import Path
from typing import Literal, Self

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from common.settings import SharedSettings
from serving.canary import CanaryConfig


class ServingSettings(SharedSettings):
    model_config = SettingsConfigDict(env_prefix="SERVING_", extra="ignore", validate_by_name=True,
                                      env_nested_delimiter="__")

    host: str = Field("127.0.0.1", description="Interface to listen on (0.0.0.0 in a container).")
    port: int = Field(8000, description="HTTP port.")
    served_model_name: str = Field("rlhf-policy", description="The `model` name clients send and /v1/models lists.")
    max_model_len: int = Field(512, ge=16, description="Context length (prompt + completion) in tokens.")
    dtype: str = Field("float32", description="Weights dtype for vLLM ('auto' on GPUs).")
    kv_cache_gib: int = Field(1, ge=1, description="CPU backend only: KV-cache size in GiB.")
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="GPU backend only: memory fraction.")
    max_loras: int = Field(4, ge=2, description="Adapters resident at once: at least the current and previous.")
    max_lora_rank: int = Field(16, description="Largest LoRA rank a published policy may have.")
    max_n: int = Field(4, ge=1, le=128, description="Largest `n` (choices per request) accepted.")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Requests with a larger body get 413.")
    completion_key: SecretStr | None = Field(
        None, description="HMAC key (32+ characters) that signs completion ids (serving/completion_ids.py); "
        "every replica needs the same one. Unset: the key in `completion_key_file` (local mode).")
    completion_previous_key: SecretStr | None = Field(
        None, description="The key before the last rotation: ids it signed are still accepted.")
    completion_key_file: Path = Field(
        Path("var/serving/completion-key"), description="Used when `completion_key` is unset: made with a "
        "random key on first start, so local restarts and replicas started from one directory share it.")
    completion_id_max_age_s: int = Field(
        7 * 24 * 3600, gt=0, description="Feedback is accepted on completions at most this old (seconds).")
    event_queue_size: int = Field(
        10_000, ge=1, description="Events waiting for the sender thread before new completion events are "
        "dropped (counted) and feedback gets 503."
    )
    feedback_ack_timeout_s: float = Field(
        5.0, gt=0, description="How long an event waits for Kafka's acknowledgement (the producer's delivery "
        "timeout) before it goes to the spool."
    )
    spool_dir: Path | None = Field(
        None, description="Where events wait while Kafka cannot take them (serving/spool.py); one directory per "
        "replica, on a persistent volume, so a restarted replica replays them. Unset: var/serving/spool-<port>.")
    spool_max_bytes: int = Field(
        1 << 30, ge=1 << 16, description="The spool's bound: when full, feedback gets 503 with Retry-After and "
        "completion events are dropped (counted).")
    idempotency_cache_size: int = Field(
        100_000, ge=1, description="Recent idempotency keys (Idempotency-Key, `event_id`) a replica remembers "
        "with their first answer; across replicas the trainer keeps one event per key.")
    feedback_rate_per_key: float = Field(
        10_000.0, ge=0, description="Feedback per second one app key may send (token bucket; 0: no limit). "
        "Without SERVING_API_KEYS every client shares one bucket.")
    feedback_burst_per_key: float = Field(20_000.0, ge=1, description="That bucket's size: the longest burst.")
    feedback_rate_per_user: float = Field(
        2.0, ge=0, description="Feedback per second one end user (`user`) may send (0: no limit); beyond it 429 "
        "with Retry-After.")
    feedback_burst_per_user: float = Field(120.0, ge=1, description="That bucket's size: the longest burst.")
    auth: Literal["keys", "local"] = Field(
        "keys", description="'keys' (the default): apps send one of `api_keys`, the admin routes take only "
        "`admin_key`, and serving refuses to start without them, SERVING_COMPLETION_KEY and "
        "RLHF_POLICY_SIGNING_KEY. 'local': nothing is checked, for one machine (`make up` sets it).")
    api_keys: list[str] = Field(
        default_factory=list,
        description="Bearer keys apps send (JSON list, e.g. '[\"k1\",\"k2\"]'); they never open the admin routes.",
    )
    admin_key: str | None = Field(
        None, description="Bearer key of the admin routes (/v1/admin/*); it differs from every app key."
    )
    page: bool = Field(
        True, description="Serve the end-user page at / and, with SERVING_AUTH=keys, mint its session tokens "
        "(serving/page_sessions.py): whoever can load the page can chat and give feedback. False: an API only.")
    page_session_ttl_s: int = Field(3600, ge=60, description="How long a page session token is accepted.")
    follow_policy_topic: bool = Field(True, description="Take up each new version announced by the trainer.")
    canary: CanaryConfig = Field(
        default_factory=CanaryConfig, description="How a new version earns all of the traffic "
        "(SERVING_CANARY__FRACTION=0.2 and so on; serving/canary.py).")

    @model_validator(mode="after")
    def _keys_when_not_local(self) -> Self:
        """Outside local mode nothing runs open: a clear error at start instead of an API anyone can call."""
        if self.auth == "local":
            return self
        needed = {"SERVING_API_KEYS": self.api_keys, "SERVING_ADMIN_KEY": self.admin_key,
                  "SERVING_COMPLETION_KEY": self.completion_key, "RLHF_POLICY_SIGNING_KEY": self.policy_signing_key}
        if missing := [name for name, value in needed.items() if not value]:
            raise ValueError(f"SERVING_AUTH=keys (the default) needs {', '.join(missing)}; "
                             "SERVING_AUTH=local runs without authentication, for one machine")
        if self.admin_key in self.api_keys:
            raise ValueError("SERVING_ADMIN_KEY must differ from every app key in SERVING_API_KEYS")
        return self
