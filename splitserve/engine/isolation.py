"""Finding the culprit of a failed forward pass: re-run its sequences one at a time. No I/O.

A forward pass over a batch that raises says only that something in the batch broke it. Running
each sequence alone tells the request that breaks the model (it raises alone too) from its innocent
neighbours (they run), so only the culprit fails. A batch costs at most one extra forward pass per
sequence, and only on the rare step that failed.

Re-running is safe because a forward pass changes nothing but KV slots: the scheduler has already
allocated every sequence's blocks, and the engine moves a sequence's state on (num_computed_tokens,
queues) only after its logits came back. The slots a failed attempt wrote lie in the same sequences'
own blocks, at the positions the solo runs write again before any read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from splitserve.engine.request import Sequence

# The model over some of a step's sequences: logits for those of them that sample, in step order.
Forward = Callable[[list[Sequence]], torch.Tensor]


@dataclass
class Isolated:
    """What running a failed batch's sequences one at a time gave."""

    kept: list[Sequence]  # the sequences whose solo run returned, in batch order
    logits: torch.Tensor | None  # their rows, concatenated in that order; None when none was kept
    failed: list[tuple[Sequence, Exception]] = field(default_factory=list)  # with each one's own error


def isolate(seqs: list[Sequence], run: Forward, exc: Exception) -> Isolated:
    """Re-run each of seqs alone after run(seqs) raised exc; a lone sequence is not run again.

    A lone sequence's failure is already its own, and re-running it would only retry the culprit.
    """
    if len(seqs) == 1:
        return Isolated([], None, [(seqs[0], exc)])
    kept: list[Sequence] = []
    rows: list[torch.Tensor] = []
    failed: list[tuple[Sequence, Exception]] = []
    for seq in seqs:
        try:
            rows.append(run([seq]))
        except Exception as solo_exc:  # this sequence breaks the model even alone: it is a culprit
            failed.append((seq, solo_exc))
            continue
        kept.append(seq)
    # A middle prompt chunk gives no row, so these are the rows one run over kept would give.
    return Isolated(kept, torch.cat(rows) if rows else None, failed)


def among(seqs: list[Sequence], chunks: list[tuple[Sequence, int]],
          decodes: list[Sequence]) -> tuple[list[tuple[Sequence, int]], list[Sequence]]:
    """The chunks and decodes of a mixed step that belong to seqs (a sequence is in at most one):
    what a mixed step runs for some of its sequences."""
    ids = {s.request_id for s in seqs}
    return [c for c in chunks if c[0].request_id in ids], [s for s in decodes if s.request_id in ids]
