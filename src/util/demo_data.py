"""A synthetic question-answering set in SQuAD's nested format, generated offline from a seed.

    data = generate_squad(num_contexts=100, seed=0)   # {"version", "data": [{"title", "paragraphs"}]}
    write_squad(data, "train.json")                 # readable by the task scripts' --train_file

Each context describes a few invented people in several sentences, shuffled, with distractors:
the other people's facts (other cities, names, years) and filler sentences about places. Each
kind of fact is stated once per context, so a question is answered by finding its fact among the
distractors (not by telling apart two people with the same kind of fact, which a model trained
for minutes on a CPU does not learn). The answer is copied from the context, and `answer_start`
is its character offset there, as in SQuAD. Invented names give the tokenizer thousands of word pieces,
so the output head costs what it does in real T5.
"""

import json
import random
from typing import Dict, List, Tuple

_ONSETS = ("b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr",
           "kr", "st", "th", "sh", "ch", "tr")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ei", "ou", "y")
_CODAS = ("", "", "", "n", "r", "l", "s", "th", "m", "x")

OCCUPATIONS = ("baker", "teacher", "pilot", "farmer", "nurse", "painter", "carpenter", "doctor", "lawyer",
               "tailor", "sailor", "miner", "potter", "weaver", "jeweller", "butcher", "chemist", "dentist",
               "gardener", "librarian", "musician", "engineer", "architect", "fisherman", "blacksmith")
INSTRUMENTS = ("violin", "cello", "flute", "harp", "piano", "trumpet", "drums", "guitar", "oboe", "clarinet",
               "trombone", "accordion", "banjo", "lute", "bagpipes")
COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "black", "white", "grey", "brown", "pink",
           "silver", "golden", "crimson", "turquoise")
ANIMALS = ("dog", "cat", "horse", "parrot", "goat", "rabbit", "tortoise", "donkey")

# relation -> (fact sentence, question); {p} the person, {v} the answer, {a} an extra slot.
# The answer is never next to punctuation, so it is the same word piece in context and answer.
RELATIONS = {
    "birthplace": ("{p} was born in {v} and grew up there.", "Where was {p} born?"),
    "job": ("{p} works as a {v} in the old town.", "Which job does {p} have?"),
    "instrument": ("{p} plays the {v} every evening.", "Which instrument does {p} play?"),
    "colour": ("{p} likes the colour {v} most of all.", "Which colour does {p} like most?"),
    "pet": ("{p} has a {a} called {v} at home.", "What is the {a} of {p} called?"),
    "year": ("{p} moved to {a} in {v} with the family.", "When did {p} move to {a} with the family?"),
    "street": ("{p} lives on {v} near the park.", "On which street does {p} live?"),
}
FILLERS = (
    "The winters in {c} are long and cold.",
    "{c} is famous for its old bridges.",
    "Many travellers pass through {c} in spring.",
    "The market of {c} opens every morning.",
    "A river runs between {c} and {d}.",
)


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)) + rng.choice(_CODAS)


def _lexicon(rng: random.Random, count: int, low: int, high: int) -> List[str]:
    """`count` distinct capitalised invented words of low..high syllables."""
    words = set()
    while len(words) < count:
        words.add(_word(rng, rng.randint(low, high)).capitalize())
    return sorted(words)


class _World:
    """The names a data set draws from (fixed by the seed, shared by train and evaluation)."""

    def __init__(self, seed: int):
        rng = random.Random(seed)
        self.first = _lexicon(rng, 400, 1, 2)
        self.last = _lexicon(rng, 400, 2, 3)
        self.cities = _lexicon(rng, 400, 2, 3)
        self.pets = _lexicon(rng, 200, 1, 2)
        self.streets = _lexicon(rng, 150, 2, 2)

    def value(self, rng: random.Random, relation: str) -> Tuple[str, str]:
        """(answer, extra slot) for one fact."""
        if relation == "birthplace":
            return rng.choice(self.cities), ""
        if relation == "job":
            return rng.choice(OCCUPATIONS), ""
        if relation == "instrument":
            return rng.choice(INSTRUMENTS), ""
        if relation == "colour":
            return rng.choice(COLOURS), ""
        if relation == "pet":
            return rng.choice(self.pets), rng.choice(ANIMALS)
        if relation == "year":
            return str(rng.randint(1800, 2020)), rng.choice(self.cities)
        return f"{rng.choice(self.streets)} Street", ""


