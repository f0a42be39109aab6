"""Hidden preferences of simulated users: properties of an answer that only the user knows about.

Three kinds, so that a learning loop cannot pass by learning one trick:

- `polite` (a surface property): the answer contains one of the corpus's polite pleasantries
  (POLITE_WORDS), whatever it says otherwise;
- `length` (a length/format property): the answer is longer than LONG_ANSWER_WORDS words, the median
  length of the corpus's answers;
- `subject` (a content property): the answer restates the subject of the question, i.e. repeats one of
  its content words (the country, the thing, the animal, the numbers, the word to spell, the topic):
  "The capital of France is Paris." does, "Paris." does not. A question without content words (small
  talk such as "Hello!") has nothing to restate, and every answer to it satisfies. This is not length:
  the corpus's middle phrasings restate the subject in 6 words or fewer, while a short answer with a
  pleasantry ("Sure! Paris. I hope that helps.") can be as long without restating anything
  (tests/bench/test_hidden_preferences.py measures how often the two disagree on corpus answers).

Each preference has a degree (how much of the property an answer has: pleasantries, words, restated
subject words) and a threshold: an answer satisfies the user when its degree exceeds the threshold. Users
rank and compare answers by degree, and write corrections that satisfy them from the corpus's phrasings.
"""

from __future__ import annotations

import random
import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

from trainer.data.corpus import CLOSERS, FAMILIES, USER_POLITE, generate_dialogues

Messages = list[dict[str, str]]


def words(text: str) -> int:
    return len(text.split())


# Half of the corpus answers are longer than this (it is 7 words for every seed tried).
LONG_ANSWER_WORDS = statistics.median(words(d[-1]["content"]) for d in generate_dialogues(2000, seed=0))

# The corpus's pleasantries that these words make polite: "Happy to help!", "I hope that helps.",
# "Thanks for asking!", "Please ask if you want to know more." (others, like "Sure!", are not).
POLITE_WORDS = ("happy to help", "hope that helps", "thanks", "thank you", "please")

# Words of the corpus's question templates (and of the polite wrappers users put around questions): what
# is left of a question without them is its subject.
TEMPLATE_WORDS = frozenset(
    "a an the what which who how is are do does can you me your of to from about than tell know much make "
    "say sound colour opposite capital city spell word count name list please thanks thank answer hello "
    "hi hey there good morning today goodbye bye lot plus minus times bigger".split()
)


def is_long(answer: str) -> bool:
    return words(answer) > LONG_ANSWER_WORDS


def is_polite(answer: str) -> bool:
    return politeness(answer) > 0


def politeness(answer: str) -> int:
    """How many of the polite phrases the answer contains."""
    lowered = answer.lower()
    return sum(phrase in lowered for phrase in POLITE_WORDS)


def _tokens(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


def subject_words(question: str) -> set[str]:
    """The question's content words: its tokens less the template words."""
    return _tokens(question) - TEMPLATE_WORDS


def restated_subject(question: str, answer: str) -> int:
    """How many of the question's subject words the answer repeats; 1 when the question has none."""
    subject = subject_words(question)
    return len(subject & _tokens(answer)) if subject else 1


def restates_subject(question: str, answer: str) -> bool:
    return restated_subject(question, answer) > 0


@dataclass(frozen=True)
class HiddenPreference:
    name: str
    kind: str  # surface, length/format or content: what the loop has to learn
    description: str
    degree: Callable[[str, str], float]  # (question, answer) -> how much of the property the answer has
    threshold: float  # an answer satisfies the user when its degree is above this

    def satisfied(self, question: str, answer: str) -> bool:
        return self.degree(question, answer) > self.threshold

    def correction(self, question: str, rng: random.Random) -> str | None:
        """An answer the user would write instead: the shortest of the corpus's phrasings for the question
        that satisfies, else one with a polite closer that does; None when the user does not know the
        answer (the question is not from the corpus) or nothing satisfies."""
        phrasings = corpus_phrasings().get(plain_question(question), [])
        plain = [p for p in phrasings if self.satisfied(question, p)]
        if plain:
            return plain[0]
        wrapped = [w for w in with_polite_closers(phrasings) if self.satisfied(question, w)]
        return rng.choice(wrapped) if wrapped else None

    def at_stake(self, question: str) -> bool:
        """Whether the corpus's answers to the question (with and without a polite closer) include some
        that satisfy and some that do not: questions where a policy's choices decide the preference."""
        phrasings = corpus_phrasings().get(plain_question(question), [])
        answers = phrasings + with_polite_closers(phrasings)
        return {self.satisfied(question, a) for a in answers} == {True, False}


def with_polite_closers(phrasings: list[str]) -> list[str]:
    return [f"{p} {closer}" for p in phrasings for closer in CLOSERS if is_polite(closer)]


PREFERENCES = {
    p.name: p
    for p in (
        HiddenPreference("polite", "surface", "the answer contains a polite pleasantry",
                         lambda question, answer: politeness(answer), 0),
        HiddenPreference("length", "length/format", f"the answer is longer than {LONG_ANSWER_WORDS:g} words",
                         lambda question, answer: words(answer), LONG_ANSWER_WORDS),
        HiddenPreference("subject", "content", "the answer restates the subject of the question",
                         restated_subject, 0),
    )
}  # fmt: skip


def last_question(messages: Messages) -> str:
    return next(m["content"] for m in reversed(messages) if m["role"] == "user")


_POLITE_WRAPPERS = [
    re.compile("^" + re.escape(template).replace(re.escape("{q}"), "(.+)") + "$") for template in USER_POLITE
]


def plain_question(question: str) -> str:
    """The question without the polite wrapper a corpus user may have put around it."""
    for wrapper in _POLITE_WRAPPERS:
        if (match := wrapper.match(question)) and match.group(1) in corpus_phrasings():
            return match.group(1)
    return question


@cache
def corpus_phrasings(draws_per_family: int = 10_000) -> dict[str, list[str]]:
    """Question -> the corpus's answer phrasings for it (shortest first), for nearly every question the
    corpus asks (each task family drawn `draws_per_family` times; a question that draws several answer
    sets, such as "Name three fruits.", keeps the first)."""
    phrasings: dict[str, list[str]] = {}
    for family, task in FAMILIES.items():
        for draw in range(draws_per_family):
            question, answers = task(random.Random(f"{family}-{draw}"))
            phrasings.setdefault(question, answers)
    return phrasings
