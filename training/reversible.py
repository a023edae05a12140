"""Reversible blocks and sequences (seeds 002, 004) and the MBConv unit (seed 002).

A reversible block splits its input's channels into halves `x1, x2` and computes

    y1 = x1 + F(x2),    y2 = x2 + G(y1)

so its input can be recomputed from its output: `x2 = y2 - G(y1)`, `x1 = y1 - F(x2)`. A
`ReversibleSequence` of such blocks therefore keeps only the sequence's output for backward and
recomputes each block's input on the way back (one custom autograd function for the sequence):

    for each block, last first:   recompute G(y1) with grad, backprop dy2  -> grads of G, d(y1)
                                  x2 = y2 - G(y1);  dx1 = dy1 + d(y1)
                                  recompute F(x2) with grad, backprop dx1  -> grads of F, d(x2)
                                  x1 = y1 - F(x2);  dx2 = dy2 + d(x2)

The RNG state before each F and G call is recorded in forward and restored for the recompute,
so dropout draws the same masks. BatchNorm inside F or G is refused (the recompute would update
its running statistics a second time); use GroupNorm or InstanceNorm. Without autograd (eval,
`torch.no_grad`, export) a sequence is an ordinary chain of blocks.

`memory` chooses how a sequence is trained, for the same function and parameters:
"reversible" (above), "plain" (ordinary autograd: every activation saved; the baseline) or
"checkpoint" (`torch.utils.checkpoint` per block: inputs saved, activations recomputed).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from nnslim.training.config import MEMORY_MODES


def group_count(channels: int, max_groups: int = 8) -> int:
    """The largest divisor of `channels` not above `max_groups` (GroupNorm needs a divisor)."""
    return max(g for g in range(1, min(max_groups, channels) + 1) if channels % g == 0)


class ConvUnit(nn.Module):
    """Seed 004's F / G: GroupNorm -> LeakyReLU -> Conv3d 3x3x3, channels unchanged."""

    def __init__(self, channels: int, negative_slope: float = 0.01, max_groups: int = 8, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(group_count(channels, max_groups), channels)
        self.nonlin = nn.LeakyReLU(negative_slope)
        self.dropout = nn.Dropout3d(dropout) if dropout else nn.Identity()
        self.conv = nn.Conv3d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.dropout(self.nonlin(self.norm(x))))


class MBConv3d(nn.Module):
    """Seed 002's mobile inverted bottleneck, channels unchanged: 1x1x1 expand (ratio) -> GN ->
    LeakyReLU -> depthwise 3x3x3 -> GN -> LeakyReLU -> linear 1x1x1 project -> GN (no activation)."""

    def __init__(self, channels: int, expand_ratio: int = 2, negative_slope: float = 0.01, max_groups: int = 8) -> None:
        super().__init__()
        hidden = channels * expand_ratio
        self.expand = nn.Conv3d(channels, hidden, 1, bias=False)
        self.norm1 = nn.GroupNorm(group_count(hidden, max_groups), hidden)
        self.depthwise = nn.Conv3d(hidden, hidden, 3, padding=1, groups=hidden, bias=False)
        self.norm2 = nn.GroupNorm(group_count(hidden, max_groups), hidden)
        self.project = nn.Conv3d(hidden, channels, 1, bias=False)
        self.norm3 = nn.GroupNorm(group_count(channels, max_groups), channels)
        self.nonlin = nn.LeakyReLU(negative_slope)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.nonlin(self.norm1(self.expand(x)))
        x = self.nonlin(self.norm2(self.depthwise(x)))
        return self.norm3(self.project(x))


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


class _RestoredRng:
    """Run a block of code with a recorded RNG state, leaving the global state as it was."""

    def __init__(self, state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
        self.state, self.device = state, device
        self.fork = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])

    def __enter__(self) -> None:
        self.fork.__enter__()
        torch.set_rng_state(self.state[0])
        if self.state[1] is not None:
            torch.cuda.set_rng_state(self.state[1], self.device)

    def __exit__(self, *exc: Any) -> None:
        self.fork.__exit__(*exc)


