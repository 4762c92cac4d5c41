"""What the scheduler's ranks do in one iteration (:class:`Plan`), and how it reaches them
(:class:`PlanChannel`).

The scheduler decides on one rank, the leader (rank 0 under tensor parallelism, the only one otherwise), and
every rank applies the same plan in the same order: host-side ends first (cancellations, stop strings), then
the requests that start, with everything a rank needs to make their sequences (the seed included), then one
step of every runner that has sequences. So the ranks' runners stay identical, and their collectives meet.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

from ..speculative.sampling import SamplingParams

CONTROL_TIMEOUT = timedelta(days=7)  # followers wait for the next plan this long (an idle server is fine)


@dataclass(frozen=True)
class Admission:
    """A request that starts: its id and what its sequence is made of."""

    rid: int
    speculative: bool
    prompt: tuple[int, ...]
    params: SamplingParams
    max_new_tokens: int
    stop_ids: frozenset[int]
    seed: int


@dataclass
class Plan:
    """One iteration: ``finish`` ``(rid, reason)`` pairs to end and release, ``admit`` in order, then a step
    of every runner with running sequences; ``stop``: the scheduler ends (after nothing else)."""

    finish: list[tuple[int, str]] = field(default_factory=list)
    admit: list[Admission] = field(default_factory=list)
    stop: bool = False


class PlanChannel:
    """Carries the leader's plan to every rank: a no-op on one process; under tensor parallelism ``tp``, a
    broadcast from rank 0 over a CPU (gloo) group of its own, so that plans never interleave with the
    model's collectives and an idle follower waits without timing out. Construct it on every rank, in the
    same order (it creates a process group)."""

    def __init__(self, tp=None):
        self.tp = tp
        self.leader = tp is None or tp.rank == 0
        self.broken = False  # an exchange failed: the ranks are no longer in step (see exchange)
        self.group = None
        if tp is not None:
            import torch.distributed as dist

            self.group = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)

    def exchange(self, plan: Plan | None) -> Plan:
        """The leader passes its plan (and gets it back); a follower passes None and gets the leader's.
        Raises when a rank is gone; the channel is ``broken`` from then on (no later exchange can meet)."""
        if self.tp is None:
            return plan
        import torch.distributed as dist

        if self.broken:
            raise RuntimeError("the plan channel is broken: a rank left")
        box = [plan]
        try:
            dist.broadcast_object_list(box, src=0, group=self.group)
        except Exception:
            self.broken = True
            raise
        return box[0]


__all__ = ["Admission", "Plan", "PlanChannel"]
