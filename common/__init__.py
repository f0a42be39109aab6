"""What serving and trainer share beyond the events: settings, Kafka clients, the policy registry."""
