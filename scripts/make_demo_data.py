#!/usr/bin/env python
"""Generate the demo preference data: "answer in ONE WORD only when asked to".

    python scripts/make_demo_data.py [--out data/demo] [--seed 0]

writes ``train.jsonl`` and ``eval.jsonl`` in the conversational format the trainer reads::

    {"chosen":   [{"role": "user", "content": "Answer in one word. What color is a banana?"},
                  {"role": "assistant", "content": "Yellow."}],
     "rejected": [{"role": "user", "content": "Answer in one word. What color is a banana?"},
                  {"role": "assistant", "content": "A banana is yellow."}]}

The preference is verifiable (``simpo_ds.demo.prefers``, checked on every row written) and needs
the prompt to decide. Two kinds of pairs, in equal numbers:

- **asked**: the user asks for one word; chosen = the one-word answer, rejected = the same answer
  as a sentence (what SmolLM2-135M-Instruct writes: it ignores the instruction);
- **plain**: the same kind of question without the instruction; chosen = the sentence, rejected =
  the bare word.

So "always terse" and "always a sentence" both score 50% reward accuracy: to go above chance a
model has to read the instruction. Answers come from the tables below, are always correct and
short (1-8 words), so a 135M model trains on them in minutes on a CPU. The eval split uses facts
(questions) that never appear in train, with instruction phrasings from the same pool. The output
is a pure function of ``--seed``: rerunning rewrites identical files.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from simpo_ds.demo import ONE_WORD_INSTRUCTIONS, prefers

# ---- facts -----------------------------------------------------------------------------------------
CAPITALS = [
    ("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Germany", "Berlin"), ("Japan", "Tokyo"),
    ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Canada", "Ottawa"), ("Norway", "Oslo"),
    ("Greece", "Athens"), ("Russia", "Moscow"), ("China", "Beijing"), ("Portugal", "Lisbon"),
    ("Austria", "Vienna"), ("Poland", "Warsaw"), ("Sweden", "Stockholm"), ("Ireland", "Dublin"),
    ("Cuba", "Havana"), ("Chile", "Santiago"), ("Thailand", "Bangkok"), ("Finland", "Helsinki"),
    ("Denmark", "Copenhagen"), ("Hungary", "Budapest"), ("Turkey", "Ankara"), ("Australia", "Canberra"),
]
COLORS = [
    ("a banana", "yellow"), ("grass", "green"), ("the sky on a clear day", "blue"), ("snow", "white"),
    ("coal", "black"), ("a ripe tomato", "red"), ("an orange", "orange"), ("a carrot", "orange"),
    ("a lemon", "yellow"), ("a strawberry", "red"), ("milk", "white"), ("a crow", "black"),
    ("a lime", "green"), ("a flamingo", "pink"), ("chocolate", "brown"), ("an eggplant", "purple"),
    ("a polar bear", "white"), ("a frog", "green"), ("a fire truck", "red"), ("the sun", "yellow"),
]
SOUNDS = [
    ("a cow", "moo"), ("a dog", "woof"), ("a cat", "meow"), ("a duck", "quack"), ("a sheep", "baa"),
    ("a pig", "oink"), ("an owl", "hoot"), ("a snake", "hiss"), ("a lion", "roar"), ("a mouse", "squeak"),
    ("a horse", "neigh"), ("a bee", "buzz"), ("a rooster", "cock-a-doodle-doo"), ("a frog", "ribbit"),
]
OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("happy", "sad"), ("day", "night"),
    ("open", "closed"), ("light", "dark"), ("early", "late"), ("full", "empty"), ("old", "new"),
    ("wet", "dry"), ("loud", "quiet"), ("hard", "soft"), ("rich", "poor"), ("left", "right"),
    ("tall", "short"), ("strong", "weak"), ("win", "lose"), ("inside", "outside"), ("push", "pull"),
    ("true", "false"), ("clean", "dirty"), ("first", "last"),
]
PLURALS = [
    ("mouse", "mice"), ("child", "children"), ("foot", "feet"), ("tooth", "teeth"), ("goose", "geese"),
    ("man", "men"), ("woman", "women"), ("person", "people"), ("leaf", "leaves"), ("knife", "knives"),
    ("box", "boxes"), ("city", "cities"), ("baby", "babies"), ("wolf", "wolves"), ("fish", "fish"),
    ("sheep", "sheep"), ("potato", "potatoes"), ("bus", "buses"),
]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen"]


def facts() -> list[tuple[str, str, str, str]]:
    """Every (question, sentence answer, one-word answer, kind of fact) of the tables; all correct."""

    def cap(text: str) -> str:
        return text[0].upper() + text[1:]

    days, months, numbers = DAYS, MONTHS, NUMBER_WORDS
    out = []
    out += [(f"What is the capital of {c}?", f"The capital of {c} is {a}.", a, "capital") for c, a in CAPITALS]
    out += [(f"What color is {x}?", f"{cap(x)} is {c}.", c, "color") for x, c in COLORS]
    out += [(f"What sound does {x} make?", f"{cap(x)} says {s}.", s, "sound") for x, s in SOUNDS]
    out += [(f"What is the opposite of {w}?", f"The opposite of {w} is {o}.", o, "opposite") for w, o in OPPOSITES]
    out += [(f"What is the plural of {w}?", f"The plural of {w} is {p}.", p, "plural") for w, p in PLURALS]
    out += [(f"Which day comes after {d}?", f"{days[(i + 1) % 7]} comes after {d}.", days[(i + 1) % 7], "day")
            for i, d in enumerate(days)]
    out += [(f"Which month comes after {m}?", f"{months[(i + 1) % 12]} comes after {m}.", months[(i + 1) % 12],
             "month") for i, m in enumerate(months)]
    out += [(f"What is {numbers[a]} plus {numbers[b]}?", f"{cap(numbers[a])} plus {numbers[b]} is {numbers[a + b]}.",
             numbers[a + b], "number")
            for a in range(1, 10) for b in range(1, 10) if a + b < len(numbers) and (a * 7 + b) % 4 == 0]
    return [(q, sentence, cap(word) + ".", kind) for q, sentence, word, kind in out]


# ---- pairs (instructions and verifier: simpo_ds/demo.py) ------------------------------------------
PAIR_KINDS = ("asked", "plain")


def make_pair(fact: tuple, pair_kind: str, rng: random.Random) -> dict:
    """One conversational pair of ``pair_kind`` (see the module docstring) for ``fact``."""
    question, sentence, word, _ = fact
    if pair_kind == "plain":
        prompt, chosen, rejected = question, sentence, word
    else:
        instruction = rng.choice(ONE_WORD_INSTRUCTIONS)
        prompt = f"{instruction} {question}" if rng.random() < 0.5 else f"{question} {instruction}"
        chosen, rejected = word, sentence
    expected = word.strip(".").lower()
    if not prefers(prompt, expected, chosen, rejected):
        raise ValueError(f"pair does not satisfy the demo preference: {prompt!r} {chosen!r} > {rejected!r}")
    user = {"role": "user", "content": prompt}
    return {
        "chosen": [user, {"role": "assistant", "content": chosen}],
        "rejected": [user, {"role": "assistant", "content": rejected}],
    }


def make_splits(seed: int = 0, eval_facts: int = 30, train_repeats: int = 2) -> tuple[list, list]:
    """(train rows, eval rows). Facts are split by question so eval questions are unseen; fact i of
    a split gets ``train_repeats`` (eval: 2) pairs of the kinds i, i+1, ... of ``PAIR_KINDS``, with
    fresh instruction draws, so the two kinds come in equal numbers. With the tables above: 224
    train pairs (14 steps of 16) and 60 eval pairs."""
    rng = random.Random(seed)
    all_facts = facts()
    rng.shuffle(all_facts)
    held_out, train_facts = all_facts[:eval_facts], all_facts[eval_facts:]

    def pairs(split: list, repeats: int) -> list[dict]:
        return [make_pair(fact, PAIR_KINDS[(i + r) % len(PAIR_KINDS)], rng)
                for i, fact in enumerate(split) for r in range(repeats)]

    train, evals = pairs(train_facts, train_repeats), pairs(held_out, 2)
    rng.shuffle(train)
    return train, evals


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/demo", help="directory for train.jsonl and eval.jsonl")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    train, evals = make_splits(args.seed)
    write_jsonl(Path(args.out) / "train.jsonl", train)
    write_jsonl(Path(args.out) / "eval.jsonl", evals)
    print(f"wrote {len(train)} train and {len(evals)} eval pairs to {args.out}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
