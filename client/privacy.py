"""Differential privacy at a site: DP-SGD with Opacus and the site's privacy ledger.

A site that enables ``privacy.dp`` in its YAML trains with DP-SGD (Abadi et al., "Deep
Learning with Differential Privacy", CCS 2016): per-sample gradients clipped to
``max_grad_norm``, Gaussian noise of standard deviation ``noise_multiplier * max_grad_norm``
added to their sum, and batches drawn by Poisson sampling. Opacus
(``opacus.PrivacyEngine.make_private``) does the clipping, the noise and the sampling.

The privacy spent is tracked per task in ``state_dir/privacy_ledger.json``. The ledger
keeps every round that ever trained on the task's data, across rounds, stages and Flower
runs, and computes epsilon over that whole history with Opacus's RDP accountant
(Mironov, "Rényi Differential Privacy", CSF 2017). A round whose epsilon would exceed the
task's budget is declined before it trains.

Typical use in a training handler::

    config = DPConfig.from_mapping(site_config.privacy, site_config.source)
    ledger = PrivacyLedger.open(state_dir)
    plan = plan_private_round(ledger, config, task=..., run_id=..., stage=...,
                              num_samples=len(dataset), batch_size=4,
                              steps_per_round=10, num_rounds=5)
    if not plan.allowed:
        ...  # reply "declined" with plan.reason, train nothing
    model, optimizer, loader = attach_dp(model, optimizer, loader, config,
                                         plan.noise_multiplier)
    ...  # exactly plan.steps steps: private_step, or step_on_empty_batch when empty
    ledger.record_round(task, run_id=..., stage=..., server_round=..., steps=plan.steps,
                        sample_rate=plan.sample_rate,
                        noise_multiplier=plan.noise_multiplier, delta=config.delta)
    state = plain_state_dict(model)
"""

from __future__ import annotations

import contextlib
import difflib
import json
import math
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from opacus import PrivacyEngine
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.data_loader import CollateFnWithEmpty, DPDataLoader
from opacus.grad_sample import AbstractGradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.utils.module_utils import trainable_modules
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader

from unicon_model.log import get_logger

logger = get_logger(__name__)

LEDGER_FILE_NAME = "privacy_ledger.json"
LEDGER_FORMAT = "unicon-fl privacy ledger"
LEDGER_VERSION = 1

# Bisection tolerance on epsilon when a noise multiplier is chosen for a target epsilon.
# It is the default of get_noise_multiplier in Opacus 1.6.0.
EPSILON_TOLERANCE = 0.01
# Largest noise multiplier searched for, the limit (MAX_SIGMA) of Opacus 1.6.0 as well.
MAX_NOISE_MULTIPLIER = 1.0e6

DP_KEYS = (
    "enabled",
    "max_grad_norm",
    "delta",
    "target_epsilon",
    "noise_multiplier",
    "epsilon_budget",
)
PRIVACY_KEYS = ("dp",)
DEFAULT_MAX_GRAD_NORM = 1.0


class PrivacyError(Exception):
    """Base class of the privacy errors raised at a site."""


class PrivacyConfigError(PrivacyError, ValueError):
    """Invalid ``privacy`` section of a site YAML, or a delta too large for a dataset."""


class PrivacyLedgerError(PrivacyError):
    """Unreadable privacy ledger, or a write that would lower the privacy spent."""


class PrivacyBudgetError(PrivacyError):
    """No noise multiplier keeps a task within its target epsilon."""


class OpacusIncompatibleError(PrivacyError, ValueError):
    """A model, optimizer or data loader that DP-SGD with Opacus cannot train."""


