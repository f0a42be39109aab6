#!/bin/sh
# One-shot set-up of compose's Kafka (service kafka-setup): the least each account needs, on the project's
# topics (prefix $TOPIC_PREFIX) only. Serving also writes the policy topic (its canary verdicts), so only the
# announcements' signatures, not ACLs, tell the trainer's versions from forged ones.
set -eu
config=/tmp/admin.properties
cat > "$config" <<PROPERTIES
security.protocol=SASL_PLAINTEXT
sasl.mechanism=PLAIN
sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required username="broker" password="$KAFKA_BROKER_PASSWORD";
PROPERTIES

# The image's tools directory is not on PATH: look the tool up wherever the image puts it.
acls=$(command -v kafka-acls.sh || find / -path '*/bin/kafka-acls.sh' 2>/dev/null | head -n 1)
[ -n "$acls" ] || { echo "kafka-acls.sh not found in this image" >&2; exit 1; }
acl() {
  "$acls" --bootstrap-server kafka:9092 --command-config "$config" --add --force "$@"
}
topics="--topic $TOPIC_PREFIX --resource-pattern-type prefixed"

# Serving: writes completions, feedback, verdicts and dead letters; reads the policy topic (no group).
acl --allow-principal User:serving --operation Create --operation Describe --operation Write $topics
acl --allow-principal User:serving --operation Read --topic "${TOPIC_PREFIX}policy"
# The trainer: reads completions and feedback in its group, announces versions, writes dead letters.
acl --allow-principal User:trainer --operation Create --operation Describe --operation Read --operation Write $topics
acl --allow-principal User:trainer --operation Read --group "$TRAINER_GROUP"
# The lag exporter: offsets and group positions, nothing else.
acl --allow-principal User:exporter --operation Describe $topics
acl --allow-principal User:exporter --operation Describe --group "$TRAINER_GROUP"
