"""Writes reviews/: a small, balanced, labelled text set for the ML pipelines
(train.jsonl, test.jsonl, unlabelled.jsonl). Made here from templates, so it is ours to
ship (Apache-2.0 like the rest of the repo) and the same on every run:
    python3 pipelines/data/make_reviews.py
Label 1 is a positive review, 0 a negative one. Negated phrases ("not great") carry the
opposite sentiment, and every review has neutral filler, so a model must learn more
than one word."""
import json
import os
import random

POSITIVE = ["great", "excellent", "wonderful", "reliable", "sturdy", "delightful", "fantastic",
            "superb", "comfortable", "lovely", "brilliant", "solid", "impressive", "pleasant",
            "handy", "charming", "flawless", "smooth", "generous", "fast"]
NEGATIVE = ["terrible", "awful", "flimsy", "broken", "disappointing", "useless", "noisy",
            "poor", "cheap", "horrible", "faulty", "clumsy", "slow", "annoying", "dreadful",
            "shoddy", "fragile", "mediocre", "leaky", "buggy"]
THINGS = ["kettle", "lamp", "backpack", "keyboard", "blender", "jacket", "phone case", "chair",
          "tent", "speaker", "watch", "toaster", "printer", "bicycle bell", "umbrella", "mug",
          "charger", "router", "vacuum", "headset", "desk", "stroller", "drill", "camera"]
FILLER = ["I bought it last month.", "It arrived on a Tuesday.", "My sister uses one too.",
          "The box was blue.", "I use it every morning.", "It came with a manual.",
          "We have had it for a year.", "It was a gift.", "The colour is grey.",
          "I ordered two of them.", "Delivery took three days.", "It fits on the shelf."]
TEMPLATES = ["The {thing} is {adj}.", "This {thing} feels {adj}.", "Honestly a {adj} {thing}.",
             "Quality is {adj}.", "Overall the {thing} was {adj}.", "Such a {adj} purchase.",
             "The {thing} turned out {adj}.", "Service was {adj} and the {thing} {adj2}."]
NEGATED = ["The {thing} is not {adj}.", "Not {adj} at all.", "I would not call it {adj}.",
           "Far from {adj}."]


def phrase(rng, label):
    negate = rng.random() < 0.25
    words = (NEGATIVE if negate else POSITIVE) if label == 1 else (POSITIVE if negate else NEGATIVE)
    t = rng.choice(NEGATED if negate else TEMPLATES)
    return t.format(thing=rng.choice(THINGS), adj=rng.choice(words), adj2=rng.choice(words))


def review(rng, label):
    parts = [phrase(rng, label) for _ in range(rng.choice([1, 1, 2]))]
    parts += rng.sample(FILLER, rng.choice([1, 2]))
    rng.shuffle(parts)
    return " ".join(parts)


def write(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, sort_keys=True) + "\n")


def main():
    rng = random.Random(20261201)
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reviews")
    os.makedirs(out, exist_ok=True)
    for name, n in [("train", 2000), ("test", 400)]:
        labels = [i % 2 for i in range(n)]
        rng.shuffle(labels)
        write(os.path.join(out, f"{name}.jsonl"),
              [{"id": f"{name}-{i:05d}", "text": review(rng, l), "label": l} for i, l in enumerate(labels)])
    write(os.path.join(out, "unlabelled.jsonl"),
          [{"id": f"u-{i:05d}", "text": review(rng, rng.randrange(2))} for i in range(1000)])


if __name__ == "__main__":
    main()
