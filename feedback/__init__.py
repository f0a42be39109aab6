"""The event contract shared by serving and trainer: what goes on the Kafka topics."""

from feedback.events import (
    ChoiceRef,
    CompletionChoice,
    CompletionEvent,
    CorrectionFeedback,
    Feedback,
    FeedbackEvent,
    Message,
    PairwiseFeedback,
    PolicyEvent,
    RankingFeedback,
    RatingFeedback,
    SamplingRecord,
    ThumbsFeedback,
    idempotent_event_id,
    parse_feedback,
    referenced_choices,
)

__all__ = [
    "ChoiceRef",
    "CompletionChoice",
    "CompletionEvent",
    "CorrectionFeedback",
    "Feedback",
    "FeedbackEvent",
    "Message",
    "PairwiseFeedback",
    "PolicyEvent",
    "RankingFeedback",
    "RatingFeedback",
    "SamplingRecord",
    "ThumbsFeedback",
    "idempotent_event_id",
    "parse_feedback",
    "referenced_choices",
]
