"""Builds the known-facts retention probe for a real model: general-knowledge questions the base
model answers correctly closed-book (``sleep_jax/assets/probes/known_facts_smollm2.jsonl``).

    python experiments/knowledge_incorporation/make_known_facts.py            # SmolLM2 (fetched)
    python experiments/knowledge_incorporation/make_known_facts.py --gguf F --out F.jsonl

The candidates below are short questions with a one- or two-word answer. Each is asked as the
sleep driver asks (``ChatFormat.closed_book``, greedy, ``--max-new-tokens`` as the smollm2
variant's eval budget) and scored with the driver's "contains" metric; the ones the base gets
right are written, each with the base's own answer. A sleep that keeps what the model knew scores
100% on the file; the loss from 100% is the forgetting of known facts (issue: retention measured
the way the field trusts). Any model can get its own file with ``--gguf``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

# "question|answer|alias;alias"
CANDIDATES = """
What is the capital of France?|Paris
What is the capital of Italy?|Rome
What is the capital of Germany?|Berlin
What is the capital of Spain?|Madrid
What is the capital of Japan?|Tokyo
What is the capital of England?|London
What is the capital of the United Kingdom?|London
What is the capital of Russia?|Moscow
What is the capital of China?|Beijing
What is the capital of Egypt?|Cairo
What is the capital of Greece?|Athens
What is the capital of Canada?|Ottawa
What is the capital of Australia?|Canberra
What is the capital of Portugal?|Lisbon
What is the capital of Ireland?|Dublin
What is the capital of Austria?|Vienna
What is the capital of Norway?|Oslo
What is the capital of Sweden?|Stockholm
What is the capital of Poland?|Warsaw
What is the capital of India?|New Delhi|Delhi
What is the capital of Mexico?|Mexico City
What is the capital of Argentina?|Buenos Aires
What is the capital of Kenya?|Nairobi
What is the capital of Turkey?|Ankara
What is the capital of South Korea?|Seoul
What is the capital of Thailand?|Bangkok
What is the capital of the United States?|Washington
What is the capital of Belgium?|Brussels
What is the capital of the Netherlands?|Amsterdam
What is the capital of Denmark?|Copenhagen
What is the capital of Finland?|Helsinki
What is the capital of Hungary?|Budapest
What is the capital of Peru?|Lima
What is the capital of Cuba?|Havana
In which country is the Eiffel Tower?|France
In which city is the Eiffel Tower?|Paris
In which country are the pyramids of Giza?|Egypt
In which country is the Great Wall?|China
In which country is the Colosseum?|Italy
In which country is Mount Fuji?|Japan
In which country is the Taj Mahal?|India
In which city is the Statue of Liberty?|New York
In which city is Big Ben?|London
What is the largest planet in the solar system?|Jupiter
Which planet is known as the Red Planet?|Mars
Which planet is closest to the Sun?|Mercury
Which planet has the most famous rings?|Saturn
What is the name of our galaxy?|Milky Way
What is the closest star to Earth?|Sun|the Sun
What does the Moon orbit?|Earth|the Earth
What is the largest ocean on Earth?|Pacific|Pacific Ocean
What is the longest river in Africa?|Nile
What is the tallest mountain in the world?|Everest|Mount Everest
What is the largest desert in Africa?|Sahara
What is the largest continent?|Asia
On which continent is Brazil?|South America
On which continent is Egypt?|Africa
On which continent is France?|Europe
What is the chemical symbol for water?|H2O
What is the chemical symbol for gold?|Au
What is the chemical symbol for iron?|Fe
What is the chemical symbol for sodium?|Na
What is the chemical symbol for oxygen?|O
What gas do plants absorb from the air?|carbon dioxide|CO2
What gas do humans need to breathe?|oxygen
What is the boiling point of water in degrees Celsius?|100
What is the freezing point of water in degrees Celsius?|0|zero
What is frozen water called?|ice
What is the hardest natural substance?|diamond
What is the main gas in the air we breathe?|nitrogen
What force keeps us on the ground?|gravity
How many legs does a spider have?|eight|8
How many legs does an insect have?|six|6
How many legs does a dog have?|four|4
How many wheels does a bicycle have?|two|2
How many days are in a week?|seven|7
How many months are in a year?|twelve|12
How many hours are in a day?|24|twenty-four|twenty four
How many minutes are in an hour?|60|sixty
How many seconds are in a minute?|60|sixty
How many days are in a leap year?|366
How many days are in a year?|365
How many sides does a triangle have?|three|3
How many sides does a square have?|four|4
How many sides does a hexagon have?|six|6
How many sides does an octagon have?|eight|8
How many continents are there?|seven|7
How many players are on a soccer team on the field?|eleven|11
How many strings does a standard guitar have?|six|6
How many colors are in a rainbow?|seven|7
What is 2 plus 2?|4|four
What is 5 times 5?|25|twenty-five
What is 10 times 10?|100|one hundred
What is 9 minus 3?|6|six
What is 12 divided by 4?|3|three
What is the square root of 9?|3|three
What is the square root of 16?|4|four
What is half of 100?|50|fifty
What is 3 times 3?|9|nine
What is 7 plus 8?|15|fifteen
What is the first letter of the English alphabet?|A
What is the largest mammal?|blue whale
What is the largest land animal?|elephant
What is the fastest land animal?|cheetah
What is the tallest animal?|giraffe
Which animal is known as the king of the jungle?|lion
What animal says moo?|cow
What animal says meow?|cat
What animal barks?|dog
What do bees make?|honey
What do caterpillars turn into?|butterfly|butterflies|moth
What is a baby cat called?|kitten
What is a baby dog called?|puppy
Which bird is a symbol of peace?|dove
Which animal has a trunk?|elephant
Which animal produces milk that people drink most often?|cow
What do pandas mainly eat?|bamboo
What color is the sky on a clear day?|blue
What color is grass?|green
What color is snow?|white
What color is a banana when it is ripe?|yellow
What color do you get by mixing blue and yellow?|green
What color do you get by mixing red and white?|pink
What color is a stop sign?|red
What fruit keeps the doctor away?|apple
What is the main ingredient of guacamole?|avocado
What vegetable is orange and loved by rabbits?|carrot
What is the opposite of hot?|cold
What is the opposite of up?|down
What is the opposite of day?|night
What is the opposite of big?|small|little
What do you call a shape with three sides?|triangle
What is the largest organ of the human body?|skin
What organ pumps blood through the body?|heart
What organ do humans use to think?|brain
How many lungs does a human have?|two|2
What do we call the bones in the head?|skull
Who wrote Romeo and Juliet?|Shakespeare|William Shakespeare
Who wrote Hamlet?|Shakespeare|William Shakespeare
Who painted the Mona Lisa?|Leonardo da Vinci|da Vinci|Leonardo
Who developed the theory of relativity?|Einstein|Albert Einstein
Who was the first president of the United States?|George Washington|Washington
Who discovered penicillin?|Fleming|Alexander Fleming
Who is known for the laws of motion and gravity?|Newton|Isaac Newton
Who invented the telephone?|Bell|Alexander Graham Bell
Who invented the light bulb?|Edison|Thomas Edison
Who was the first man on the Moon?|Neil Armstrong|Armstrong
Who composed the Fifth Symphony with the famous four-note opening?|Beethoven
Who wrote Harry Potter?|Rowling|J.K. Rowling|J. K. Rowling
Who painted The Starry Night?|Van Gogh|Vincent van Gogh
Who proposed the theory of evolution by natural selection?|Darwin|Charles Darwin
What language is spoken in France?|French
What language is spoken in Germany?|German
What language is spoken in Spain?|Spanish
What language is spoken in Italy?|Italian
What language is spoken in Japan?|Japanese
What language is mainly spoken in Brazil?|Portuguese
What is the currency of Japan?|yen
What is the currency of the United Kingdom?|pound|pound sterling
What is the currency of the United States?|dollar
What currency is used in Germany?|euro
What instrument has 88 keys?|piano
What sport is played at Wimbledon?|tennis
In which sport do you score a touchdown?|football|American football
What sport does Lionel Messi play?|football|soccer
How many rings are on the Olympic flag?|five|5
What is the main language of the United States?|English
What do you call a person who fixes teeth?|dentist
What do you call a doctor for animals?|veterinarian|vet
Who delivers letters to your house?|mailman|postman|mail carrier|postal worker
What do you use to write on a blackboard?|chalk
What do you wear on your feet?|shoes|socks
What do we use to see?|eyes
What do we use to hear?|ears
What season comes after winter?|spring
What season comes after summer?|autumn|fall
What is the first month of the year?|January
What is the last month of the year?|December
What day comes after Monday?|Tuesday
What day comes before Sunday?|Saturday
Which month has 28 days in a common year?|February
What is the holiday on December 25?|Christmas
What is the shape of the Earth?|sphere|round|spherical
What is H2O commonly called?|water
What metal is liquid at room temperature?|mercury
What is the center of an atom called?|nucleus
What is the process by which plants make food from sunlight?|photosynthesis
What part of the plant is underground?|roots|root
What do you call animals that eat only plants?|herbivores|herbivore
What do you call a young frog?|tadpole
What is the largest country by area?|Russia
Which country has the largest population?|China|India
What is the smallest prime number?|2|two
What is the name of the toy bear named after Theodore Roosevelt?|teddy bear|teddy
What is the name of the famous ship that sank in 1912?|Titanic
What is the capital city of Scotland?|Edinburgh
What is the largest city in the United States?|New York|New York City
Which ocean lies between Europe and North America?|Atlantic|Atlantic Ocean
What is the primary language of Australia?|English
What do you call a group of stars that form a pattern?|constellation
What is the opposite of north?|south
What is the opposite of left?|right
What animal is known for its black and white stripes?|zebra
What is the color of a ripe tomato?|red
What is the largest bird?|ostrich
How many arms does an octopus have?|eight|8
"""


def candidates():
  out = []
  for line in CANDIDATES.strip().splitlines():
    q, *golds = line.split("|")
    out.append({"q": q, "answer": golds[0], "aliases": golds[1:]})
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--gguf", default="", help="model file ('' = the fetched SmolLM2)")
  ap.add_argument("--out", default="sleep_jax/assets/probes/known_facts_smollm2.jsonl")
  ap.add_argument("--max-new-tokens", type=int, default=32)
  a = ap.parse_args()
  sys.path.insert(0, os.getcwd())
  from sleep_jax.data import documents
  from sleep_jax.data.hf_tokenizer import HFTokenizer
  from sleep_jax.eval import qa as qa_eval
  from sleep_jax.model import convert, fetch
  path = a.gguf or fetch.smollm2_path()
  cfg, params = convert.load_gguf(path)
  tok = HFTokenizer.from_gguf(path)
  fmt = documents.ChatFormat(tok)
  cands = candidates()
  t0 = time.time()
  comps = qa_eval.greedy_completions(params, cfg, [fmt.closed_book(c["q"]) for c in cands],
                                     max_new_tokens=a.max_new_tokens, stop_tokens=fmt.stop_ids,
                                     pad_id=tok.pad_id, batch_size=32)
  preds = [tok.decode(c) for c in comps]
  sc = qa_eval.score_answers(preds, [[c["answer"], *c["aliases"]] for c in cands])["contains"]
  kept = [dict(c, base_answer=p) for c, p, s in zip(cands, preds, sc) if s]
  with open(a.out, "w", encoding="utf-8") as f:
    for c in kept:
      f.write(json.dumps(c) + "\n")
  print(f"{len(kept)} of {len(cands)} candidates answered correctly by {os.path.basename(path)} "
        f"({time.time() - t0:.0f} s); wrote {a.out}")
  for c, p, s in zip(cands, preds, sc):
    if not s:
      print(f"  missed: {c['q']} -> {p!r}")


if __name__ == "__main__":
  main()
