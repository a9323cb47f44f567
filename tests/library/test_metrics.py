"""pixelray.metrics against pycocoevalcap's own scorers (pure Python; its Java tokenizer is not used).

The tokenizer expectations below are what CoreNLP 3.4.1's PTBTokenizer (as pycocoevalcap runs it,
punctuation tokens then dropped) prints for the same captions.
"""

from __future__ import annotations

import random

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from pixelray.metrics import bleu, caption_scores, cider, normalize_answer, rouge_l, tokenize, vqa_accuracy

RAW_REFERENCES = {
    "img1": ["A man riding a wave on top of a surfboard.", "A surfer rides a large wave in the ocean.",
             "A person on a surfboard riding a wave.", "A man surfing on a big blue wave."],
    "img2": ["Two giraffes standing next to each other in a field.", "A pair of giraffes in a grassy field.",
             "Two giraffes are standing in the grass near trees."],
    "img3": ["A kitchen with stainless steel appliances and granite counter tops.",
             "A modern kitchen with a stove, a fridge and a microwave.", "A clean kitchen with white cabinets.",
             "The kitchen has a refrigerator, an oven and a sink.", "An empty kitchen in a new apartment."],
    "img4": ["A cat laying on top of a laptop computer.", "A cat is sleeping on a laptop keyboard.",
             "A gray cat lies on an open laptop.", "The cat's asleep on the computer."],
    "img5": ["A red stop sign on the side of a road.", "A stop sign at an intersection in a town.",
             "A red and white stop sign next to a street."],
    "img6": ["A plate of food with broccoli, carrots and rice.", "A dinner plate with rice and vegetables.",
             "Some vegetables and rice on a white plate.", "A meal of rice, broccoli and carrots."],
}
RAW_PREDICTIONS = {
    "img1": "A man riding a wave on a surfboard.",                    # good paraphrase
    "img2": "Two giraffes standing next to each other in a field.",   # exact match of a reference
    "img3": "Kitchen.",                                               # one word
    "img4": "A dog sitting on a couch.",                              # wrong
    "img5": "A stop sign on the side of a street next to a red car in a small town.",  # long
    "img6": "A plate with broccoli and rice and carrots.",
}


def _tokenised(raw_refs: dict[str, list[str]], raw_preds: dict[str, str]):
    refs = {k: [tokenize(r) for r in v] for k, v in raw_refs.items()}
    return refs, {k: [tokenize(raw_preds[k])] for k in raw_refs}


def _assert_same_as_coco(refs: dict[str, list[str]], hyps: dict[str, list[str]]) -> None:
    expected_bleu, _ = Bleu(4).compute_score(refs, hyps, verbose=0)
    assert bleu(refs, hyps) == pytest.approx(expected_bleu, abs=1e-6, rel=0)
    expected_cider, _ = Cider().compute_score(refs, hyps)
    assert cider(refs, hyps) == pytest.approx(expected_cider, abs=1e-4, rel=0)
    expected_rouge, _ = Rouge().compute_score(refs, hyps)
    assert rouge_l(refs, hyps) == pytest.approx(expected_rouge, abs=1e-6, rel=0)


def _random_corpus(seed: int, items: int = 200) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    rng = random.Random(seed)
    vocab = ("a an the man woman dog cat red blue small big sitting standing on in next to with of "
             "table street field grass ball car tree").split()
    refs, hyps = {}, {}
    for i in range(items):
        refs[f"id{i}"] = [" ".join(rng.choices(vocab, k=rng.randint(1, 12))) for _ in range(rng.randint(1, 5))]
        if rng.random() < 0.4:          # a noisy copy of a reference: some words replaced or dropped
            words = [w if rng.random() < 0.7 else rng.choice(vocab) for w in rng.choice(refs[f"id{i}"]).split()]
            words = [w for w in words if rng.random() < 0.9]
        else:
            words = rng.choices(vocab, k=rng.choice([0, 1, 2, 5, 8, 11, 14]))
        hyps[f"id{i}"] = [" ".join(words)]
    return refs, hyps


def test_hand_written_set_matches_pycocoevalcap():
    refs, hyps = _tokenised(RAW_REFERENCES, RAW_PREDICTIONS)
    assert hyps["img3"] == ["kitchen"] and hyps["img2"][0] in refs["img2"]
    _assert_same_as_coco(refs, hyps)
    # the scores are not degenerate: a good corpus, every n-gram order used
    scores = bleu(refs, hyps)
    assert 0.3 < scores[3] < scores[2] < scores[1] < scores[0] < 1.0
    assert cider(refs, hyps) > 1.0


