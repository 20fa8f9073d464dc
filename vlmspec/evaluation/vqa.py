"""VQA accuracy as the official VQAv2 evaluation (GT-Vision-Lab `vqaEval.py`) computes it.

Published VQAv2 numbers come from that script, so its exact behaviour is the definition, quirks included:

- The prediction is normalised: newlines and tabs become spaces, the ends are stripped, punctuation is
  handled (below), then it is lower-cased, split on whitespace, number words `none`/`zero`..`ten` become
  digits, the articles `a an the` are dropped and apostrophe-less contractions (`dont`) get their
  apostrophe back (`don't`).
- Punctuation: each of ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` is deleted when the text has it next
  to a space, or when the text has a comma between two digits anywhere (`1,000`); otherwise it becomes a
  space (`black/white` -> `black white`). Then every period not followed by a digit is deleted (`3.5`
  keeps its period) -- but at most the first 32, because the script passes `re.UNICODE` (32) where
  `re.sub` expects a count.
- The human answers are only punctuation-processed, and only when they are not all identical; they are
  not stripped afterwards, so an answer `yes!` becomes `yes ` and matches nothing. VQAv2's answers are
  already normalised when the dataset is built, so this matters only for other data; pass
  `normalize_answers=True` to give the answers the prediction's full normalisation.
- Accuracy of one question = the mean, over the 10 leave-one-out subsets of the 10 human answers, of
  min(#humans in the subset who gave the prediction / 3, 1). Dataset accuracy = the mean over questions,
  reported in percent.

Fewer than 10 answers (other datasets, hand-made JSONL): with n >= 4 answers the same formula is used
over the n leave-one-out subsets (identical to the script). With 2 or 3 answers the script's formula can
never reach 1 (a subset holds at most n-1 < 3 humans), so the divisor becomes n-1: the prediction is fully
right when every other human agrees. With a single answer it is exact match (after normalisation). An
empty answer list is an error of the data, caught by `formats`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

#: Characters the script treats as punctuation (its current, Python 3 version).
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
               "?", "!")
_COMMA_BETWEEN_DIGITS = re.compile(r"\d,\d")
#: The script's pattern reads as "a period not preceded by a digit", but its look-behind is written as a
#: look-ahead (`(?!<=\d)`), which never fires; what it does is: a period not followed by a digit.
_PERIOD = re.compile(r"\.(?!\d)")
_PERIOD_LIMIT = 32            # re.UNICODE, passed as `count` by the script

NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})


def _contractions() -> dict[str, str]:
    """The script's contraction table, as it acts on lower-cased words.

    Written as `restored form: spellings without (some) apostrophes`. The script's table also has keys with
    capitals (`Im`, `Ive`, `Id've`), which can never match a lower-cased word, so they are left out; its
    identity entries (`let's`) change nothing and are left out too. Its one odd entry is kept:
    `somebody'd` becomes `somebodyd`.
    """
    table = {
        "ain't": "aint", "aren't": "arent", "can't": "cant", "could've": "couldve", "couldn't": "couldnt",
        "couldn't've": "couldn'tve couldnt've", "didn't": "didnt", "doesn't": "doesnt", "don't": "dont",
        "hadn't": "hadnt", "hadn't've": "hadnt've hadn'tve", "hasn't": "hasnt", "haven't": "havent",
        "he'd": "hed", "he'd've": "hed've he'dve", "he's": "hes", "how'd": "howd", "how'll": "howll",
        "how's": "hows", "isn't": "isnt", "it'd": "itd", "it'd've": "itd've it'dve", "it'll": "itll",
        "ma'am": "maam", "mightn't": "mightnt", "mightn't've": "mightnt've mightn'tve", "might've": "mightve",
        "mustn't": "mustnt", "must've": "mustve", "needn't": "neednt", "not've": "notve", "o'clock": "oclock",
        "oughtn't": "oughtnt", "'ow's'at": "ow's'at 'ows'at 'ow'sat", "shan't": "shant",
        "she'd've": "shed've she'dve", "should've": "shouldve", "shouldn't": "shouldnt",
        "shouldn't've": "shouldnt've shouldn'tve", "somebodyd": "somebody'd",
        "somebody'd've": "somebodyd've somebody'dve", "somebody'll": "somebodyll", "somebody's": "somebodys",
        "someone'd": "someoned", "someone'd've": "someoned've someone'dve", "someone'll": "someonell",
        "someone's": "someones", "something'd": "somethingd", "something'd've": "somethingd've something'dve",
        "something'll": "somethingll", "that's": "thats", "there'd": "thered", "there'd've": "thered've there'dve",
        "there're": "therere", "there's": "theres", "they'd": "theyd", "they'd've": "theyd've they'dve",
        "they'll": "theyll", "they're": "theyre", "they've": "theyve", "'twas": "twas", "wasn't": "wasnt",
        "we'd've": "wed've we'dve", "we've": "weve", "weren't": "werent", "what'll": "whatll",
        "what're": "whatre", "what's": "whats", "what've": "whatve", "when's": "whens", "where'd": "whered",
        "where's": "wheres", "where've": "whereve", "who'd": "whod", "who'd've": "whod've who'dve",
        "who'll": "wholl", "who's": "whos", "who've": "whove", "why'll": "whyll", "why're": "whyre",
        "why's": "whys", "won't": "wont", "would've": "wouldve", "wouldn't": "wouldnt",
        "wouldn't've": "wouldnt've wouldn'tve", "y'all": "yall", "y'all'll": "yall'll y'allll",
        "y'all'd've": "yall'd've y'alld've y'all'dve", "you'd": "youd", "you'd've": "youd've you'dve",
        "you'll": "youll", "you're": "youre", "you've": "youve",
    }
    return {spelling: restored for restored, spellings in table.items() for spelling in spellings.split()}


CONTRACTIONS = _contractions()


def process_punctuation(text: str) -> str:
    """The script's punctuation step (see the module docstring), applied to prediction and answers."""
    out = text
    delete_all = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for p in PUNCTUATION:
        # The test reads the original text, the replacement acts on the text so far: as the script does.
        if delete_all or (p + " ") in text or (" " + p) in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=_PERIOD_LIMIT)


