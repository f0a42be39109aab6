"""Serving: OpenAI-compatible chat API over vLLM; logs completions and feedback to Kafka; hot-swaps policies.

Data path: routes/ (HTTP) -> chat.py (OpenAI semantics) -> engine/ (vLLM) -> event_log.py (Kafka);
policy.py follows the policy topic and switches the served version.
"""
