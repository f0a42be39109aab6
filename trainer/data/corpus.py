"""Templated chat dialogues: the default base model's training corpus and the PPO prompts.

No model or data set can be downloaded here, so the base model learns to chat from dialogues generated
out of the tables below. Each task family turns a random table entry into a question and a few answer
phrasings; a style then picks how long and how polite the answer is. The variety is deliberate: RLHF
tests reward e.g. longer answers or answers with certain words, and that only works if the base model
sometimes produces them and sometimes not.

Everything is deterministic given the seed (random.Random with an int or str seed does not depend on
PYTHONHASHSEED).
"""

from __future__ import annotations

import random
from collections.abc import Callable

Message = dict[str, str]
Dialogue = list[Message]

# --- Tables -------------------------------------------------------------------------------------------

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
    "Egypt": "Cairo", "Canada": "Ottawa", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo",
    "Greece": "Athens", "Portugal": "Lisbon", "Ireland": "Dublin", "Poland": "Warsaw", "Austria": "Vienna",
    "China": "Beijing", "India": "New Delhi", "Mexico": "Mexico City", "Australia": "Canberra",
    "Sweden": "Stockholm", "Finland": "Helsinki", "Cuba": "Havana", "Chile": "Santiago", "Thailand": "Bangkok",
}  # fmt: skip

COLOURS = {
    "the sky": "blue", "grass": "green", "snow": "white", "a banana": "yellow", "a tomato": "red",
    "coal": "black", "an orange": "orange", "a lemon": "yellow", "milk": "white", "a strawberry": "red",
    "the sun": "yellow", "a carrot": "orange", "chocolate": "brown", "a leaf": "green", "the sea": "blue",
    "a plum": "purple", "a crow": "black", "a cloud": "white",
}  # fmt: skip

SOUNDS = {
    "dog": ("barks", "Woof"), "cat": ("meows", "Meow"), "cow": ("moos", "Moo"), "duck": ("quacks", "Quack"),
    "sheep": ("baas", "Baa"), "lion": ("roars", "Roar"), "owl": ("hoots", "Hoot"), "bee": ("buzzes", "Buzz"),
    "snake": ("hisses", "Hiss"), "frog": ("croaks", "Ribbit"), "pig": ("oinks", "Oink"),
    "horse": ("neighs", "Neigh"), "mouse": ("squeaks", "Squeak"), "wolf": ("howls", "Howl"),
}  # fmt: skip

OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("happy", "sad"),
    ("light", "dark"), ("old", "young"), ("open", "closed"), ("early", "late"), ("full", "empty"),
    ("day", "night"), ("wet", "dry"), ("hard", "soft"), ("loud", "quiet"), ("high", "low"),
    ("good", "bad"), ("left", "right"), ("strong", "weak"), ("rich", "poor"), ("near", "far"),
]  # fmt: skip

# Facts in an order that reads well when a prefix of them is used as the answer.
TOPICS = {
    "cats": ["Cats are small animals with soft fur.", "Many people keep cats as pets.",
             "A cat likes to sleep in the sun.", "Cats can see well at night."],
    "dogs": ["Dogs are loyal animals.", "Many people keep dogs as pets.",
             "A dog likes to run and play.", "Dogs have a very good sense of smell."],
    "the sun": ["The sun is a star.", "It gives the earth light and heat.",
                "The sun rises in the east and sets in the west."],
    "the moon": ["The moon goes around the earth.", "It shines at night with light from the sun.",
                 "People walked on the moon in 1969."],
    "water": ["Water is a clear liquid.", "All living things need water.",
              "Water freezes into ice when it is cold.", "Rain, rivers and the sea are water."],
    "trees": ["Trees are tall plants.", "They have roots, a trunk and leaves.",
              "Trees make the air clean.", "Some trees live for hundreds of years."],
    "the sea": ["The sea is large and salty.", "Many fish live in the sea.",
                "The sea covers most of the earth."],
    "rain": ["Rain is water that falls from clouds.", "Plants need rain to grow.",
             "After rain you can sometimes see a rainbow."],
    "bread": ["Bread is made from flour, water and yeast.", "People bake bread in an oven.",
              "Bread is eaten all over the world."],
    "music": ["Music is made of sounds and rhythm.", "People play music with voices and instruments.",
              "Music can make people happy."],
    "books": ["Books are full of words and stories.", "You can learn many things from books.",
              "A library has many books."],
    "bees": ["Bees are small insects.", "They make honey.", "Bees help flowers grow."],
    "winter": ["Winter is the cold season.", "In winter it can snow.", "The days are short in winter."],
    "summer": ["Summer is the warm season.", "The days are long in summer.",
               "Many people go to the beach in summer."],
    "birds": ["Birds have feathers and wings.", "Most birds can fly.", "Birds lay eggs in nests."],
    "apples": ["Apples are sweet fruits.", "They grow on trees.", "Apples can be red, green or yellow."],
}  # fmt: skip

