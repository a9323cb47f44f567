"""Caption and VQA metrics without Java: BLEU-1..4, CIDEr-D and ROUGE-L as the COCO caption
evaluation computes them, and the VQA accuracy.

`bleu`, `cider` and `rouge_l` take what pycocoevalcap's `compute_score` takes (id -> list of
tokenised references, id -> one-element list with the tokenised hypothesis) and reproduce its
`Bleu(4)` ("closest" reference length), `Cider()` and `Rouge()` scores, quirks included (noted
where they occur); tests/test_metrics.py checks them against pycocoevalcap. `tokenize` replaces
its Java PTBTokenizer (Stanford CoreNLP 3.4.1, `-preserveLines -lowerCase`, then its PUNCTUATIONS
dropped) with regular expressions that give the same tokens on ordinary English captions;
rarer CoreNLP rules (URLs, e-mails, phone numbers, smileys, #tags, "R&B", "-5", "y'all",
"rock'n'roll") are not reproduced.
METEOR and SPICE need Java and are not offered. `caption_scores` is the one-call entry point.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Iterable
from itertools import combinations

import numpy as np

# pycocoevalcap.tokenizer.ptbtokenizer.PUNCTUATIONS. CoreNLP lowercases *after* escaping, so
# "(" comes out as "-lrb-", which this list (with "-LRB-") never matches: brackets stay tokens.
PUNCTUATIONS = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                          ".", "?", "!", ",", ":", "-", "--", "...", ";"])
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_CURRENCY = {"¢": "cents", "£": "#", "¤": "$", "€": "$", "¥": "¥"}     # CoreNLP's normalizeCurrency
# Words CoreNLP keeps with their final period (its ABBREV1/ABBREV2 lists, case-insensitive part).
_ABBREVIATIONS = frozenset("""jan feb mar apr jun jul aug sep sept oct nov dec mon tue tues wed thu
    thurs fri ala ariz calif colo conn ct dak fla ga ind kan kans ky md mich minn mo mont neb nev okla
    penn tenn va vt wis wisc wyo inc co cos corp ltd plc bancorp assn univ intl sys tel est ext sq jr
    sr bros blvd rd esq etc al seq bldg mr mrs ms dr drs prof profs sen sens rep reps lt col gen gov
    govs adm rev maj sgt cpl pvt capt st ste ave mt ft pres lieut hon brig cmdr comdr pfc spc supt supts det
    adj adv asst assoc ens insp mlle mme msgr sfc messrs atty attys pty pte ptys rt bhd alex wm jos cie
    treas ph vs cf invt elec natl mfg mtg dept""".split())
_ACRONYM = re.compile(r"[A-Za-z](?:\.[A-Za-z])*\.")            # "a.", "u.s.", "e.g."
_KEPT_QUOTE_START = r"(?:s|m|d|re|ve|ll|t|em|till?|cause|[2-9]0s)(?![A-Za-z0-9])"
_PTB_RULES: list[tuple[str, str | Callable[[re.Match[str]], str]]] = [
    (r"[\"“”„«»]|&quot;", " "),                                  # double quotes: `` and '', dropped
    (r"[‘’`]", "'"),
    (r"(?<=\S)\.{2,}", ". "),                                     # "St...." keeps "st."
    (r"…|\.{2,}", " "),                                           # ellipses (and ".."): dropped
    (r"[—–]|(?<![^\W_])-+|-+(?![^\W_])", lambda m: " " if len(m[0]) <= 4 else f" {m[0]} "),
    (r"(?<!\d)[,;:]|[,;:](?!\d)", " "),                          # kept inside 1,000 and 10:30
    (r"(?<![^\W\d_])[?!]+|[?!]+(?![^\W\d_])", lambda m: f" {m[0]} "),  # "!!" is not dropped
    (r"[$%&+=<>~^|\\]|\*+|#+|@+|(?<![^\W_])/|/(?![^\W_])", lambda m: f" {m[0]} "),
    (r"[(){}\[\]]", lambda m: f" {_BRACKETS[m[0]]} "),
    (r"[¢£¤¥€]", lambda m: f" {_CURRENCY[m[0]]} "),
    (r"(?i)(?<=[^\W_])'(?:s|m|d|re|ve|ll)(?![A-Za-z])", lambda m: f" {m[0]}"),   # it's -> it 's
    (r"(?i)(?<=[a-mo-z])n't(?![A-Za-z])", " n't"),                              # don't -> do n't
    (r"(?i)\b(?:can(?=not\b)|gon(?=na\b)|got(?=ta\b)|wan(?=na\b)|[lg]im(?=me\b)|lem(?=me\b))",
     lambda m: f"{m[0]} "),
    (r"(?i)(?<!\S)'t(?=(?:is|was)\b)", "'t "),                                   # 'tis -> 't is
    (r"\b(\d+(?:[.:,]\d+)+)(?=[^\W\d_])", r"\1 "),                                # 5:00pm -> 5:00 pm
    (rf"(?i)(?<!\S)'+(?!{_KEPT_QUOTE_START})|(?<=\S)'+(?=[\s.]|$)|(?<=\d)'(?=\d)", " "),       # quote marks
]
_PTB_COMPILED = [(re.compile(p), r) for p, r in _PTB_RULES]


def tokenize(text: str) -> str:
    """PTB-tokenise and lowercase one caption as pycocoevalcap's PTBTokenizer does, punctuation
    tokens removed: "It's a dog, isn't it?" -> "it 's a dog is n't it". (CoreNLP reads all captions
    as one stream, so there a caption ending in one letter and a period, "vitamin c.", followed by
    one starting "A ..." loses that period; here it keeps it, as it does in any other position.)"""
    for pattern, repl in _PTB_COMPILED:
        text = pattern.sub(repl, text)
    tokens = []
    for tok in text.split():
        if len(tok) > 1 and tok.endswith(".") and not (
                _ACRONYM.fullmatch(tok) or tok[:-1].lower() in _ABBREVIATIONS):
            tok = tok[:-1]                         # sentence-final period: its own token, dropped
        tok = tok.lower()
        if tok not in PUNCTUATIONS:
            tokens.append(tok)
    return " ".join(tokens)


def _same_ids(a: Iterable[str], b: Iterable[str], what: str = "a prediction") -> None:
    a, b = set(a), set(b)
    if a != b:
        missing, extra = sorted(a - b), sorted(b - a)
        raise ValueError(f"ids differ: {len(missing)} without {what} (e.g. {missing[:3]}), "
                         f"{len(extra)} without references (e.g. {extra[:3]})")
    if not a:
        raise ValueError("nothing to score: no ids")


def _check(refs: dict[str, list[str]], hyps: dict[str, list[str]]) -> None:
    """The input pycocoevalcap's compute_score asserts on, as ValueErrors."""
    _same_ids(refs, hyps, "a hypothesis")
    for key in refs:
        if not isinstance(refs[key], list) or not refs[key]:
            raise ValueError(f"id {key!r}: references must be a non-empty list of strings")
        if not isinstance(hyps[key], list) or len(hyps[key]) != 1:
            raise ValueError(f"id {key!r}: the hypothesis must be a list of exactly one string")


