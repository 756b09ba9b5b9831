"""A built-in synthetic English corpus, so the quickstart and the tests need no download.

Short stories from a small grammar: each story keeps its characters, objects and places, tells a little event,
and often does some counting ("Mia had 3 apples. Tom gave her 2 more. Now Mia has 5 apples."). The text has
structure at several ranges (spelling, agreement, entity coherence within a document, arithmetic), so a small
model's validation loss falls quickly and keeps falling. Generation is deterministic for a seed.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

_GIRLS = ["Mia", "Lily", "Sara", "Anna", "Nora", "Emma", "Zoe", "Ella", "Ruby", "Lucy", "Maya", "Ivy"]
_BOYS = ["Tom", "Ben", "Max", "Leo", "Sam", "Jack", "Finn", "Noah", "Owen", "Theo", "Luke", "Adam"]
_ANIMALS = ["dog", "cat", "bird", "fox", "rabbit", "duck", "frog", "horse", "mouse", "bear", "owl", "goat"]
_OBJECTS = ["ball", "kite", "book", "box", "hat", "drum", "boat", "cup", "shoe", "map", "bell", "lamp"]
_FOODS = ["apples", "cookies", "plums", "carrots", "eggs", "cakes", "pears", "nuts", "grapes", "buns"]
_COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "pink", "brown", "white", "black"]
_SIZES = ["big", "small", "tiny", "huge", "little", "tall", "round", "soft", "old", "shiny"]
_PLACES = [
    "park",
    "garden",
    "beach",
    "forest",
    "kitchen",
    "school",
    "river",
    "farm",
    "hill",
    "market",
    "lake",
]
_FEELINGS = ["happy", "sad", "tired", "excited", "scared", "proud", "calm", "curious", "angry", "surprised"]
_WEATHER = ["sunny", "rainy", "windy", "cold", "warm", "cloudy", "snowy", "bright"]
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_TIMES = ["morning", "afternoon", "evening"]
_VERBS_PAST = ["found", "lost", "painted", "carried", "washed", "hid", "dropped", "fixed", "opened", "shared"]
_MOVES = ["ran", "walked", "jumped", "hopped", "danced", "raced", "skipped", "rolled", "climbed", "swam"]
_NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def _person(rng: random.Random) -> tuple[str, str, str, str]:
    """(name, subject pronoun, object pronoun, possessive)."""
    if rng.random() < 0.5:
        return rng.choice(_GIRLS), "she", "her", "her"
    return rng.choice(_BOYS), "he", "him", "his"


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _counting(rng: random.Random, name: str, friend: str, obj_pron: str) -> list[str]:
    food = rng.choice(_FOODS)
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    if rng.random() < 0.5 or a <= b:
        return [
            f"{name} had {a} {food}.",
            f"{friend} gave {obj_pron} {b} more.",
            f"Now {name} has {a + b} {food}.",
        ]
    return [
        f"{name} had {a} {food}.",
        f"{name} gave {b} {food} to {friend}.",
        f"Now {name} has {a - b} {food} and {friend} has {b}.",
    ]


def story(rng: random.Random) -> str:
    """One document: a few sentences about one hero, a friend, an animal, an object and a place."""
    name, subj, obj_pron, poss = _person(rng)
    friend, f_subj, _, _ = _person(rng)
    while friend == name:
        friend, f_subj, _, _ = _person(rng)
    animal, thing, place = rng.choice(_ANIMALS), rng.choice(_OBJECTS), rng.choice(_PLACES)
    color, size = rng.choice(_COLORS), rng.choice(_SIZES)
    feeling, later_feeling = rng.choice(_FEELINGS), rng.choice(_FEELINGS)
    sentences = [
        rng.choice(
            [
                f"On {rng.choice(_DAYS)} {rng.choice(_TIMES)}, {name} went to the {place}.",
                f"It was {_a(rng.choice(_WEATHER))} day, and {name} went to the {place}.",
                f"Once upon a time, there was a child named {name} who lived near the {place}.",
            ]
        ),
        f"{_cap(subj)} had {_a(size)} {color} {thing}.",
    ]
    events = [
        [
            f"At the {place}, {name} saw {_a(animal)}.",
            f"The {animal} {rng.choice(_MOVES)} to {name} and looked at the {thing}.",
            f"{name} felt {feeling}.",
        ],
        [
            f"{name} met {friend} at the {place}.",
            f'{friend} said, "Can I play with your {thing}?"',
            f"{name} said yes, and {f_subj} was {feeling}.",
        ],
        [
            f"Then {name} {rng.choice(_VERBS_PAST)} the {thing}.",
            f"{_cap(poss)} {animal} {rng.choice(_MOVES)} around the {place}.",
            f'"Look at my {color} {thing}!" said {name}.',
        ],
    ]
    rng.shuffle(events)
    for event in events[: rng.randint(1, 3)]:
        sentences.extend(event)
    if rng.random() < 0.6:
        sentences.extend(_counting(rng, name, friend, obj_pron))
    if rng.random() < 0.4:
        n = rng.randint(2, 10)
        sentences.append(f"{name} counted {_NUMBER_WORDS[n]} {animal}s by the {place}.")
    sentences.append(
        rng.choice(
            [
                f"At the end of the day, {name} was {later_feeling}.",
                f"{name} and {friend} went home, {later_feeling} and ready for bed.",
                f"The {animal} stayed at the {place}, and {name} went home with the {thing}.",
            ]
        )
    )
    return " ".join(sentences)


def generate_stories(num_documents: int, *, seed: int = 0) -> Iterator[str]:
    """``num_documents`` stories, the same ones for the same seed."""
    rng = random.Random(seed)
    for _ in range(num_documents):
        yield story(rng)
