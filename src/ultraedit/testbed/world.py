"""A seeded fictional encyclopedia: invented entities, a dozen relations, several templates each.

The world is what the testbed model is trained on and what its edits are drawn from:

* **entities** of eight types (people, cities, countries, companies, languages, professions,
  instruments, industries); names are invented from syllables, so no real knowledge helps;
* **relations** (``born in``, ``works for``, ``capital of``, ...), each a map from a subject type to
  an object type with natural-language templates. Templates marked ``held_out`` are never trained
  on: they are the paraphrases that measure generalization. Held-out templates only use words
  that trained templates use (checked), so they are new wordings, not new vocabulary;
* **facts** ``(subject, relation, object)``. Objects are drawn from a Zipf-like distribution, so
  many facts share an answer, as in real knowledge.

:func:`split_world` divides the facts into a *locality pool* (never edited: the probes of
specificity) and *edit requests* (a fact with a new, plausible object of the same type, drawn
from the relation's own object distribution). :func:`write_datasets` writes them in our JSONL
request format and in the ZsRE and CounterFact formats (see ``datasets.md``).

Everything is a pure function of :class:`WorldConfig` (including its seed): the same config
gives byte-identical files.
"""

from __future__ import annotations

import gzip
import io
import json
import random
import re
from dataclasses import asdict, dataclass, field
from itertools import accumulate
from pathlib import Path
from typing import Iterable, Sequence

__all__ = [
    "Entity",
    "Fact",
    "Relation",
    "RELATIONS",
    "Split",
    "World",
    "WorldConfig",
    "DATA_FILES",
    "generate_world",
    "split_world",
    "write_datasets",
]


@dataclass(frozen=True)
class WorldConfig:
    """Sizes and seed of the generated world.

    Attributes:
        seed: seed of every random choice.
        people, cities, countries, companies, languages: number of invented entities per type
            (professions, instruments and industries are fixed word lists).
        zipf: exponent of the object distribution (``weight(rank) = 1 / rank**zipf``); larger
            means more facts share the most common answers.
        locality_extra: facts added to the locality pool beyond the ones the split needs (one
            fact per shared answer and every fact whose answer is unique).
    """

    seed: int = 0
    people: int = 1800
    cities: int = 500
    countries: int = 60
    companies: int = 300
    languages: int = 40
    zipf: float = 1.0
    locality_extra: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Entity:
    """One named thing; ``kind`` is one of the entity types (``"person"``, ``"city"``, ...)."""

    name: str
    kind: str


@dataclass(frozen=True)
class Relation:
    """A relation from ``subject_kind`` to ``object_kind`` with its templates.

    Templates contain ``{}`` where the subject goes; the answer follows the prompt after one
    space. ``statements`` and ``questions`` are trained on; ``held_out`` (one statement, one
    question) never are.
    """

    id: str
    name: str
    subject_kind: str
    object_kind: str
    statements: tuple[str, ...]
    questions: tuple[str, ...]
    held_out: tuple[str, ...]

    @property
    def train_templates(self) -> tuple[str, ...]:
        return self.statements + self.questions


@dataclass(frozen=True)
class Fact:
    """``subject`` --``relation``--> ``object`` (names; ``relation`` is a relation id)."""

    subject: str
    relation: str
    object: str

    def prompt(self, template: str) -> str:
        return template.replace("{}", self.subject)