def test_empty_hypothesis_matches_pycocoevalcap():
    refs, hyps = _tokenised(RAW_REFERENCES, {**RAW_PREDICTIONS, "img4": "..."})
    assert hyps["img4"] == [""]
    _assert_same_as_coco(refs, hyps)


@pytest.mark.parametrize("seed", [0, 1])
def test_random_corpus_matches_pycocoevalcap(seed):
    refs, hyps = _random_corpus(seed)
    _assert_same_as_coco(refs, hyps)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_bleu_orders_below_four_match_pycocoevalcap(n):
    refs, hyps = _random_corpus(7, items=60)
    expected, _ = Bleu(n).compute_score(refs, hyps, verbose=0)
    assert bleu(refs, hyps, n=n) == pytest.approx(expected, abs=1e-6, rel=0)


def test_bleu_smoothing_when_an_order_has_no_match():
    """Like pycocoevalcap, a zero 4-gram count gives a tiny positive BLEU-4, not 0 (here ~1e-4)."""
    refs = {"a": ["a man riding a horse on a beach"], "b": ["two dogs play in the snow"]}
    hyps = {"a": ["a man riding on the beach"], "b": ["dogs play snow"]}
    expected, _ = Bleu(4).compute_score(refs, hyps, verbose=0)
    scores = bleu(refs, hyps)
    assert scores == pytest.approx(expected, abs=1e-6, rel=0)
    assert 1e-5 < scores[3] < 1e-3
    empty = {"a": [""], "b": [""]}
    assert bleu(refs, empty) == pytest.approx(Bleu(4).compute_score(refs, empty, verbose=0)[0], abs=1e-9, rel=0)


def test_known_values():
    same = {"x": ["the cat sat on the mat"]}
    assert bleu(same, same) == pytest.approx([1.0] * 4, abs=1e-9)
    # LCS("a b c d", "a c d e") = 3: precision = recall = 3/4, so F = 3/4 whatever beta is
    assert rouge_l({"x": ["a b c d"]}, {"x": ["a c d e"]}) == pytest.approx(0.75)
    # hypothesis half the reference length: brevity penalty exp(1 - 2), unigram precision 1
    assert bleu({"x": ["a b c d"]}, {"x": ["a b"]}, n=1)[0] == pytest.approx(0.36787944, abs=1e-8)
    # a one-item corpus: every idf is log(1) - log(1) = 0, so CIDEr is 0
    assert cider(same, same) == 0.0


def test_scorers_reject_malformed_input():
    with pytest.raises(ValueError, match="ids differ"):
        bleu({"a": ["x y"]}, {"b": ["x y"]})
    with pytest.raises(ValueError, match="non-empty list"):
        cider({"a": []}, {"a": ["x y"]})
    with pytest.raises(ValueError, match="exactly one"):
        rouge_l({"a": ["x y"]}, {"a": ["x y", "y x"]})
    with pytest.raises(ValueError, match="no ids"):
        bleu({}, {})


@pytest.mark.parametrize("raw, expected", [
    ("It's a dog, isn't it?", "it 's a dog is n't it"),
    ("Don't stop!", "do n't stop"),
    ("A man can't ride; he won't.", "a man ca n't ride he wo n't"),
    ("I'm sure they're fine, we've seen it; you'll see.", "i 'm sure they 're fine we 've seen it you 'll see"),
    ("THEY'RE HERE", "they 're here"),
    ("The dog's bone, on the table...", "the dog 's bone on the table"),
    ("The dogs' toys", "the dogs toys"),
    ('A "red" bus (double-decker) -- in London.', "a red bus -lrb- double-decker -rrb- in london"),
    ("a [red] {blue}", "a -lsb- red -rsb- -lcb- blue -rcb-"),
    ("It’s a “quoted” word", "it 's a quoted word"),
    ("a cat 'sitting' there.", "a cat sitting there"),
    ("A sign on Main St.", "a sign on main st."),
    ("The U.S. flag", "the u.s. flag"),
    ("A picture of vitamin c.", "a picture of vitamin c."),
    ("3.5 inches, 1,000 people at 10:30.", "3.5 inches 1,000 people at 10:30"),
    ("A plane flying over the city at 5:00pm", "a plane flying over the city at 5:00 pm"),
    ("I cannot", "i can not"),
    ("He's gonna win.", "he 's gon na win"),
    ("'Tis the season", "'t is the season"),
    ("Wow!!", "wow !!"),
    ("$5 and 50% off", "$ 5 and 50 % off"),
    ("A £5 note on a table.", "a # 5 note on a table"),
    ("and/or a / b", "and/or a / b"),
    ("a man - riding", "a man riding"),
    ("The clock reads 3 o'clock.", "the clock reads 3 o'clock"),
    ("A 5'10\" man standing.", "a 5 10 man standing"),
    ("a man wearing a hat , sunglasses and a shirt .", "a man wearing a hat sunglasses and a shirt"),
    ("  A skateboarder doing a trick  ", "a skateboarder doing a trick"),
])
def test_tokenize_like_ptb_tokenizer(raw, expected):
    assert tokenize(raw) == expected


