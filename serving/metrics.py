"""Serving's Prometheus metrics. They live in the default registry, beside vLLM's own engine metrics."""

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter("rlhf_http_requests_total", "HTTP requests by route and status.", ["route", "status"])
REQUEST_LATENCY = Histogram(
    "rlhf_request_latency_seconds", "Request latency, to the last byte.", ["route"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
TIME_TO_FIRST_TOKEN = Histogram(
    "rlhf_time_to_first_token_seconds", "Time from request to the first generated text.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
IN_FLIGHT = Gauge("rlhf_requests_in_flight", "Chat completions being generated now.")
GENERATED_TOKENS = Counter("rlhf_generated_tokens_total", "Completion tokens generated, by policy version.", ["version"])
POLICY_VERSION = Gauge("rlhf_policy_version_info", "1 for the policy version new requests get, 0 for others.", ["version"])
POLICY_NUMBER = Gauge("rlhf_policy_version_number", "Number of the version new requests get (0: base).")
POLICY_SWITCHES = Counter("rlhf_policy_switches_total", "Times the served policy version changed.")
CANARY_VERSION = Gauge("rlhf_canary_version_number", "Number of the version in canary now (0: none).")
CANARY_FIGURE = Gauge("rlhf_canary_figure", "The running canary's evidence (requests, failures, ratings, "
                      "approvals of each arm; fraction; seconds).", ["figure"])
CANARY_VERDICTS = Counter("rlhf_canary_verdicts_total", "Canaries concluded, by verdict.", ["verdict"])
FEEDBACK = Counter("rlhf_feedback_total", "Feedback accepted, by type.", ["type"])
FEEDBACK_REJECTED = Counter("rlhf_feedback_rejected_total", "Feedback refused for abuse, by reason.", ["reason"])
EVENTS_SENT = Counter("rlhf_events_sent_total", "Events acknowledged by Kafka, by topic kind.", ["kind"])
EVENTS_FAILED = Counter("rlhf_events_failed_total", "Events Kafka did not take within the delivery timeout "
                        "(spooled, except canary verdicts).", ["kind"])
EVENTS_DROPPED = Counter("rlhf_completion_events_dropped_total", "Completion events dropped: buffer full.")
EVENTS_SPOOLED = Counter("rlhf_events_spooled_total", "Events written to the on-disk spool: Kafka did not take "
                         "them, or earlier ones still wait there.", ["kind"])
EVENTS_REPLAYED = Counter("rlhf_events_replayed_total", "Spooled events Kafka acknowledged later.", ["kind"])
SPOOL_RECORDS = Gauge("rlhf_spool_records", "Events in the spool waiting for Kafka.")
SPOOL_BYTES = Gauge("rlhf_spool_bytes", "Bytes the spool's segments take on disk (the bound applies to this).")
SPOOL_MAX_BYTES = Gauge("rlhf_spool_max_bytes", "The spool's bound: when full, feedback gets 503.")
SPOOL_OLDEST_AGE = Gauge("rlhf_spool_oldest_age_seconds", "How long the oldest spooled event has waited (0: empty).")
SPOOL_DROPPED = Counter("rlhf_spool_dropped_total", "Events lost on the way through the spool: 'full' (completion "
                        "events the full spool refused), 'corrupt' (found at start), 'rejected' (by Kafka).",
                        ["reason"])
FEEDBACK_VOTES = Counter("rlhf_feedback_votes_total", "Thumbs and 1-7 ratings accepted, by the policy version that "
                         "wrote the answer and vote (up: thumbs up or 5-7; down: thumbs down or 1-3; 4: none).",
                         ["version", "vote"])
POLICY_EVENTS_REJECTED = Counter("rlhf_policy_events_rejected_total", "Policy announcements ignored: 'unsigned' "
                                 "or 'bad_signature' (not signed by RLHF_POLICY_SIGNING_KEY).", ["reason"])
