"""Hard-negative mining: ``embedtune mine`` gives every Q&A record the documents that the model
ranks closest to its question without being its answer.

The corpus is the distinct answers of the input (distinct by normalized text, ``text_key``) plus
any extra documents. Two passes over the input keep memory bounded: the first reads every record
(a bad one stops the run here, before any encoding) and spools the documents' texts to a file on
disk; the corpus is then embedded in batches into one preallocated (documents x dim) tensor,
which is all that stays in memory besides a few integers per document. The second pass streams
the questions in chunks, searches each chunk against the corpus chunk by chunk with a running
top-k (the full score matrix is never built), and writes the records out as it goes.

Guards against false negatives: a question's own answer and every document with the same
normalized text never count, nor do the answers of other records with the same question;
``skip_top`` passes over the closest remaining candidates, and a margin keeps only candidates
scored clearly below the answer. Candidates are taken in rank order (ties by corpus row), so the
FAISS and torch searches pick the same negatives up to ties in score.

``negatives`` searches and chooses, ``corpus`` reads and embeds the documents, ``run`` holds a
whole run together, ``refresh`` mines during training. A teacher's scores for distillation:
``teacher`` loads a cross-encoder or an embedding model and scores with it (and filters mined
candidates it scores too close to the positive), ``scores`` is ``embedtune score``.
"""


class MineError(ValueError):
    """A mining run that cannot start (bad options, output over an input); the message says why."""