# ---------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DPConfig:
    """Validated ``privacy.dp`` section of a site YAML.

    Exactly one of ``target_epsilon`` and ``noise_multiplier`` is set. With
    ``target_epsilon``, the noise multiplier of each stage is chosen so that the task's
    total epsilon ends at the target. With ``noise_multiplier``, the noise is fixed, and
    ``epsilon_budget`` (when set) caps the task's total epsilon.

    Attributes
    ----------
    max_grad_norm : float
        Per-sample clipping norm (L2 over all trainable parameters), default 1.0.
    delta : float
        The delta of the (epsilon, delta) guarantee; must be below 1 / N for a task with N
        training samples (checked by `check_delta`).
    target_epsilon : float or None
        Total epsilon per task across rounds, stages and runs.
    noise_multiplier : float or None
        Fixed ratio of the noise standard deviation to ``max_grad_norm``.
    epsilon_budget : float or None
        Optional cap on the total epsilon per task when ``noise_multiplier`` is given.
    source : Path
        The site YAML the section came from, named in error messages.
    """

    max_grad_norm: float
    delta: float
    target_epsilon: float | None
    noise_multiplier: float | None
    epsilon_budget: float | None
    source: Path

    @property
    def enabled(self) -> bool:
        """Always True, because `from_mapping` returns None when DP-SGD is off."""
        return True

    @property
    def budget(self) -> float | None:
        """Maximum total epsilon per task, or None when the epsilon is uncapped."""
        if self.target_epsilon is not None:
            return self.target_epsilon
        return self.epsilon_budget

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | None, source: Path) -> DPConfig | None:
        """Validate the ``privacy`` section of a site YAML.

        Parameters
        ----------
        mapping : Mapping or None
            The whole ``privacy`` section (the mapping that contains ``dp``), as parsed
            from YAML. None means the site YAML has no ``privacy`` section.
        source : Path
            The site YAML, named in error messages.

        Returns
        -------
        DPConfig or None
            None when the section or its ``dp`` block is absent, or ``dp.enabled`` is
            false. A ``dp`` block without ``enabled`` counts as enabled.

        Raises
        ------
        PrivacyConfigError
            On an unknown key (with the closest spelling), a value of the wrong type or
            range, both or neither of ``target_epsilon`` and ``noise_multiplier``, or
            ``epsilon_budget`` together with ``target_epsilon``.
        """
        if mapping is None:
            return None
        if not isinstance(mapping, Mapping):
            raise PrivacyConfigError(
                f"{source}: 'privacy' must be a mapping with a 'dp' block, found "
                f"{type(mapping).__name__} {mapping!r}. Fix: write 'privacy:' followed by an "
                "indented 'dp:' block."
            )
        _reject_unknown_keys(mapping, PRIVACY_KEYS, "privacy", source)
        dp = mapping.get("dp")
        if dp is None:
            return None
        if not isinstance(dp, Mapping):
            raise PrivacyConfigError(
                f"{source}: 'privacy.dp' must be a mapping, found {type(dp).__name__} {dp!r}. "
                "Fix: give 'privacy.dp' keys such as 'enabled', 'delta' and 'target_epsilon'."
            )
        _reject_unknown_keys(dp, DP_KEYS, "privacy.dp", source)

        enabled = dp.get("enabled", True)
        if not isinstance(enabled, bool):
            raise PrivacyConfigError(
                f"{source}: 'privacy.dp.enabled' must be true or false, found {enabled!r}. "
                "Fix: write 'enabled: true' or 'enabled: false'."
            )
        if not enabled:
            logger.info("DP-SGD is off: %s sets privacy.dp.enabled to false", source)
            return None

        max_grad_norm = _positive_number(dp, "max_grad_norm", source, DEFAULT_MAX_GRAD_NORM)
        delta = _positive_number(dp, "delta", source, None)
        if delta >= 1.0:
            raise PrivacyConfigError(
                f"{source}: 'privacy.dp.delta' must be below 1, found {delta!r}. "
                "Fix: set delta well below 1/N for N training samples, for example 1.0e-5."
            )
        target_epsilon = _optional_positive_number(dp, "target_epsilon", source)
        noise_multiplier = _optional_positive_number(dp, "noise_multiplier", source)
        epsilon_budget = _optional_positive_number(dp, "epsilon_budget", source)

        if target_epsilon is None and noise_multiplier is None:
            raise PrivacyConfigError(
                f"{source}: 'privacy.dp' sets neither 'target_epsilon' nor "
                "'noise_multiplier'. Fix: add 'target_epsilon: 8.0' (the noise is then "
                "chosen for you) or 'noise_multiplier: 1.1'."
            )
        if target_epsilon is not None and noise_multiplier is not None:
            raise PrivacyConfigError(
                f"{source}: 'privacy.dp' sets both 'target_epsilon' ({target_epsilon!r}) and "
                f"'noise_multiplier' ({noise_multiplier!r}). Fix: keep only one of them."
            )
        if target_epsilon is not None and epsilon_budget is not None:
            raise PrivacyConfigError(
                f"{source}: 'privacy.dp.epsilon_budget' ({epsilon_budget!r}) applies only "
                "with 'noise_multiplier'; 'target_epsilon' is already the budget. Fix: remove "
                "'epsilon_budget'."
            )

        return cls(
            max_grad_norm=max_grad_norm,
            delta=delta,
            target_epsilon=target_epsilon,
            noise_multiplier=noise_multiplier,
            epsilon_budget=epsilon_budget,
            source=source,
        )

    def check_delta(self, num_samples: int, task: str) -> None:
        """Raise `PrivacyConfigError` unless ``delta < 1 / num_samples``.

        Publishing one randomly chosen training record in full is (0, 1/N)-private, so
        a delta of 1/N or more makes the guarantee meaningless.

        Parameters
        ----------
        num_samples : int
            Training samples N of the task at this site.
        task : str
            The task, named in the message.
        """
        if num_samples < 1:
            raise PrivacyConfigError(
                f"{self.source}: task {task!r} has {num_samples} training samples, so DP-SGD "
                "has nothing to train on. Fix: add training cases for the task or remove its "
                "dataset from the site YAML."
            )
        limit = 1.0 / num_samples
        if self.delta >= limit:
            suggestion = 10.0 ** math.floor(math.log10(limit / 10.0))
            raise PrivacyConfigError(
                f"{self.source}: 'privacy.dp.delta' is {self.delta!r}, not below 1/N = "
                f"1/{num_samples} = {limit:.3g} for task {task!r}. Fix: set delta below "
                f"1/N = {limit:.3g}, for example {suggestion:.0e}."
            )


def _reject_unknown_keys(
    mapping: Mapping[str, Any], allowed: Sequence[str], prefix: str, source: Path
) -> None:
    for key in mapping:
        if key in allowed:
            continue
        closest = difflib.get_close_matches(str(key), allowed, n=1)
        hint = f"Did you mean '{closest[0]}'?" if closest else "Remove it."
        raise PrivacyConfigError(
            f"{source}: unknown key '{prefix}.{key}'. Allowed keys: {', '.join(allowed)}. {hint}"
        )


def _positive_number(
    mapping: Mapping[str, Any], key: str, source: Path, default: float | None
) -> float:
    if key not in mapping or mapping[key] is None:
        if default is None:
            raise PrivacyConfigError(
                f"{source}: 'privacy.dp.{key}' is missing. Fix: add it, for example "
                f"'{key}: 1.0e-5'."
            )
        return default
    value = mapping[key]
    if isinstance(value, str):
        # PyYAML reads exponents without a decimal point, such as 1e-5, as strings.
        raise PrivacyConfigError(
            f"{source}: 'privacy.dp.{key}' must be a number, found the string {value!r}. "
            "Fix: write the number with a decimal point, such as 1.0e-5 (YAML reads 1e-5 "
            "as text)."
        )
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PrivacyConfigError(
            f"{source}: 'privacy.dp.{key}' must be a number, found "
            f"{type(value).__name__} {value!r}. Fix: write a positive number."
        )
    number = float(value)
    if not math.isfinite(number) or number <= 0.0:
        raise PrivacyConfigError(
            f"{source}: 'privacy.dp.{key}' must be a finite number above 0, found {value!r}. "
            "Fix: write a positive number."
        )
    return number


def _optional_positive_number(mapping: Mapping[str, Any], key: str, source: Path) -> float | None:
    if mapping.get(key) is None:
        return None
    return _positive_number(mapping, key, source, None)


