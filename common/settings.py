"""Settings both services read. Each service extends `SharedSettings` with its own prefixed fields."""

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class SharedSettings(BaseSettings):
    """Fields named by their full environment variable (no service prefix): both services must agree."""

    model_config = SettingsConfigDict(extra="ignore", validate_by_name=True, validate_by_alias=True)

    kafka_bootstrap_servers: str = Field(
        "127.0.0.1:9092",
        alias="KAFKA_BOOTSTRAP_SERVERS",
        description="Comma-separated host:port list of the Kafka cluster.",
    )
    kafka_replication_factor: int = Field(
        1,
        alias="KAFKA_REPLICATION_FACTOR",
        description="Replication factor of the topics this project creates (3 on a production cluster).",
    )
    topic_prefix: str = Field(
        "rlhf.",
        alias="RLHF_TOPIC_PREFIX",
        description="Prepended to every topic name, so several stacks (or test runs) can share a cluster.",
    )
    base_model: Path = Field(
        Path("var/models/base"),
        alias="RLHF_BASE_MODEL",
        description="Local Hugging Face model directory of the frozen base policy.",
    )
    registry_dir: Path = Field(
        Path("var/registry"),
        alias="RLHF_REGISTRY_DIR",
        description="Root of the policy registry (a directory both services can read).",
    )
    registry_url: str | None = Field(
        None,
        alias="RLHF_REGISTRY_URL",
        description="s3://bucket/prefix: the policy registry in an S3-compatible store instead of "
        "RLHF_REGISTRY_DIR. Endpoint, region and credentials come from the standard AWS_* variables "
        "(AWS_ENDPOINT_URL for a store other than AWS).",
    )
    registry_cache_dir: Path = Field(
        Path("var/registry-cache"),
        alias="RLHF_REGISTRY_CACHE_DIR",
        description="Where versions fetched from an S3 registry are kept (vLLM and PEFT load local files).",
    )

    @property
    def completions_topic(self) -> str:
        return f"{self.topic_prefix}completions"

    @property
    def feedback_topic(self) -> str:
        return f"{self.topic_prefix}feedback"

    @property
    def policy_topic(self) -> str:
        return f"{self.topic_prefix}policy"

    @property
    def dead_letter_topic(self) -> str:
        """Records a consumer could not parse, with why and where from (common/dead_letters.py)."""
        return f"{self.topic_prefix}dead-letters"
