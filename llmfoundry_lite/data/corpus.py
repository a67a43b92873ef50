"""The embedded corpus: English prose shipped with every Python install (``pydoc_data.topics``).

It is the offline default for tokenizer training, conversion, tests and the quickstart: about 465 KB of
reference-manual text in 79 topics, identical on every machine with the same Python version. The topics are
long (6 KB on average), so they are cut at paragraph boundaries into documents of about ``chunk_chars``
characters: an MLM sample is one document truncated to ``max_seq_len``, and whole topics would waste most text.
"""

from __future__ import annotations


def embedded_documents(chunk_chars: int = 600) -> list[str]:
    """The embedded corpus as documents of about ``chunk_chars`` characters (whole paragraphs), in topic order."""
    from pydoc_data.topics import topics

    docs: list[str] = []
    # Sorted keys: dict order is an implementation detail of the generated module; sorting pins it.
    for key in sorted(topics):
        current: list[str] = []
        size = 0
        for para in topics[key].split("\n\n"):
            para = para.strip()
            if not para:
                continue
            current.append(para)
            size += len(para)
            if size >= chunk_chars:
                docs.append("\n\n".join(current))
                current, size = [], 0
        if current:
            docs.append("\n\n".join(current))
    return docs