CATEGORIES = {
    "fruits": ["apple", "banana", "pear", "orange", "plum", "grape", "lemon", "cherry"],
    "animals": ["dog", "cat", "cow", "horse", "lion", "duck", "sheep", "mouse"],
    "colours": ["red", "blue", "green", "yellow", "white", "black", "purple", "brown"],
    "countries": list(CAPITALS),
    "vegetables": ["carrot", "potato", "onion", "pea", "bean", "cabbage", "tomato"],
    "drinks": ["water", "milk", "tea", "coffee", "juice"],
}

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]

# (what the user says, possible replies): greetings and small talk.
SMALL_TALK = [
    (["Hello!", "Hi!", "Hi there!", "Hey!"],
     ["Hello!", "Hi there! How can I help you today?", "Hello! What would you like to know?"]),
    (["Good morning!"], ["Good morning!", "Good morning! How can I help you today?"]),
    (["How are you?", "How are you today?"],
     ["I am fine, thank you.", "I am doing well, thanks for asking! How can I help you?"]),
    (["What is your name?", "Who are you?"],
     ["I am a small assistant.", "I am a small assistant. I can answer simple questions about the world."]),
    (["Thank you!", "Thanks!", "Thanks a lot!"],
     ["You are welcome!", "You are welcome! Happy to help.", "My pleasure. Thanks for asking!"]),
    (["Goodbye!", "Bye!"], ["Goodbye!", "Goodbye! Have a nice day.", "Bye! Thanks for chatting with me."]),
    (["What can you do?"],
     ["I can answer simple questions.",
      "I can do sums, name capitals and colours, spell words and tell you about many things."]),
]  # fmt: skip

# --- Task families: rng -> (question, answer phrasings from shortest to longest) ------------------------

Task = tuple[str, list[str]]


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def _arithmetic(rng: random.Random) -> Task:
    op = rng.choice(["plus", "minus", "times"])
    if op == "times":
        a, b = rng.randint(1, 5), rng.randint(1, 5)
        result = a * b
    else:
        a, b = rng.randint(0, 10), rng.randint(0, 10)
        if op == "minus":
            a, b = max(a, b), min(a, b)  # no negative numbers
        result = a + b if op == "plus" else a - b
    question = rng.choice(
        ["What is {a} {op} {b}?", "How much is {a} {op} {b}?", "Can you tell me {a} {op} {b}?"]
    )
    return question.format(a=a, op=op, b=b), [
        f"{result}.",
        f"{a} {op} {b} is {result}.",
        f"The answer is {result}. {a} {op} {b} equals {result}.",
    ]


def _capital(rng: random.Random) -> Task:
    country, city = rng.choice(list(CAPITALS.items()))
    question = rng.choice(["What is the capital of {c}?", "Which city is the capital of {c}?"])
    return question.format(c=country), [
        f"{city}.",
        f"The capital of {country} is {city}.",
        f"The capital of {country} is {city}. {city} is a big city in {country}.",
    ]


