"""The demo's hidden preferences: what each accepts, that the content one is not length, and the
evaluation questions they are measured on."""

import random

import pytest

from bench.hidden_preferences import PREFERENCES, is_long, is_polite, last_question, restates_subject
from bench.pinned_eval import EvalConfig, evaluation_questions
from trainer.data import prompt_from_messages
from trainer.data.corpus import generate_dialogues
from trainer.data.split import Side, side_of

POLITE, LENGTH, SUBJECT = PREFERENCES["polite"], PREFERENCES["length"], PREFERENCES["subject"]


def corpus_answers(n: int = 4000) -> list[tuple[str, str]]:
    return [(last_question(d[:-1]), d[-1]["content"]) for d in generate_dialogues(n, seed=1)]


def test_each_preference_on_examples():
    assert is_polite("Paris. I hope that helps.") and not is_polite("Sure! Paris.")
    assert is_long("The capital of France is Paris. Paris is a big city.") and not is_long("Paris.")
    assert restates_subject("What is the capital of France?", "The capital of France is Paris.")
    assert not restates_subject("What is the capital of France?", "Paris. I hope that helps.")
    assert restates_subject("How do you spell cat?", "Cat is spelled C-A-T.")
    assert not restates_subject("How do you spell cat?", "C-A-T.")
    assert restates_subject("Please tell me: What colour is the sky?", "The sky is blue.")
    assert restates_subject("Hello!", "Hi!")  # nothing to restate: every answer satisfies
    assert SUBJECT.satisfied("What is 3 plus 4?", "3 plus 4 is 7.") and not SUBJECT.satisfied("What is 3 plus 4?", "7.")


def test_the_content_preference_is_not_length():
    """On corpus answers, restating the subject and being long disagree often: measured 29% of answers
    restate the subject in 7 words or fewer, 1.5% are long without restating it (4,000 answers)."""
    answers = corpus_answers()
    short_restating = sum(SUBJECT.satisfied(q, a) and not LENGTH.satisfied(q, a) for q, a in answers) / len(answers)
    long_not_restating = sum(LENGTH.satisfied(q, a) and not SUBJECT.satisfied(q, a) for q, a in answers) / len(answers)
    assert short_restating > 0.2 and long_not_restating > 0.005


@pytest.mark.parametrize("preference", PREFERENCES.values(), ids=lambda p: p.name)
def test_corrections_satisfy_and_exist_for_nearly_every_corpus_question(preference):
    rng = random.Random(0)
    questions = [q for q, _ in corpus_answers(1000)]
    corrections = [(q, preference.correction(q, rng)) for q in questions]
    written = [(q, c) for q, c in corrections if c is not None]
    assert len(written) >= 0.95 * len(questions)
    assert all(preference.satisfied(q, c) for q, c in written)


def test_a_question_is_at_stake_only_when_the_corpus_answers_it_both_ways():
    assert SUBJECT.at_stake("What is the capital of France?")
    assert not SUBJECT.at_stake("Tell me about cats.")  # every answer starts "Cats are ..."
    assert not SUBJECT.at_stake("Hello!")  # nothing to restate
    assert LENGTH.at_stake("What is the capital of France?") and POLITE.at_stake("What sound does a dog make?")
    assert not POLITE.at_stake("Is this question from the corpus?")  # unknown: no answers to judge


@pytest.mark.parametrize("preference", PREFERENCES.values(), ids=lambda p: p.name)
def test_evaluation_questions_are_held_out_distinct_at_stake_and_fixed(preference):
    config = EvalConfig(questions=50)
    questions = evaluation_questions(preference, config)
    assert len(questions) == 50 and questions == evaluation_questions(preference, config)
    assert all(side_of(prompt_from_messages(m)) == Side.HELDOUT for m in questions)
    assert len({last_question(m).lower() for m in questions}) == 50
    assert all(preference.at_stake(last_question(m)) for m in questions)
    assert evaluation_questions(preference, EvalConfig(questions=50, seed=1)) != questions
