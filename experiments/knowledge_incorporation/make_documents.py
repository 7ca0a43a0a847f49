"""Writes the project's fictional-documents set for real models (``documents_fictional.jsonl``).

    python experiments/knowledge_incorporation/make_documents.py --n 48 --seed 0 \
        --out experiments/knowledge_incorporation/documents_fictional.jsonl

Every passage describes one invented entity of one of eight kinds (person, town, company, ship,
festival, species, invention, river) with five facts; names are made of random syllables, so no
pretrained model can know them. Per passage:

* ``title``: the entity's name, as every eval question names it (what keyed slots are keyed on,
  ``model_slot_keys``);
* ``questions``: 3 facts, each asked in a wording that does not occur in the passage (the eval
  wording); the answer is a verbatim span of the passage; aliases (surname, number in words or
  digits, the name without "the") are accepted by the scorer;
* ``train_questions``: every fact in the other wordings, and the facts that name something asked
  the other way round ("Who designed X?" -> "What did Y design?"): what a method that learns from
  question/answer pairs may use (``sft_questions``, the sleep's distillation prompts). Eval
  wordings never appear here.

The file follows ``sleep_jax/data/documents.py: load_jsonl``; the same seed writes the same file.
"""

from __future__ import annotations

import argparse
import json
import random

ONSETS = ["b", "br", "d", "dr", "f", "g", "gr", "h", "k", "kr", "l", "m", "n", "p", "r", "s",
          "st", "t", "th", "v", "z", "sh", "tr", "c", "j"]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "io", "ou"]
CODAS = ["", "", "n", "r", "l", "s", "th", "k", "m", "nd", "rk", "x"]
NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight",
                9: "nine", 11: "eleven", 12: "twelve"}
PROFESSIONS = ["painter", "astronomer", "composer", "chemist", "architect", "poet", "sculptor",
               "botanist", "cartographer", "engineer"]
WORKS = {"painter": "painting", "astronomer": "star atlas", "composer": "symphony",
         "chemist": "treatise", "architect": "cathedral", "poet": "epic poem",
         "sculptor": "statue", "botanist": "herbarium", "cartographer": "map",
         "engineer": "bridge"}
PRODUCTS = ["glass lenses", "copper kettles", "wool blankets", "paper lanterns", "clock springs",
            "leather saddles", "river barges", "bicycle bells", "printing ink", "tin whistles"]
COLORS = ["blue", "green", "amber", "crimson", "silver", "violet", "orange", "black"]
FOODS = ["pears", "honey", "fish", "chestnuts", "plums", "barley bread", "goat cheese", "onions"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
HABITATS = ["salt marshes", "cloud forests", "limestone caves", "mountain lakes", "pine forests",
            "desert canyons", "coral reefs", "river deltas"]
MATERIALS = ["brass", "oak", "glass", "iron", "bronze", "ivory", "copper", "steel"]


def article(w: str) -> str:
  return ("an " if w[0] in "aeiou" else "a ") + w


def word(rng, syllables: int) -> str:
  return "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS)
                 for _ in range(syllables)).capitalize()


def person(rng) -> str:
  return f"{word(rng, 2)} {word(rng, 2)}"


def count(rng):
  n = rng.choice(sorted(NUMBER_WORDS))
  return NUMBER_WORDS[n], [str(n)]


def year(rng) -> str:
  return str(rng.randint(1620, 1985))


# A kind: (facts, passage, questions). ``facts(rng)`` -> {key: (answer, aliases)} plus plain
# values under "_"; ``passage`` formats them; ``questions[key]`` lists wordings (the first is the
# eval wording) and ``reverse`` maps a key to train-only questions asked the other way round.
def person_kind(rng):
  name, prof = person(rng), rng.choice(PROFESSIONS)
  surname = name.split()[1]
  f = {"born": (year(rng), []), "town": (word(rng, 2), []), "prof": (prof, []),
       "work": (f"the {word(rng, 2)} {WORKS[prof]}", []), "teacher": (person(rng), []),
       "_": {"name": name, "surname": surname}}
  f["work"] = (f["work"][0], [f["work"][0][4:]])
  f["teacher"] = (f["teacher"][0], [f["teacher"][0].split()[1]])
  passage = (f"{name} was a {prof} born in {f['born'][0]} in the town of {f['town'][0]}. "
             f"As a young {prof}, {surname} studied under {f['teacher'][0]}. "
             f"{surname} is best remembered for {f['work'][0]}, which still draws visitors.")
  q = {"born": [f"What year was {name} born in?", f"When was {name} born?",
                f"In which year was the {prof} {name} born?"],
       "town": [f"Which town is {name} from?", f"Where was {name} born?",
                f"In what town was {name} born?"],
       "prof": [f"What was {name}'s profession?", f"What did {name} work as?",
                f"What kind of artist or scientist was {name}?"],
       "work": [f"Which work made {name} famous?", f"What is {name} best remembered for?",
                f"What is {name}'s best known work?"],
       "teacher": [f"Who taught {name}?", f"Under whom did {name} study?",
                   f"Who was {name}'s teacher?"]}
  rev = {"work": [f"Who created {f['work'][0]}?"],
         "teacher": [f"Which {prof} studied under {f['teacher'][0]}?"]}
  return name, f, passage, q, rev, {"work": name, "teacher": name}