def _context(rng: random.Random, world: _World, people: int, facts: int, fillers: int):
    """(context, facts as (person, relation, answer, extra, answer_start))."""
    names = set()
    while len(names) < people:
        names.add(f"{rng.choice(world.first)} {rng.choice(world.last)}")
    names = sorted(names)
    # each relation is stated once; the other people's facts (cities, names, years) are distractors
    relations = rng.sample(sorted(RELATIONS), people * facts)
    sentences = []
    for p, person in enumerate(names):
        for relation in relations[p * facts : (p + 1) * facts]:
            answer, extra = world.value(rng, relation)
            template = RELATIONS[relation][0]
            sentences.append((template.format(p=person, v=answer, a=extra), (person, relation, answer, extra)))
    for _ in range(fillers):
        filler = rng.choice(FILLERS).format(c=rng.choice(world.cities), d=rng.choice(world.cities))
        sentences.append((filler, None))
    rng.shuffle(sentences)

    text, found = "", []
    for sentence, fact in sentences:
        start = len(text) + (1 if text else 0)
        text = f"{text} {sentence}" if text else sentence
        if fact is not None:
            person, relation, answer, extra = fact
            # the answer's offset in its sentence: the length of the template's text before {v}
            offset = len(RELATIONS[relation][0].split("{v}")[0].format(p=person, a=extra))
            found.append((person, relation, answer, extra, start + offset))
    return text, found


def generate_squad(num_contexts: int, seed: int = 0, questions_per_context: int = 2, people: int = 3,
                   facts_per_person: int = 2, fillers: int = 1, world_seed: int = 12345) -> Dict:
    """SQuAD v1.1-style data: {"version", "data": [{"title", "paragraphs": [{"context", "qas"}]}]}.

    `seed` draws the contexts and questions; `world_seed` the invented names, so that a training
    and an evaluation set generated with different seeds share one world.
    """
    if num_contexts < 1 or questions_per_context < 1 or people < 2 or facts_per_person < 1:
        raise ValueError("generate_squad needs num_contexts, questions_per_context, facts_per_person >= 1 and people >= 2.")
    if people * facts_per_person > len(RELATIONS):
        raise ValueError(f"people x facts_per_person = {people * facts_per_person} exceeds the {len(RELATIONS)} relations.")
    world = _World(world_seed)
    rng = random.Random(seed)
    articles = []
    for c in range(num_contexts):
        context, facts = _context(rng, world, people, facts_per_person, fillers)
        qas = []
        for q, (person, relation, answer, extra, start) in enumerate(rng.sample(facts, min(questions_per_context, len(facts)))):
            qas.append({
                "id": f"s{seed}-c{c}-q{q}",
                "question": RELATIONS[relation][1].format(p=person, a=extra),
                "answers": [{"text": answer, "answer_start": start}],
            })
        articles.append({"title": f"context {c}", "paragraphs": [{"context": context, "qas": qas}]})
    return {"version": "synthetic-1.0", "data": articles}


def write_squad(data: Dict, path: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle)


