"""Pipeline-parallel schedules: the bubble, how many micro-batches' activations a stage keeps, and
the point-to-point bytes a rank sends, for GPipe, 1F1B and interleaved 1F1B.

p stages, m micro-batches per step, v model chunks (virtual stages) per rank; one slot is one
micro-batch's forward and backward through one rank's layers (Narayanan et al. 2021, section 2.2):

    GPipe      F1 F2 .. Fm, then B1 .. Bm       every stage keeps all m micro-batches
    1F1B       p - r forwards, then one F per B  stage r keeps min(p - r, m)
    interleaved 1F1B: the same with v chunks of L/(p v) layers per rank, each slot v times shorter

    step = (m + p - 1) slots: the bubble is (p - 1) / (m + p - 1) of it (GPipe and 1F1B alike);
    interleaved shrinks the bubble's time by v: (p - 1) / (v m + p - 1) of the step.

Pure numbers: nothing here knows a model or a strategy, so benchmarks can compare measured runs
against the same formulas the planner uses.
"""

from __future__ import annotations

SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b")
INTERLEAVED = "interleaved-1f1b"


def pipeline_bubble_fraction(
    pp: int, micro_batches: int, schedule: str = "1f1b", virtual_stages: int = 1
) -> float:
    """The share of a step that pipeline ranks spend idle, waiting to fill and drain the pipeline.

    GPipe and 1F1B: (p - 1) / (m + p - 1). Interleaved 1F1B: (p - 1) / (v m + p - 1), which is
    Narayanan et al. 2021's bubble time (1/v) (p - 1)/m of the ideal compute, as a share of the
    whole step (compute + bubble).

    Args:
        pp: pipeline stages (ranks), p.
        micro_batches: micro-batches per step through one pipeline, m.
        schedule: one of `SCHEDULES`.
        virtual_stages: model chunks per rank, v (above 1 only for interleaved 1F1B).

    Returns:
        The fraction of the step, in [0, 1).
    """
    _check(schedule, virtual_stages)
    slots = virtual_stages * micro_batches if schedule == INTERLEAVED else micro_batches
    return (pp - 1) / (slots + pp - 1)


def in_flight_micro_batches(
    pp: int, micro_batches: int, schedule: str = "1f1b", virtual_stages: int = 1, rank: int = 0
) -> float:
    """How many micro-batches' activations of its whole share of layers a rank keeps at its peak.

    GPipe: m (every forward runs before any backward). 1F1B: min(p - r, m) on rank r (its warm-up
    forwards plus the one in flight), so p on the first stage. Interleaved 1F1B: rank r runs
    2 (p - r - 1) + (v - 1) p warm-up forwards of chunks (each L/(p v) layers) before its first
    backward, then one more before each backward, so it keeps
    min(2 (p - r - 1) + (v - 1) p + 1, v m) chunks, i.e. that divided by v in whole-stage units.
    On the first stage that is min(p + (p - 1)/v, m) = p (1 + (p - 1)/(p v)) when m > p: the
    L (1 + (p - 1)/(p v)) layers of activations Korthikanti et al. 2022 (section 4.2.3) state.

    Args:
        pp, micro_batches, schedule, virtual_stages: as for `pipeline_bubble_fraction`.
        rank: the stage, 0 (first) to pp - 1 (last).

    Returns:
        Micro-batches' worth of the rank's L/p layers (a fraction for interleaved schedules).
    """
    _check(schedule, virtual_stages)
    if schedule == "gpipe":
        return float(micro_batches)
    if schedule == "1f1b":
        return float(min(pp - rank, micro_batches))
    v = virtual_stages
    chunks = min(2 * (pp - rank - 1) + (v - 1) * pp + 1, v * micro_batches)
    return chunks / v


def pipeline_p2p_bytes(
    pp: int, micro_batches: int, message_bytes: float, virtual_stages: int = 1,
    rank: int | None = None,
) -> float:  # fmt: skip
    """Bytes one pipeline rank sends to its neighbours in one step.

    Every micro-batch crosses each of the v p - 1 chunk boundaries (p - 1 without interleaving)
    twice: its activation forward, its activation's gradient back. A rank sends forward from
    each of its v chunks but the pipeline's last, and back from each but the pipeline's first:

        rank r sends m x message x (2 v - [r = p - 1] - [r = 0])
        all ranks together send 2 m (v p - 1) x message

    Args:
        pp, micro_batches, virtual_stages: as for `pipeline_bubble_fraction` (the schedule does
            not change what crosses a boundary, only when).
        message_bytes: one micro-batch's activation at a boundary (`pipeline_message_bytes`).
        rank: the stage; None means the busiest (an inner stage; with 2 stages both send alike).

    Returns:
        Bytes the rank sends per step (0 without a pipeline).
    """
    if pp == 1:
        return 0.0
    if rank is None:
        rank = 1 if pp > 2 else 0
    chunks_sending = 2 * virtual_stages - (rank == pp - 1) - (rank == 0)
    return micro_batches * message_bytes * chunks_sending


def pipeline_message_bytes(
    micro_batch: int, seq_len: int, dim: int, activation_bytes: int, tp: int = 1,
    sp: bool = False,
) -> float:  # fmt: skip
    """Bytes of one micro-batch's activation crossing a stage boundary: (b, s, h) elements.

    With sequence parallel each tensor-parallel rank holds (and sends) 1/tp of the sequence;
    without it every tensor-parallel rank holds the whole activation and sends its copy.
    """
    return micro_batch * seq_len * dim * activation_bytes / (tp if sp else 1)


def _check(schedule: str, virtual_stages: int) -> None:
    # NOTE: a ValueError, not an LmscaleError: users reach these through `strategy_problem`,
    # which states the same problems with the flags they typed.
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got '{schedule}'")
    if virtual_stages < 1 or (virtual_stages > 1 and schedule != INTERLEAVED):
        raise ValueError(f"virtual_stages {virtual_stages} needs the interleaved-1f1b schedule")