def _colour(rng: random.Random) -> Task:
    thing, colour = rng.choice(list(COLOURS.items()))
    return f"What colour is {thing}?", [
        f"{_cap(colour)}.",
        f"{_cap(thing)} is {colour}.",
        f"{_cap(thing)} is usually {colour}. That is its most common colour.",
    ]


def _sound(rng: random.Random) -> Task:
    animal, (verb, noise) = rng.choice(list(SOUNDS.items()))
    question = rng.choice(["What sound does a {a} make?", "What does a {a} say?"])
    return question.format(a=animal), [
        f"{noise}!",
        f"A {animal} {verb}.",
        f"A {animal} {verb}. It goes {noise.lower()}, {noise.lower()}!",
    ]


def _opposite(rng: random.Random) -> Task:
    word, opposite = rng.sample(rng.choice(OPPOSITES), 2)  # either direction
    return f"What is the opposite of {word}?", [
        f"{_cap(opposite)}.",
        f"The opposite of {word} is {opposite}.",
        f"The opposite of {word} is {opposite}. The words {word} and {opposite} are opposites.",
    ]


def _small_talk(rng: random.Random) -> Task:
    prompts, replies = rng.choice(SMALL_TALK)
    return rng.choice(prompts), replies


def _topic(rng: random.Random) -> Task:
    topic, facts = rng.choice(list(TOPICS.items()))
    question = rng.choice(["Tell me about {t}.", "What do you know about {t}?", "Can you tell me about {t}?"])
    return question.format(t=topic), [" ".join(facts[:n]) for n in range(1, len(facts) + 1)]


def _counting(rng: random.Random) -> Task:
    start = rng.randint(1, 5)
    end = start + rng.randint(2, 6)
    numbers = ", ".join(str(i) for i in range(start, end + 1))
    if start == 1 and rng.random() < 0.5:
        question = f"Can you count to {end}?"
    else:
        question = f"Count from {start} to {end}."
    return question, [f"{numbers}.", f"Here you go: {numbers}.", f"Let me count: {numbers}. Done!"]


def _spelling(rng: random.Random) -> Task:
    word = rng.choice([w for words in CATEGORIES.values() for w in words if " " not in w])
    letters = "-".join(word.upper())
    return rng.choice([f"How do you spell {word}?", f"Spell the word {word}."]), [
        f"{letters}.",
        f"{_cap(word)} is spelled {letters}.",
        f"{_cap(word)} is spelled {letters}. It has {len(word)} letters.",
    ]


def _yes_no(rng: random.Random) -> Task:
    kind = rng.choice(["capital", "colour", "bigger"])
    truth = rng.random() < 0.5
    if kind == "capital":
        country, city = rng.choice(list(CAPITALS.items()))
        asked = city if truth else rng.choice([c for c in CAPITALS.values() if c != city])
        question = f"Is {asked} the capital of {country}?"
        fact = f"{city} is the capital of {country}"
    elif kind == "colour":
        thing, colour = rng.choice(list(COLOURS.items()))
        asked = colour if truth else rng.choice(sorted(c for c in set(COLOURS.values()) if c != colour))
        question = f"Is {thing} {asked}?"
        fact = f"{thing} is {colour}"
    else:
        a, b = rng.sample(range(11), 2)
        truth = a > b
        question = f"Is {a} bigger than {b}?"
        fact = f"{max(a, b)} is bigger than {min(a, b)}"
    if truth:
        return question, ["Yes.", f"Yes, {fact}.", f"Yes. {_cap(fact)}. I am sure about that."]
    return question, ["No.", f"No. {_cap(fact)}.", f"No, it is not. {_cap(fact)}. I am sure about that."]


