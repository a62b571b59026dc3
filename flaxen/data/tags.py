"""IOB tag schemes: checking a tag's form and converting a sentence's tags between IOB1 and IOB2.

Why: CoNLL-2003 ships IOB1 (`B-` only where an entity directly follows another of the same type),
most models are trained on IOB2 (`B-` on every entity's first word); entity F1 (seqeval) needs to
know which one the tags follow. Tags are strings `O`, `B-TYPE`, `I-TYPE`; a sentence is a list.
"""
from __future__ import annotations

from typing import Sequence


def is_iob_tag(tag: str) -> bool:
    """True for `O`, `B-TYPE` and `I-TYPE` (TYPE non-empty)."""
    return tag == "O" or (len(tag) > 2 and tag[1] == "-" and tag[0] in "BI")


def iob1_to_iob2(tags: Sequence[str]) -> list[str]:
    """`I-X` that starts an entity (after `O`, at the start, or after another type) becomes `B-X`."""
    out, previous = [], "O"
    for tag in tags:
        if tag.startswith("I-") and (previous == "O" or previous[2:] != tag[2:]):
            tag = "B-" + tag[2:]
        out.append(tag)
        previous = tag
    return out


def iob2_to_iob1(tags: Sequence[str]) -> list[str]:
    """`B-X` keeps its `B-` only right after an `X` entity; elsewhere it becomes `I-X`."""
    out, previous = [], "O"
    for tag in tags:
        if tag.startswith("B-") and (previous == "O" or previous[2:] != tag[2:]):
            out.append("I-" + tag[2:])
        else:
            out.append(tag)
        previous = tag
    return out


def convert(tags: Sequence[str], source: str, target: str) -> list[str]:
    """Tags of one sentence from scheme `source` to `target` (IOB1 or IOB2)."""
    if source == target:
        return list(tags)
    return iob1_to_iob2(tags) if (source, target) == ("IOB1", "IOB2") else iob2_to_iob1(tags)
