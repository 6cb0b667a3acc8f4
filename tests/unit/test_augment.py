"""Augmentation multiplicity: the views, and every engine clipping an example's mean over its views."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedmq.site_agent.models import PRESETS, build_model
from fedmq.site_agent.training import DPConfig, LocalTrainer, TrainingConfig, TrainingError
from fedmq.site_agent.training.augment import augment, max_shift
from fedmq.site_agent.training.engines import ENGINES, make_engine


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _all_views(img: torch.Tensor) -> list[torch.Tensor]:
    """Every shift and flip the module may draw, written the slow, obvious way."""
    c, h, w = img.shape
    p = max_shift(h)
    padded = F.pad(img[None], (p, p, p, p), mode="replicate")[0]
    out = []
    for dy in range(2 * p + 1):
        for dx in range(2 * p + 1):
            crop = padded[:, dy : dy + h, dx : dx + w]
            out += [crop, crop.flip(-1)]
    return out


def test_views_are_shifted_or_flipped_copies_of_their_own_example() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 1, 28, 28, generator=g)
    v = augment(x, 4, torch.Generator().manual_seed(1))
    assert v.shape == (20, 1, 28, 28)
    assert max_shift(28) == 2 and max_shift(224) == 16
    for i in range(5):
        allowed = _all_views(x[i])
        for k in range(4):  # example-major: rows 4i .. 4i+3 are example i
            assert any(torch.equal(v[4 * i + k], a) for a in allowed)
    # the views differ (30 % of draws repeat at most by chance, not all 20) and are reproducible
    assert len({tuple(r.flatten().tolist()) for r in v}) > 10
    assert torch.equal(v, augment(x, 4, torch.Generator().manual_seed(1)))


def test_augment_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="copies"):
        augment(torch.zeros(2, 1, 8, 8), 0, torch.Generator())
    with pytest.raises(ValueError, match="N, C, H, W"):
        augment(torch.zeros(8, 8), 2, torch.Generator())


def _reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor, group: int, clip: float) -> list[torch.Tensor]:
    """Sum over examples of clip(mean over the example's views of its gradient), one example at a time."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    loss_fn = nn.BCEWithLogitsLoss(reduction="sum")
    for i in range(x.shape[0] // group):
        rows = slice(i * group, (i + 1) * group)
        loss = loss_fn(model(x[rows]).reshape(-1), y[rows]) / group
        grads = torch.autograd.grad(loss, params)
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        factor = min(1.0, clip / (float(norm) + 1e-6))
        for t, g in zip(total, grads):
            t.add_(g * factor)
    return total


@pytest.mark.parametrize(
    ("preset", "engines"),
    [("small_cnn", ENGINES), ("resnet18", ("bk", "hooks")), ("resnet50_224", ("bk",))],
)
def test_engines_clip_the_mean_of_an_examples_views(preset: str, engines: tuple[str, ...]) -> None:
    """Clipping each view alone would let an example contribute up to K x C; the mean of its views is clipped."""
    size = min(PRESETS[preset].input_size, 32)
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand(4, 1, size, size, generator=g)
    y0 = torch.tensor([0.0, 1.0, 1.0, 0.0])
    x, y = augment(x0, 3, torch.Generator().manual_seed(3)), y0.repeat_interleave(3)
    clip = 0.05  # small enough that every example is clipped, so the grouping shows in the result
    ref = _reference(build_model(preset, 5), x, y, 3, clip)  # type: ignore[arg-type]
    for engine in engines:
        model = build_model(preset, 5)  # type: ignore[arg-type]
        eng = make_engine(engine, model, max_grad_norm=clip)
        acc = [torch.zeros_like(p) for p in eng.params]
        loss = eng.accumulate(x, y, nn.BCEWithLogitsLoss(reduction="sum"), acc, group=3)
        eng.close()
        assert loss > 0
        for a, b in zip(acc, ref, strict=True):
            torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-6)
        norm = float(torch.sqrt(sum((a**2).sum() for a in acc)))
        assert norm <= 4 * clip + 1e-5  # four examples, each at most C


def test_engines_refuse_a_batch_that_is_not_whole_groups() -> None:
    eng = make_engine("bk", build_model("small_cnn", 0), max_grad_norm=1.0)
    with pytest.raises(TrainingError, match="whole groups"):
        eng.accumulate(torch.rand(5, 1, 28, 28), torch.zeros(5), nn.BCEWithLogitsLoss(reduction="sum"),
                       [torch.zeros_like(p) for p in eng.params], group=2)
    eng.close()


@pytest.mark.parametrize("dp", [True, False])
def test_trainer_with_views_is_reproducible_and_differs_from_plain(dp: bool, tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(4)
    X, y = torch.rand(24, 1, 28, 28, generator=g), (torch.arange(24) % 2).float()

    def run(views: int, tag: str) -> dict[str, torch.Tensor]:
        cfg = TrainingConfig(model="small_cnn", lr=0.5, optimizer="sgd", momentum=0.0, batch_size=8, local_steps=2,
                             seed=7, device="cpu", augmentations=views, max_physical_batch=8,
                             dp=DPConfig(enabled=dp, target_epsilon=8.0, planned_rounds=2))
        result = LocalTrainer(cfg, tmp_path / f"{tag}.json").train_round(build_model("small_cnn", 0).state_dict(), X, y)
        assert all(torch.isfinite(v).all() for v in result.state_dict.values())
        if dp:
            assert result.epsilon is not None and 0 < result.epsilon <= 8.0
        return result.state_dict

    a, b, plain = run(4, "a"), run(4, "b"), run(0, "plain")
    assert all(torch.equal(a[k], b[k]) for k in a)  # seeded views and noise: the same round twice
    assert any(not torch.allclose(a[k], plain[k]) for k in a)


def test_views_are_bounded() -> None:
    with pytest.raises(ValueError):
        TrainingConfig(augmentations=-1)
    with pytest.raises(ValueError):
        TrainingConfig(augmentations=65)