# ----- data-to-text: a record of invented facts -> a few templated sentences ---------------------
# Each record names a person, a style and 4 or 5 facts in random order; the text states the facts in
# the fixed order below, in the style's templates. Once a sentence has begun, its function words
# follow from the template (easy tokens for a shallow layer); the style, the names and the numbers
# must be read from the record (the encoder). {p}: the person (full name first, then the surname),
# {v}: the value, {a}: "a" or "an" before the value.
BIO_STYLES = ("formal", "plain", "news")
BIO_RELATIONS = {
    "born": ("{p} was born in the year {v}.", "{p} was born in {v}.", "In {v}, {p} was born."),
    "from": ("{p} was raised in the town of {v}.", "{p} grew up in {v}.", "{p} is from {v}."),
    "job": ("By profession, {p} was {a} {v}.", "{p} worked as {a} {v}.", "{p} is {a} {v} by trade."),
    "plays": ("{p} played the {v} with great skill.", "{p} could play the {v}.", "{p} plays the {v}."),
    "children": ("{p} had {v} children.", "{p} raised {v} children.", "{p} has {v} children."),
    "prize": ("{p} was awarded the {v}.", "{p} won the {v}.", "{p} received the {v}."),
    "height": ("{p} stood {v} centimetres tall.", "{p} was {v} cm tall.", "{p} measures {v} cm."),
    "died": ("{p} died in the year {v}.", "{p} passed away in {v}.", "{p} died in {v}."),
}
PRIZES = ("Prize", "Medal", "Award", "Cup")


def _bio_value(rng: random.Random, world: _World, relation: str) -> str:
    if relation in ("born", "died"):
        return str(rng.randint(1700, 1999))
    if relation == "from":
        return rng.choice(world.cities)
    if relation == "job":
        return rng.choice(OCCUPATIONS)
    if relation == "plays":
        return rng.choice(INSTRUMENTS)
    if relation == "children":
        return str(rng.randint(2, 12))
    if relation == "prize":
        return f"{rng.choice(world.cities)} {rng.choice(PRIZES)}"
    return str(rng.randint(140, 210))  # height


def bio_example(rng: random.Random, world: _World, min_facts: int = 4, max_facts: int = 5,
                min_words: int = 20) -> Tuple[str, str]:
    """(record, text) of one invented person; drawn again until the text has min_words words (each
    word is at least one token, so the text is at least min_words tokens long)."""
    while True:
        record, text = _bio_draw(rng, world, min_facts, max_facts)
        if len(text.split()) >= min_words:
            return record, text


def _bio_draw(rng: random.Random, world: _World, min_facts: int, max_facts: int) -> Tuple[str, str]:
    first, last = rng.choice(world.first), rng.choice(world.last)
    style = rng.randrange(len(BIO_STYLES))
    chosen = rng.sample(sorted(BIO_RELATIONS), rng.randint(min_facts, max_facts))
    facts = {relation: _bio_value(rng, world, relation) for relation in chosen}
    fields = [f"{relation}: {facts[relation]}" for relation in chosen]  # chosen is in random order
    record = " ; ".join([f"name: {first} {last}", f"style: {BIO_STYLES[style]}"] + fields)
    sentences = []
    for relation in BIO_RELATIONS:  # the text's order is fixed, the record's is not
        if relation in facts:
            value = facts[relation]
            person = f"{first} {last}" if not sentences else last
            article = "an" if value[0] in "aeiou" else "a"
            sentences.append(BIO_RELATIONS[relation][style].format(p=person, v=value, a=article))
    return record, " ".join(sentences)


def generate_bios(num_examples: int, seed: int = 0, min_facts: int = 4, max_facts: int = 5,
                  min_words: int = 20, world_seed: int = 12345) -> List[Dict[str, str]]:
    """Rows {"id", "text" (the record), "summary" (the sentences)}: the summarization columns.

    `seed` draws the examples; `world_seed` the invented names, shared by training and evaluation.
    """
    if num_examples < 1:
        raise ValueError(f"generate_bios needs num_examples >= 1, got {num_examples}.")
    if not 1 <= min_facts <= max_facts <= len(BIO_RELATIONS):
        raise ValueError(f"generate_bios needs 1 <= min_facts <= max_facts <= {len(BIO_RELATIONS)}, "
                         f"got {min_facts} and {max_facts}.")
    world = _World(world_seed)
    rng = random.Random(seed)
    rows = []
    for i in range(num_examples):
        record, text = bio_example(rng, world, min_facts, max_facts, min_words)
        rows.append({"id": f"s{seed}-{i}", "text": record, "summary": text})
    return rows


def write_jsonl(rows: List[Dict], path: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