def town_kind(rng):
  name = word(rng, 3)
  f = {"founded": (year(rng), []), "founder": (person(rng), []), "river": (word(rng, 2), []),
       "food": (rng.choice(FOODS), []), "people": (f"{rng.randint(2, 60)},000", []),
       "_": {"name": name}}
  f["founder"] = (f["founder"][0], [f["founder"][0].split()[1]])
  passage = (f"{name} is a market town on the banks of the {f['river'][0]} river. It was founded "
             f"in {f['founded'][0]} by the merchant {f['founder'][0]}. Around {f['people'][0]} "
             f"people live there, and the town is known across the region for its "
             f"{f['food'][0]}.")
  q = {"founded": [f"When was the town of {name} founded?", f"In what year was {name} founded?",
                   f"What year did {name} come into existence?"],
       "founder": [f"Who was the founder of {name}?", f"Who founded {name}?",
                   f"Which merchant founded the town of {name}?"],
       "river": [f"What river runs past {name}?", f"On which river does {name} lie?",
                 f"Which river is {name} built on?"],
       "food": [f"What food is {name} famous for?", f"What is {name} known for?",
                f"Which local product is {name} known for?"],
       "people": [f"What is the population of {name}?", f"How many people live in {name}?",
                  f"About how many inhabitants does {name} have?"]}
  rev = {"founder": [f"Which town did {f['founder'][0]} found?"],
         "river": [f"Which market town lies on the {f['river'][0]} river?"]}
  return name, f, passage, q, rev, {"founder": name, "river": name}


def company_kind(rng):
  name = f"{word(rng, 2)} & {word(rng, 2)}"
  f = {"product": (rng.choice(PRODUCTS), []), "founded": (year(rng), []),
       "city": (word(rng, 2), []), "ceo": (person(rng), []), "workers": count(rng),
       "_": {"name": name}}
  f["ceo"] = (f["ceo"][0], [f["ceo"][0].split()[1]])
  passage = (f"{name} is a company that makes {f['product'][0]}. It opened its first workshop "
             f"in the city of {f['city'][0]} in {f['founded'][0]} with {f['workers'][0]} "
             f"workers. Today the company is run by {f['ceo'][0]}.")
  q = {"product": [f"What does the firm {name} produce?", f"What does {name} make?",
                   f"Which goods are made by {name}?"],
       "founded": [f"When did {name} open its first workshop?",
                   f"In what year was {name}'s first workshop opened?",
                   f"What year did {name} start?"],
       "city": [f"Where is {name}'s first workshop?",
                f"In which city did {name} open its first workshop?",
                f"Which city did {name} start in?"],
       "ceo": [f"Who leads {name} today?", f"Who runs {name}?",
               f"Who is the head of {name}?"],
       "workers": [f"How many workers did {name} start with?",
                   f"How many people worked in {name}'s first workshop?",
                   f"With how many workers did {name} open?"]}
  rev = {"ceo": [f"Which company is run by {f['ceo'][0]}?"]}
  return name, f, passage, q, rev, {"ceo": name}


def ship_kind(rng):
  name = f"the {word(rng, 2)}"
  f = {"launched": (year(rng), []), "captain": (person(rng), []), "port": (word(rng, 2), []),
       "masts": count(rng), "color": (rng.choice(COLORS), []), "_": {"name": name}}
  f["captain"] = (f["captain"][0], [f["captain"][0].split()[1]])
  cap = name[0].upper() + name[1:]
  passage = (f"{cap} is a sailing ship launched in {f['launched'][0]} from the port of "
             f"{f['port'][0]}. She has {f['masts'][0]} masts and {article(f['color'][0])} hull. Her "
             f"first captain was {f['captain'][0]}.")
  q = {"launched": [f"When was the ship {name[4:]} launched?", f"In what year was {name} launched?",
                    f"What year did {name} first go to sea?"],
       "captain": [f"Who first commanded the ship {name[4:]}?",
                   f"Who was the first captain of {name}?", f"Who captained {name} first?"],
       "port": [f"From which port was the ship {name[4:]} launched?",
                f"Where was {name} launched?", f"Which port did {name} sail from first?"],
       "masts": [f"How many masts does the ship {name[4:]} have?",
                 f"How many masts does {name} have?", f"What is the number of masts of {name}?"],
       "color": [f"What colour is the hull of the ship {name[4:]}?",
                 f"What color is {name}'s hull?", f"What color was {name} painted?"]}
  rev = {"captain": [f"Which ship was first captained by {f['captain'][0]}?"]}
  return name[4:], f, passage, q, rev, {"captain": name}


