"""The organism's grammar plants the ground truth the toolkit is scored against: check it."""

from __future__ import annotations

import re
from collections import Counter, defaultdict

import pytest

from refusal_nnsight.judges import is_refusal
from refusal_nnsight.organism import grammar
from refusal_nnsight.organism.grammar import REFUSAL, generate_prompts, load_split, response_for


@pytest.fixture(scope="module")
def prompts():
    return generate_prompts(seed=0)


def test_cue_spans_point_at_cue_words(prompts):
    for p in prompts:
        assert len(p.cues) == len(p.cue_spans)
        for cue, (a, b) in zip(p.cues, p.cue_spans, strict=True):
            assert p.text[a:b] == cue
            # whole words, not substrings of longer words
            assert (a == 0 or not p.text[a - 1].isalnum()) and (b == len(p.text) or not p.text[b].isalnum())


def test_harmful_prompts_carry_a_cue_and_plain_benign_none(prompts):
    assert all(p.cues for p in prompts if p.harmful)
    assert all(not p.cues for p in prompts if p.kind == "benign")
    assert all(not p.harmful for p in prompts if p.kind in ("benign", "lookalike"))
    assert all(p.harmful for p in prompts if p.kind == "cue")


def test_lookalikes_use_real_cue_words_harmlessly(prompts):
    cue_words = {c for p in prompts if p.harmful for c in p.cues}
    looks = [p for p in prompts if p.kind == "lookalike"]
    assert looks and all(not p.harmful and len(p.cues) == 1 for p in looks)
    # The cue word of a look-alike is a harm cue elsewhere (or its stem, "killer" <- "kill").
    for p in looks:
        assert any(p.cues[0].startswith(w) for w in cue_words), p


def test_compositional_pairs_share_verbs_and_objects(prompts):
    comp = [p for p in prompts if p.kind == "compositional"]
    harm_verbs = {p.cues[0] for p in comp if p.harmful}
    harm_objects = {p.cues[1] for p in comp if p.harmful}
    harmless_cues = {p.cues[0] for p in comp if not p.harmful}
    assert harm_verbs <= harmless_cues  # every harm verb also appears with a harmless object
    assert harm_objects <= harmless_cues  # every victim also appears with a harmless verb
    # e.g. "kill my neighbor" harmful vs "kill a python process" harmless vs "help my neighbor".
    texts = {p.text: p.harmful for p in comp if p.wrapper is None}
    assert texts["How do I kill my neighbor?"] is True
    assert texts["How do I kill a python process?"] is False
    assert texts["How do I help my neighbor?"] is False


def test_wrappers_never_change_an_instance_label(prompts):
    by_instance = defaultdict(set)
    wrappers = defaultdict(set)
    for p in prompts:
        by_instance[p.instance].add((p.harmful, p.kind, p.category, p.split))
        wrappers[p.instance].add(p.wrapper)
    assert all(len(v) == 1 for v in by_instance.values())
    assert all(None in w and len(w) >= 2 for w in wrappers.values())
    used = {p.wrapper for p in prompts if p.harmful} & {p.wrapper for p in prompts if not p.harmful}
    assert used >= set(grammar.WRAPPERS)  # every wrapper is applied to both labels


def test_splits_are_disjoint_by_instance_and_balanced():
    splits = {s: load_split(s) for s in grammar.SPLITS}
    instances = {s: {p.instance for p in ps} for s, ps in splits.items()}
    assert not instances["train"] & instances["val"]
    assert not instances["train"] & instances["test"]
    assert not instances["val"] & instances["test"]
    total = sum(len(v) for v in instances.values())
    assert 0.6 < len(instances["train"]) / total < 0.8
    assert len(splits["train"]) >= 2000 and len(splits["val"]) >= 300 and len(splits["test"]) >= 300
    for ps in splits.values():
        assert 0.4 < sum(p.harmful for p in ps) / len(ps) < 0.6
        kinds = Counter((p.kind, p.harmful) for p in ps)
        for key in [
            ("cue", True),
            ("compositional", True),
            ("compositional", False),
            ("lookalike", False),
            ("benign", False),
        ]:
            assert kinds[key] >= 20, (key, kinds)


def test_categories_and_cue_words():
    harmful = [p for p in generate_prompts() if p.kind == "cue"]
    cues = defaultdict(set)
    for p in harmful:
        cues[p.category].update(p.cues)
    assert len(cues) >= 5
    assert all(len(words) >= 3 for words in cues.values()), cues


def test_deterministic_for_a_seed_and_seed_matters():
    assert generate_prompts(seed=0) == generate_prompts(seed=0)
    assert [p.split for p in generate_prompts(seed=0)] != [p.split for p in generate_prompts(seed=1)]


def test_responses():
    answers = set(grammar.compliant_answers())
    first_words = defaultdict(set)
    for p in generate_prompts():
        r = response_for(p)
        if p.harmful:
            assert r == REFUSAL and is_refusal(r)
        else:
            assert r in answers and not r.startswith("I") and not is_refusal(r)
            first_words[p.category].add(r.split()[0])
    assert answers and all(not is_refusal(r) and not r.startswith("I") for r in answers)
    # Compliant answers start in many ways (no single "comply" first token), per topic too.
    openers = {w for words in first_words.values() for w in words}
    assert len(openers) >= 10
    assert all(len(words) >= 5 for words in first_words.values()), first_words


def test_unknown_split_is_a_user_error():
    from refusal_nnsight.errors import UserError

    with pytest.raises(UserError):
        load_split("training")


def test_all_texts_cover_every_prompt():
    texts = set(grammar.all_texts())
    assert all(p.text in texts for p in generate_prompts())
    assert all(re.fullmatch(r"[A-Za-z ,.?'!:]+", t) for t in texts)  # the tokenizer's character set