def process_digits_articles(text: str) -> str:
    """Lower-case, number words to digits, articles out, contractions restored; words re-joined by spaces."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_answer(text: str) -> str:
    """A predicted answer as the script compares it."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digits_articles(process_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str], normalize_answers: bool = False) -> float:
    """Accuracy of one predicted answer against the human answers, in [0, 1]."""
    if not answers:
        raise ValueError("a VQA question needs at least one human answer")
    pred = normalize_answer(prediction)
    if normalize_answers:
        refs = [normalize_answer(a) for a in answers]
    elif len(set(answers)) > 1:
        refs = [process_punctuation(a) for a in answers]
    else:
        refs = list(answers)
    hits = [ref == pred for ref in refs]
    n = len(hits)
    if n == 1:
        return float(hits[0])
    needed = min(3, n - 1)
    total = sum(hits)
    return sum(min(1.0, (total - hit) / needed) for hit in hits) / n


def vqa_scores(predictions: Sequence[str], answers: Sequence[Sequence[str]], answer_types: Sequence[str | None]
               | None = None, normalize_answers: bool = False) -> tuple[dict[str, object], list[float]]:
    """Dataset VQA accuracy in percent (the script's `overall`, unrounded), per answer type when the
    annotations give one (`yes/no`, `number`, `other`), and the per-question accuracies in [0, 1]."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} questions")
    per_question = [vqa_accuracy(p, a, normalize_answers) for p, a in zip(predictions, answers, strict=True)]
    metrics: dict[str, object] = {
        "vqa_accuracy": 100.0 * sum(per_question) / len(per_question) if per_question else 0.0,
        "questions": len(per_question),
    }
    if answer_types is not None and any(t for t in answer_types):
        groups: dict[str, list[float]] = {}
        for acc, kind in zip(per_question, answer_types, strict=True):
            if kind:
                groups.setdefault(kind, []).append(acc)
        metrics["vqa_accuracy_per_answer_type"] = {k: 100.0 * sum(v) / len(v) for k, v in sorted(groups.items())}
    return metrics, per_question