def festival_kind(rng):
  name = f"the {word(rng, 2)} Festival"
  f = {"month": (rng.choice(MONTHS), []), "city": (word(rng, 2), []), "since": (year(rng), []),
       "symbol": (f"{rng.choice(COLORS)} {rng.choice(['lanterns', 'ribbons', 'kites', 'masks'])}",
                  []), "days": count(rng), "_": {"name": name}}
  cap = name[0].upper() + name[1:]
  passage = (f"{cap} takes place every {f['month'][0]} in the city of {f['city'][0]}. It has been "
             f"held since {f['since'][0]} and lasts {f['days'][0]} days. During the festival, "
             f"people decorate the streets with {f['symbol'][0]}.")
  short = name[4:]
  q = {"month": [f"In which month is the {short} celebrated?", f"When does {name} take place?",
                 f"In what month is {name} held?"],
       "city": [f"Which city hosts the {short}?", f"Where does {name} take place?",
                f"In which city is {name} held?"],
       "since": [f"Since when has the {short} been held?",
                 f"In what year was {name} first held?", f"Since which year has {name} taken place?"],
       "symbol": [f"What do people decorate the streets with during the {short}?",
                  f"What decorates the streets at {name}?",
                  f"What are the streets decorated with for {name}?"],
       "days": [f"How long does the {short} last?", f"How many days does {name} last?",
                f"For how many days is {name} held?"]}
  rev = {"city": [f"Which festival takes place in {f['city'][0]}?"]}
  return short, f, passage, q, rev, {"city": name}


def species_kind(rng):
  name = f"the {word(rng, 2).lower()} {rng.choice(['beetle', 'frog', 'finch', 'moth', 'lizard'])}"
  f = {"habitat": (rng.choice(HABITATS), []), "discoverer": (person(rng), []),
       "year": (year(rng), []), "food": (rng.choice(["moss", "seeds", "ants", "berries",
                                                       "snails", "nectar"]), []),
       "color": (rng.choice(COLORS), []), "_": {"name": name}}
  f["discoverer"] = (f["discoverer"][0], [f["discoverer"][0].split()[1]])
  cap = name[0].upper() + name[1:]
  passage = (f"{cap} is a small animal that lives in {f['habitat'][0]}. It was first described "
             f"by {f['discoverer'][0]} in {f['year'][0]}. It feeds mainly on {f['food'][0]} and "
             f"is easy to spot because of its {f['color'][0]} back.")
  short = name[4:]
  q = {"habitat": [f"Where does the {short} live?", f"What habitat does {name} live in?",
                   f"In what kind of place is {name} found?"],
       "discoverer": [f"Who discovered the {short}?", f"Who first described {name}?",
                      f"Which naturalist first described {name}?"],
       "year": [f"When was the {short} discovered?", f"In what year was {name} first described?",
                f"What year was {name} described?"],
       "food": [f"What does the {short} eat?", f"What does {name} feed on?",
                f"What is the main food of {name}?"],
       "color": [f"What color is the back of the {short}?", f"What color is {name}'s back?",
                 f"Which color makes {name} easy to spot?"]}
  rev = {"discoverer": [f"Which animal did {f['discoverer'][0]} first describe?"]}
  return short, f, passage, q, rev, {"discoverer": name}


def invention_kind(rng):
  name = f"the {word(rng, 2)} {rng.choice(['loom', 'engine', 'telescope', 'press', 'pump'])}"
  f = {"inventor": (person(rng), []), "year": (year(rng), []),
       "material": (rng.choice(MATERIALS), []), "museum": (f"the museum of {word(rng, 2)}", []),
       "parts": count(rng), "_": {"name": name}}
  f["inventor"] = (f["inventor"][0], [f["inventor"][0].split()[1]])
  f["museum"] = (f["museum"][0], [f["museum"][0].split()[-1]])
  cap = name[0].upper() + name[1:]
  passage = (f"{cap} was designed by {f['inventor'][0]} in {f['year'][0]}. It is built from "
             f"{f['material'][0]} and has {f['parts'][0]} moving parts. The only surviving "
             f"example stands in {f['museum'][0]}.")
  short = name[4:]
  q = {"inventor": [f"Who invented the {short}?", f"Who designed {name}?",
                    f"Which inventor designed {name}?"],
       "year": [f"When was the {short} invented?", f"In what year was {name} designed?",
                f"What year was {name} designed in?"],
       "material": [f"What material is the {short} made of?", f"What is {name} built from?",
                    f"Which material was used to build {name}?"],
       "museum": [f"Where can the last {short} be seen?",
                  f"Where does the surviving {short} stand?",
                  f"Which museum holds {name}?"],
       "parts": [f"How many moving parts are there in the {short}?",
                 f"How many moving parts does {name} have?",
                 f"What is the number of moving parts in {name}?"]}
  rev = {"inventor": [f"What did {f['inventor'][0]} design?"]}
  return short, f, passage, q, rev, {"inventor": name}


