"""The quickstart language: every generated sentence parses under an independent recognizer of the
grammar (agreement, class selection), labels are the subject's class, held-out subjects stay held
out, and unigram entropy matches its closed form."""
import math
import os

import pytest

from flaxen.data import synthetic


def lexicon():
    nouns, verbs, adjectives = {}, {}, {}
    for cls, words in synthetic.NOUNS.items():
        for w in words:
            nouns[w], nouns[w + "s"] = (cls, False, w), (cls, True, w)
    for cls, words in synthetic.INTRANSITIVE.items():
        for w in words:
            verbs[w], verbs[w + "s"] = (cls, True, None), (cls, False, None)
    for cls, table in synthetic.TRANSITIVE.items():
        for w, objects in table.items():
            verbs[w], verbs[w + "s"] = (cls, True, objects), (cls, False, objects)
    for cls, words in synthetic.ADJECTIVES.items():
        for w in words:
            adjectives[w] = cls
    return nouns, verbs, adjectives


NOUN, VERB, ADJECTIVE = lexicon()
SINGULAR = {"a", "an", "every", "one", "this"}
PLURAL = {"some", "many", "two", "these"}


class Reject(Exception):
    pass


def parse_np(words, i, modifiers=True):
    """-> (class, plural, head noun, next index)"""
    det = words[i]
    if det not in SINGULAR | PLURAL | {"the"}:
        raise Reject(f"determiner expected at {i}: {det}")
    if det in ("a", "an") and (det == "an") != (words[i + 1][0] in "aeiou"):
        raise Reject(f"{det} before {words[i + 1]}")
    i += 1
    adjective = ADJECTIVE.get(words[i])
    if adjective:
        i += 1
    if words[i] not in NOUN:
        raise Reject(f"noun expected at {i}: {words[i]}")
    cls, plural, head = NOUN[words[i]]
    i += 1
    if (det in SINGULAR and plural) or (det in PLURAL and not plural):
        raise Reject(f"determiner {det} does not agree with {words[i - 1]}")
    if adjective and adjective != cls:
        raise Reject(f"adjective of class {adjective} on a {cls}")
    if modifiers and words[i] == "that":
        i = parse_vp(words, i + 1, cls, plural, nested=True)
    elif modifiers and words[i] in synthetic.PREPOSITIONS:
        i = parse_np(words, i + 1, modifiers=False)[3]
    return cls, plural, head, i


def parse_vp(words, i, cls, plural, nested=False):
    if words[i] not in VERB:
        raise Reject(f"verb expected at {i}: {words[i]}")
    verb_cls, verb_plural, objects = VERB[words[i]]
    if verb_cls != cls or verb_plural != plural:
        raise Reject(f"verb {words[i]} does not fit a {'plural' if plural else 'singular'} {cls} subject")
    i += 1
    if objects is None:
        return i + 1 if words[i] in synthetic.ADVERBS else i
    object_cls, _, _, i = parse_np(words, i, modifiers=not nested)
    if object_cls not in objects:
        raise Reject(f"object of class {object_cls}")
    return i


def parse(sentence):
    words = sentence.split()
    cls, plural, head, i = parse_np(words, 0)
    i = parse_vp(words, i, cls, plural)
    if words[i:] != ["."]:
        raise Reject(f"trailing words {words[i:]}")
    return cls, head


def test_corpus_sentences_are_grammatical_and_seeded():
    sentences = synthetic.corpus(11, 3000)
    for s in sentences:
        parse(s)
    assert synthetic.corpus(11, 50) == sentences[:50]
    assert synthetic.corpus(12, 50) != sentences[:50]
    words = {w for s in sentences for w in s.split()}
    assert words <= set(synthetic.vocabulary()) and len(words) > 0.9 * len(synthetic.vocabulary())
    assert len(synthetic.vocabulary()) <= 300


def test_labels_are_subject_classes_and_held_out_nouns_stay_out():
    train = synthetic.labelled(1, 400, held_out=False)
    validation = synthetic.labelled(2, 400, held_out=True)
    for rows, allowed in ((train, slice(0, synthetic.SEEN_NOUNS)), (validation, slice(synthetic.SEEN_NOUNS, None))):
        for sentence, label in rows:
            cls, head = parse(sentence)
            assert cls == label and head in synthetic.NOUNS[cls][allowed]
        assert sorted(set(label for _, label in rows)) == sorted(synthetic.CLASSES)
        assert max(sum(label == c for _, label in rows) for c in synthetic.CLASSES) == 100


def test_a_recognizer_that_ignores_agreement_would_be_caught():
    parse("an apple ripens .")
    for wrong in ["the dog run .", "a dogs runs .", "a apple ripens .", "the dog that chase the cats runs .",
                  "the dog eats a robot .", "the sweet dog runs ."]:
        with pytest.raises(Reject):
            parse(wrong)


def test_unigram_entropy_closed_form():
    assert synthetic.unigram_entropy(["a b", "a b"]) == pytest.approx(math.log(2), abs=1e-12)
    assert synthetic.unigram_entropy(["a a a b"]) == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)),
                                                                    abs=1e-12)
    assert 3.5 < synthetic.unigram_entropy(synthetic.corpus(0, 2000)) < math.log(len(synthetic.vocabulary()))


def test_files_are_written_once_and_reused(tmp_path):
    from flaxen.data import DataConfig, SyntheticConfig
    cfg = DataConfig(synthetic=SyntheticConfig(kind="classification", seed=4, num_train=10, num_validation=6))
    kind, effective, files = synthetic.write_files(cfg, str(tmp_path))
    assert kind == "delimited" and effective.label_names == list(synthetic.CLASSES)
    stamp = os.stat(files["train"]).st_mtime_ns
    assert synthetic.write_files(cfg, str(tmp_path))[2] == files and os.stat(files["train"]).st_mtime_ns == stamp
    with open(files["validation"]) as f:
        assert len(f.read().splitlines()) == 7
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".incomplete")]