# ---------------------------------------------------------------------------------------
# Accounting
# ---------------------------------------------------------------------------------------


def compute_epsilon(history: Sequence[tuple[float, float, int]], delta: float) -> float:
    """Compute the epsilon of a DP-SGD history with Opacus's RDP accountant.

    Parameters
    ----------
    history : sequence of (noise_multiplier, sample_rate, steps)
        The layout of ``RDPAccountant.history``; the entries are composed.
    delta : float
        The delta at which epsilon is reported.

    Returns
    -------
    float
        0.0 for an empty history; ``inf`` or ``nan`` when the accountant cannot bound the
        privacy loss (for example a noise multiplier of 0).
    """
    if not history:
        return 0.0
    accountant = RDPAccountant()
    accountant.history = [(float(sigma), float(rate), int(steps)) for sigma, rate, steps in history]
    try:
        with _quiet_order_warnings():
            return float(accountant.get_epsilon(delta=delta))
    except (ValueError, OverflowError, ZeroDivisionError, FloatingPointError) as error:
        logger.warning("epsilon computation failed for history %s: %s", history, error)
        return math.nan


@contextlib.contextmanager
def _quiet_order_warnings() -> Iterator[None]:
    """Silence Opacus's warning that the best RDP order lies at the end of its range.

    The epsilon is then still a valid upper bound, only a looser one, and the bisection
    that chooses a noise multiplier would repeat the warning dozens of times.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the", category=UserWarning)
        yield


def poisson_sample_rate(num_samples: int, batch_size: int) -> float:
    """Return the Poisson sampling rate that `attach_dp` will use.

    Opacus's ``make_private`` sets the rate to ``1 / len(data_loader)``, that is
    ``1 / ceil(num_samples / batch_size)`` for a loader that keeps its last partial batch,
    so that the expected batch size stays close to ``batch_size``. A loader with
    ``drop_last=True`` has ``floor`` in place of ``ceil``; use ``loader.sample_rate`` of
    the loader that `attach_dp` returns when in doubt.
    """
    if num_samples < 1 or batch_size < 1:
        raise ValueError(
            f"num_samples and batch_size must be at least 1, found {num_samples} and {batch_size}"
        )
    return 1.0 / math.ceil(num_samples / batch_size)


def choose_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    history: Sequence[tuple[float, float, int]] = (),
) -> float:
    """Choose the smallest noise multiplier (to ``EPSILON_TOLERANCE``) that ends at the target.

    With an empty history this is Opacus's ``get_noise_multiplier`` for ``steps`` steps at
    ``sample_rate``. With earlier rounds in the history, the earlier rounds and the new
    ``steps`` are composed, and the noise multiplier is found by bisection so that the
    epsilon of the whole history stays at or below ``target_epsilon``.

    Parameters
    ----------
    target_epsilon : float
        Total epsilon allowed after the planned steps.
    delta : float
        The delta of the guarantee.
    sample_rate : float
        Poisson sampling rate of the planned steps, in (0, 1].
    steps : int
        Planned optimizer steps, for a stage ``num_rounds * steps_per_round``.
    history : sequence of (noise_multiplier, sample_rate, steps)
        Rounds already spent on the task.

    Raises
    ------
    PrivacyBudgetError
        When the history leaves less than ``EPSILON_TOLERANCE`` of the target, or no
        noise multiplier up to ``MAX_NOISE_MULTIPLIER`` fits.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, found {steps}")
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample_rate must be in (0, 1], found {sample_rate}")

    epsilon_before = compute_epsilon(history, delta)
    if not epsilon_before < target_epsilon - EPSILON_TOLERANCE:
        # A remainder within the search tolerance would buy only steps of almost pure noise.
        raise PrivacyBudgetError(
            f"epsilon spent is already {epsilon_before:.4g}, which leaves less than "
            f"{EPSILON_TOLERANCE} of the target {target_epsilon:.4g}"
        )

    if not history:
        try:
            with _quiet_order_warnings():
                sigma = float(
                    get_noise_multiplier(
                        target_epsilon=target_epsilon,
                        target_delta=delta,
                        sample_rate=sample_rate,
                        steps=steps,
                        accountant="rdp",
                        epsilon_tolerance=EPSILON_TOLERANCE,
                    )
                )
        except ValueError as error:
            raise PrivacyBudgetError(
                f"no noise multiplier reaches epsilon {target_epsilon:.4g} in {steps} steps "
                f"at sample rate {sample_rate:.4g}: {error}"
            ) from error
    else:
        sigma = _bisect_noise_multiplier(target_epsilon, delta, sample_rate, steps, history)

    # get_noise_multiplier exits early when the accountant returns NaN, so check the result.
    epsilon_after = compute_epsilon([*history, (sigma, sample_rate, steps)], delta)
    if not epsilon_after <= target_epsilon:
        raise PrivacyBudgetError(
            f"noise multiplier {sigma:.4g} gives epsilon {epsilon_after}, above the target "
            f"{target_epsilon:.4g}"
        )
    return sigma


def _bisect_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    history: Sequence[tuple[float, float, int]],
) -> float:
    def epsilon_with(sigma: float) -> float:
        return compute_epsilon([*history, (sigma, sample_rate, steps)], delta)

    sigma_high = 1.0
    epsilon_high = epsilon_with(sigma_high)
    while not epsilon_high <= target_epsilon:
        sigma_high *= 2.0
        if sigma_high > MAX_NOISE_MULTIPLIER:
            raise PrivacyBudgetError(
                f"no noise multiplier up to {MAX_NOISE_MULTIPLIER:g} keeps epsilon within "
                f"{target_epsilon:.4g} for {steps} more steps"
            )
        epsilon_high = epsilon_with(sigma_high)

    # Invariant: epsilon_with(sigma_high) <= target < epsilon_with(sigma_low).
    sigma_low = 0.0
    for _ in range(100):
        if target_epsilon - epsilon_high <= EPSILON_TOLERANCE:
            break
        if sigma_high - sigma_low <= 1e-6 * sigma_high:
            # The history alone sits within the tolerance of the target.
            break
        sigma = (sigma_low + sigma_high) / 2.0
        epsilon = epsilon_with(sigma)
        if epsilon <= target_epsilon:
            sigma_high, epsilon_high = sigma, epsilon
        else:
            sigma_low = sigma
    return sigma_high