def test_caption_scores_tokenises_and_matches_pycocoevalcap():
    scores = caption_scores(RAW_REFERENCES, RAW_PREDICTIONS)
    assert list(scores) == ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "CIDEr", "ROUGE-L"]
    refs, hyps = _tokenised(RAW_REFERENCES, RAW_PREDICTIONS)
    expected_bleu, _ = Bleu(4).compute_score(refs, hyps, verbose=0)
    assert [scores[f"BLEU-{k}"] for k in range(1, 5)] == pytest.approx(expected_bleu, abs=1e-6, rel=0)
    assert scores["CIDEr"] == pytest.approx(Cider().compute_score(refs, hyps)[0], abs=1e-4, rel=0)
    assert scores["ROUGE-L"] == pytest.approx(Rouge().compute_score(refs, hyps)[0], abs=1e-6, rel=0)
    perfect = caption_scores(RAW_REFERENCES, {k: v[0].upper() for k, v in RAW_REFERENCES.items()})
    assert [perfect[f"BLEU-{k}"] for k in range(1, 5)] == pytest.approx([1.0] * 4, abs=1e-9)
    assert perfect["ROUGE-L"] == pytest.approx(1.0)


def test_caption_scores_errors():
    with pytest.raises(ValueError, match=r"1 without a prediction \(e.g. \['img6'\]\)"):
        caption_scores(RAW_REFERENCES, {k: v for k, v in RAW_PREDICTIONS.items() if k != "img6"})
    with pytest.raises(ValueError, match=r"1 without references \(e.g. \['extra'\]\)"):
        caption_scores(RAW_REFERENCES, {**RAW_PREDICTIONS, "extra": "a dog"})
    with pytest.raises(ValueError, match=r"empty reference list \(e.g. \['img2'\]\)"):
        caption_scores({**RAW_REFERENCES, "img2": []}, RAW_PREDICTIONS)
    with pytest.raises(ValueError, match="no ids"):
        caption_scores({}, {})


@pytest.mark.parametrize("raw, expected", [
    ("Two", "2"), ("a dog", "dog"), ("The Dog.", "dog"), ("None", "0"), ("yes!", "yes"),
    ("dont", "don't"), ("couldnt've", "couldn't've"), ("10,000", "10000"), ("3.5", "3.5"),
    ("red, white", "red white"), ("black/white", "black white"), ("  an apple\n", "apple"),
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_vqa_accuracy_single_reference_is_exact_match():
    preds = {"q1": "Two", "q2": "a dog", "q3": "cat", "q4": "Yes."}
    refs = {"q1": ["2"], "q2": ["dog"], "q3": ["dog"], "q4": ["yes"]}
    assert vqa_accuracy(preds, refs) == pytest.approx(3 / 4)


@pytest.mark.parametrize("matches, expected", [(0, 0.0), (1, 1 / 3), (2, 2 / 3), (3, 1.0), (7, 1.0)])
def test_vqa_accuracy_ten_human_answers(matches, expected):
    humans = ["Red"] * matches + ["blue", "green", "dark red", "maroon", "pink", "orange", "a red one"][: 10 - matches]
    humans += ["crimson"] * (10 - len(humans))
    assert len(humans) == 10
    assert vqa_accuracy({"q": "red"}, {"q": humans}) == pytest.approx(expected)


def test_vqa_accuracy_averages_items_and_rejects_bad_input():
    refs = {"a": ["two"] * 2 + ["three"] * 8, "b": ["no"] * 10, "c": ["dog"]}
    assert vqa_accuracy({"a": "2", "b": "No", "c": "the dog"}, refs) == pytest.approx((2 / 3 + 1 + 1) / 3)
    with pytest.raises(ValueError, match="ids differ"):
        vqa_accuracy({"a": "2"}, refs)
    with pytest.raises(ValueError, match="empty reference list"):
        vqa_accuracy({"a": "2"}, {"a": []})
