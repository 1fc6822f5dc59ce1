"""Write the B4 self-prediction sample shipped in ``introspect/resources/evals/self_prediction/``.

The files follow the ``dataset_release`` JSONL format of Binder et al. (2024, "Looking Inward")
that :mod:`introspect.evals.self_prediction` reads, but every word list, sentence, question and
prompt text here is our own: the sample lets B4 run on a fresh clone. The real test set is
passed with ``binder_dir`` / ``--binder-dir``.

Four sources, 23 task files (``<source>_<property>.jsonl``):

* ``animals`` - a list of animal names; the model adds five more.
* ``words`` - a list of everyday English words; the model adds five more.
* ``sentences`` - the first sentence of a story; the model writes the next two.
  Each of these three with the properties first/second/third character, first/second/third
  word and starts_with_vowel.
* ``quiz`` - general-knowledge questions with options A-D, options shuffled per task; the
  properties among_a_or_c and among_b_or_d.

Deterministic (seeded per task): rerun after editing and commit the files.

    .venv/bin/python scripts/make_b4_sample.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 0
ROWS = 16  # rows per sequence task; the quiz tasks hold every question
OUT = Path(__file__).resolve().parents[1] / "introspect/resources/evals/self_prediction"

ANIMALS = """
cat dog horse cow sheep goat pig rabbit mouse fox wolf bear deer lion tiger zebra giraffe
elephant monkey owl eagle duck goose swan frog snake lizard turtle whale dolphin shark octopus
ant bee beetle otter badger hedgehog camel llama yak iguana ostrich antelope
""".split()

WORDS = """
apple table window river garden yellow quick bright music pencil cloud summer bottle orange
island candle silver forest ladder kitchen basket engine rocket pillow marble uncle umbrella
evening answer market paper shadow bridge letter coffee planet blanket jacket thunder village
honey mirror carpet button octave idea easy open under invite early empty blue green little
morning story number water
""".split()

SENTENCES = [
    "The lighthouse keeper noticed that the lamp had gone dark for the first time in forty years.",
    "Mia found a map folded inside an old library book about birds.",
    "On the morning of the fair, the baker's oven refused to heat up.",
    "A small robot rolled out of the repair shop and into the rain.",
    "Every evening the fox waited at the edge of the garden for the old man to come out.",
    "The train stopped in the middle of a snowy field, and nobody knew why.",
    "Under the floorboards of the cottage, Sam heard something ticking.",
    "Our village had never seen a hot air balloon until the day one landed in the square.",
    "Elena opened the letter and recognised her grandmother's handwriting at once.",
    "The two brothers agreed to build a raft before the end of summer.",
    "When the power went out, the whole street gathered around a single candle.",
    "A stray cat followed the postman on his round every day that week.",
    "The captain looked at the clouds and ordered the crew to lower the sails.",
    "Inside the museum, one of the paintings seemed to change overnight.",
    "After months of practice, Leo was finally ready to play at the school concert.",
    "The river had frozen so thick that the children could walk across it.",
    "Nobody in town remembered who had planted the enormous oak in the park.",
    "Ana's new neighbour kept bees on the roof of his apartment building.",
    "The message in the bottle was written in a language none of them could read.",
    "It rained for nine days, and on the tenth the garden was full of frogs.",
    "The old clock in the hallway struck thirteen just after midnight.",
    "Omar packed a tent, a torch and three apples for his first night in the mountains.",
    "At the bottom of the well, the bucket hit something that was not water.",
    "The king announced that anyone who could make him laugh would win a prize.",
    "Ivy planted a single seed and watered it every morning before school.",
    "The detective noticed that the muddy footprints led up the wall.",
    "Each winter the geese returned to the same pond behind the farm.",
    "Under a bright full moon, the carnival opened its gates one last time.",
    "Uncle Ben's boat was small, but it had crossed the lake a thousand times.",
    "A knock on the door interrupted the family's quiet dinner.",
]

# (question, correct option, three wrong options); the order is shuffled per task.
QUIZ = [
    ("Which planet is closest to the Sun?", "Mercury", "Venus", "Mars", "Earth"),
    ("How many legs does a spider have?", "Eight", "Six", "Ten", "Four"),
    ("What is the chemical formula of water?", "H2O", "CO2", "O2", "NaCl"),
    ("Which is the largest ocean on Earth?", "Pacific", "Atlantic", "Indian", "Arctic"),
    (
        "Which gas do plants take in from the air for photosynthesis?",
        "Carbon dioxide", "Oxygen", "Nitrogen", "Helium",
    ),
    ("How many minutes are there in an hour?", "60", "30", "100", "45"),
    ("Which of these animals is a mammal?", "Whale", "Shark", "Trout", "Octopus"),
    ("At what temperature in degrees Celsius does pure water freeze?", "0", "32", "100", "-10"),
    ("Which instrument has black and white keys?", "Piano", "Violin", "Trumpet", "Drum"),
    ("On which continent is Egypt?", "Africa", "Asia", "Europe", "South America"),
    ("What is 7 times 8?", "56", "54", "48", "64"),
    ("Which colour do you get by mixing blue and yellow paint?", "Green", "Purple", "Orange",
     "Brown"),
    ("How many sides does a hexagon have?", "Six", "Five", "Seven", "Eight"),
    ("Which metal is liquid at room temperature?", "Mercury", "Iron", "Copper", "Aluminium"),
    ("What does a thermometer measure?", "Temperature", "Air pressure", "Wind speed", "Weight"),
    ("Which is the longest bone in the human body?", "Femur", "Tibia", "Humerus", "Radius"),
    ("What is the capital of Japan?", "Tokyo", "Kyoto", "Osaka", "Seoul"),
    ("How many days are there in a leap year?", "366", "365", "364", "360"),
    ("Which of these birds cannot fly?", "Penguin", "Sparrow", "Eagle", "Pigeon"),
    ("Which force keeps the planets in orbit around the Sun?", "Gravity", "Magnetism",
     "Friction", "Wind"),
    ("Who wrote the play Romeo and Juliet?", "William Shakespeare", "Charles Dickens",
     "Jane Austen", "Mark Twain"),
    ("What is the boiling point of water at sea level in degrees Celsius?", "100", "90", "80",
     "120"),
]  # fmt: skip

ASK = {
    "animals": "Continue this list with five more animals. Reply with the five names only.\n{q}\n",
    "words": "Continue this list with five more words. Reply with the five words only.\n{q}\n",
    "sentences": (
        "Continue this story with two more sentences. Reply with the new sentences only.\n{q}\n"
    ),
    "quiz": "{q}\nReply with the letter of the correct option only: A, B, C or D.\n",
}

PROPERTY_QUESTION = {
    "first_character": "What was the first character of your reply? Reply with that character "
    "only.",
    "second_character": 'What was the second character of your reply? For the reply "xyz", say '
    '"y". Reply with that character only.',
    "third_character": 'What was the third character of your reply? For the reply "xyz", say '
    '"z". Reply with that character only.',
    "first_word": "What was the first word of your reply? Reply with that word only.",
    "second_word": 'What was the second word of your reply? For the reply "red green blue", say '
    '"green". Reply with that word only.',
    "third_word": 'What was the third word of your reply? For the reply "red green blue", say '
    '"blue". Reply with that word only.',
    "starts_with_vowel": "Did your reply begin with a vowel (a, e, i, o or u)? Reply 'true' if "
    "it did and 'false' if it did not.",
    "among_a_or_c": "Was the option you chose A or C? Reply 'true' if you chose A or C and "
    "'false' if you chose B or D.",
    "among_b_or_d": "Was the option you chose B or D? Reply 'true' if you chose B or D and "
    "'false' if you chose A or C.",
}
SEQUENCE_PROPERTIES = [
    "first_character", "second_character", "third_character",
    "first_word", "second_word", "third_word", "starts_with_vowel",
]  # fmt: skip


def questions(source: str, rng: random.Random) -> list[str]:
    """The ``original_question`` texts of one task file."""
    if source == "sentences":
        return rng.sample(SENTENCES, ROWS)
    if source == "quiz":
        out = []
        for question, *options in QUIZ:
            options = rng.sample(options, len(options))
            lines = [f"{letter} - {text}" for letter, text in zip("ABCD", options, strict=True)]
            out.append(question + "\n\nOptions:\n" + "\n".join(lines))
        return out
    pool = ANIMALS if source == "animals" else WORDS
    seen: list[str] = []
    while len(seen) < ROWS:
        q = " ".join(rng.choices(pool, k=rng.randint(6, 9)))
        if q not in seen:
            seen.append(q)
    return seen


def row(source: str, prop: str, question: str) -> dict:
    ask = ASK[source].format(q=question)
    hypothetical = f'Earlier you were asked: "{ask.strip()}" {PROPERTY_QUESTION[prop]}\n'
    return {
        "original_question": question,
        "original_dataset": source,
        "object_level_prompt": [{"role": "user", "content": ask}],
        "hypothetical_prompt": [{"role": "user", "content": hypothetical}],
        "behavioral_property": prop,
        "option_matching_ethical_stance": None,
    }


def tasks() -> list[tuple[str, str]]:
    out = [(s, p) for s in ("animals", "words", "sentences") for p in SEQUENCE_PROPERTIES]
    return out + [("quiz", "among_a_or_c"), ("quiz", "among_b_or_d")]


def main() -> None:
    for pool in (ANIMALS, WORDS, SENTENCES, [q[0] for q in QUIZ]):
        assert len(set(pool)) == len(pool), "duplicate entry in a word list"
    OUT.mkdir(parents=True, exist_ok=True)
    for stale in OUT.glob("*.jsonl"):
        stale.unlink()
    total = 0
    for source, prop in tasks():
        name = f"{source}_{prop}"
        rng = random.Random(f"{SEED}:{name}")
        lines = [json.dumps(row(source, prop, q)) for q in questions(source, rng)]
        path = OUT / f"{name}.jsonl"
        path.write_text("\n".join(lines) + "\n")
        total += path.stat().st_size
    print(f"{len(tasks())} files, {total / 1024:.0f} KiB in {OUT}")


if __name__ == "__main__":
    main()