# ---------------------------------------------------------------------------------------
# Ledger
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LedgerEntry:
    """One round of DP-SGD on a task's data, as stored in the ledger.

    ``epsilon_after`` is the task's total epsilon at ``delta`` once this round is added.
    """

    time: str
    run_id: str
    stage: str
    server_round: int
    steps: int
    sample_rate: float
    noise_multiplier: float
    delta: float
    epsilon_after: float


@dataclass(frozen=True)
class NoiseChoice:
    """Noise multiplier chosen once per stage for a target epsilon, reused by its rounds."""

    time: str
    run_id: str
    stage: str
    sample_rate: float
    planned_steps: int
    target_epsilon: float
    delta: float
    noise_multiplier: float


@dataclass(frozen=True)
class RoundPlan:
    """Decision on one round of DP-SGD, taken before the round trains.

    Attributes
    ----------
    epsilon_before, epsilon_after : float
        The task's total epsilon without and with the round (``nan`` or ``inf`` when the
        accountant cannot bound it).
    allowed : bool
        Whether the round fits the budget; a declined round must not train.
    reason : str or None
        Why the round is declined, None when allowed.
    noise_multiplier, sample_rate : float
        What the round must train with; `plan_private_round` fills them in.
    steps : int
        Optimizer steps of the round.
    delta : float
        The delta at which the epsilons are given.
    """

    epsilon_before: float
    epsilon_after: float
    allowed: bool
    reason: str | None
    noise_multiplier: float = math.nan
    sample_rate: float = math.nan
    steps: int = 0
    delta: float = math.nan