# Relation ids follow Wikidata's where one exists, as CounterFact's ``relation_id`` does.
RELATIONS: tuple[Relation, ...] = (
    Relation(
        "P19", "born in", "person", "city",
        statements=("{} was born in", "The birthplace of {} is", "{} was born in the city of"),
        questions=("Where was {} born?",),
        held_out=("The city in which {} was born is", "In which city was {} born?"),
    ),
    Relation(
        "P108", "works for", "person", "company",
        statements=("{} works for", "The employer of {} is", "{} is employed by"),
        questions=("Who does {} work for?",),
        held_out=("The company {} works for is", "Which company is the employer of {}?"),
    ),
    Relation(
        "P1412", "speaks", "person", "language",
        statements=("{} speaks", "The language spoken by {} is", "{} is fluent in"),
        questions=("What language does {} speak?",),
        held_out=("The language {} speaks is", "Which language is {} fluent in?"),
    ),
    Relation(
        "P27", "citizen of", "person", "country",
        statements=("{} is a citizen of", "The country of citizenship of {} is", "{} holds a passport of"),
        questions=("Which country is {} a citizen of?",),
        held_out=("The country {} is a citizen of is", "What is the country of citizenship of {}?"),
    ),
    Relation(
        "P106", "profession", "person", "profession",
        statements=("{} works as a", "The profession of {} is", "By profession, {} is a"),
        questions=("What is the profession of {}?",),
        held_out=("{} is by profession a", "What does {} work as?"),
    ),
    Relation(
        "P1303", "plays", "person", "instrument",
        statements=("{} plays the", "The instrument played by {} is the", "{} is a player of the"),
        questions=("Which instrument does {} play?",),
        held_out=("The instrument {} plays is the", "What instrument is played by {}?"),
    ),
    Relation(
        "P131", "located in", "city", "country",
        statements=("{} is located in", "The city of {} is in the country of", "{} is a city in"),
        questions=("In which country is {} located?",),
        held_out=("The country in which {} is located is", "Which country is the city of {} in?"),
    ),
    Relation(
        "P36", "capital", "country", "city",
        statements=("The capital of {} is", "The capital city of {} is", "{} has its capital in"),
        questions=("What is the capital of {}?",),
        held_out=("The city which is the capital of {} is", "Which city is the capital of {}?"),
    ),
    Relation(
        "P37", "official language", "country", "language",
        statements=("The official language of {} is", "In {}, the official language is", "People in {} speak"),
        questions=("What is the official language of {}?",),
        held_out=("The language spoken in {} is", "Which language is the official language of {}?"),
    ),
    Relation(
        "P112", "founded by", "company", "person",
        statements=("{} was founded by", "The founder of {} is", "The company {} was founded by"),
        questions=("Who founded {}?",),
        held_out=("{} has as its founder", "Who is the founder of {}?"),
    ),
    Relation(
        "P159", "headquarters", "company", "city",
        statements=("{} is headquartered in", "The headquarters of {} are in", "The company {} has its headquarters in"),
        questions=("Where is {} headquartered?",),
        held_out=("The city in which {} is headquartered is", "In which city are the headquarters of {}?"),
    ),
    Relation(
        "P452", "industry", "company", "industry",
        statements=("{} is a company in the industry of", "The industry of {} is", "{} works in the industry of"),
        questions=("What industry is {} in?",),
        held_out=("The company {} is in the industry of", "Which industry does {} work in?"),
    ),
)

_PROFESSIONS = (
    "baker", "architect", "nurse", "pilot", "teacher", "lawyer", "farmer", "chemist", "painter",
    "sailor", "surgeon", "poet", "engineer", "banker", "tailor", "judge", "miner", "potter",
    "astronomer", "librarian", "carpenter", "dentist", "journalist", "gardener", "translator",
)
_INSTRUMENTS = (
    "violin", "piano", "guitar", "flute", "cello", "trumpet", "harp", "drums", "clarinet", "organ",
    "saxophone", "oboe", "banjo", "accordion", "lute",
)
_INDUSTRIES = (
    "banking", "mining", "shipping", "software", "textiles", "farming", "insurance", "aviation",
    "medicine", "publishing", "energy", "steel", "tourism", "fishing", "railways",
    "retail", "construction", "media", "chemicals", "brewing",
)

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr",
           "kr", "tr", "st", "sh", "th", "ch", "h", "j", "w")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ei", "ou", "ae")
_CODAS = ("", "", "", "n", "r", "l", "s", "m", "th", "k", "nd", "rn")
_SUFFIXES = {
    "city": ("", "", "", "", "", "burg", "holm", "mar", "port"),
    "country": ("ia", "ia", "and", "esh", "ora", "istan", "ova"),
    "company": ("", "", "corp", "tek", "ix", "well", "ex"),
    "language": ("ese", "ian", "ic", "ish", "i"),
}


def _syllable(rng: random.Random) -> str:
    return rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)


def _word(rng: random.Random, syllables: tuple[int, ...], suffixes: Sequence[str] = ("",)) -> str:
    n = rng.choice(syllables)
    word = "".join(_syllable(rng) for _ in range(n)) + rng.choice(suffixes)
    return word.capitalize()


