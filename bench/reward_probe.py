"""How well a reward model knows a hidden preference: the corpus's phrasings of make demo's pinned questions,
ranked by the model.

    python bench/reward_probe.py var/demo-subject/trainer/rounds/000016/reward_model --preference subject

For each pinned question (bench/pinned_eval.py: held out, the preference at stake) every corpus phrasing of
its answer, with and without a polite closer, is scored. Printed: for how many questions the top-scored
answer satisfies the preference, the share of (satisfying, unsatisfying) pairs of one question ranked the
right way round, and, for the first question, every answer with its score. A reward model PPO learns from
must rank the right way round: where it does not (it rewards a pleasantry, say), a round learns that
instead. make demo's round directories keep every round's reward model (`reward_model`) and judge
(`judge_model`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.hidden_preferences import (  # noqa: E402
    PREFERENCES,
    corpus_phrasings,
    last_question,
    plain_question,
    with_polite_closers,
)
from bench.pinned_eval import EvalConfig, evaluation_questions  # noqa: E402
from trainer.reward.reward_model import RewardModel  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reward_model", type=Path, help="a reward model directory (a round's reward_model)")
    parser.add_argument("--preference", choices=sorted(PREFERENCES), default="subject")
    parser.add_argument("--base-model", type=Path, default=ROOT / "var" / "models" / "base")
    args = parser.parse_args()

    preference = PREFERENCES[args.preference]
    model = RewardModel.load(args.base_model, args.reward_model)
    questions = evaluation_questions(preference, EvalConfig())
    top_satisfies = right_way = pairs = 0
    for index, messages in enumerate(questions):
        question = last_question(messages)
        phrasings = corpus_phrasings()[plain_question(question)]
        answers = phrasings + with_polite_closers(phrasings)
        prompt = tuple((m["role"], m["content"]) for m in messages)
        scores = model.score([prompt] * len(answers), answers).tolist()
        satisfied = [preference.satisfied(question, a) for a in answers]
        top_satisfies += satisfied[max(range(len(answers)), key=scores.__getitem__)]
        good = [s for s, ok in zip(scores, satisfied, strict=True) if ok]
        bad = [s for s, ok in zip(scores, satisfied, strict=True) if not ok]
        right_way += sum(g > b for g in good for b in bad)
        pairs += len(good) * len(bad)
        if index == 0:
            print(f"question 0: {question}")
            for score, ok, answer in sorted(zip(scores, satisfied, answers, strict=True), reverse=True):
                print(f"  {score:+6.2f} {'satisfies' if ok else '         '} {answer}")
    print(f"{args.preference}: top answer satisfies for {top_satisfies} of {len(questions)} questions; "
          f"satisfying above unsatisfying in {right_way} of {pairs} pairs ({right_way / pairs:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