class PrivacyLedger:
    """Per-task record of all DP-SGD rounds run on a site's data, kept in a JSON file.

    The file ``state_dir/privacy_ledger.json`` survives restarts and new Flower runs.
    Every change reads the file again under a file lock, adds to it and replaces it
    atomically (temporary file, then ``os.replace``), so two processes of one site do not
    lose each other's rounds. Entries are only ever appended, and a round whose epsilon
    would come out below the last recorded one (a larger delta than before) raises
    `PrivacyLedgerError`.

    A missing file means that nothing has been spent. An unreadable file raises
    `PrivacyLedgerError` instead of starting again at zero.

    NOTE: the lock uses ``fcntl.flock`` and is skipped on Windows, where two processes
    writing the ledger at the same moment could lose a round.
    """

    def __init__(self, path: Path, tasks: dict[str, dict[str, list[dict[str, Any]]]]) -> None:
        self._path = path
        self._tasks = tasks

    @classmethod
    def open(cls, state_dir: Path) -> PrivacyLedger:
        """Open the ledger of a site's state folder, creating the folder if needed.

        Raises
        ------
        PrivacyLedgerError
            When the file exists but is not a valid ledger.
        """
        state_dir = Path(state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        path = state_dir / LEDGER_FILE_NAME
        return cls(path, _read_ledger(path))

    @property
    def path(self) -> Path:
        """The ledger's JSON file."""
        return self._path

    def tasks(self) -> list[str]:
        """Return the tasks that have recorded rounds, sorted."""
        self._reload()
        return sorted(task for task, data in self._tasks.items() if data["entries"])

    def entries(self, task: str) -> list[LedgerEntry]:
        """Return the recorded rounds of a task, oldest first, as stored on disk now."""
        self._reload()
        return self._entries(task)

    def history(self, task: str) -> list[tuple[float, float, int]]:
        """Return the task's rounds as ``RDPAccountant.history``: (noise, sample_rate, steps)."""
        self._reload()
        return self._history(task)

    def total_steps(self, task: str) -> int:
        """Return the number of DP-SGD steps recorded for a task."""
        return sum(entry.steps for entry in self.entries(task))

    def epsilon_spent(self, task: str, delta: float) -> float:
        """Compute the task's total epsilon at ``delta`` over its whole history."""
        return compute_epsilon(self.history(task), delta)

    def plan_round(
        self,
        task: str,
        steps: int,
        sample_rate: float,
        noise_multiplier: float,
        delta: float,
        *,
        epsilon_budget: float | None = None,
    ) -> RoundPlan:
        """Decide whether one more round fits the task's budget, without recording it.

        The round is declined in three cases. Epsilon before or after it cannot be
        computed (the accountant returns ``inf`` or ``nan``). Epsilon after it exceeds
        ``epsilon_budget``. Or epsilon after it would come out below the last recorded
        epsilon, because ``delta`` is larger than the delta of earlier rounds.

        Parameters
        ----------
        task : str
            The task whose data the round trains on.
        steps : int
            Optimizer steps of the round, at least 1.
        sample_rate : float
            Poisson sampling rate, in (0, 1].
        noise_multiplier : float
            Noise multiplier of the round, at least 0.
        delta : float
            The delta of the guarantee.
        epsilon_budget : float or None
            Maximum total epsilon of the task; None for no cap.
        """
        _check_round_values(steps, sample_rate, noise_multiplier)
        history = self.history(task)  # reloads, so rounds of other processes count
        epsilon_before = compute_epsilon(history, delta)
        epsilon_after = compute_epsilon([*history, (noise_multiplier, sample_rate, steps)], delta)
        last_recorded = self._last_recorded_epsilon(task)

        reason: str | None = None
        if not math.isfinite(epsilon_before):
            reason = (
                f"the epsilon already spent on task {task!r} cannot be computed "
                f"(accountant returned {epsilon_before}); no further private round is possible"
            )
        elif not math.isfinite(epsilon_after):
            reason = (
                f"the epsilon of task {task!r} after {steps} steps at noise multiplier "
                f"{noise_multiplier:g} and sample rate {sample_rate:.4g} cannot be computed "
                f"(accountant returned {epsilon_after}); use a noise multiplier above 0"
            )
        elif epsilon_budget is not None and epsilon_after > epsilon_budget:
            reason = (
                f"task {task!r} would reach epsilon {epsilon_after:.4g} at delta {delta:g}, "
                f"above its budget {epsilon_budget:.4g} (spent so far {epsilon_before:.4g})"
            )
        elif last_recorded is not None and epsilon_after < last_recorded:
            reason = (
                f"task {task!r} would report epsilon {epsilon_after:.4g}, below the "
                f"{last_recorded:.4g} already recorded; delta {delta:g} is larger than the "
                f"delta of earlier rounds ({self._smallest_delta(task):g}). Keep delta at or "
                "below that value"
            )
        return RoundPlan(
            epsilon_before=epsilon_before,
            epsilon_after=epsilon_after,
            allowed=reason is None,
            reason=reason,
            noise_multiplier=noise_multiplier,
            sample_rate=sample_rate,
            steps=steps,
            delta=delta,
        )

    def record_round(
        self,
        task: str,
        *,
        run_id: str,
        stage: str,
        server_round: int,
        steps: int,
        sample_rate: float,
        noise_multiplier: float,
        delta: float,
    ) -> LedgerEntry:
        """Append one trained round to the task's history and write the file.

        Call it after the round has trained and before its reply leaves the site, with
        the number of optimizer steps actually taken (empty batches included).

        Returns
        -------
        LedgerEntry
            The entry written, with the task's new total epsilon.

        Raises
        ------
        PrivacyLedgerError
            When the task's epsilon would come out below the last recorded one, or
            cannot be computed, or the file on disk is unreadable.
        """
        _check_round_values(steps, sample_rate, noise_multiplier)
        if noise_multiplier <= 0.0:
            raise ValueError(
                f"a round without noise (noise multiplier {noise_multiplier}) is not private "
                "and has no finite epsilon; plan_round declines such rounds"
            )

        with self._locked():
            history = self._history(task)
            epsilon_after = compute_epsilon(
                [*history, (noise_multiplier, sample_rate, steps)], delta
            )
            if not math.isfinite(epsilon_after):
                raise PrivacyLedgerError(
                    f"{self._path}: the epsilon of task {task!r} after this round cannot be "
                    f"computed (accountant returned {epsilon_after}); nothing was recorded"
                )
            last_recorded = self._last_recorded_epsilon(task)
            if last_recorded is not None and epsilon_after < last_recorded:
                raise PrivacyLedgerError(
                    f"{self._path}: recording this round would lower the epsilon of task "
                    f"{task!r} from {last_recorded:.6g} to {epsilon_after:.6g}, because delta "
                    f"{delta:g} is larger than the delta of earlier rounds "
                    f"({self._smallest_delta(task):g}). Fix: keep privacy.dp.delta at or "
                    "below that value"
                )

            entry = LedgerEntry(
                time=_utc_now(),
                run_id=run_id,
                stage=stage,
                server_round=int(server_round),
                steps=int(steps),
                sample_rate=float(sample_rate),
                noise_multiplier=float(noise_multiplier),
                delta=float(delta),
                epsilon_after=epsilon_after,
            )
            self._task_data(task)["entries"].append(asdict(entry))
            self._write()

        logger.info(
            "privacy ledger: task=%s run=%s stage=%s round=%d steps=%d epsilon=%.4g delta=%g",
            task,
            run_id,
            stage,
            server_round,
            steps,
            epsilon_after,
            delta,
        )
        return entry

    def noise_multiplier_for_stage(
        self,
        task: str,
        *,
        run_id: str,
        stage: str,
        target_epsilon: float,
        delta: float,
        sample_rate: float,
        planned_steps: int,
    ) -> float:
        """Return the noise multiplier of a stage for a target epsilon, choosing it once.

        The first call of a stage chooses the noise multiplier with
        `choose_noise_multiplier` for all ``planned_steps`` of the stage (rounds times
        steps per round) on top of the task's history before the stage, and stores the
        choice. Later rounds of the same run and stage reuse it, so that the noise stays
        the same for the whole stage even though each message may start a fresh process.
        A new sample rate or step count (the dataset changed) makes a new choice.

        Raises
        ------
        PrivacyBudgetError
            When the task's budget leaves no room for the stage.
        """
        with self._locked():
            for choice in self._task_data(task)["noise_choices"]:
                if (
                    choice["run_id"] == run_id
                    and choice["stage"] == stage
                    and choice["sample_rate"] == sample_rate
                    and choice["planned_steps"] == planned_steps
                    and choice["target_epsilon"] == target_epsilon
                    and choice["delta"] == delta
                ):
                    return float(choice["noise_multiplier"])

            sigma = choose_noise_multiplier(
                target_epsilon, delta, sample_rate, planned_steps, self._history(task)
            )
            choice_record = NoiseChoice(
                time=_utc_now(),
                run_id=run_id,
                stage=stage,
                sample_rate=float(sample_rate),
                planned_steps=int(planned_steps),
                target_epsilon=float(target_epsilon),
                delta=float(delta),
                noise_multiplier=sigma,
            )
            self._task_data(task)["noise_choices"].append(asdict(choice_record))
            self._write()

        logger.info(
            "noise multiplier chosen: task=%s run=%s stage=%s sigma=%.4g for %d steps at "
            "sample rate %.4g, target epsilon %.4g",
            task,
            run_id,
            stage,
            sigma,
            planned_steps,
            sample_rate,
            target_epsilon,
        )
        return sigma

    def _entries(self, task: str) -> list[LedgerEntry]:
        return [LedgerEntry(**entry) for entry in self._task_data(task)["entries"]]

    def _history(self, task: str) -> list[tuple[float, float, int]]:
        return [
            (entry.noise_multiplier, entry.sample_rate, entry.steps)
            for entry in self._entries(task)
        ]

    def _task_data(self, task: str) -> dict[str, list[dict[str, Any]]]:
        return self._tasks.setdefault(task, {"entries": [], "noise_choices": []})

    def _last_recorded_epsilon(self, task: str) -> float | None:
        entries = self._task_data(task)["entries"]
        if not entries:
            return None
        return max(float(entry["epsilon_after"]) for entry in entries)

    def _smallest_delta(self, task: str) -> float:
        return min(float(entry["delta"]) for entry in self._task_data(task)["entries"])

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold an exclusive lock on ``privacy_ledger.json.lock`` and reload the ledger."""
        lock_path = self._path.with_name(self._path.name + ".lock")
        with open(lock_path, "a+b") as lock_file:
            if sys.platform != "win32":
                import fcntl

                # The lock is released when the file closes, also on an exception.
                fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)
            self._reload()
            yield

    def _reload(self) -> None:
        self._tasks = _read_ledger(self._path)

    def _write(self) -> None:
        """Replace the file with the in-memory ledger, raising if a recorded round would be lost."""
        on_disk = _read_ledger(self._path)
        for task, data in on_disk.items():
            new_entries = self._task_data(task)["entries"]
            if new_entries[: len(data["entries"])] != data["entries"]:
                raise PrivacyLedgerError(
                    f"{self._path}: cannot write a ledger that drops or changes recorded "
                    f"rounds of task {task!r}; the file on disk has "
                    f"{len(data['entries'])} rounds"
                )

        document = {"format": LEDGER_FORMAT, "version": LEDGER_VERSION, "tasks": self._tasks}
        text = json.dumps(document, indent=2, sort_keys=True, allow_nan=False)
        _write_text_atomic(self._path, text + "\n")


def _check_round_values(steps: int, sample_rate: float, noise_multiplier: float) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer of at least 1, found {steps!r}")
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample_rate must be in (0, 1], found {sample_rate!r}")
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0.0):
        raise ValueError(
            f"noise_multiplier must be finite and at least 0, found {noise_multiplier!r}"
        )


_ENTRY_FIELDS = {
    "time": str,
    "run_id": str,
    "stage": str,
    "server_round": int,
    "steps": int,
    "sample_rate": float,
    "noise_multiplier": float,
    "delta": float,
    "epsilon_after": float,
}
_CHOICE_FIELDS = {
    "time": str,
    "run_id": str,
    "stage": str,
    "sample_rate": float,
    "planned_steps": int,
    "target_epsilon": float,
    "delta": float,
    "noise_multiplier": float,
}


def _read_ledger(path: Path) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Read and validate a ledger file; a missing file is an empty ledger."""
    if not path.exists():
        return {}
    fix = (
        "Fix: restore the file from a backup. Do not delete it: the site would then "
        "start its privacy budget again at zero."
    )
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PrivacyLedgerError(
            f"{path}: cannot read the privacy ledger: {error}. {fix}"
        ) from error

    if not isinstance(document, dict) or document.get("format") != LEDGER_FORMAT:
        raise PrivacyLedgerError(f"{path}: not a UNICON-FL privacy ledger. {fix}")
    if document.get("version") != LEDGER_VERSION:
        raise PrivacyLedgerError(
            f"{path}: ledger version {document.get('version')!r} is not supported; this "
            f"release reads version {LEDGER_VERSION}."
        )
    tasks = document.get("tasks")
    if not isinstance(tasks, dict):
        raise PrivacyLedgerError(f"{path}: 'tasks' must be a mapping. {fix}")

    for task, data in tasks.items():
        if not isinstance(data, dict):
            raise PrivacyLedgerError(f"{path}: task {task!r} must be a mapping. {fix}")
        for key, fields in (("entries", _ENTRY_FIELDS), ("noise_choices", _CHOICE_FIELDS)):
            records = data.setdefault(key, [])
            if not isinstance(records, list):
                raise PrivacyLedgerError(f"{path}: {task}.{key} must be a list. {fix}")
            for index, record in enumerate(records):
                _check_record(record, fields, f"{path}: {task}.{key}[{index}]", fix)
    return tasks


def _check_record(record: Any, fields: Mapping[str, type], where: str, fix: str) -> None:
    if not isinstance(record, dict) or set(record) != set(fields):
        raise PrivacyLedgerError(
            f"{where} must have exactly the fields {', '.join(sorted(fields))}. {fix}"
        )
    for name, kind in fields.items():
        value = record[name]
        valid = isinstance(value, kind) and not isinstance(value, bool)
        if kind is float:
            # json.loads accepts NaN and Infinity, which a ledger never contains.
            valid = (
                isinstance(value, int | float)
                and not isinstance(value, bool)
                and math.isfinite(value)
            )
        if not valid:
            raise PrivacyLedgerError(
                f"{where}.{name} must be of type {kind.__name__}, found {value!r}. {fix}"
            )


def _write_text_atomic(path: Path, text: str) -> None:
    file_descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(file_descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def plan_private_round(
    ledger: PrivacyLedger,
    config: DPConfig,
    *,
    task: str,
    run_id: str,
    stage: str,
    num_samples: int,
    batch_size: int,
    steps_per_round: int,
    num_rounds: int,
) -> RoundPlan:
    """Plan one DP-SGD round of a stage: check delta, fix the noise, check the budget.

    The noise multiplier is ``config.noise_multiplier`` when the site fixes it. With a
    ``target_epsilon`` it is chosen once per stage for ``num_rounds * steps_per_round``
    steps, so that the task's total epsilon reaches the target only if the site trains
    in every round of the stage (see `PrivacyLedger.noise_multiplier_for_stage`).

    Parameters
    ----------
    ledger : PrivacyLedger
        The site's ledger.
    config : DPConfig
        The site's DP settings.
    task, run_id, stage : str
        The task trained, the Flower run and the curriculum stage.
    num_samples : int
        Training samples N of the task at this site.
    batch_size : int
        Batch size of the data loader given to `attach_dp`.
    steps_per_round, num_rounds : int
        Optimizer steps of one round and rounds of the stage.

    Returns
    -------
    RoundPlan
        Declined (``allowed`` False, with a reason) when the budget is spent or the
        epsilon cannot be computed.

    Raises
    ------
    PrivacyConfigError
        When ``config.delta`` is not below ``1 / num_samples``.
    """
    config.check_delta(num_samples, task)
    sample_rate = poisson_sample_rate(num_samples, batch_size)

    if config.noise_multiplier is not None:
        noise_multiplier = config.noise_multiplier
    else:
        target_epsilon = config.target_epsilon
        if target_epsilon is None:
            raise PrivacyConfigError(
                f"{config.source}: 'privacy.dp' sets neither 'target_epsilon' nor "
                "'noise_multiplier'. Fix: add one of them."
            )
        try:
            noise_multiplier = ledger.noise_multiplier_for_stage(
                task,
                run_id=run_id,
                stage=stage,
                target_epsilon=target_epsilon,
                delta=config.delta,
                sample_rate=sample_rate,
                planned_steps=num_rounds * steps_per_round,
            )
        except PrivacyBudgetError as error:
            epsilon_spent = ledger.epsilon_spent(task, config.delta)
            return RoundPlan(
                epsilon_before=epsilon_spent,
                epsilon_after=epsilon_spent,
                allowed=False,
                reason=f"task {task!r} has no privacy budget left for stage {stage!r}: {error}",
                noise_multiplier=math.nan,
                sample_rate=sample_rate,
                steps=steps_per_round,
                delta=config.delta,
            )

    return ledger.plan_round(
        task,
        steps_per_round,
        sample_rate,
        noise_multiplier,
        config.delta,
        epsilon_budget=config.budget,
    )


# ---------------------------------------------------------------------------------------
# Opacus glue
# ---------------------------------------------------------------------------------------


def opacus_incompatibilities(model: nn.Module) -> dict[str, str]:
    """Find the modules that prevent DP-SGD with Opacus, with the reason for each.

    Checks, for every module by its name in ``model.named_modules()`` (the root is
    ``"(model)"``):

    - BatchNorm that is trainable or in training mode, because it mixes the samples
      of a batch (a frozen BatchNorm in eval mode is fine);
    - the checks of ``opacus.validators.ModuleValidator`` on trainable modules;
    - trainable modules with buffers, which per-sample gradients do not cover;
    - modules with ``inplace=True``, which break Opacus's backward hooks;
    - a root module in eval mode (call ``model.train()`` first).

    NOTE: in-place operations inside ``forward`` (such as ``x += identity`` in a residual
    block) are not visible here and fail only when the first batch runs.
    """
    problems: dict[str, str] = {}
    if not model.training:
        problems["(model)"] = "the model is in eval mode; call model.train() before attach_dp"

    trainable = dict(trainable_modules(model))
    for name, module in model.named_modules():
        label = name or "(model)"
        is_trainable = name in trainable
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and (
            is_trainable or module.training
        ):
            problems[label] = (
                f"{type(module).__name__} mixes the samples of a batch; replace it with "
                "GroupNorm or InstanceNorm, or freeze it and put it in eval mode"
            )
            continue
        if getattr(module, "inplace", False) is True:
            problems[label] = (
                f"{type(module).__name__} has inplace=True, which breaks Opacus's backward "
                "hooks; build it with inplace=False"
            )
            continue
        if not is_trainable:
            continue
        validator = ModuleValidator.VALIDATORS.get(type(module))
        errors = validator(module) if validator is not None else []
        if errors:
            problems[label] = f"{type(module).__name__}: {errors[0]}"
            continue
        if any(True for _ in module.buffers(recurse=False)):
            problems[label] = (
                f"{type(module).__name__} is trainable and has buffers, which DP-SGD does not "
                "protect; freeze it or use a layer without buffers"
            )
    return problems


def check_opacus_compatible(model: nn.Module) -> list[str]:
    """Return the names of the modules that prevent DP-SGD with Opacus, sorted.

    An empty list means the model passed every check of `opacus_incompatibilities`,
    which also gives the reason for each name.
    """
    return sorted(opacus_incompatibilities(model))


def attach_dp(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: DataLoader[Any],
    config: DPConfig,
    noise_multiplier: float,
    *,
    noise_generator: torch.Generator | None = None,
) -> tuple[AbstractGradSampleModule, DPOptimizer, DPDataLoader]:
    """Make a model, its optimizer and its data loader private with Opacus.

    Wraps ``PrivacyEngine.make_private`` with Poisson sampling, flat clipping at
    ``config.max_grad_norm`` and hook-based per-sample gradients. The loss must be the
    mean over the batch, computed per sample (no BatchNorm, no batch-level terms),
    because the optimizer divides the clipped sum by the expected batch size. A penalty
    that reads only the parameters (EWC, L2-SP) must go through `private_step`, because
    Opacus drops its gradient when it is part of the loss.

    Empty Poisson batches come out as tensors with a batch axis of length 0, also when
    the very first batch is empty. Pass them to `step_on_empty_batch` instead of the
    model.

    The returned loader's ``sample_rate`` and ``len()`` (steps per pass over the data)
    are what the ledger must record. Opacus's own accountant in the engine is not used:
    `PrivacyLedger` accounts for the steps.

    NOTE: the noise comes from torch's pseudo-random generator. Opacus's ``secure_mode``
    needs the ``torchcsprng`` package, which is not a dependency.

    Parameters
    ----------
    model : nn.Module
        In training mode, with frozen parameters set to ``requires_grad=False``.
    optimizer : torch.optim.Optimizer
        Containing only the model's trainable parameters.
    data_loader : DataLoader
        Map-style loader whose ``batch_size`` sets the expected Poisson batch size.
    config : DPConfig
        Supplies ``max_grad_norm``.
    noise_multiplier : float
        From the round's plan, above 0.
    noise_generator : torch.Generator or None
        Generator of the noise, for reproducible tests only.

    Returns
    -------
    tuple
        ``(GradSampleModule, DPOptimizer, DPDataLoader)``; use them in place of the inputs.

    Raises
    ------
    OpacusIncompatibleError
        When the model fails `opacus_incompatibilities`, the optimizer contains a frozen
        parameter or no parameter, or the noise multiplier is not above 0.
    """
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0.0):
        raise OpacusIncompatibleError(
            f"noise multiplier must be finite and above 0, found {noise_multiplier!r}"
        )
    problems = opacus_incompatibilities(model)
    if problems:
        listing = "; ".join(f"{name}: {reason}" for name, reason in sorted(problems.items()))
        raise OpacusIncompatibleError(f"the model cannot train with DP-SGD: {listing}")

    parameter_names = {id(parameter): name for name, parameter in model.named_parameters()}
    optimized = [p for group in optimizer.param_groups for p in group["params"]]
    if not optimized:
        raise OpacusIncompatibleError("the optimizer contains no parameters")
    frozen = [parameter_names.get(id(p), "?") for p in optimized if not p.requires_grad]
    if frozen:
        raise OpacusIncompatibleError(
            f"the optimizer contains frozen parameters ({', '.join(frozen)}); DP-SGD would add "
            "noise to them. Build the optimizer from the parameters with requires_grad=True"
        )

    with warnings.catch_warnings():
        # The engine warns about secure_mode on every construction; the NOTE above covers it.
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant="rdp", secure_mode=False)
    private_model, private_optimizer, private_loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=data_loader,
        noise_multiplier=noise_multiplier,
        max_grad_norm=config.max_grad_norm,
        poisson_sampling=True,
        clipping="flat",
        grad_sample_mode="hooks",
        noise_generator=noise_generator,
    )
    _prepare_empty_batches(private_loader)
    return private_model, private_optimizer, private_loader


