"""DP-SGD for every preset, engines against Opacus, micro-batching, devices, OOM, init weights.

Everything runs on CPU with tiny inputs; the GPU figures come from ``make bench-gpu``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from fedmq.shared.errors import ConfigError
from fedmq.site_agent.model_state import FederatedModel
from fedmq.site_agent.models import PRESETS, build_model, check_image_size, load_init_weights
from fedmq.site_agent.training import DPConfig, LocalTrainer, PrivacyLedger, TrainingConfig, TrainingError
from fedmq.site_agent.training.device import resolve_device
from fedmq.site_agent.training.engines import ENGINES, BookKeepingEngine, make_engine


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tiny(preset: str, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    # 224 px presets accept any size >= 32 (adaptive pooling); 32 px keeps the CPU suite fast
    size = min(PRESETS[preset].input_size, 32)
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, size, size, generator=g), (torch.arange(n) % 2).float()


def _config(preset: str = "small_cnn", *, engine: str = "bk", **kw: object) -> TrainingConfig:
    dp = DPConfig(target_epsilon=8.0, planned_rounds=2, max_grad_norm=1.0, engine=engine,
                  secure_noise=bool(kw.pop("secure_noise", False)))
    base: dict[str, object] = dict(model=preset, lr=0.5, optimizer="sgd", momentum=0.0, batch_size=4,
                                   local_steps=1, seed=7, device="cpu", dp=dp)
    base.update(kw)
    return TrainingConfig(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("engine", ["bk", "hooks"])
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_trains_one_dp_round(preset: str, engine: str, tmp_path: Path) -> None:
    """The issue's failure: Opacus refused MONAI's in-place residual add and ReLU on both ResNets."""
    X, y = _tiny(preset)
    init = build_model(preset, 0).state_dict()  # type: ignore[arg-type]
    result = LocalTrainer(_config(preset, engine=engine), tmp_path / "ledger.json").train_round(init, X, y)
    assert result.epsilon is not None and 0 < result.epsilon <= 8.0
    assert PrivacyLedger.load(tmp_path / "ledger.json").rounds_done == 1
    assert set(result.state_dict) == set(init)
    assert any(not torch.equal(result.state_dict[k], init[k]) for k in init)
    assert all(torch.isfinite(v).all() for v in result.state_dict.values())


@pytest.mark.parametrize(
    ("preset", "engines"),
    [("small_cnn", ENGINES), ("scatternet", ENGINES), ("resnet18", ENGINES), ("resnet50_224", ("bk", "hooks"))],  # functorch: slow on CPU
)
def test_bk_engine_matches_opacus_clipped_sums(preset: str, engines: tuple[str, ...]) -> None:
    """fedmq's mixed ghost / book-keeping engine releases what Opacus' per-sample gradients give."""
    X, y = _tiny(preset, 6)
    sums = {}
    for engine in engines:
        model = build_model(preset, 3)  # type: ignore[arg-type]
        eng = make_engine(engine, model, max_grad_norm=0.5)
        acc = [torch.zeros_like(p) for p in eng.params]
        eng.accumulate(X, y, nn.BCEWithLogitsLoss(reduction="sum"), acc)
        eng.close()
        assert not any(p.grad is not None for p in model.parameters())
        sums[engine] = acc
    total = torch.sqrt(sum((a**2).sum() for a in sums["hooks"]))
    assert 0 < total <= 0.5 * 6 + 1e-4  # each of 6 samples contributes at most the clip norm
    for engine in set(engines) - {"hooks"}:
        for a, b in zip(sums[engine], sums["hooks"], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_bk_engine_uses_both_ghost_and_instantiated_layers() -> None:
    """The mix is real: the stem instantiates per-sample gradients, layer4 takes the ghost norm."""
    model = build_model("resnet50_224", 0)
    eng = BookKeepingEngine(model, 1.0)
    seen: dict[str, str] = {}
    original = eng._on_grad

    def spy(layer, g):  # type: ignore[no-untyped-def]
        original(layer, g)
        if isinstance(layer.module, nn.Conv2d):
            seen[type(layer.module).__name__ + str(id(layer.module))] = "instantiated" if layer.per_sample else "ghost"

    eng._on_grad = spy  # type: ignore[method-assign]
    X, y = torch.rand(2, 1, 64, 64), torch.ones(2)
    eng.accumulate(X, y, nn.BCEWithLogitsLoss(reduction="sum"), [torch.zeros_like(p) for p in eng.params])
    eng.close()
    assert set(seen.values()) == {"instantiated", "ghost"}


@pytest.mark.parametrize("engine", ["bk", "hooks"])
def test_split_and_unsplit_batches_release_the_same_gradient(engine: str, tmp_path: Path) -> None:
    """Micro-batching changes memory, not privacy: same epsilon, same clipped-and-noised step."""
    X, y = _tiny("small_cnn", 40)
    init = build_model("small_cnn", 0).state_dict()
    out = []
    for i, physical in enumerate((64, 3)):
        cfg = _config(engine=engine, batch_size=16, max_physical_batch=physical, lr=1.0)
        out.append(LocalTrainer(cfg, tmp_path / f"l{i}.json").train_round(init, X, y, round_index=2))
    whole, split = out
    assert split.timings["physical_batch"] == 3 and whole.timings["physical_batch"] == 64
    assert split.epsilon == whole.epsilon
    moved = 0
    for k in init:
        torch.testing.assert_close(split.state_dict[k], whole.state_dict[k], rtol=1e-5, atol=1e-6)
        moved += int(not torch.equal(whole.state_dict[k], init[k]))
    assert moved > 0


def test_secure_noise_is_not_replayable_and_seeded_noise_is(tmp_path: Path) -> None:
    X, y = _tiny("small_cnn", 20)
    init = build_model("small_cnn", 0).state_dict()

    def run(secure: bool, i: int) -> dict[str, torch.Tensor]:
        cfg = _config(secure_noise=secure, batch_size=8)
        return LocalTrainer(cfg, tmp_path / f"{secure}{i}.json").train_round(init, X, y).state_dict

    a, b = run(True, 0), run(True, 1)
    assert any(not torch.equal(a[k], b[k]) for k in a)
    c, d = run(False, 0), run(False, 1)
    assert all(torch.equal(c[k], d[k]) for k in c)


def test_out_of_memory_names_max_physical_batch_and_charges_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def oom(*args: object, **kwargs: object) -> float:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(BookKeepingEngine, "accumulate", oom)
    X, y = _tiny("small_cnn", 16)
    trainer = LocalTrainer(_config(max_physical_batch=5), tmp_path / "ledger.json")
    with pytest.raises(TrainingError, match=r"max_physical_batch = 5"):
        trainer.train_round(None, X, y)
    assert PrivacyLedger.load(tmp_path / "ledger.json").rounds_done == 0
    assert trainer.ledger is not None and trainer.ledger.epsilon_spent() == 0.0


def test_cuda_without_gpu_is_refused_before_any_ledger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for spec in ("cuda", "cuda:1"):
        with pytest.raises(ConfigError, match="no usable CUDA GPU"):
            LocalTrainer(_config(device=spec), tmp_path / "ledger.json")
    assert not (tmp_path / "ledger.json").exists()
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="not one of"):
        resolve_device("tpu")


def test_image_size_comes_from_the_preset() -> None:
    assert check_image_size("resnet50_224", None) == 224 and check_image_size("small_cnn", 28) == 28
    with pytest.raises(ConfigError, match=r"image_size = 224 does not match model_preset 'resnet50'.*expects 28"):
        check_image_size("resnet50", 224)


# ---------------------------------------------------------------------------------------- init weights
def _torchvision_layout(preset: str) -> dict[str, torch.Tensor]:
    """A state dict named and shaped as torchvision's ResNet: RGB stem, BatchNorm statistics, 1000 classes."""
    out: dict[str, torch.Tensor] = {}
    g = torch.Generator().manual_seed(5)
    for key, value in build_model(preset, 9).state_dict().items():  # type: ignore[arg-type]
        if key == "conv1.weight":
            value = torch.randn(value.shape[0], 3, *value.shape[2:], generator=g)
        elif key == "fc.weight":
            value = torch.randn(1000, value.shape[1], generator=g)
        elif key == "fc.bias":
            value = torch.randn(1000, generator=g)
        else:
            value = torch.randn(value.shape, generator=g)
        out[key] = value
        if key.endswith("bias") and ("bn" in key or "downsample.1" in key):
            stem = key[: -len("bias")]
            out[stem + "running_mean"] = torch.zeros_like(value)
            out[stem + "running_var"] = torch.ones_like(value)
            out[stem + "num_batches_tracked"] = torch.tensor(7)
    return out


