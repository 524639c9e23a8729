"""The last pipeline stage's sampled ids, sent to the first stage (pipeline overlap).

With overlap scheduling on a pipeline the scheduler sends a batch before the results of the
batches `lanes` launches back have reached it; the tokens those batches sample are -1 placeholders
in it. The last stage's tp_rank r sends each step's sampled ids to the first stage's tp_rank r,
which writes them into its `next_tokens` buffer (the rows that sampled them) right before the batch
that refers to them (`ScheduledBatch.resolve_until`), as every rank of a TP-only grid does from its
own samples. The ids travel on a process group of their own (the two ranks), so these transfers
never queue behind the hidden states going the other way.

The last stage sends without waiting (isend of a copy: the next step's graph replay may overwrite
the sampled buffer while the transfer runs); the first stage receives in step order, for each step
that sampled anything, so sends and receives always pair up."""

from __future__ import annotations

import collections

import numpy as np
import torch
import torch.distributed as dist

from nanovllmx.distributed.parallel_state import ParallelInfo


def new_channel_groups(tp_size: int, pp_size: int) -> list[dist.ProcessGroup]:
    """One group {first-stage rank r, last-stage rank r} per tp_rank r; every rank must call this
    (new_group is collective), in the same order."""
    last = (pp_size - 1) * tp_size
    return [dist.new_group([r, last + r]) for r in range(tp_size)]


class SampleChannel:
    def __init__(self, info: ParallelInfo, group: dist.ProcessGroup, device: torch.device):
        self.group, self.device = group, device
        self.first, self.last = info.is_first_stage, info.is_last_stage
        self.first_rank = info.tp_rank
        self.last_rank = (info.pp_size - 1) * info.tp_size + info.tp_rank
        # first stage: steps whose ids are still to be received, oldest first: (step, rows, count)
        self._expected: collections.deque[tuple[int, np.ndarray]] = collections.deque()
        # last stage: sends in flight, with the tensors they read
        self._sent: collections.deque[tuple[dist.Work, torch.Tensor]] = collections.deque()
        # one transfer at start-up: both ends set up their connection now, not inside a step
        x = torch.zeros(1, dtype=torch.int32, device=device)
        if self.last:
            dist.send(x, dst=self.first_rank, group=group)
        else:
            dist.recv(x, src=self.last_rank, group=group)

    # ---- the last stage ----
    def send(self, ids: torch.Tensor) -> None:
        """Send a step's sampled ids (int32, on the device) to the first stage, without waiting."""
        t = ids.to(torch.int32).clone()
        work = dist.isend(t, dst=self.first_rank, group=self.group)
        assert work is not None  # a send within a group we are in
        self._sent.append((work, t))
        while self._sent and self._sent[0][0].is_completed():
            self._sent.popleft()

    # ---- the first stage ----
    def expect(self, step: int, rows: np.ndarray) -> None:
        """This stage launched `step`, which samples for these req_to_token rows (in order)."""
        if len(rows):
            self._expected.append((step, rows))

    def resolve(self, until: int, next_tokens: torch.Tensor) -> None:
        """Receive the ids of every expected step up to `until` into next_tokens[rows]."""
        while self._expected and self._expected[0][0] <= until:
            _, rows = self._expected.popleft()
            buf = torch.empty(len(rows), dtype=torch.int32, device=self.device)
            dist.recv(buf, src=self.last_rank, group=self.group)
            next_tokens[torch.from_numpy(rows.astype(np.int64)).to(self.device, non_blocking=True)] = buf