def _prepare_empty_batches(loader: DataLoader[Any]) -> None:
    """Give Opacus's empty-batch collate the layout of a batch before the first batch.

    Opacus 1.6 learns the layout of an empty batch from the first non-empty one. When the
    first Poisson batch is empty and samples are dictionaries of tensors, its fallback
    fails with a TypeError. A zero-length template built from sample 0 avoids that and
    keeps no sample data in memory.
    """
    collate = loader.collate_fn
    if not isinstance(collate, CollateFnWithEmpty) or collate.first_batch is not None:
        return
    inner = collate.wrapped_collator_fn
    if inner is None:
        return
    example = inner([loader.dataset[0]])
    collate.first_batch = _zero_length_like(example)


def _zero_length_like(batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.new_empty((0, *batch.shape[1:]))
    if isinstance(batch, Mapping):
        return {key: _zero_length_like(value) for key, value in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(_zero_length_like(value) for value in batch)
    raise TypeError(
        f"samples must be tensors, or dicts, lists or tuples of tensors, found {type(batch)}"
    )


def is_empty_batch(batch: Any) -> bool:
    """Return whether a batch from a Poisson-sampled loader contains no sample.

    A batch is empty when it is an empty list, tuple or dict, or when its first tensor
    (depth first) has a batch axis of length 0.
    """
    if isinstance(batch, torch.Tensor):
        return batch.ndim > 0 and batch.shape[0] == 0
    if isinstance(batch, Mapping):
        values = list(batch.values())
    elif isinstance(batch, list | tuple):
        values = list(batch)
    else:
        return False
    if not values:
        return True
    return is_empty_batch(values[0])


def private_step(optimizer: DPOptimizer, penalty: torch.Tensor | None = None) -> None:
    """Take one DP-SGD step, adding the gradient of a penalty that reads no data.

    Opacus's ``DPOptimizer.step`` replaces ``p.grad`` with the clipped, noised sum of
    the per-sample gradients, so the gradient of a term that depends only on the
    parameters (EWC, L2-SP) would be lost if it were part of the backward pass. Call
    ``loss.backward()`` on the data-dependent loss only (task loss, and LwF, which runs
    the model on the batch), then pass the parameter-only penalty here. Its gradient is
    added after clipping and noise, which costs no privacy because the penalty reads
    no training sample.

    Parameters
    ----------
    optimizer : DPOptimizer
        The optimizer returned by `attach_dp`, after ``loss.backward()``.
    penalty : torch.Tensor or None
        Scalar penalty computed from the parameters (and fixed reference values),
        with its autograd graph. None takes a plain ``optimizer.step()``.
    """
    if penalty is None:
        optimizer.step()
        return

    parameters = list(optimizer.params)
    penalty_gradients = torch.autograd.grad(penalty, parameters, allow_unused=True)

    # pre_step clips, adds the noise and averages; it returns False for a step that
    # only accumulates (Opacus's virtual batches), which must not move the parameters.
    if not optimizer.pre_step():
        return
    for parameter, gradient in zip(parameters, penalty_gradients, strict=True):
        if gradient is None:
            continue
        if parameter.grad is None:
            parameter.grad = gradient.detach().clone()
        else:
            parameter.grad.add_(gradient.detach())
    optimizer.original_optimizer.step()


def step_on_empty_batch(optimizer: DPOptimizer, penalty: torch.Tensor | None = None) -> None:
    """Take a DP-SGD step for a batch without samples: noise only, plus any penalty.

    Poisson sampling draws an empty batch now and then, and the privacy analysis counts
    that step like any other, so skipping it would break the accounting. The step sets
    zero-length per-sample gradients, so that the optimizer adds only the Gaussian
    noise (and the gradient of ``penalty``, see `private_step`) and updates the
    parameters. It runs no forward pass, so no NaN loss (a mean over zero samples)
    reaches the metrics. Call ``optimizer.zero_grad()`` before the next batch, as after
    every step.
    """
    for parameter in optimizer.params:
        # Opacus's hooks normally set this attribute during the backward pass.
        parameter.grad_sample = parameter.new_zeros((0, *parameter.shape))
    private_step(optimizer, penalty)


def unwrap_dp_model(model: nn.Module) -> nn.Module:
    """Remove Opacus's hooks and return the plain model inside a GradSampleModule.

    A model that is not wrapped is returned unchanged.
    """
    if isinstance(model, AbstractGradSampleModule):
        return model.to_standard_module()
    return model


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Return the model's state dict under its own parameter names.

    A GradSampleModule prefixes every key with ``_module.``. The prefix is removed, also
    from nested wrappers, so that the names match the model spec sent over the wire.
    """
    prefix = "_module."
    state: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        while key.startswith(prefix):
            key = key[len(prefix) :]
        state[key] = value
    return state