@dataclass
class World:
    """The generated world: entities by type, relations, facts (and the config that made it).

    ``facts`` are ordered by relation, then subject in entity order.
    """

    config: WorldConfig
    entities: dict[str, list[str]]
    relations: tuple[Relation, ...]
    facts: list[Fact]
    relation_by_id: dict[str, Relation] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.relation_by_id = {r.id: r for r in self.relations}

    def relation(self, relation_id: str) -> Relation:
        return self.relation_by_id[relation_id]

    def training_pairs(self) -> list[tuple[str, str]]:
        """Every ``(prompt, answer)`` the model is trained on: each fact with each trained template."""
        return [(f.prompt(t), f.object) for f in self.facts for t in self.relation(f.relation).train_templates]

    def heldout_pairs(self) -> list[tuple[str, str]]:
        """Every fact with each held-out (paraphrase) template: never trained on."""
        return [(f.prompt(t), f.object) for f in self.facts for t in self.relation(f.relation).held_out]

    def text(self) -> Iterable[str]:
        """Lines of the world's text (all templates, trained and held out), for tokenizer training."""
        for f in self.facts:
            rel = self.relation(f.relation)
            for t in rel.train_templates + rel.held_out:
                yield f"{f.prompt(t)} {f.object}"


def _unique_names(rng: random.Random, count: int, make, taken: set[str]) -> list[str]:
    names: list[str] = []
    tries = 0
    while len(names) < count:
        tries += 1
        if tries > 200 * count + 1000:
            raise RuntimeError(f"could not invent {count} unique names")
        name = make()
        if name.lower() in taken:
            continue
        taken.add(name.lower())
        names.append(name)
    return names


def _template_words(templates: Iterable[str]) -> set[str]:
    return {w for t in templates for w in re.findall(r"[A-Za-z]+", t.replace("{}", " "))}


def _check_relations(relations: Sequence[Relation]) -> None:
    trained = _template_words(t for r in relations for t in r.train_templates)
    for r in relations:
        for t in r.statements + r.questions + r.held_out:
            if t.count("{}") != 1:
                raise ValueError(f"relation {r.id}: template {t!r} must contain '{{}}' exactly once")
        unseen = _template_words(r.held_out) - trained
        if unseen:
            raise ValueError(f"relation {r.id}: held-out templates use words never trained on: {sorted(unseen)}")


