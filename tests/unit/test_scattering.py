"""The scattering front end: what the wavelets are, what the transform keeps and loses, and its cache."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from fedmq.site_agent.models import PRESETS, build_model, count_parameters, trained_part
from fedmq.site_agent.scattering import FrontendCache, Scattering2D, morlet
from fedmq.site_agent.training import DPConfig, LocalTrainer, TrainingConfig, predict_proba


def _smooth_images(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 7, 7, generator=g)
    return torch.nn.functional.interpolate(x, size=28, mode="bilinear", align_corners=False)


def test_wavelets_ignore_brightness_and_the_average_keeps_it() -> None:
    s = Scattering2D(28)
    assert s.channels == 81 and s.out_size == 7
    assert s.psi_hat[:, 0, 0].abs().max() < 1e-5  # every wavelet sums to zero
    assert abs(float(s.phi_hat[0, 0]) - 1.0) < 1e-3  # the low-pass sums to one
    assert float(morlet(44, 1.6, 0.3, 1.2, 0.5).sum().abs()) < 1e-9
    const = torch.full((2, 1, 28, 28), 0.7)
    f = s(const)
    assert f.shape == (2, 81, 7, 7)
    torch.testing.assert_close(f[:, 0], torch.full((2, 7, 7), 0.7), atol=1e-3, rtol=0)
    assert f[:, 1:].abs().max() < 1e-4  # no edges, no texture


def test_a_quarter_turn_of_the_image_moves_each_orientation_by_half_the_angles() -> None:
    """8 angles over pi: 90 degrees is 4 of them, whichever way it turns."""
    s = Scattering2D(28)
    x = _smooth_images(3, seed=1)
    first = slice(1, 17)  # order 1: 2 scales x 8 angles
    a = s(x).detach()[:, first].mean((2, 3)).reshape(3, 2, 8)
    b = s(torch.rot90(x, 1, (2, 3))).detach()[:, first].mean((2, 3)).reshape(3, 2, 8)
    # the sampling grid and the reflected border are not quite symmetric under the turn: 5 % apart,
    # and every other pairing of the angles at least twice as far
    err = [float((b - a.roll(r, dims=2)).norm() / a.norm()) for r in range(8)]
    assert err[4] < 0.06
    assert err[4] < 0.6 * min(e for r, e in enumerate(err) if r != 4)


def test_stripes_light_up_the_orientation_across_them() -> None:
    s = Scattering2D(28)
    rows = torch.arange(28, dtype=torch.float32).view(28, 1).expand(28, 28)
    stripes = (0.5 + 0.5 * torch.cos(rows * (3 * math.pi / 4))).view(1, 1, 28, 28)  # varies down the rows
    scale0 = s(stripes)[0, 1:9].mean((1, 2))
    best = int(scale0.argmax())
    assert scale0[best] > 5 * scale0[(best + 4) % 8]  # the perpendicular orientation hardly responds
    assert scale0[best] > 2 * scale0.median()


def test_a_one_pixel_shift_moves_the_features_far_less_than_the_pixels() -> None:
    s = Scattering2D(28)
    x = _smooth_images(4, seed=2) + 0.1 * torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    shifted = torch.roll(x, 1, dims=3)
    pixels = (shifted - x).norm() / x.norm()
    features = (s(shifted) - s(x)).norm() / s(x).norm()
    assert features < 0.5 * pixels


def test_the_front_end_is_not_trained_sent_or_saved() -> None:
    model = build_model("scatternet", 0)
    assert count_parameters(model) == PRESETS["scatternet"].n_params == 4_132
    assert all(k.startswith("classifier.") for k in model.state_dict())
    assert not list(model.frontend.parameters())
    x = _smooth_images(5)
    net, features = trained_part(model, x)
    assert net is model.classifier and features.shape == (5, 81, 7, 7) and not features.requires_grad
    torch.testing.assert_close(net(features), model(x))
    other, same = trained_part(build_model("small_cnn", 0), x)
    assert same is x and not hasattr(other, "frontend")


def test_the_cache_is_keyed_by_content_and_bounded() -> None:
    cache, s = FrontendCache(entries=2), Scattering2D(28)
    a, b, c = _smooth_images(3, 4), _smooth_images(3, 5), _smooth_images(3, 6)
    fa = cache.features(s, a)
    assert cache.features(s, a.clone()) is fa and (cache.hits, cache.misses) == (1, 1)  # same pixels, new tensor
    a2 = a.clone()
    a2[0, 0, 0, 0] += 1e-3
    assert cache.features(s, a2) is not fa  # one changed pixel is another dataset
    cache.features(s, b)
    cache.features(s, c)
    assert len(cache._held) == 2
    one = cache.held_bytes() // 2
    small = FrontendCache(entries=8, max_bytes=one + 1)  # room for one dataset's features
    small.features(s, a)
    small.features(s, b)
    assert len(small._held) == 1 and small.features(s, b) is not None and small.hits == 1
    torch.testing.assert_close(cache.features(s, c), s(c))
    assert cache.features(s, a[:0]).shape == (0, 81, 7, 7)
    with pytest.raises(ValueError, match="entries"):
        FrontendCache(entries=0)
    with pytest.raises(ValueError, match="max_bytes"):
        FrontendCache(max_bytes=0)
    with pytest.raises(ValueError, match="28, 28"):
        s(torch.zeros(1, 1, 32, 32))


@pytest.mark.parametrize("views", [0, 2])
def test_scatternet_trains_a_dp_round_and_learns(views: int, tmp_path: Path) -> None:
    """Brighter-centre images against darker-centre ones: a few DP steps separate them."""
    g = torch.Generator().manual_seed(7)
    y = (torch.arange(64) % 2).float()
    X = 0.3 * torch.rand(64, 1, 28, 28, generator=g)
    X[y == 1, :, 10:18, 10:18] += 0.6
    cfg = TrainingConfig(model="scatternet", lr=0.5, optimizer="sgd", momentum=0.5, batch_size=32, local_steps=10,
                         seed=1, device="cpu", augmentations=views,
                         dp=DPConfig(target_epsilon=8.0, planned_rounds=1, max_grad_norm=1.0))
    init = build_model("scatternet", 0)
    result = LocalTrainer(cfg, tmp_path / "ledger.json").train_round(init.state_dict(), X, y)
    assert set(result.state_dict) == set(init.state_dict()) and result.epsilon is not None
    trained = build_model("scatternet", 0)
    trained.load_state_dict(result.state_dict)
    p = predict_proba(trained, X)
    assert p[y.numpy() == 1].mean() > p[y.numpy() == 0].mean() + 0.1


def test_scatternet_exports_to_torchscript_for_any_batch(tmp_path: Path) -> None:
    """``fedmq site export-model`` traces the whole model at batch 1; clinical tooling feeds batches."""
    import warnings

    model = build_model("scatternet", 3).eval()
    with warnings.catch_warnings():
        # the tracer notes the input-shape check it freezes; torch 2.13 marks torch.jit deprecated
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, torch.zeros(1, 1, 28, 28))
        torch.jit.save(traced, str(tmp_path / "m.pt"))
        loaded = torch.jit.load(str(tmp_path / "m.pt"))
    x = _smooth_images(4, seed=8)
    torch.testing.assert_close(loaded(x), model(x).detach(), atol=1e-5, rtol=1e-5)


def test_the_cache_serves_two_threads_at_once() -> None:
    """A site trains on one thread while it scores a version on another; both use the cache."""
    import threading

    cache, s = FrontendCache(entries=2), Scattering2D(28)
    data = [_smooth_images(2, seed=20 + i) for i in range(4)]
    expected = [s(x).detach() for x in data]
    errors: list[BaseException] = []

    def work(offset: int) -> None:
        try:
            for k in range(12):
                i = (k + offset) % 4
                torch.testing.assert_close(cache.features(s, data[i]), expected[i])
        except BaseException as exc:  # noqa: BLE001 - reported to the test thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(o,)) for o in (0, 1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(cache._held) <= 2
