"""Per-sample-gradient engines: each turns one physical batch into the SUM of its clipped gradients.

The trainer adds the Gaussian noise once per logical (Poisson) batch and divides by the expected
batch size, so every engine, and any split of a logical batch into physical micro-batches,
releases the same quantity: sum_i clip(g_i) + N(0, sigma^2 C^2). Clipping is per sample, so a
split changes only the float summation order, not the privacy analysis.

With augmentation multiplicity (training/augment.py) a physical batch holds ``group`` adjacent
views of each example, and an example's gradient g_i is the mean over its views: every engine
clips that mean, never a single view, so an example still contributes one vector of norm <= C.

Engines (``DPConfig.engine``; docs/architecture.md gives the measurements behind the default):
- ``bk``: fedmq's own mixed ghost / book-keeping engine (after Bu et al., "Differentially private
  optimization on large model at small cost", 2023). The backward pass computes input gradients
  only (parameters do not require grad during it); a tensor hook on each layer's output receives
  that layer's output gradient and computes every sample's squared gradient norm, per layer
  choosing the cheaper of instantiating the per-sample gradient (early conv layers: many
  positions, few weights) and the ghost norm <A A^T, G G^T> (late layers: few positions, many
  weights). The clipped sum is then one weight-gradient product per layer with the output
  gradient scaled by each sample's clip factor: no second backward pass, no per-sample gradients
  for the large layers.
- ``hooks``: Opacus' GradSampleModule (backward hooks instantiate every per-sample gradient).
- ``functorch``: Opacus' GradSampleModule with ``force_functorch=True`` (vmap over per-sample grads).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from fedmq.site_agent.training.errors import TrainingError

Engine = Literal["bk", "hooks", "functorch"]
ENGINES: tuple[str, ...] = ("bk", "hooks", "functorch")
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_NORM_EPS = 1e-6  # Opacus' guard in max_grad_norm / (norm + eps)


class ClippedSumEngine(Protocol):
    """One physical batch in, sum of clipped per-sample gradients added into ``into``."""

    params: list[nn.Parameter]
    clip_s: float

    def accumulate(self, xb: torch.Tensor, yb: torch.Tensor, loss_fn: LossFn, into: list[torch.Tensor],
                   group: int = 1) -> float:
        """Returns the batch's summed per-example loss; ``loss_fn`` must reduce by sum. ``xb`` holds
        ``group`` adjacent views of each example (example-major); each example is clipped once."""

    def close(self) -> None:
        """Remove hooks and per-sample state so nothing outlives the round."""


def _rows_per_example(rows: int, group: int) -> int:
    if group < 1 or rows % group:
        raise TrainingError(f"a batch of {rows} rows is not whole groups of {group} views")
    return rows // group


def clip_factors(sq_norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    return (max_grad_norm / (sq_norms.sqrt() + _NORM_EPS)).clamp(max=1.0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------ Opacus
class OpacusEngine:
    """Opacus' per-sample gradients (hooks or functorch); clipping and summing done here."""

    def __init__(self, model: nn.Module, max_grad_norm: float, *, functorch: bool) -> None:
        from opacus import GradSampleModule
        from opacus.validators import ModuleValidator

        errors = ModuleValidator.validate(model, strict=False)
        if errors:
            raise TrainingError(f"model is not DP-compatible: {errors}")
        self.model = model
        self.wrapped = GradSampleModule(model, batch_first=True, loss_reduction="sum", force_functorch=functorch)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.max_grad_norm = max_grad_norm
        self.clip_s = 0.0

    def accumulate(self, xb: torch.Tensor, yb: torch.Tensor, loss_fn: LossFn, into: list[torch.Tensor],
                   group: int = 1) -> float:
        b = _rows_per_example(xb.shape[0], group)
        with warnings.catch_warnings():
            # Opacus' hooks fire on the first layer, whose input needs no grad; harmless and noisy.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            loss = loss_fn(self.wrapped(xb).reshape(-1), yb) / group  # an example's loss: the mean of its views
            loss.backward()
        _sync(xb.device)
        t = time.perf_counter()
        grads = [p.grad_sample for p in self.params]
        if any(g is None for g in grads):
            raise TrainingError("Opacus produced no per-sample gradient for some parameter")
        if group > 1:  # per-view gradients summed per example (the loss already carries 1 / group)
            grads = [g.reshape(b, group, *g.shape[1:]).sum(1) for g in grads]
        sq = torch.stack([g.reshape(b, -1).pow(2).sum(1) for g in grads], dim=1).sum(1)
        factor = clip_factors(sq, self.max_grad_norm)
        for acc, g in zip(into, grads):
            acc.add_((factor @ g.reshape(b, -1)).view_as(acc))
        for p in self.params:
            p.grad_sample = None
            p.grad = None
        _sync(xb.device)
        self.clip_s += time.perf_counter() - t
        return float(loss.detach())

    def close(self) -> None:
        self.wrapped.remove_hooks()
        for p in self.model.parameters():
            for attr in ("grad_sample", "summed_grad", "_forward_counter"):
                if hasattr(p, attr):
                    try:
                        delattr(p, attr)
                    except AttributeError:
                        setattr(p, attr, None)
            p.grad = None