def _ngrams(words: list[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def bleu(refs: dict[str, list[str]], hyps: dict[str, list[str]], n: int = 4) -> list[float]:
    """Corpus BLEU-1..n: clipped n-gram counts summed over the corpus, brevity penalty against
    the reference length closest to each hypothesis (ties: the shorter). As pycocoevalcap, the
    precisions are smoothed by 1e-15 / 1e-9, so a zero match count gives a tiny, not zero, score."""
    _check(refs, hyps)
    tiny, small = 1e-15, 1e-9
    correct, guess, hyp_len, ref_len = [0] * n, [0] * n, 0, 0
    for key in refs:
        words = hyps[key][0].split()
        ref_words = [r.split() for r in refs[key]]
        max_ref: Counter[tuple[str, ...]] = Counter()
        for r in ref_words:
            max_ref |= _ngrams(r, n)
        for gram, count in _ngrams(words, n).items():
            correct[len(gram) - 1] += min(count, max_ref[gram])
        for k in range(n):
            guess[k] += max(0, len(words) - k)
        hyp_len += len(words)
        ref_len += min((abs(len(r) - len(words)), len(r)) for r in ref_words)[1]
    scores, product = [], 1.0
    for k in range(n):
        product *= (correct[k] + tiny) / (guess[k] + small)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (hyp_len + tiny) / (ref_len + small)
    penalty = math.exp(1 - 1 / ratio) if ratio < 1 else 1.0
    return [s * penalty for s in scores]


def cider(refs: dict[str, list[str]], hyps: dict[str, list[str]], n: int = 4, sigma: float = 6.0) -> float:
    """CIDEr-D: per n (1..n) the mean over references of the cosine of tf-idf vectors with the
    hypothesis weights clipped at the reference's, times a Gaussian length penalty; averaged over n,
    x10, mean over items. idf = log(#items) - log(max(1, #items whose references hold the n-gram)).
    Lengths count bigrams, as pycocoevalcap's code does: the same difference as words unless a
    sentence is empty, and then the cosine is 0 anyway."""
    _check(refs, hyps)
    ref_counts = {key: [_ngrams(r.split(), n) for r in refs[key]] for key in refs}
    doc_freq = Counter(g for counts in ref_counts.values() for g in set().union(*counts))
    log_items = math.log(len(refs))

    def tfidf(counts: Counter) -> tuple[list[dict], list[float], int]:
        vec: list[dict] = [{} for _ in range(n)]
        for gram, tf in counts.items():
            vec[len(gram) - 1][gram] = tf * (log_items - math.log(max(1.0, doc_freq[gram])))
        norms = [math.sqrt(sum(w * w for w in v.values())) for v in vec]
        return vec, norms, sum(tf for gram, tf in counts.items() if len(gram) == 2)

    scores = []
    for key in refs:
        hvec, hnorm, hlen = tfidf(_ngrams(hyps[key][0].split(), n))
        total = np.zeros(n)
        for counts in ref_counts[key]:
            rvec, rnorm, rlen = tfidf(counts)
            for k in range(n):
                val = sum(min(w, rvec[k].get(g, 0.0)) * rvec[k].get(g, 0.0) for g, w in hvec[k].items())
                if hnorm[k] != 0 and rnorm[k] != 0:
                    val /= hnorm[k] * rnorm[k]
                total[k] += val * math.exp(-((hlen - rlen) ** 2) / (2 * sigma ** 2))
        scores.append(10.0 * total.mean() / len(ref_counts[key]))
    return float(np.mean(scores))


def _lcs(a: list[str], b: list[str]) -> int:
    row = [0] * (len(b) + 1)
    for x in a:
        prev_diag = 0
        for j, y in enumerate(b, 1):
            prev_diag, row[j] = row[j], prev_diag + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(refs: dict[str, list[str]], hyps: dict[str, list[str]], beta: float = 1.2) -> float:
    """ROUGE-L F-measure (beta=1.2) from the longest common subsequence, mean over items. As in
    pycocoevalcap, precision and recall are each maximised over the references separately, and
    strings are split on single spaces (an empty hypothesis is one empty token and scores 0)."""
    _check(refs, hyps)
    scores = []
    for key in refs:
        cand = hyps[key][0].split(" ")
        pairs = [(_lcs(r.split(" "), cand), len(r.split(" "))) for r in refs[key]]
        prec = max(lcs / len(cand) for lcs, _ in pairs)
        rec = max(lcs / length for lcs, length in pairs)
        scores.append((1 + beta ** 2) * prec * rec / (rec + beta ** 2 * prec) if prec and rec else 0.0)
    return float(np.mean(scores))


def caption_scores(references: dict[str, list[str]], predictions: dict[str, str]) -> dict[str, float]:
    """Tokenise raw captions with `tokenize` and score them: {"BLEU-1".."BLEU-4", "CIDEr", "ROUGE-L"}."""
    _same_ids(references, predictions)
    empty = [key for key, refs in references.items() if not refs]
    if empty:
        raise ValueError(f"{len(empty)} ids have an empty reference list (e.g. {empty[:3]})")
    refs = {key: [tokenize(r) for r in value] for key, value in references.items()}
    hyps = {key: [tokenize(value)] for key, value in predictions.items()}
    scores = {f"BLEU-{k + 1}": s for k, s in enumerate(bleu(refs, hyps, 4))}
    return {**scores, "CIDEr": cider(refs, hyps), "ROUGE-L": rouge_l(refs, hyps)}


# The official VQA eval (vqaEval.py) normalisation tables.
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})
_CANONICAL = """ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've
    hasn't haven't he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't
    mightn't've might've mustn't must've needn't not've o'clock oughtn't shan't she'd've should've
    shouldn't shouldn't've somebody'd've somebody'll somebody's someone'd someone'd've someone'll
    someone's something'd something'd've something'll that's there'd there'd've there're there's
    they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't what'll what're what's
    what've when's where'd where's where've who'd who'd've who'll who's who've why'll why're why's
    won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've"""