def _short_list(rng: random.Random) -> Task:
    category, members = rng.choice(list(CATEGORIES.items()))
    count = rng.randint(2, 5)
    picked = rng.sample(members, count)
    listed = ", ".join(picked[:-1]) + " and " + picked[-1]
    return rng.choice([f"Name {NUMBER_WORDS[count]} {category}.", f"Please list {count} {category}."]), [
        f"{_cap(listed)}.",
        f"Here are {NUMBER_WORDS[count]} {category}: {listed}.",
        f"Here are {NUMBER_WORDS[count]} {category}: {listed}. There are many more {category} too.",
    ]


FAMILIES: dict[str, Callable[[random.Random], Task]] = {
    "arithmetic": _arithmetic, "capital": _capital, "colour": _colour, "sound": _sound,
    "opposite": _opposite, "small_talk": _small_talk, "topic": _topic, "counting": _counting,
    "spelling": _spelling, "yes_no": _yes_no, "short_list": _short_list,
}  # fmt: skip

# --- Styles: how long and how polite an answer is --------------------------------------------------------

OPENERS = ["Sure!", "Of course.", "Good question!", "Happy to help!", "Let me see."]
CLOSERS = [
    "I hope that helps.",
    "Thanks for asking!",
    "Happy to help!",
    "Please ask if you want to know more.",
]
USER_POLITE = ["Please tell me: {q}", "{q} Thanks!", "{q} Please answer.", "Hello! {q}"]

# System message -> the answer style it asks for; "normal" mixes everything.
SYSTEMS = {
    "You are a helpful assistant.": "normal",
    "You are a friendly assistant.": "normal",
    "Answer briefly.": "brief",
    "You are a concise assistant. Keep answers short.": "brief",
    "Answer in detail and be polite.": "detailed",
    "You are a polite assistant who gives full answers.": "detailed",
}


def _answer(rng: random.Random, phrasings: list[str], style: str, wrap: bool) -> str:
    """A phrasing for the style; `wrap` adds polite openers and closers (always when detailed)."""
    if style == "brief":
        return phrasings[0]
    parts = [phrasings[-1] if style == "detailed" else rng.choice(phrasings)]
    if wrap and (style == "detailed" or rng.random() < 0.2):
        parts.insert(0, rng.choice(OPENERS))
    if wrap and (style == "detailed" or rng.random() < 0.2):
        parts.append(rng.choice(CLOSERS))
    return " ".join(parts)


def _exchange(rng: random.Random, style: str) -> tuple[Message, Message]:
    family = rng.choice(list(FAMILIES))
    question, phrasings = FAMILIES[family](rng)
    task = family != "small_talk"  # small talk is already a pleasantry: no polite wrapping around it
    if task and rng.random() < 0.15:
        question = rng.choice(USER_POLITE).format(q=question)
    answer = _answer(rng, phrasings, style, wrap=task)
    return {"role": "user", "content": question}, {"role": "assistant", "content": answer}


def _dialogue(rng: random.Random) -> Dialogue:
    """One to three exchanges, a quarter of them after a system message that sets the answer style."""
    messages: Dialogue = []
    style = "normal"
    if rng.random() < 0.25:
        system = rng.choice(list(SYSTEMS))
        style = SYSTEMS[system]
        messages.append({"role": "system", "content": system})
    for _ in range(rng.choices([1, 2, 3], weights=[70, 20, 10])[0]):
        messages.extend(_exchange(rng, style))
    return messages


def generate_dialogues(n: int, seed: int = 0) -> list[Dialogue]:
    """`n` training dialogues: lists of {"role", "content"} dicts, each ending with an assistant turn."""
    rng = random.Random(seed)
    return [_dialogue(rng) for _ in range(n)]


def sample_prompts(n: int, seed: int = 0) -> list[Dialogue]:
    """`n` prompts for PPO and tests: message lists ending with a user turn.

    Same distribution as the training dialogues (system messages and earlier turns included), drawn
    from a random stream of their own, so the prompts for a seed are not the training dialogues of that
    seed cut short.
    """
    rng = random.Random(f"prompts-{seed}")
    return [_dialogue(rng)[:-1] for _ in range(n)]
