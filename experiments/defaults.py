"""Defaults that are rules, not numbers tuned to one dataset (docs/reproduction.md, "Defaults as rules").

The demo (experiments/demo.py, experiments/federation.py) and the reproduction
(experiments/reproduce.py) read every default below from here, so a rule is written once. Each
function says why its rule holds; what the rule gives on PneumoniaMNIST, and what was measured,
is in docs/reproduction.md.

- the model of the 28 px runs: :func:`model_preset`
- rounds R: :func:`planned_rounds`
- local steps per round: :func:`local_steps` (one epoch, at most S; the demo)
- clip norm C: :func:`clip_norm`
- the DP noise multiplier: never chosen, computed from the budget (:func:`dp_noise_multiplier`,
  the site's own accountant)
- the DP learning rate: :func:`dp_learning_rate` (from the noise multiplier, per site; for rounds of
  at most S steps corrected for momentum that restarts every round, :func:`momentum_gain`)
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
#: S: the most DP-SGD steps a site takes in one round; see :func:`local_steps`
LOCAL_STEPS = 4
#: T: the DP-SGD steps a large site takes over a run of short rounds (R x S); see :func:`planned_rounds`
SHORT_RUN_STEPS = 320
#: R for rounds of at most S steps (the demo's): T / S; see :func:`planned_rounds`
ROUNDS_SHORT = SHORT_RUN_STEPS // LOCAL_STEPS
#: heavy-ball momentum of the DP-SGD optimizer (the demo's and the reproduction's SGD)
MOMENTUM = 0.9
#: steps per round of the large sites in the runs :data:`DP_STEP_NOISE` was anchored on (c1: one-epoch
#: rounds of 1,800-2,000 images at B = 128, docs/reproduction.md); see :func:`momentum_gain`
ANCHOR_ROUND_STEPS = 16
#: the SMA-equivalent window of the EMA, as a fraction of the versions; see :func:`ema_beta`
EMA_WINDOW_FRACTION = 0.25


def model_preset() -> str:
    """``scatternet``: a fixed wavelet scattering front end (no trained weights, no privacy cost)
    and a linear classifier on its 81 x 7 x 7 features (site_agent/scattering.py).

    Under DP-SGD every trained weight is noised, and a federation of a few thousand images at
    epsilon 1.2 gets a few hundred noisy steps: an end-to-end CNN spends them learning its
    filters. Fixed features that are known to suit images (edges and textures at each scale and
    direction) leave only a linear classifier to learn, which converges in those few steps
    (Tramer & Boneh, ICLR 2021: linear ScatterNet models beat end-to-end CNNs under DP at small
    epsilon on MNIST, Fashion-MNIST and CIFAR-10). On the demo's five partitions, in the
    simulation with everything else equal, test AUC went from 0.883-0.909 (``small_cnn``) to
    0.937-0.953, and the swing between versions from 0.010-0.021 to 0.001 (docs/results.md, "The
    demo"). The demo's ``--no-dp`` keeps the same model, so the two runs differ in DP only.
    """
    return "scatternet"


def planned_rounds(short: bool = False) -> int:
    """R = 20 rounds (updates per site) of one local epoch for every dataset; for rounds of at
    most S steps (``short``, :func:`local_steps`) R = T / S = 80 with T = 320 steps.

    Short rounds: the privacy accountant charges DP-SGD steps, not rounds, so how a large site's
    steps are cut into rounds does not change its noise multiplier; T = 320 is about what a
    large site of the anchor runs took (20 one-epoch rounds of 15-16 steps, docs/reproduction.md
    c1), and R = T / S keeps it whatever S is (S = 4: R = 80; the former S = 8: R = 40). A site
    with fewer than S steps in an epoch takes one epoch per round and R of them. Over T the
    signal-to-noise of a large site's summed steps, sqrt(T) x B / sigma, hardly depends on how T
    is cut into batches or rounds (1,500 images: 461-482 for B 128-512, R 20-40), so rounds
    are set for drift and wall time, not for privacy. T = 480 (R = 120 at S = 4) was no better
    on validation at the demo's seeds 1 and 4 (docs/results.md, "The demo"): the larger sigma
    lowers the lr the rule gives, and the extra steps buy little.

    The accountant charges every step, so at a fixed epsilon the noise multiplier grows about
    as sqrt(T); together with :func:`dp_learning_rate` the per-step noise stays fixed and more
    steps buy more, smaller steps. 20 one-epoch rounds is the fewest at which every DP setting
    tried stopped losing validation AUC between rounds 10 and 20 (docs/reproduction.md, runs
    B/K, J/L). The non-DP arms use the same R so both get the same compute.
    """
    return ROUNDS_SHORT if short else ROUNDS


def local_steps(n_train: int, *, batch_size: int, most: int = LOCAL_STEPS) -> int:
    """A site's DP-SGD steps per round: one epoch (ceil(n / B)), but at most S = 4.

    Bounds client drift under label skew. Drift grows with how far a site travels from a
    version before the next average, lr x (steps of the round) (local-SGD / FedAvg analyses,
    e.g. Karimireddy et al. 2020, SCAFFOLD), and under DP the lr is set by the noise
    (:func:`dp_learning_rate`), so S is the one knob left for drift. With one epoch per round a
    site of 2,750 images took 22 momentum steps toward its own class mix (86 % pneumonia at the
    demo's seed 1) and the next version swung with it; at S = 8 the same seed became unstable
    (validation AUC 0.4-0.8) as soon as the lr was doubled, at S = 4 it was not. S = 4 is half
    an epoch or less of every site of 1,024 images or more at B = 128; the run keeps T steps
    (:func:`planned_rounds`), and the momentum that restarts every round is corrected for in
    the lr (:func:`momentum_gain`). Never more than one epoch: a small site that passed over
    its data several times per round would pay for every pass (237 images, 8 steps instead of 2
    per round: noise multiplier 26 instead of 13 at the same epsilon), and the federation's
    learning rate follows the noisiest site. Measured on the demo's partitions: docs/results.md,
    "The demo".
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
    "The demo"), so C = 1 stays. C = 0.5, about that late median, was level with C = 1 at
    S = 4 (validation 0.927 / 0.953 against 0.927 / 0.950 at the demo's seeds 1 / 4).
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


def momentum_gain(steps: int, momentum: float = MOMENTUM) -> float:
    """How much farther heavy-ball SGD moves, per step, than plain SGD over a round of ``steps``
    steps that starts from zero momentum (the site builds a new optimizer every round):
    g(s) = (1/s) sum_{k=1..s} (1 - m^k) / (1 - m).

    A gradient (or noise draw) taken at step k of the round has moved the weights by
    lr (1 - m^j) / (1 - m) after j more steps; averaged over the round that is g(s): 1.45 at
    s = 2, 2.26 at s = 4, 3.59 at s = 8, 5.42 at s = 16, and 1 / (1 - m) = 10 only in the limit.
    """
    if steps < 1 or not 0.0 <= momentum < 1.0:
        raise ValueError("steps must be positive and momentum in [0, 1)")
    if momentum == 0.0:
        return 1.0
    return sum((1.0 - momentum ** k) / (1.0 - momentum) for k in range(1, steps + 1)) / steps


def dp_learning_rate(noise_multiplier: float, *, batch_size: int, max_grad_norm: float = CLIP_NORM,
                     step_noise: float = DP_STEP_NOISE, round_steps: int | None = None,
                     momentum: float = MOMENTUM) -> float:
    """SGD learning rate under DP: lr = step_noise x B / (sigma x C), and for rounds of at most
    ``round_steps`` = S steps lr x g(16) / g(S) (:func:`momentum_gain`).

    Under DP the noise, not the gradient, limits a step: each step adds Gaussian noise of
    per-coordinate size lr x sigma x C / B to the weights. Holding that size fixed (1.5e-3)
    carries the rule across datasets and sites: a small site (large q, large sigma) takes
    smaller steps, a large one (small sigma) larger ones, instead of every site using the step
    size that suits the noisiest one. 1.5e-3 is what lr 0.02 gives at sigma 9.3 and B = 128,
    the setting the validation search chose (docs/reproduction.md, c1).

    That anchor was set with one-epoch rounds, in which the large sites (which carry nearly all
    of a version's sample weight) took about 16 momentum steps per round; momentum 0.9 restarts
    every round, so a step moved the weights g(16) = 5.4 lr on average. In rounds of S steps it
    moves g(S) lr (2.26 lr at S = 4): the same lr would travel less than half as far, with
    the same total steps and privacy. ``round_steps`` = S holds the momentum-effective step,
    lr x g(S) x sigma x C / B = 1.5e-3 x g(16), at the anchor's level (x 2.39 at S = 4, x 1.51
    at S = 8); None (one-epoch rounds, the reproduction) leaves the anchor as it is. Derived,
    not searched: docs/results.md ("The demo") lists what it gave, and what 2 x did.
    """
    if noise_multiplier <= 0 or batch_size < 1 or max_grad_norm <= 0:
        raise ValueError("noise multiplier, batch size and clip norm must be positive")
    lr = step_noise * batch_size / (noise_multiplier * max_grad_norm)
    if round_steps is not None:
        lr *= momentum_gain(ANCHOR_ROUND_STEPS, momentum) / momentum_gain(round_steps, momentum)
    return lr


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
                             max_grad_norm: float = CLIP_NORM, step_noise: float = DP_STEP_NOISE,
                             round_steps: int | None = None, momentum: float = MOMENTUM) -> dict[str, float]:
    """One lr for every site: :func:`dp_learning_rate` at the largest noise multiplier (with
    ``round_steps`` = S for rounds of at most S steps).

    FedAvg averages site steps of one step size (a site with a larger lr would pull the mean
    toward its own optimum beyond its sample weight), and every version folds the noisiest
    site's update too, so that site's per-step noise is the one held at the rule's level.
    """
    if not noise_multipliers:
        raise ValueError("no sites")
    lr = dp_learning_rate(max(noise_multipliers.values()), batch_size=batch_size, max_grad_norm=max_grad_norm,
                          step_noise=step_noise, round_steps=round_steps, momentum=momentum)
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
