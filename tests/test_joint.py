"""The training schedule of the joint pooled baseline."""

from __future__ import annotations

import itertools

import pytest

from simulation.joint import takes_part


@pytest.mark.parametrize(("budget", "epochs"), [(40, 40), (24, 40), (16, 40), (12, 40), (1, 7)])
def test_each_task_gets_its_stage_budget(budget: int, epochs: int) -> None:
    epochs_taken = [e for e in range(epochs) if takes_part(e, budget, epochs)]
    assert len(epochs_taken) == budget
    # Spread over the run, not bunched at its start: the last pass falls in the last epoch.
    assert epochs_taken[-1] == epochs - 1


def test_passes_are_evenly_spaced() -> None:
    epochs_taken = [e for e in range(40) if takes_part(e, 12, 40)]
    gaps = {b - a for a, b in itertools.pairwise(epochs_taken)}
    assert gaps <= {3, 4}
