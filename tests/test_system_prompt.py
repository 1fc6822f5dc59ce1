"""The system prompt setting reaches every conversation the data and the evals build."""

import json

import pandas as pd

from introspect.config import with_system
from introspect.data import DataConfig, make_examples
from introspect.detection import build_prompt
from introspect.evals.concepts import steered_chat
from introspect.evals.localization import localization_prompts
from introspect.examples import to_detection_examples
from introspect.vectors import VectorSet, random_vectors

SYSTEM = "You are a helpful assistant."
VS = VectorSet(random_vectors(64, 4, 0), "tiny-random", "random", 2, name="random")


def test_with_system_keeps_a_conversation_that_brings_its_own():
    user = [{"role": "user", "content": "hi"}]
    assert with_system(user, None) == user
    assert with_system(user, SYSTEM)[0] == {"role": "system", "content": SYSTEM}
    own = [{"role": "system", "content": "x"}, *user]
    assert with_system(own, SYSTEM) == own


def test_training_rows_carry_it_into_the_prompt(tiny):
    config = DataConfig(n=4, magnitudes=[8.0], magnitude_mode="absolute", system_prompt=SYSTEM)
    df = make_examples(config, 4, VS)
    assert (df["system_prompt"] == SYSTEM).all()
    example = to_detection_examples(df.iloc[:1], {"random": VS}, 4, 64)[0]
    prompt = build_prompt(tiny.tokenizer, example)
    assert SYSTEM in tiny.tokenizer.decode(prompt.prefix_ids)
    plain = make_examples(DataConfig(n=4, magnitudes=[8.0], magnitude_mode="absolute"), 4, VS)
    assert plain["system_prompt"].isna().all()


def test_b6_and_b7_conversations_start_with_it_and_b7_still_steers_the_sentence(tiny):
    tok = tiny.tokenizer
    ids, n_prefix = steered_chat(tok, "ctx", "reply", "what?", SYSTEM)
    assert tok.decode(ids[:n_prefix]).count(SYSTEM) == 1
    sentences = ["The sky was grey.", "A dog barked twice.", "Rain fell at noon."]
    trials = pd.DataFrame(
        [{"question": "sentence", "sentences": json.dumps(sentences), "steered_sentence": 1,
          "vector_idx": 0, "layer_start": 0, "layer_end": 2, "magnitude": 4.0}]
    )  # fmt: skip
    [prompt] = localization_prompts(tok, trials, VS.vectors, system_prompt=SYSTEM)
    assert SYSTEM in tok.decode(prompt.prefix_ids)
    start, end = prompt.steering.positions
    assert tok.decode(prompt.prefix_ids[start:end]).strip() == "A dog barked twice."
