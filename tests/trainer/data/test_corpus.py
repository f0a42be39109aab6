"""The templated corpus: deterministic, well-formed, and varied enough for RLHF to have something to prefer."""

import random
import re

from trainer.data.corpus import FAMILIES, generate_dialogues, sample_prompts

ROLES = {"system", "user", "assistant"}


def _answers(dialogues):
    return [m["content"] for d in dialogues for m in d if m["role"] == "assistant"]


def test_same_seed_same_dialogues_other_seed_others():
    assert generate_dialogues(200, seed=3) == generate_dialogues(200, seed=3)
    assert generate_dialogues(200, seed=3) != generate_dialogues(200, seed=4)
    assert sample_prompts(50, seed=3) == sample_prompts(50, seed=3)


def test_dialogues_alternate_user_and_assistant_after_an_optional_system_message():
    dialogues = generate_dialogues(500, seed=0)
    assert any(d[0]["role"] == "system" for d in dialogues)
    assert any(len(d) >= 4 for d in dialogues), "no multi-turn dialogue"
    for dialogue in dialogues:
        turns = dialogue[1:] if dialogue[0]["role"] == "system" else dialogue
        assert [m["role"] for m in turns] == ["user", "assistant"] * (len(turns) // 2)
        assert all(set(m) == {"role", "content"} and m["content"].strip() for m in dialogue)


def test_prompts_end_with_a_user_turn_and_are_not_training_dialogues_cut_short():
    prompts = sample_prompts(300, seed=0)
    assert all(p[-1]["role"] == "user" and {m["role"] for m in p} <= ROLES for p in prompts)
    training = {str(d[:-1]) for d in generate_dialogues(300, seed=0)}
    assert sum(str(p) in training for p in prompts) < len(prompts) / 2


def test_answers_vary_in_length_and_politeness():
    answers = _answers(generate_dialogues(2000, seed=0))
    words = [len(a.split()) for a in answers]
    assert min(words) <= 2 and max(words) >= 25
    for phrase in ("please", "thanks", "happy to help"):
        share = sum(phrase in a.lower() for a in answers) / len(answers)
        assert 0.01 < share < 0.5, (phrase, share)


def test_every_task_family_appears():
    questions = " ".join(
        m["content"] for d in generate_dialogues(2000, seed=0) for m in d if m["role"] == "user"
    )
    for marker in ("plus", "capital of", "colour is", "sound does", "opposite of", "Hello", "Tell me about",
                   "Count from", "spell", "bigger than", "Name "):  # fmt: skip
        assert re.search(marker, questions), marker


def test_each_family_lists_its_phrasings_from_shortest_to_longest():
    """Brief styles take the first phrasing and detailed ones the last."""
    rng = random.Random(0)
    for name, family in FAMILIES.items():
        for _ in range(50):
            question, phrasings = family(rng)
            assert question and phrasings, name
            assert len(phrasings[0]) == min(map(len, phrasings)), (name, phrasings)
            assert len(phrasings[-1]) == max(map(len, phrasings)), (name, phrasings)