# ------------------------------------------------------------------------------------------ fedmq bk
class _Layer:
    """One parametrised module's captured activation, per-sample gradient or ghost inputs."""

    __slots__ = ("module", "act", "grad_out", "per_sample")

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.act: torch.Tensor | None = None
        self.grad_out: torch.Tensor | None = None
        self.per_sample: list[torch.Tensor] | None = None  # one (b, *param.shape) per parameter

    def reset(self) -> None:
        self.act = self.grad_out = self.per_sample = None


class BookKeepingEngine:
    """Mixed ghost-norm / instantiated per-sample clipping with book-keeping (see module docstring)."""

    SUPPORTED = (nn.Conv2d, nn.Linear, nn.GroupNorm)

    def __init__(self, model: nn.Module, max_grad_norm: float) -> None:
        self.model = model
        self.max_grad_norm = max_grad_norm
        self.layers: list[_Layer] = []
        self.params: list[nn.Parameter] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._sq: torch.Tensor | None = None
        self._group = 1
        self.clip_s = 0.0
        self._trainable: set[int] = set()
        for name, module in model.named_modules():
            own = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            if not isinstance(module, self.SUPPORTED):
                raise TrainingError(f"dp engine 'bk' does not support {type(module).__name__} ({name}); use engine 'hooks'")
            if isinstance(module, nn.Conv2d) and (module.groups != 1 or module.padding_mode != "zeros"):
                raise TrainingError(f"dp engine 'bk' supports plain convolutions only ({name}); use engine 'hooks'")
            if isinstance(module, nn.GroupNorm) and not module.affine:
                continue
            layer = _Layer(module)
            self.layers.append(layer)
            self.params.extend(self._params_of(module))
            self._trainable.update(id(p) for p in self._params_of(module))
            self._handles.append(module.register_forward_hook(self._forward_hook(layer)))
        if len(self.params) != len([p for p in model.parameters() if p.requires_grad]):
            raise TrainingError("dp engine 'bk' found parameters outside Conv2d/Linear/GroupNorm")

    @staticmethod
    def _params_of(module: nn.Module) -> list[nn.Parameter]:
        return [p for p in (module.weight, module.bias) if p is not None and p.requires_grad]  # type: ignore[union-attr]

    def _trains(self, p: nn.Parameter | None) -> bool:
        # requires_grad is switched off during the engine's backward pass, so ask the set
        return p is not None and id(p) in self._trainable

    # -- capture ------------------------------------------------------------------------
    def _forward_hook(self, layer: _Layer) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if not torch.is_grad_enabled() or not output.requires_grad:
                return  # evaluation, or a forward outside accumulate()
            layer.act = inputs[0].detach()

            def on_grad(grad: torch.Tensor) -> None:
                self._on_grad(layer, grad.detach())

            output.register_hook(on_grad)

        return hook

    def _on_grad(self, layer: _Layer, g: torch.Tensor) -> None:
        """Runs inside backward, once per layer: this layer's share of every sample's squared norm."""
        m, a = layer.module, layer.act
        assert a is not None and self._sq is not None
        rows, k = g.shape[0], self._group
        b = rows // k  # examples; the k views of one example are adjacent rows and count as one sample
        if isinstance(m, nn.GroupNorm):
            # d/dw = sum_hw g * xhat, d/db = sum_hw g; xhat from the group statistics of the input
            var, mean = torch.var_mean(a.reshape(rows, m.num_groups, -1), dim=2, unbiased=False)
            rstd = (var + m.eps).rsqrt()
            per_group = m.num_channels // m.num_groups
            gb = g.reshape(rows, m.num_channels, -1).sum(2)
            gxa = (g * a).reshape(rows, m.num_channels, -1).sum(2)
            gw = (gxa - mean.repeat_interleave(per_group, 1) * gb) * rstd.repeat_interleave(per_group, 1)
            if k > 1:
                gw, gb = gw.view(b, k, -1).sum(1), gb.view(b, k, -1).sum(1)
            layer.per_sample = [t for t, p in ((gw, m.weight), (gb, m.bias)) if self._trains(p)]
            self._sq += sum(t.pow(2).sum(1) for t in layer.per_sample)
            layer.act = None
            return
        if isinstance(m, nn.Linear):
            # (examples, views x positions, features): an example's views are more positions of it
            a2 = a.reshape(b, -1, a.shape[-1])
            g2 = g.reshape(b, -1, g.shape[-1])
            if a2.shape[1] == 1:  # one position: the ghost norm is exact and cheap
                sq = a2.pow(2).sum((1, 2)) * g2.pow(2).sum((1, 2))
            else:
                sq = (torch.bmm(a2, a2.transpose(1, 2)) * torch.bmm(g2, g2.transpose(1, 2))).sum((1, 2))
            if self._trains(m.bias):
                sq = sq + g2.sum(1).pow(2).sum(1)
            self._sq += sq
            layer.act, layer.grad_out = a2, g2
            return
        # Conv2d
        assert isinstance(m, nn.Conv2d)
        if m.kernel_size == (1, 1) and m.padding == (0, 0):  # 1x1: the input itself, strided, is the unfolding
            u = a[:, :, :: m.stride[0], :: m.stride[1]].reshape(rows, a.shape[1], -1)
        else:
            # the batch folded into the channels: one im2col launch instead of one per sample
            # (unfold orders rows channel-major, so (1, b*C*k*k, T) is (b, C*k*k, T) exactly)
            u = F.unfold(a.reshape(1, rows * a.shape[1], *a.shape[2:]), m.kernel_size, dilation=m.dilation,
                         padding=m.padding, stride=m.stride).view(rows, -1, g.shape[2] * g.shape[3])  # (rows, D, T)
        gf = g.reshape(rows, g.shape[1], -1)  # (rows, C_out, T)
        if k > 1:  # an example's views side by side as positions: (b, D, k T), (b, C_out, k T)
            u = u.view(b, k, *u.shape[1:]).transpose(1, 2).reshape(b, u.shape[1], -1)
            gf = gf.view(b, k, *gf.shape[1:]).transpose(1, 2).reshape(b, gf.shape[1], -1)
        positions, weights = u.shape[2], m.weight.numel()
        if weights <= 2 * positions * positions:
            ps = torch.bmm(gf, u.transpose(1, 2)).view(b, *m.weight.shape)
            per_sample = [ps]
            sq = ps.reshape(b, -1).pow(2).sum(1)
            if self._trains(m.bias):
                gb = gf.sum(2)
                per_sample.append(gb)
                sq = sq + gb.pow(2).sum(1)
            layer.per_sample = per_sample
            layer.act = None
        else:
            sq = (torch.bmm(u.transpose(1, 2), u) * torch.bmm(gf.transpose(1, 2), gf)).sum((1, 2))
            if self._trains(m.bias):
                sq = sq + gf.sum(2).pow(2).sum(1)
            layer.grad_out = g
        self._sq += sq

    # -- one physical batch ------------------------------------------------------------------
    def accumulate(self, xb: torch.Tensor, yb: torch.Tensor, loss_fn: LossFn, into: list[torch.Tensor],
                   group: int = 1) -> float:
        b = _rows_per_example(xb.shape[0], group)
        self._group = group
        self._sq = torch.zeros(b, device=xb.device, dtype=torch.float32)
        for p in self.params:
            p.requires_grad_(False)  # backward computes input gradients only; weight grads come below
        try:
            x = xb.detach().requires_grad_(True)
            loss = loss_fn(self.model(x).reshape(-1), yb) / group  # an example's loss: the mean of its views
            loss.backward()
        finally:
            for p in self.params:
                p.requires_grad_(True)
        _sync(xb.device)
        t = time.perf_counter()
        factor = clip_factors(self._sq, self.max_grad_norm)
        slots = iter(into)
        for layer in self.layers:
            m = layer.module
            accs = [next(slots) for _ in self._params_of(m)]
            if layer.per_sample is not None:
                for acc, ps in zip(accs, layer.per_sample):
                    acc.add_((factor @ ps.reshape(b, -1)).view_as(acc))
            elif isinstance(m, nn.Linear):
                assert layer.act is not None and layer.grad_out is not None
                gs = layer.grad_out * factor.view(b, 1, 1)
                accs[0].add_(torch.einsum("bto,bti->oi", gs, layer.act))
                if len(accs) > 1:
                    accs[1].add_(gs.sum((0, 1)))
            else:
                assert isinstance(m, nn.Conv2d) and layer.act is not None and layer.grad_out is not None
                row_factor = factor.repeat_interleave(group) if group > 1 else factor  # grad_out is per view
                gs = layer.grad_out * row_factor.view(-1, 1, 1, 1)
                accs[0].add_(
                    torch.nn.grad.conv2d_weight(layer.act, m.weight.shape, gs, m.stride, m.padding, m.dilation, m.groups)
                )
                if len(accs) > 1:
                    accs[1].add_(gs.sum((0, 2, 3)))
            layer.reset()
        self._sq = None
        self._group = 1
        _sync(xb.device)
        self.clip_s += time.perf_counter() - t
        return float(loss.detach())

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for layer in self.layers:
            layer.reset()
        for p in self.model.parameters():
            p.grad = None


def make_engine(name: str, model: nn.Module, max_grad_norm: float) -> ClippedSumEngine:
    if name == "bk":
        return BookKeepingEngine(model, max_grad_norm)
    if name in ("hooks", "functorch"):
        return OpacusEngine(model, max_grad_norm, functorch=name == "functorch")
    raise TrainingError(f"unknown dp engine {name!r}; choose one of {list(ENGINES)}")


__all__ = ["ENGINES", "BookKeepingEngine", "ClippedSumEngine", "Engine", "OpacusEngine", "clip_factors", "make_engine"]