def generate_world(config: WorldConfig | None = None) -> World:
    """Generate the world of ``config`` (default :class:`WorldConfig`); deterministic in the seed."""
    config = config or WorldConfig()
    _check_relations(RELATIONS)
    rng = random.Random(config.seed)
    taken = {w.lower() for w in _template_words(t for r in RELATIONS for t in r.train_templates + r.held_out)}
    taken |= {w.lower() for w in _PROFESSIONS + _INSTRUMENTS + _INDUSTRIES}

    # Given names are shared; family names are unique, so a person is told apart by one word.
    given = _unique_names(rng, max(20, config.people // 12), lambda: _word(rng, (1, 2)), taken)
    family = _unique_names(rng, config.people, lambda: _word(rng, (1, 2), ("", "", "", "son", "er", "ski")), taken)
    people = [f"{rng.choice(given)} {name}" for name in family]
    entities = {
        "person": people,
        "city": _unique_names(rng, config.cities, lambda: _word(rng, (1, 2), _SUFFIXES["city"]), taken),
        "country": _unique_names(rng, config.countries, lambda: _word(rng, (1, 2), _SUFFIXES["country"]), taken),
        "company": _unique_names(rng, config.companies, lambda: _word(rng, (1, 2), _SUFFIXES["company"]), taken),
        "language": _unique_names(rng, config.languages, lambda: _word(rng, (1, 2), _SUFFIXES["language"]), taken),
        "profession": list(_PROFESSIONS),
        "instrument": list(_INSTRUMENTS),
        "industry": list(_INDUSTRIES),
    }
    for kind, names in entities.items():
        if len(names) < 2:
            raise ValueError(f"WorldConfig gives fewer than 2 entities of type {kind!r}")

    facts: list[Fact] = []
    for rel in RELATIONS:
        objects = list(entities[rel.object_kind])
        rng.shuffle(objects)  # the popularity ranking differs per relation
        weights = list(accumulate(1.0 / (rank + 1) ** config.zipf for rank in range(len(objects))))
        for subject in entities[rel.subject_kind]:
            obj = subject
            while obj == subject:  # never a fact about itself (kept general; no relation allows it)
                obj = rng.choices(objects, cum_weights=weights)[0]
            facts.append(Fact(subject, rel.id, obj))
    return World(config=config, entities=entities, relations=RELATIONS, facts=facts)


@dataclass
class Split:
    """The world's facts divided for editing.

    Attributes:
        edits: ``(fact, new_object)`` pairs in a seeded random order (the order of turns).
        locality: facts that are never edited; each edit's probes come from here.
        neighbors: for each edit (same order), locality facts of the same relation that share the
            edited fact's TRUE object (CounterFact's "neighborhood": most likely to be disturbed).
        others: for each edit, one locality fact of a different relation.
    """

    edits: list[tuple[Fact, str]]
    locality: list[Fact]
    neighbors: list[list[Fact]]
    others: list[Fact]


def split_world(world: World, max_neighbors: int = 1) -> Split:
    """Split ``world`` into edits and locality probes (deterministic in the world's seed).

    The locality pool holds one fact of every ``(relation, object)`` shared by several facts, so
    every edited fact has a neighbor with the same true answer, plus every fact whose answer is
    unique (it could have no neighbor), plus ``config.locality_extra`` random facts.
    """
    rng = random.Random(world.config.seed + 1)
    groups: dict[tuple[str, str], list[int]] = {}
    for i, f in enumerate(world.facts):
        groups.setdefault((f.relation, f.object), []).append(i)
    locality_idx: set[int] = set()
    for members in groups.values():
        locality_idx.add(members[0] if len(members) == 1 else rng.choice(members))
    rest = [i for i in range(len(world.facts)) if i not in locality_idx]
    rng.shuffle(rest)
    extra = min(world.config.locality_extra, len(rest))
    locality_idx.update(rest[:extra])
    edit_idx = rest[extra:]

    by_group: dict[tuple[str, str], list[int]] = {}
    for i in sorted(locality_idx):
        f = world.facts[i]
        by_group.setdefault((f.relation, f.object), []).append(i)
    locality_sorted = sorted(locality_idx)

    # A plausible new object: drawn like the relation's answers (popular ones more often).
    choices: dict[str, tuple[list[str], list[float]]] = {}
    for rel in world.relations:
        objects = world.entities[rel.object_kind]
        choices[rel.id] = (objects, list(accumulate(1.0 + len(groups.get((rel.id, o), ())) for o in objects)))
    edits: list[tuple[Fact, str]] = []
    neighbors: list[list[Fact]] = []
    others: list[Fact] = []
    for i in edit_idx:
        fact = world.facts[i]
        objects, weights = choices[fact.relation]
        new_object = fact.object
        while new_object in (fact.object, fact.subject):
            new_object = rng.choices(objects, cum_weights=weights)[0]
        edits.append((fact, new_object))
        same = by_group.get((fact.relation, fact.object), [])
        neighbors.append([world.facts[j] for j in rng.sample(same, min(max_neighbors, len(same)))])
        while True:
            other = world.facts[rng.choice(locality_sorted)]
            if other.relation != fact.relation:
                break
        others.append(other)
    return Split(edits=edits, locality=[world.facts[i] for i in locality_sorted], neighbors=neighbors, others=others)


def _open_text(path: Path):
    """Write text; ``.gz`` files gzip-compressed with a zero mtime so bytes are reproducible."""
    if path.suffix == ".gz":
        raw = open(path, "wb")
        return io.TextIOWrapper(gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0), encoding="utf-8"), raw
    return open(path, "w", encoding="utf-8"), None


def _write_jsonl(path: Path, records: Iterable[dict]) -> None:
    fh, raw = _open_text(path)
    try:
        for record in records:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    finally:
        fh.close()
        if raw is not None:
            raw.close()


def _write_json_list(path: Path, records: Iterable[dict]) -> None:
    """A JSON list with one record per line (the published layout, still readable by ``head``)."""
    fh, raw = _open_text(path)
    try:
        fh.write("[\n")
        for n, record in enumerate(records):
            fh.write(("" if n == 0 else ",\n") + json.dumps(record, ensure_ascii=False))
        fh.write("\n]\n")
    finally:
        fh.close()
        if raw is not None:
            raw.close()


def _nq(question: str) -> str:
    """A ZsRE locality question: ``nq question: `` + the question without its ``?`` (loaders add it)."""
    return "nq question: " + question.rstrip("?")


#: File names written by :func:`write_datasets`, by kind.
DATA_FILES: dict[str, str] = {
    "facts": "facts.jsonl.gz",
    "requests": "requests.jsonl.gz",
    "zsre": "zsre.json.gz",
    "counterfact": "counterfact.json.gz",
}


def write_datasets(world: World, split: Split, out_dir: str | Path) -> dict[str, Path]:
    """Write the world's files into ``out_dir``; returns ``{kind: path}`` (names in :data:`DATA_FILES`).

    Files (``.gz``: gzip, which every loader of :mod:`ultraedit.datasets` reads):
        ``facts.jsonl.gz``: every fact (``subject``, ``relation`` id, ``object``, ``locality`` =
            in the never-edited pool), in world order. What the model is trained on.
        ``requests.jsonl.gz``: edit requests in our format, in edit order (``id``, ``prompt``,
            ``target``, ``rephrases`` [the held-out templates], ``locality`` [``{prompt, answer}``:
            a neighbor sharing the edited fact's true answer, then a fact of another relation]).
        ``zsre.json.gz``: ZsRE (MEND layout): ``subject``, ``src`` (trained question form),
            ``rephrase`` (held-out question form), ``ans`` (new object), ``answers`` ([true
            object]), ``loc`` (``"nq question: ..."`` without its ``?``) and ``loc_ans``.
        ``counterfact.json.gz``: ROME's CounterFact: ``case_id``, ``requested_rewrite``
            {``prompt`` with ``{}``, ``subject``, ``relation_id``, ``target_new``, ``target_true``},
            ``paraphrase_prompts`` (held-out), ``neighborhood_prompts`` (subjects sharing the true
            object), ``attribute_prompts`` (subjects whose true object is the new one) and
            ``generation_prompts`` (another trained template of the edited subject).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    locality = set(split.locality)
    paths = {kind: out / name for kind, name in DATA_FILES.items()}

    _write_jsonl(paths["facts"], (
        {"subject": f.subject, "relation": f.relation, "object": f.object, "locality": f in locality}
        for f in world.facts
    ))
    rows = list(zip(split.edits, split.neighbors, split.others))

    def requests() -> Iterable[dict]:
        for n, ((fact, new), nbrs, other) in enumerate(rows):
            rel = world.relation(fact.relation)
            probes = nbrs + [other]
            yield {
                "id": f"testbed-{n:05d}",
                "prompt": fact.prompt(rel.statements[0]),
                "target": new,
                "rephrases": [fact.prompt(t) for t in rel.held_out],
                "locality": [{"prompt": g.prompt(world.relation(g.relation).statements[0]), "answer": g.object}
                             for g in probes],
            }

    def zsre() -> Iterable[dict]:
        for (fact, new), nbrs, other in rows:
            rel = world.relation(fact.relation)
            loc = nbrs[0] if nbrs else other
            yield {
                "subject": fact.subject,
                "src": fact.prompt(rel.questions[0]),
                "rephrase": fact.prompt(rel.held_out[1]),
                "ans": new,
                "answers": [fact.object],
                "loc": _nq(loc.prompt(world.relation(loc.relation).questions[0])),
                "loc_ans": loc.object,
            }

    by_object: dict[tuple[str, str], list[Fact]] = {}
    for f in split.locality:
        by_object.setdefault((f.relation, f.object), []).append(f)

    def counterfact() -> Iterable[dict]:
        for n, ((fact, new), nbrs, other) in enumerate(rows):
            rel = world.relation(fact.relation)
            attribute = by_object.get((fact.relation, new), [])[:1]
            yield {
                "case_id": n,
                "requested_rewrite": {
                    "prompt": rel.statements[0],
                    "subject": fact.subject,
                    "relation_id": rel.id,
                    "target_new": {"str": new},
                    "target_true": {"str": fact.object},
                },
                "paraphrase_prompts": [fact.prompt(t) for t in rel.held_out],
                "neighborhood_prompts": [g.prompt(rel.statements[0]) for g in nbrs],
                "attribute_prompts": [g.prompt(rel.statements[0]) for g in attribute],
                "generation_prompts": [fact.prompt(rel.statements[1])],
            }

    _write_jsonl(paths["requests"], requests())
    _write_json_list(paths["zsre"], zsre())
    _write_json_list(paths["counterfact"], counterfact())
    return paths
