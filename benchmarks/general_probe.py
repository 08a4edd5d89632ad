"""Candidate general-knowledge questions with checkable answers, for benchmarks/lifelong_base.py.

Short factual completions (capitals, opposites, plurals, colours), sequences (numbers, days, months, letters),
and the same facts asked as chat instructions, answered in a sentence. (Arithmetic is left out: SmolLM2-135M
answered none of 27 single-digit additions, so there is nothing of it to keep.) The benchmark keeps the candidates the base
answers correctly (greedy, exact match: its answer's tokens are the greedy continuation) and measures, after
every stage, how many of those an arm still answers: the base's knowledge kept. Every candidate is written here,
in code: nothing is downloaded.
"""
from __future__ import annotations

from dataclasses import dataclass

CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
    ("China", "Beijing"), ("Russia", "Moscow"), ("England", "London"), ("the United Kingdom", "London"),
    ("Egypt", "Cairo"), ("Greece", "Athens"), ("Portugal", "Lisbon"), ("Austria", "Vienna"), ("Ireland", "Dublin"),
    ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Denmark", "Copenhagen"),
    ("Poland", "Warsaw"), ("Hungary", "Budapest"), ("the Czech Republic", "Prague"), ("Belgium", "Brussels"),
    ("the Netherlands", "Amsterdam"), ("Canada", "Ottawa"), ("Mexico", "Mexico City"), ("Argentina", "Buenos Aires"),
    ("Peru", "Lima"), ("Chile", "Santiago"), ("Colombia", "Bogot"), ("Venezuela", "Caracas"), ("Cuba", "Havana"),
    ("India", "New Delhi"), ("Pakistan", "Islamabad"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"),
    ("South Korea", "Seoul"), ("North Korea", "Pyongyang"), ("Indonesia", "Jakarta"), ("the Philippines", "Manila"),
    ("Iran", "Tehran"), ("Iraq", "Baghdad"), ("Turkey", "Ankara"), ("Saudi Arabia", "Riyadh"), ("Israel", "Jerusalem"),
    ("Kenya", "Nairobi"), ("Nigeria", "Abuja"), ("Ethiopia", "Addis Ababa"), ("Morocco", "Rabat"),
    ("Australia", "Canberra"), ("New Zealand", "Wellington"), ("the United States", "Washington"),
    ("Ukraine", "Kyiv"), ("Romania", "Bucharest"), ("Bulgaria", "Sofia"), ("Switzerland", "Bern"),
    ("Scotland", "Edinburgh"), ("Wales", "Cardiff"), ("Afghanistan", "Kabul"), ("Syria", "Damascus"),
    ("Lebanon", "Beirut"),
]
OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("day", "night"), ("black", "white"), ("yes", "no"),
    ("left", "right"), ("fast", "slow"), ("happy", "sad"), ("good", "bad"), ("old", "young"), ("light", "dark"),
    ("rich", "poor"), ("strong", "weak"), ("early", "late"), ("wet", "dry"), ("full", "empty"), ("high", "low"),
    ("true", "false"), ("love", "hate"), ("war", "peace"), ("win", "lose"), ("inside", "outside"),
    ("north", "south"), ("east", "west"), ("open", "closed"), ("hard", "soft"), ("heavy", "light"),
]
PLURALS = [
    ("mouse", "mice"), ("child", "children"), ("man", "men"), ("woman", "women"), ("foot", "feet"),
    ("tooth", "teeth"), ("goose", "geese"), ("person", "people"), ("cat", "cats"), ("dog", "dogs"),
    ("box", "boxes"), ("city", "cities"), ("leaf", "leaves"), ("knife", "knives"), ("ox", "oxen"),
]
COLOURS = [
    ("the sky", "blue"), ("grass", "green"), ("snow", "white"), ("coal", "black"), ("a banana", "yellow"),
    ("blood", "red"), ("an orange", "orange"), ("a lemon", "yellow"), ("milk", "white"), ("a tomato", "red"),
]
NUMBER_WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
                "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
LETTERS = [chr(c) for c in range(ord("A"), ord("Z") + 1)]


@dataclass(frozen=True)
class Question:
    prompt: str
    answer: str  # with its leading space where the prompt ends before a word
    kind: str


def _sequence(items: list[str], kind: str, shown: int = 3, wrap: bool = False) -> list[Question]:
    """"one, two, three," → " four": every run of ``shown`` consecutive items and the next one."""
    questions = []
    stop = len(items) if wrap else len(items) - shown
    for start in range(stop):
        run = [items[(start + i) % len(items)] for i in range(shown + 1)]
        questions.append(Question(", ".join(run[:-1]) + ",", " " + run[-1], kind))
    return questions


def _chat(user: str) -> str:
    """A ChatML turn (SmolLM2's template) asking ``user``, the assistant's answer to follow."""
    return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def candidate_questions() -> list[Question]:
    questions = [Question(f"The capital of {country} is", f" {city}", "capital") for country, city in CAPITALS]
    questions += [Question(f"The opposite of {word} is", f" {other}", "opposite") for word, other in OPPOSITES]
    questions += [Question(f"The plural of {word} is", f" {plural}", "plural") for word, plural in PLURALS]
    questions += [Question(f"The color of {thing} is", f" {colour}", "colour") for thing, colour in COLOURS]
    questions += _sequence(NUMBER_WORDS, "sequence")
    questions += _sequence(DAYS, "sequence", wrap=True)
    questions += _sequence(MONTHS, "sequence", wrap=True)
    questions += _sequence(LETTERS, "sequence")
    questions += _sequence([str(n) for n in range(1, 31)], "sequence", shown=4)
    questions += [Question(_chat(f"What is the capital of {country}?"), f"The capital of {country} is {city}.",
                           "instruction") for country, city in CAPITALS]
    questions += [Question(_chat(f"What is the opposite of {word}?"), f"The opposite of {word} is {other}.",
                           "instruction") for word, other in OPPOSITES]
    return questions
