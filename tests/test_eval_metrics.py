"""Evaluation metrics: VQA accuracy as the official VQAv2 script computes it, BLEU/CIDEr-D against
pycocoevalcap's Java pipeline, retrieval recall@k on hand-built similarity matrices."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from vlmspec.diagnostics import UserInputError
from vlmspec.evaluation.metrics import (
    caption_scores,
    normalize_answer,
    process_punctuation,
    ptb_tokenize,
    recall_at_k,
    retrieval_scores,
    tokenize_caption,
    tokenize_captions,
    vqa_accuracy,
    vqa_scores,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "eval"


def ten(*pairs: tuple[str, int]) -> list[str]:
    """Ten human answers from (answer, count) pairs."""
    out = [a for a, n in pairs for _ in range(n)]
    assert len(out) == 10
    return out


# ---------------------------------------------------------------- VQA: normalisation, case by case
@pytest.mark.parametrize("raw, normal", [
    ("Red", "red"),                                  # lower-cased
    ("  red\n", "red"),                              # ends stripped, newline/tab become spaces
    ("red.", "red"),                                 # a period not followed by a digit goes
    ("3.5", "3.5"),                                  # ... one followed by a digit stays
    ("u.s.", "us"),
    ("Two", "2"), ("none", "0"), ("ten", "10"),     # number words to digits
    ("eleven", "eleven"),                            # ... only zero/none..ten
    ("a dog", "dog"), ("the red one", "red 1"), ("an apple", "apple"),   # articles out
    ("dont", "don't"), ("isnt", "isn't"), ("youre", "you're"),           # contractions restored
    ("somebody'd", "somebodyd"),                     # the table's one odd entry, kept
    ("black/white", "black white"),                  # punctuation not next to a space: a space
    ("black / white", "black white"),                # ... next to a space: deleted
    ("(red)", "red"), ("yes!", "yes"), ("t-shirt", "t shirt"), ("c++", "c"),
    ("1,000", "1000"),                               # a comma between digits: every mark deleted
    ("red/blue 1,000", "redblue 1000"),
    ("it's", "it's"), ("o'clock", "o'clock"),       # apostrophes are not punctuation here
    ("10:30", "10:30"),                              # nor is the colon
])
def test_answer_normalisation(raw: str, normal: str) -> None:
    assert normalize_answer(raw) == normal


def test_period_removal_stops_after_32() -> None:
    # The script passes re.UNICODE (32) as re.sub's count: only the first 32 periods are removed.
    assert normalize_answer("a." * 40) == "a" * 33 + ".a" * 7 + "."


def test_punctuation_checks_the_original_text() -> None:
    # Each mark is tested on its own ("," has a space beside it: deleted; "/" has none: a space) ...
    assert process_punctuation("a, b/c") == "a b c"
    assert process_punctuation("1,2 b/c") == "12 bc"     # ... unless a digit-comma-digit deletes them all


# ---------------------------------------------------------------- VQA: accuracy
@pytest.mark.parametrize("matching, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_leave_one_out_accuracy(matching: int, expected: float) -> None:
    # k humans said "red": a left-out "red" leaves k-1 of 9, another leaves k; min(./3, 1), averaged.
    answers = ten(("red", matching), ("blue", 10 - matching))
    assert vqa_accuracy("red", answers) == pytest.approx(expected)
    assert vqa_accuracy("Red.", answers) == pytest.approx(expected)


def test_prediction_normalised_but_identical_answers_are_not() -> None:
    assert vqa_accuracy("two", ["2"] * 10) == 1.0
    assert vqa_accuracy("a dog", ["dog"] * 10) == 1.0
    # All ten answers identical: the script leaves them untouched, so "Two" never equals "2".
    assert vqa_accuracy("two", ["Two"] * 10) == 0.0
    assert vqa_accuracy("two", ["Two"] * 10, normalize_answers=True) == 1.0
    # Answers that differ get the punctuation step (only): "yes." counts as "yes", "Yes" does not ...
    assert vqa_accuracy("yes", ten(("yes.", 3), ("Yes", 7))) == pytest.approx(0.9)
    # ... and they are not stripped again: "yes!" becomes "yes " and matches nothing.
    assert vqa_accuracy("yes", ten(("yes!", 3), ("yes", 7))) == pytest.approx(1.0)
    assert vqa_accuracy("yes", ten(("yes!", 7), ("yes", 3))) == pytest.approx(0.9)


def test_fewer_than_ten_answers() -> None:
    assert vqa_accuracy("yes", ["yes"]) == 1.0 and vqa_accuracy("no", ["yes"]) == 0.0   # exact match
    assert vqa_accuracy("red", ["red", "red"]) == 1.0                    # divisor n-1 = 1
    assert vqa_accuracy("red", ["red", "blue"]) == pytest.approx(0.5)
    assert vqa_accuracy("red", ["red", "red", "blue"]) == pytest.approx((0.5 + 0.5 + 1) / 3)
    # From four answers on, the script's formula as it is: 3 matching of 4 -> (2/3 * 3 + 1) / 4.
    assert vqa_accuracy("red", ["red", "red", "red", "blue"]) == pytest.approx(0.75)
    with pytest.raises(ValueError):
        vqa_accuracy("red", [])


def test_dataset_accuracy_and_answer_types() -> None:
    metrics, per = vqa_scores(["red", "2", "no"], [ten(("red", 10)), ten(("2", 2), ("3", 8)), ["yes"] * 10],
                              ["other", "number", "yes/no"])
    assert per == pytest.approx([1.0, 0.6, 0.0])
    assert metrics["vqa_accuracy"] == pytest.approx(100 * 1.6 / 3)
    assert metrics["vqa_accuracy_per_answer_type"] == pytest.approx({"number": 60.0, "other": 100.0, "yes/no": 0.0})


# ---------------------------------------------------------------- captions: tokenisation
@pytest.mark.parametrize("caption, tokens", [
    ("A man riding a wave on top of a surfboard.", "a man riding a wave on top of a surfboard"),
    ("The dog's toy isn't here; it's there!", "the dog 's toy is n't here it 's there"),
    ("Two dogs (one black) play.", "two dogs -lrb- one black -rrb- play"),    # -lrb- survives the filter
    ("A 3.5-inch screen shows $5.99 and 1,000 people.", "a 3.5-inch screen shows $ 5.99 and 1,000 people"),
    ("At 10:30 a.m. in the U.S. we cannot wait.", "at 10:30 a.m. in the u.s. we can not wait"),
    ("Mr. Smith said \"hello\" -- twice...", "mr. smith said hello twice"),
    ("A well-known chef, e.g. Dr. Who.", "a well-known chef e.g. dr. who"),
    ("“Fancy” quotes — and ½ café", "fancy quotes and 1/2 café"),
    ("gonna wanna y'all o'clock", "gon na wan na y' all o'clock"),
])
def test_tokenisation_by_hand(caption: str, tokens: str) -> None:
    assert tokenize_caption(caption) == tokens


def test_tokenisation_matches_recorded_reference() -> None:
    fx = json.loads((FIXTURES / "captions.json").read_text())
    mine = tokenize_captions(fx["references"])
    for key, expected in fx["expected_tokens"].items():
        assert mine[key] == expected


# ---------------------------------------------------------------- captions: BLEU / CIDEr
def test_identical_captions_score_full() -> None:
    pytest.importorskip("pycocoevalcap")
    refs = {1: ["a man is riding a horse on the beach"] * 5, 2: ["two dogs play in the snow"] * 5}
    metrics, per = caption_scores({1: refs[1][0], 2: refs[2][0]}, refs)
    assert metrics["bleu4"] == pytest.approx(1.0, abs=1e-6)
    assert per[1]["bleu4"] == pytest.approx(1.0, abs=1e-6)
    assert per[1]["cider"] == pytest.approx(10.0) and metrics["cider"] == pytest.approx(10.0)


def test_bleu_small_example_by_hand() -> None:
    pytest.importorskip("pycocoevalcap")
    # 9-word candidate vs one 10-word reference: precisions 9/9, 7/8, 5/7, 3/6; brevity penalty e^(1-10/9).
    metrics, _ = caption_scores({0: "a man is riding a horse on the beach"},
                                {0: ["a man is riding a brown horse on the beach"]})
    expected = math.exp(1 - 10 / 9) * (1 * 7 / 8 * 5 / 7 * 3 / 6) ** 0.25
    assert metrics["bleu4"] == pytest.approx(expected, rel=1e-6)
    assert metrics["cider"] == 0.0        # one image: every n-gram has idf log(1/1) = 0


def test_caption_metrics_match_recorded_reference() -> None:
    pytest.importorskip("pycocoevalcap")
    fx = json.loads((FIXTURES / "captions.json").read_text())
    metrics, per = caption_scores(fx["predictions"], fx["references"])
    for name, value in fx["expected"].items():
        assert metrics[name] == pytest.approx(value, rel=1e-12), name
    assert set(per) == set(fx["predictions"])


def test_missing_pycocoevalcap_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pycocoevalcap.bleu.bleu", None)     # makes the import fail
    with pytest.raises(UserInputError) as e:
        caption_scores({1: "a dog"}, {1: ["a dog"]})
    assert e.value.diagnostics[0].code == "E0552" and "vlmspec[eval]" in (e.value.diagnostics[0].help or "")


def test_caption_keys_must_match() -> None:
    with pytest.raises(ValueError, match="differ in keys"):
        caption_scores({1: "a"}, {2: ["a"]})


#: Captions with the constructions where PTB tokenisation is subtle, checked against the jar live.
TRICKY = [
    "A man's hat and the kids' bikes.", "Don't, can't, won't, I'm, you're, we've, they'll, he'd.",
    "She said 'hi there' and \"bye\".", "A 6'2\" man", "Rock 'n' roll, o'clock, y'all, O'Neill's dog.",
    "Gonna, wanna, gotta, lemme, gimme, cannot.", "Jan. 5, Mr. Smith, Dr. Jones, St. Louis, etc.",
    "At 5 p.m. the U.S. team left (again).", "i.e., e.g. this; vs. that: a.k.a. the No. 5 bus",
    "$5.99, 50% off, 1/2 price, 2+2=4, AT&T, A&W", "well-known x-ray T-shirt mother-in-law 3-d 2.5-ton",
    "a--b a---b a----b - -- --- ...", "dog.cat www.google.com me@x.com http://x.com/a?b=c",
    "[a] {b} <c> <b class=x> a<b", "“quoted” ‘single’ «guill» — – … ½ ¼ ¾", "C++ and c# and F#",
    "the '90s and 70's and '60S", "10am 10:30pm 3rd 21st 1,000,000 3.14 -5 +7 .5", "#hashtag @user #1a @home5'6\" tall",
    "and/or his/her a/b/c/d 12/25/2014 5 7/8", "THE CAT WANTS TO EAT THE '90S STYLE CAKE!!!", "  leading  spaces\t",
    "caf\u00e9 na\u00efve \u00fcber Stra\u00dfe \u0436\u0443\u043a", "emoji \U0001f600 here", "the st. bernard on a st.",
]


@pytest.mark.skipif(shutil.which("java") is None, reason="the reference PTBTokenizer is a Java jar; java is not on PATH")
def test_against_java_reference_pipeline() -> None:
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    fx = json.loads((FIXTURES / "captions.json").read_text())
    refs, preds = fx["references"], fx["predictions"]
    extra = {f"t{i}": [c] for i, c in enumerate(TRICKY)}
    try:
        gts = PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in {**refs, **extra}.items()})
        res = PTBTokenizer().tokenize({k: [{"caption": v}] for k, v in preds.items()})
    except OSError as e:   # it writes a temporary file into its own package folder
        pytest.skip(f"the reference PTBTokenizer could not run here: {e}")
    mine = tokenize_captions({**refs, **extra})
    diffs = [(c, m, r) for k in gts for c, m, r in zip({**refs, **extra}[k], mine[k], gts[k], strict=True) if m != r]
    assert not diffs, diffs
    ref_bleu, _ = Bleu(4).compute_score({k: gts[k] for k in refs}, res, verbose=0)
    ref_cider, _ = Cider().compute_score({k: gts[k] for k in refs}, res)
    metrics, _ = caption_scores(preds, refs)
    assert metrics["bleu4"] == pytest.approx(ref_bleu[3], rel=1e-12)
    assert metrics["cider"] == pytest.approx(ref_cider, rel=1e-12)


def test_ptb_tokens_before_the_filter() -> None:
    assert ptb_tokenize("Hello, world.") == ["hello", ",", "world", "."]
    assert ptb_tokenize("(a) [b] {c}") == ["-lrb-", "a", "-rrb-", "-lsb-", "b", "-rsb-", "-lcb-", "c", "-rcb-"]


# ---------------------------------------------------------------- retrieval
def test_recall_on_constructed_similarities() -> None:
    # 3 images, 2 captions each (image i owns captions 2i, 2i+1).
    owner = [0, 0, 1, 1, 2, 2]
    sim = np.array([
        # c0   c1   c2   c3   c4   c5
        [0.9, 0.1, 0.8, 0.2, 0.3, 0.0],   # image 0: own c0 ranked 1st                     -> i2t hit @1
        [0.9, 0.8, 0.1, 0.7, 0.2, 0.3],   # image 1: best own c3 ranked 3rd (after c0, c1)  -> hit @3
        [0.6, 0.5, 0.4, 0.3, 0.2, 0.1],   # image 2: best own c4 ranked 5th                 -> hit @5
    ])
    r = recall_at_k(sim, owner, ks=(1, 3, 5))
    assert r["i2t_r1"] == pytest.approx(100 / 3)
    assert r["i2t_r3"] == pytest.approx(200 / 3)
    assert r["i2t_r5"] == pytest.approx(100.0)
    # text -> image (columns), rank of the caption's own image:
    # c0: 0.9 tied with image 1, the tie goes to the lower index: 1st.  c1: 0.1 < 0.8, 0.5: 3rd.
    # c2: 0.1 < 0.8, 0.4: 3rd.  c3: 0.7: 1st.  c4: 0.2 < 0.3 and tied with image 1 (lower index): 3rd.
    # c5: 0.1 < 0.3: 2nd.
    assert r["t2i_r1"] == pytest.approx(100 * 2 / 6)
    assert r["t2i_r3"] == pytest.approx(100.0)
    assert recall_at_k(sim, owner, ks=(2,))["t2i_r2"] == pytest.approx(100 * 3 / 6)


def test_recall_from_embeddings_and_ties() -> None:
    images = np.eye(3)
    texts = np.repeat(np.eye(3), 5, axis=0) * 2.0      # cosine: scale does not matter
    owner = [i for i in range(3) for _ in range(5)]
    r = retrieval_scores(images, texts, owner)
    assert all(r[f"{d}_r{k}"] == 100.0 for d in ("i2t", "t2i") for k in (1, 5, 10))
    assert r["images"] == 3 and r["captions"] == 15
    # All similarities equal: stable order, so only image 0's captions and image 0 come first.
    flat = recall_at_k(np.ones((3, 6)), [0, 0, 1, 1, 2, 2], ks=(1,))
    assert flat["i2t_r1"] == pytest.approx(100 / 3) and flat["t2i_r1"] == pytest.approx(100 / 3)
    with pytest.raises(ValueError):
        recall_at_k(np.ones((2, 3)), [0, 1], ks=(1,))


def test_metrics_print_on_one_scale_each() -> None:
    from vlmspec.evaluation import describe_metrics

    line = describe_metrics({"vqa_accuracy": 0, "questions": 400})
    assert line == "vqa_accuracy 0.00%, questions 400"
    line = describe_metrics({"bleu4": 0.31234, "cider": 1.5, "images": 8})
    assert line == "bleu4 0.3123, cider 1.5000, images 8 (BLEU 0-1, CIDEr-D 0-10)"
    assert describe_metrics({"i2t_r1": 12.5, "t2i_r10": 100.0}) == "i2t_r1 12.50%, t2i_r10 100.00%"
