"""GPT-2's byte-level BPE alphabet (what SmolLM2's and most byte-level tokenizers show for each byte): shared by
the serving scheduler (bytes of a token for logprobs) and the charts (a routing trace's tokens as text)."""

from __future__ import annotations

from functools import cache


@cache
def bytes_to_unicode() -> dict[int, str]:
    """Byte -> the printable character that stands for it in the vocabulary (printable Latin-1 stands for itself)."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def byte_of() -> dict[str, int]:
    """The reverse: a vocabulary character -> its byte."""
    return {c: b for b, c in bytes_to_unicode().items()}
