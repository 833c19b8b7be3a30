"""Regenerate the sample dataset in this folder (written for UUE; deterministic).

48 fictional users, each with two interests out of eight, writing forum posts, reviews and chat messages;
two statements per interest; label 1 for a user's interests and 0 for two interests they lack.
Users 0-31 are `train`, 32-39 `validation`, 40-47 `test`.  Run: python -m uue.data.sample_data.generate
"""

from __future__ import annotations

import random
from pathlib import Path

from uue.data.readers import write_table
from uue.data.schema import Label, Statement, UserChunk, UserData

TOPICS: dict[str, list[str]] = {
    "machine_learning": [
        "Finally got my transformer to converge after lowering the learning rate.",
        "Reading a paper on contrastive learning tonight, the loss derivation is neat.",
        "Anyone compared gradient boosting and neural nets on small tabular data?",
        "My GPU ran out of memory again, time to try mixed precision.",
        "Wrote a tokenizer from scratch to understand byte pair encoding.",
        "The validation curve finally stopped overfitting once I added dropout.",
    ],
    "hiking": [
        "Summited the ridge at dawn, the fog below looked like an ocean.",
        "New boots are great but gave me blisters on the descent.",
        "Packing list for a three day trek: tent, stove, water filter.",
        "The trail markers vanished after the second creek crossing.",
        "Saw mountain goats near the pass, worth the steep climb.",
        "Planning a hut-to-hut route through the alps next summer.",
    ],
    "horror_films": [
        "That slasher had me sleeping with the lights on for a week.",
        "Classic haunted house films still beat modern jump scares.",
        "The final twist in the possession movie was genuinely terrifying.",
        "Rewatched the zombie trilogy, the practical effects hold up.",
        "Midnight screening of a cult creature feature, loved every scream.",
        "Found-footage ghost stories work best when you never see the ghost.",
    ],
    "cooking": [
        "Made fresh pasta for the first time, the dough needs more rest.",
        "Slow braised short ribs for six hours, falling off the bone.",
        "Tip: toast your spices in oil before adding the onions.",
        "My sourdough starter finally doubled overnight.",
        "Tried a new curry recipe with tamarind and it was fantastic.",
        "Knife skills class this weekend, my brunoise is still uneven.",
    ],
    "jazz": [
        "The saxophone solo on that live bebop record is unreal.",
        "Practising walking bass lines over a twelve bar blues.",
        "Saw a trio at the club last night, the drummer used brushes all set.",
        "Modal improvisation finally clicked for me this week.",
        "Vinyl reissue of a fifties hard bop album arrived today.",
        "Transcribing trumpet phrasing is slow but teaches so much.",
    ],
    "football": [
        "What a comeback in injury time, the whole stadium erupted.",
        "Our midfield needs a proper holding player before the derby.",
        "Season ticket renewed, sitting behind the goal again.",
        "The new striker has scored in five matches in a row.",
        "Penalty shootouts are pure torture for supporters.",
        "Coaching the under twelves team on Saturday mornings.",
    ],
    "gardening": [
        "Tomatoes are ripening, the basil companion planting really helped.",
        "Spent the weekend building raised beds from reclaimed wood.",
        "Aphids on the roses again, trying ladybirds this time.",
        "Composting kitchen scraps has transformed my soil.",
        "Planted two hundred tulip bulbs for next spring.",
        "Pruned the apple tree in winter like the orchard guide said.",
    ],
    "video_games": [
        "Beat the final boss after forty attempts, my hands are shaking.",
        "The open world in this RPG is huge, already eighty hours in.",
        "Speedrunning the first level, shaved two seconds off my time.",
        "Co-op campaign with friends every Friday night.",
        "Retro platformers are still the best designed games ever.",
        "Building a new PC just to play the latest strategy game on ultra.",
    ],
}

STATEMENTS: dict[str, list[tuple[str, str | None]]] = {
    "machine_learning": [("interested in machine learning", None),
                         ("would enjoy a talk on neural networks", "a tech meetup invitation")],
    "hiking": [("loves hiking in the mountains", None), ("would buy a lightweight tent", "an outdoor gear ad")],
    "horror_films": [("would enjoy a horror film", None), ("likes scary movies", "a streaming recommendation")],
    "cooking": [("enjoys cooking at home", None), ("would like a cookbook as a gift", "a gift suggestion")],
    "jazz": [("listens to jazz", None), ("would go to a live jazz concert", "a concert listing")],
    "football": [("is a football fan", None), ("would watch the cup final", "a sports channel promotion")],
    "gardening": [("enjoys gardening", None), ("would buy seeds and compost", "a garden centre offer")],
    "video_games": [("plays video games", None), ("would enjoy a new RPG", "a game store recommendation")],
}

FILLER = [
    "Running late today, the train was cancelled again.",
    "Happy birthday to my sister!",
    "Does anyone know a good dentist downtown?",
    "Weather is awful, staying in with a cup of tea.",
    "Moving apartments next month, so many boxes.",
]
PLATFORMS = ["forum", "review", "chat"]


def build(seed: int = 7) -> tuple[list[UserData], list[Statement], list[Label]]:
    rng = random.Random(seed)
    topics = sorted(TOPICS)
    statements = [
        Statement(f"{topic}_{i}", text, context, {"family": "interest"})
        for topic in topics for i, (text, context) in enumerate(STATEMENTS[topic])
    ]
    users, labels = [], []
    for n in range(48):
        liked = rng.sample(topics, 2)
        lacking = rng.sample([t for t in topics if t not in liked], 2)
        lines = [t for topic in liked for t in rng.sample(TOPICS[topic], 4)] + rng.sample(FILLER, 2)
        rng.shuffle(lines)
        chunks = [
            UserChunk(text, rng.choice(PLATFORMS), f"2025-{1 + i % 12:02d}-{1 + (n + i) % 28:02d}T12:00:00Z")
            for i, text in enumerate(lines)
        ]
        user_id = f"u{n:03d}"
        metadata = {
            "age_bracket": rng.choice(["18-24", "25-34", "35-49", "50+"]),
            "country": rng.choice(["uk", "de", "us"]),
        }
        users.append(UserData(user_id, chunks, metadata=metadata))
        split = "train" if n < 32 else "validation" if n < 40 else "test"
        for topic, value in [(t, 1) for t in liked] + [(t, 0) for t in lacking]:
            for i in range(len(STATEMENTS[topic])):
                labels.append(Label(user_id, f"{topic}_{i}", value, split, "interest"))
    return users, statements, labels


def main() -> None:
    folder = Path(__file__).parent
    users, statements, labels = build()
    write_table(folder, "users", users)
    write_table(folder, "statements", statements)
    write_table(folder, "labels", labels)
    print(f"wrote {len(users)} users, {len(statements)} statements, {len(labels)} labels to {folder}")


if __name__ == "__main__":
    main()
