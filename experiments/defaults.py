"""Defaults that are rules, not numbers tuned to one dataset (docs/reproduction.md, "Defaults as rules").

The demo (experiments/demo.py, experiments/federation.py) and the reproduction
(experiments/reproduce.py) read every default below from here, so a rule is written once. Each
function says why its rule holds; what the rule gives on PneumoniaMNIST, and what was measured,
is in docs/reproduction.md.

- rounds R: :func:`planned_rounds`
- local steps per round: :func:`local_steps` (one epoch, at most S; the demo)
- clip norm C: :func:`clip_norm`
- the DP noise multiplier: never chosen, computed from the budget (:func:`dp_noise_multiplier`,
  the site's own accountant)
- the DP learning rate: :func:`dp_learning_rate` (from the noise multiplier, per site)
- K for async mode: :func:`async_buffer_size`
- EMA of the global versions: :func:`ema_beta` (from the number of versions)
- the decision threshold: :func:`experiments.scoring.select_threshold` (highest balanced accuracy
  on validation; its reason is in that module, the one place the rule lives)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

#: R: updates each site contributes (the DP budget covers exactly these); see :func:`planned_rounds`
ROUNDS = 20
#: C: per-example gradient clip norm; see :func:`clip_norm`
CLIP_NORM = 1.0
#: the per-coordinate standard deviation of the noise one DP-SGD step adds to the weights,
#: lr x sigma x C / B, that :func:`dp_learning_rate` holds fixed
DP_STEP_NOISE = 1.5e-3
#: R for rounds of at most S steps (the demo's); see :func:`planned_rounds`
ROUNDS_SHORT = 40
#: S: the most DP-SGD steps a site takes in one round; see :func:`local_steps`
LOCAL_STEPS = 8
#: the SMA-equivalent window of the EMA, as a fraction of the versions; see :func:`ema_beta`
EMA_WINDOW_FRACTION = 0.25


def planned_rounds(short: bool = False) -> int:
    """R = 20 rounds (updates per site) of one local epoch for every dataset; R = 40 for rounds
    of at most S steps (``short``, :func:`local_steps`).

    Short rounds: a round of at most S = 8 steps is about half an epoch of a large site (12-22
    steps per epoch at 1,500-2,750 images and B = 128), so twice the rounds keep the large sites'
    DP-SGD steps (and with them their noise multipliers) near those of 20 one-epoch rounds; the
    federation's total steps stay within 5 % of them on the demo's partitions. 60 short rounds
    gave no better validation AUC than 40 (docs/results.md, "The demo").

    The accountant charges every round, so at a fixed epsilon the noise multiplier grows about
    as sqrt(R); together with :func:`dp_learning_rate` the per-step noise stays fixed and more
    rounds buy more, smaller steps. 20 is the fewest at which every DP setting tried stopped
    losing validation AUC between rounds 10 and 20 (docs/reproduction.md, runs B/K, J/L). The
    non-DP arms use the same R so both get the same compute.
    """
    return ROUNDS_SHORT if short else ROUNDS


def local_steps(n_train: int, *, batch_size: int, most: int = LOCAL_STEPS) -> int:
    """A site's DP-SGD steps per round: one epoch (ceil(n / B)), but at most S = 8.

    Bounds client drift under label skew: with one epoch per round, a site of 2,750 images took
    22 momentum steps from each version toward its own class mix (86 % pneumonia at the demo's
    seed 1) and the next version swung with it. Capped at S steps, a round moves every large
    site about equally far, whatever its size. Never more than one epoch: a small site that
    passed over its data several times per round would pay for every pass (237 images, 8 steps
    instead of 2 per round: noise multiplier 26 instead of 13 at the same epsilon), and the
    federation's learning rate follows the noisiest site. Measured on the demo's partitions
    (docs/results.md, "The demo"): over seeds 0-4 it raises the worst seed's validation AUC
    (0.902 against 0.879 for one-epoch rounds), not the mean (0.923 against 0.924).
    """
    if n_train < 1 or batch_size < 1 or most < 1:
        raise ValueError("images, batch size and S must be positive")
    return min(most, max(1, math.ceil(n_train / batch_size)))


def clip_norm() -> float:
    """C = 1 for every model and dataset (the Abadi et al. / Opacus default).

    With clipping to C a DP step is lr x (clipped mean + sigma C / B noise): C only rescales the
    effective step, which the learning-rate rule sets, so C is not a second knob to tune.
    That holds while every example is clipped: at the demo's final version at seed 0, 75 % of
    the per-example gradients are below 1 (median 0.48). C = 0.1, which clips them all, was tried on
    the demo's partitions and gave lower validation AUC (0.901 against 0.911, docs/results.md,
    "The demo"), so C = 1 stays.
    """
    return CLIP_NORM


def dp_noise_multiplier(n_train: int, *, batch_size: int, rounds: int, epsilon: float,
                        local_epochs: int = 1, local_steps: int | None = None, delta: float | None = None) -> float:
    """The noise multiplier a site with ``n_train`` training images will compute for itself.

    Never chosen: the smallest sigma that spends exactly ``epsilon`` at delta = 1/(10 n) (unless
    given) over ``rounds`` rounds of Poisson sampling at q = B / n, each round ``local_steps``
    steps (None: ``local_epochs`` epochs). It calls the site's own code
    (``site_agent.training.dp.ledger_params_for``), so the rule below sees the sigma the site's
    ledger will be bound to, not a re-derivation of it.
    """
    from fedmq.site_agent.training.config import DPConfig, TrainingConfig
    from fedmq.site_agent.training.dp import ledger_params_for

    cfg = TrainingConfig(batch_size=batch_size, local_epochs=local_epochs, local_steps=local_steps,
                         dp=DPConfig(target_epsilon=epsilon, delta=delta, planned_rounds=rounds))
    return float(ledger_params_for(cfg, n_train).noise_multiplier)


def dp_learning_rate(noise_multiplier: float, *, batch_size: int, max_grad_norm: float = CLIP_NORM,
                     step_noise: float = DP_STEP_NOISE) -> float:
    """SGD learning rate under DP: lr = step_noise x B / (sigma x C).

    Under DP the noise, not the gradient, limits a step: each step adds Gaussian noise of
    per-coordinate size lr x sigma x C / B to the weights. Holding that size fixed (1.5e-3)
    carries the rule across datasets and sites: a small site (large q, large sigma) takes
    smaller steps, a large one (small sigma) larger ones, instead of every site using the step
    size that suits the noisiest one. 1.5e-3 is what lr 0.02 gives at sigma 9.3 and B = 128,
    the setting the validation search chose (docs/reproduction.md, c1).
    """
    if noise_multiplier <= 0 or batch_size < 1 or max_grad_norm <= 0:
        raise ValueError("noise multiplier, batch size and clip norm must be positive")
    return step_noise * batch_size / (noise_multiplier * max_grad_norm)


def async_buffer_size(n_sites: int, *, dp: bool) -> int:
    """K for async mode: every site's worth of updates under DP (each version then averages the
    DP noise of n updates, as a sync round does, without waiting for any particular site);
    half the sites without DP (a version should not wait for the slowest half, and K = 1
    gives every update a version of its own)."""
    if n_sites < 1:
        raise ValueError("a federation has at least one site")
    return n_sites if dp else max(1, math.ceil(n_sites / 2))


def expected_versions(rounds: int, n_sites: int, buffer_size: int) -> int:
    """Versions a run publishes when every site sends ``rounds`` updates and each version folds
    ``buffer_size`` of them (sync: buffer_size = n_sites, one version per round)."""
    if rounds < 1 or n_sites < 1 or buffer_size < 1:
        raise ValueError("rounds, sites and K must be positive")
    return max(1, (rounds * n_sites) // buffer_size)


def ema_beta(versions: int) -> float:
    """EMA coefficient of the key holder's average of global versions: beta = 1 - 2 / (N + 1)
    with N = a quarter of the versions (at least 1).

    An EMA with beta = 1 - 2 / (N + 1) has the centre of mass of an N-version moving average
    (the usual EMA/SMA correspondence). Averaging over about the last quarter of the run
    smooths the DP noise of the last few versions without reaching back to the early, poor
    ones. R = 20 versions: N = 5, beta = 0.667 (the validation search's 0.7 was within 0.007 of
    its neighbours, docs/reproduction.md third pass). Post-processing only: no privacy cost.
    """
    if versions < 1:
        raise ValueError("at least one version")
    window = max(1.0, EMA_WINDOW_FRACTION * versions)
    return 1.0 - 2.0 / (window + 1.0)


def federation_learning_rate(noise_multipliers: Mapping[str, float], *, batch_size: int,
                             max_grad_norm: float = CLIP_NORM, step_noise: float = DP_STEP_NOISE) -> dict[str, float]:
    """One lr for every site: :func:`dp_learning_rate` at the largest noise multiplier.

    FedAvg averages site steps of one step size (a site with a larger lr would pull the mean
    toward its own optimum beyond its sample weight), and every version folds the noisiest
    site's update too, so that site's per-step noise is the one held at the rule's level.
    """
    if not noise_multipliers:
        raise ValueError("no sites")
    lr = dp_learning_rate(max(noise_multipliers.values()), batch_size=batch_size, max_grad_norm=max_grad_norm,
                          step_noise=step_noise)
    return {site: lr for site in noise_multipliers}


def dp_federation_lr_for_sizes(n_train: Sequence[int], *, batch_size: int, rounds: int, epsilon: float,
                               local_epochs: int = 1, max_grad_norm: float = CLIP_NORM) -> float:
    """The one DP learning rate of a federation whose sites hold ``n_train`` training images:
    :func:`federation_learning_rate` of the noise multipliers the sites will compute
    (:func:`dp_noise_multiplier`). For the reproduction, whose simulated sites share one
    ``LocalSettings``: ``[len(s.X_train) for s in data.sites]`` of each seed's partition."""
    sigmas = {str(i): dp_noise_multiplier(n, batch_size=batch_size, rounds=rounds, epsilon=epsilon,
                                          local_epochs=local_epochs) for i, n in enumerate(n_train)}
    return next(iter(federation_learning_rate(sigmas, batch_size=batch_size, max_grad_norm=max_grad_norm).values()))