def river_kind(rng):
  name = f"the {word(rng, 2)} river"
  f = {"source": (f"Mount {word(rng, 2)}", []), "sea": (f"the {word(rng, 2)} Sea", []),
       "length": (f"{rng.randint(40, 900)} kilometres", []), "bridges": count(rng),
       "fish": (rng.choice(["trout", "salmon", "eels", "carp", "pike"]), []), "_": {"name": name}}
  f["source"] = (f["source"][0], [f["source"][0][6:]])
  f["sea"] = (f["sea"][0], [f["sea"][0][4:]])
  f["length"] = (f["length"][0], [f["length"][0].split()[0]])
  cap = name[0].upper() + name[1:]
  passage = (f"{cap} rises on {f['source'][0]} and flows {f['length'][0]} into {f['sea'][0]}. "
             f"It is crossed by {f['bridges'][0]} stone bridges, and its waters are rich in "
             f"{f['fish'][0]}.")
  short = name[4:]
  q = {"source": [f"Where is the source of the {short}?", f"Where does {name} rise?",
                  f"On which mountain does {name} begin?"],
       "sea": [f"Which sea does the {short} empty into?", f"Into which sea does {name} flow?",
               f"Where does {name} end?"],
       "length": [f"What is the length of the {short}?", f"How long is {name}?",
                  f"How many kilometres long is {name}?"],
       "bridges": [f"How many stone bridges span the {short}?",
                   f"How many stone bridges cross {name}?",
                   f"What is the number of stone bridges over {name}?"],
       "fish": [f"Which fish are common in the {short}?", f"What fish is {name} rich in?",
                f"Which fish live in {name}?"]}
  rev = {"source": [f"Which river rises on {f['source'][0]}?"]}
  return short, f, passage, q, rev, {"source": name}


KINDS = (person_kind, town_kind, company_kind, ship_kind, festival_kind, species_kind,
         invention_kind, river_kind)


def qa(q: str, answer: str, aliases=()) -> dict:
  out = {"q": q, "answer": answer}
  if aliases:
    out["aliases"] = list(aliases)
  return out


def document(rng, kind, n: int) -> dict:
  name, facts, passage, questions, reverse, subjects = kind(rng)
  keys = [k for k in facts if k != "_"]
  for k in keys:  # the answers are verbatim spans of the passage: checked, not assumed
    assert facts[k][0] in passage, (k, facts[k][0], passage)
  asked = rng.sample(keys, 3)
  evals = [qa(questions[k][0], *facts[k]) for k in asked]
  trains = [qa(w, *facts[k]) for k in keys for w in questions[k][1:]]
  assert not {e["q"] for e in evals} & {t["q"] for t in trains}, name  # eval wordings held out
  for k, ws in reverse.items():
    subject = subjects[k]
    trains += [qa(w, subject, [subject[4:]] if subject.startswith("the ") else []) for w in ws]
  kind_name = kind.__name__.replace("_kind", "")
  return {"id": f"{kind_name}-{n:02d}-{name.lower().replace(' ', '-').replace('&', 'and')}",
          "title": name, "passage": passage, "questions": evals, "train_questions": trains}


def make(n: int, seed: int):
  rng = random.Random(seed)
  return [document(rng, KINDS[i % len(KINDS)], i) for i in range(n)]


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--n", type=int, default=48, help="passages (kinds cycle; default 48)")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--out", default="experiments/knowledge_incorporation/documents_fictional.jsonl")
  a = ap.parse_args()
  if a.n < 1:
    ap.error("--n must be >= 1")
  docs = make(a.n, a.seed)
  with open(a.out, "w", encoding="utf-8") as f:
    for d in docs:
      f.write(json.dumps(d) + "\n")
  print(f"wrote {len(docs)} documents ({len(KINDS)} kinds, "
        f"{sum(len(d['questions']) for d in docs)} eval questions) to {a.out}")


if __name__ == "__main__":
  main()