def test_init_weights_map_torchvision_layout(tmp_path: Path) -> None:
    source = _torchvision_layout("resnet18_224")
    path = tmp_path / "resnet18_imagenet.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.items()}}, path)
    model = build_model("resnet18_224", 0)
    fresh_fc = model.fc.weight.detach().clone()
    left = load_init_weights(model, path, "resnet18_224")
    assert left == ["fc.weight", "fc.bias"]  # 1000 classes: the head keeps its seeded init
    torch.testing.assert_close(model.conv1.weight, source["conv1.weight"].sum(1, keepdim=True))
    torch.testing.assert_close(model.layer2[0].downsample[1].weight, source["layer2.0.downsample.1.weight"])
    assert torch.equal(model.fc.weight, fresh_fc)

    # every site starts from the same x_0, and the fingerprint names the file
    a = FederatedModel.create("resnet18_224", 0, path)
    b = FederatedModel.create("resnet18_224", 0, path)
    plain = FederatedModel.create("resnet18_224", 0)
    assert a.layout.fingerprint == b.layout.fingerprint != plain.layout.fingerprint
    assert (a.x0 == b.x0).all()
    other = tmp_path / "other.pt"
    source["layer1.0.conv1.weight"] = source["layer1.0.conv1.weight"] + 1
    torch.save(source, other)
    assert FederatedModel.create("resnet18_224", 0, other).layout.fingerprint != a.layout.fingerprint


def test_init_weights_that_do_not_fit_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "r50.pt"
    torch.save(_torchvision_layout("resnet50_224"), path)
    with pytest.raises(ConfigError, match=r"layer1\.0\.conv1\.weight: shape \(64, 64, 1, 1\) in .*r50\.pt.*preset's \(64, 64, 3, 3\)"):
        FederatedModel.create("resnet18_224", 0, path)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="not a readable torch state dict"):
        FederatedModel.create("resnet18_224", 0, path)
    with pytest.raises(ConfigError, match="not found"):
        FederatedModel.create("resnet18_224", 0, tmp_path / "missing.pt")