def _spellings(contraction: str) -> list[str]:
    """The contraction with some or all apostrophes left out: couldnt've, couldn'tve, couldntve."""
    parts = contraction.split("'")
    gaps = range(1, len(parts))                    # apostrophe i stands before parts[i]
    out = []
    for r in range(1, len(parts)):
        for cut in combinations(gaps, r):
            out.append(parts[0] + "".join(("" if i in cut else "'") + parts[i] for i in gaps))
    return out


_CONTRACTIONS = {s: c for c in _CANONICAL.split() for s in _spellings(c)}
_VQA_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
              ",", "?", "!"]
_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"\.(?!\d)")   # vqaEval.py's periodStrip (its "(?!<=\d)" part is a no-op)


def normalize_answer(text: str) -> str:
    """Normalise a VQA answer as the official VQA evaluation does: punctuation removed (or made a
    space when it joins two words, as in "black/white"), periods removed unless before a digit,
    lowercase, number words to digits, articles dropped, "dont"-style contractions restored."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for p in _VQA_PUNCT:
        spaced = p + " " in text or " " + p in text or _DIGIT_COMMA.search(text) is not None
        out = out.replace(p, "" if spaced else " ")
    words = [_NUMBERS.get(w, w) for w in _PERIOD.sub("", out).lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_accuracy(predictions: dict[str, str], references: dict[str, list[str]]) -> float:
    """Mean VQA accuracy. Each item scores min(#human answers equal to the prediction / 3, 1),
    all normalised with `normalize_answer` (so 1, 2, 3+ matching annotators give 1/3, 2/3, 1);
    an item with a single reference answer scores 1 for an exact match after normalisation, else 0.
    Unlike vqaEval.py this does not average over the ten leave-one-annotator-out subsets (which gives
    0.3, 0.6, 0.9 for 1, 2, 3 matches of 10) and always normalises (vqaEval.py skips it when all
    human answers agree)."""
    _same_ids(references, predictions)
    total = 0.0
    for key, answers in references.items():
        if not answers:
            raise ValueError(f"id {key!r} has an empty reference list")
        pred = normalize_answer(predictions[key])
        matches = sum(normalize_answer(a) == pred for a in answers)
        total += float(matches > 0) if len(answers) == 1 else min(matches / 3, 1.0)
    return total / len(references)
