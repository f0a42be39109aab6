"""rlhf_feedback_votes_total{version, vote}: each accepted thumbs or rating counts once, for the version that
wrote the answer it judges (read from the signed completion id), which the dashboard's up-rate uses."""

from prometheus_client import REGISTRY

from common.registry import PolicyRegistry
from tests.serving.test_policy import publish_fake_adapter

USER = [{"role": "user", "content": "Hi"}]


def votes() -> dict[tuple[str, str], float]:
    return {(s.labels["version"], s.labels["vote"]): s.value for metric in REGISTRY.collect()
            if metric.name == "rlhf_feedback_votes" for s in metric.samples if s.name.endswith("_total")}


def counted(before: dict, after: dict) -> dict:
    return {label: after[label] - before.get(label, 0) for label in after if after[label] != before.get(label, 0)}


def test_thumbs_and_ratings_count_for_the_version_that_wrote_the_answer(client, settings, tmp_path):
    publish_fake_adapter(PolicyRegistry(settings.registry_dir), tmp_path)
    client.portal.call(client.app.state.policies.set_candidate, "v1")
    pair = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 1, "ab": True}).json()
    by_version = {choice["policy_version"]: choice["index"] for choice in pair["choices"]}
    before = votes()
    sent = [
        {"type": "thumbs", "choice_index": by_version["v0"], "rating": "up"},
        {"type": "rating", "choice_index": by_version["v0"], "score": 6},
        {"type": "rating", "choice_index": by_version["v0"], "score": 4},  # neither: no vote
        {"type": "thumbs", "choice_index": by_version["v1"], "rating": "down"},
        {"type": "rating", "choice_index": by_version["v1"], "score": 2},
        {"type": "correction", "choice_index": by_version["v1"], "text": "better"},  # no vote
    ]
    for item in sent:
        assert client.post("/v1/feedback", json={**item, "completion_id": pair["id"]}).status_code == 202
    pairwise = {"type": "pairwise", "preference": "a", "a": {"completion_id": pair["id"], "choice_index": 0},
                "b": {"completion_id": pair["id"], "choice_index": 1}}
    assert client.post("/v1/feedback", json=pairwise).status_code == 202
    # Refused feedback and an idempotent retry add nothing.
    bad = {"type": "thumbs", "completion_id": pair["id"], "choice_index": 5, "rating": "up"}
    assert client.post("/v1/feedback", json=bad).status_code == 400
    retry = {"type": "thumbs", "completion_id": pair["id"], "choice_index": by_version["v0"], "rating": "up"}
    for _ in range(2):
        assert client.post("/v1/feedback", json=retry, headers={"Idempotency-Key": "once"}).status_code == 202
    assert counted(before, votes()) == {("v0", "up"): 3, ("v1", "down"): 2}
