"""Settings both services read. Each service extends `SharedSettings` with its own prefixed fields."""

from pathlib import Path
from typing import Literal, Self

from pydantic import Field, SecretStr, model_validator
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
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT",
        alias="KAFKA_SECURITY_PROTOCOL",
        description="How every Kafka client connects: SASL_SSL (or SSL) to a cluster behind ACLs and TLS.",
    )
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        None, alias="KAFKA_SASL_MECHANISM", description="With SASL_*: how the username and password are checked."
    )
    kafka_sasl_username: str | None = Field(None, alias="KAFKA_SASL_USERNAME", description="With SASL_*: this "
                                            "service's Kafka user (the one its ACLs name).")
    kafka_sasl_password: SecretStr | None = Field(None, alias="KAFKA_SASL_PASSWORD", description="With SASL_*.")
    kafka_ssl_cafile: Path | None = Field(None, alias="KAFKA_SSL_CAFILE", description="With SSL/SASL_SSL: the "
                                          "CA that signed the brokers' certificates (unset: the system's).")
    kafka_ssl_certfile: Path | None = Field(None, alias="KAFKA_SSL_CERTFILE", description="With SSL/SASL_SSL: "
                                            "this client's certificate, for brokers that require one (mTLS).")
    kafka_ssl_keyfile: Path | None = Field(None, alias="KAFKA_SSL_KEYFILE", description="Its private key.")
    policy_signing_key: SecretStr | None = Field(
        None,
        min_length=32,
        alias="RLHF_POLICY_SIGNING_KEY",
        description="HMAC key (32+ characters) the trainer and serving sign policy announcements with; serving "
        "ignores any announcement it did not sign. Unset: the key in RLHF_POLICY_SIGNING_KEY_FILE.",
    )
    policy_signing_previous_key: SecretStr | None = Field(
        None, alias="RLHF_POLICY_SIGNING_PREVIOUS_KEY", description="The key before the last rotation: "
        "announcements it signed are still accepted (set it on serving before the trainer gets the new key)."
    )
    policy_signing_key_file: Path = Field(
        Path("var/policy-signing-key"),
        alias="RLHF_POLICY_SIGNING_KEY_FILE",
        description="Used when RLHF_POLICY_SIGNING_KEY is unset: made with a random key on first use, so that "
        "processes started from one directory (`make up`) share it.",
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

    @model_validator(mode="after")
    def _kafka_security_consistent(self) -> Self:
        sasl = self.kafka_security_protocol.startswith("SASL_")
        credentials = (self.kafka_sasl_mechanism, self.kafka_sasl_username, self.kafka_sasl_password)
        if sasl and not all(credentials):
            raise ValueError(f"KAFKA_SECURITY_PROTOCOL={self.kafka_security_protocol} needs KAFKA_SASL_MECHANISM, "
                             "KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD")
        if not sasl and any(credentials):
            raise ValueError("KAFKA_SASL_* are used only with KAFKA_SECURITY_PROTOCOL=SASL_PLAINTEXT or SASL_SSL")
        files = (self.kafka_ssl_cafile, self.kafka_ssl_certfile, self.kafka_ssl_keyfile)
        if not self.kafka_security_protocol.endswith("SSL") and any(files):
            raise ValueError("KAFKA_SSL_* are used only with KAFKA_SECURITY_PROTOCOL=SSL or SASL_SSL")
        if (self.kafka_ssl_certfile is None) != (self.kafka_ssl_keyfile is None):
            raise ValueError("KAFKA_SSL_CERTFILE and KAFKA_SSL_KEYFILE go together")
        return self

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