class ReversibleBlock(nn.Module):
    """`y1 = x1 + F(x2)`, `y2 = x2 + G(y1)` on the two channel halves (see the module docstring)."""

    def __init__(self, f: nn.Module, g: nn.Module) -> None:
        super().__init__()
        for name, part in (("F", f), ("G", g)):
            batchnorms = [n for n, m in part.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
            if batchnorms:
                raise ValueError(
                    f"{name} of a reversible block contains BatchNorm ({batchnorms[0] or 'itself'}): its running "
                    "statistics would be updated again when the block is recomputed in backward; use GroupNorm "
                    "or InstanceNorm"
                )
        self.f, self.g = f, g

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = torch.chunk(x, 2, dim=1)
        y1 = x1 + self.f(x2)
        return torch.cat((y1, x2 + self.g(y1)), dim=1)

    def forward_recording(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        """Forward (no autograd) that also returns the RNG states before F and G."""
        x1, x2 = torch.chunk(x, 2, dim=1)
        state_f = _rng_state(x.device)
        y1 = x1 + self.f(x2)
        state_g = _rng_state(x.device)
        return torch.cat((y1, x2 + self.g(y1)), dim=1), (state_f, state_g)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """The block's input from its output (no autograd; dropout must be off or its RNG restored)."""
        y1, y2 = torch.chunk(y, 2, dim=1)
        x2 = y2 - self.g(y1)
        return torch.cat((y1 - self.f(x2), x2), dim=1)

    def backward_step(self, y: torch.Tensor, dy: torch.Tensor, states: tuple) -> tuple[torch.Tensor, torch.Tensor, list]:
        """Recompute this block's input from its output and backpropagate `dy` through it.

        Returns (input, gradient w.r.t. the input, gradients of F's then G's parameters).
        """
        state_f, state_g = states
        y1, y2 = (t.detach() for t in torch.chunk(y, 2, dim=1))
        dy1, dy2 = torch.chunk(dy, 2, dim=1)
        # results written into their halves as soon as they are known, and temporaries dropped:
        # this recomputation is the peak of a reversible step, so every half-width copy counts
        x, dx = torch.empty_like(y), torch.empty_like(dy)
        x1, x2 = torch.chunk(x, 2, dim=1)
        dx1, dx2 = torch.chunk(dx, 2, dim=1)
        g_out, dy1_from_g, g_grads = _recompute(self.g, y1, dy2, state_g)
        torch.sub(y2, g_out, out=x2)
        torch.add(dy1, dy1_from_g, out=dx1)
        del g_out, dy1_from_g
        f_out, dx2_from_f, f_grads = _recompute(self.f, x2, dx1, state_f)
        torch.sub(y1, f_out, out=x1)
        torch.add(dy2, dx2_from_f, out=dx2)
        return x, dx, f_grads + g_grads


def _recompute(fn: nn.Module, x: torch.Tensor, grad_out: torch.Tensor, rng: tuple) -> tuple[torch.Tensor, torch.Tensor, list]:
    """`fn(x)` recomputed with autograd under the recorded RNG state, and the gradients of
    `grad_out` through it: (output, d/dx, d/d parameters)."""
    params = list(fn.parameters())
    with torch.enable_grad(), _RestoredRng(rng, x.device):
        x = x.detach().requires_grad_(True)
        out = fn(x)
        grads = torch.autograd.grad(out, [x, *params], grad_out, allow_unused=True)
    return out.detach(), grads[0], list(grads[1:])


class _ReversibleFunction(torch.autograd.Function):
    """Forward through all blocks without autograd; backward block by block from the output."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, blocks: nn.ModuleList, *params: torch.Tensor) -> torch.Tensor:
        states = []
        with torch.no_grad():
            for block in blocks:
                x, recorded = block.forward_recording(x)
                states.append(recorded)
        ctx.blocks, ctx.states = blocks, states
        ctx.save_for_backward(x)  # the only activation kept for backward
        return x

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple:
        (y,) = ctx.saved_tensors
        param_grads: list = []
        for block, states in zip(reversed(ctx.blocks), reversed(ctx.states)):
            y, dy, grads = block.backward_step(y, dy, states)
            param_grads = grads + param_grads  # blocks in reverse: prepend to keep forward order
        return (dy, None, *param_grads)


class ReversibleSequence(nn.Module):
    """Reversible blocks in a row, trained per `memory` (module docstring)."""

    def __init__(self, blocks: list[ReversibleBlock], memory: str = "reversible") -> None:
        super().__init__()
        if memory not in MEMORY_MODES:
            raise ValueError(f"memory must be one of {MEMORY_MODES}, got {memory!r}")
        self.blocks = nn.ModuleList(blocks)
        self.memory = memory

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and self.training) or self.memory == "plain":
            for block in self.blocks:
                x = block(x)
            return x
        if self.memory == "checkpoint":
            for block in self.blocks:
                x = checkpoint(block, x, use_reentrant=False)
            return x
        params = [p for block in self.blocks for p in (*block.f.parameters(), *block.g.parameters())]
        return _ReversibleFunction.apply(x, self.blocks, *params)


class SavedTensorMeter:
    """Bytes of activations autograd saves for backward, counted once per storage.

    Use as a context manager around a forward pass (`torch.autograd.graph.saved_tensors_hooks`);
    tensors sharing a parameter's storage are weights, not activations, and are left out. This
    measures activation memory without a GPU, and on the "meta" device without allocating it:
    storages are told apart by identity (`_cdata`, the storage object's address), not by data
    pointer, which is 0 for every meta tensor.
    """

    def __init__(self, model: nn.Module) -> None:
        self.parameters = {p.untyped_storage()._cdata for p in model.parameters()}
        self.storages: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in self.parameters:
            self.storages[storage._cdata] = storage.nbytes()
        return tensor  # kept alive by autograd until backward, so no identity is reused meanwhile

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())

    def __enter__(self) -> SavedTensorMeter:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)
