"""Many LoRA adapters on one frozen base, in ONE forward and backward: the multi-adapter layer.

``inject(model, paths)`` replaces each targeted ``Linear`` / ``Conv1D`` of the base once by a
``MultiLoraLinear`` that keeps the frozen base layer and, per adapter, its own LoRA factors
``A`` [r, in] and ``B`` [out, r] (PEFT's layout, so checkpoints stay plain PEFT). Adapters are
added and removed at any time without touching the base.

Which rows of a forward use which adapter is the ``LoraRoute`` set on the base's shared
``LoraContext``: the flattened rows ([tokens, in]) come grouped in contiguous segments, each
with one adapter (or none: the bare base). Every layer adds each row's own delta
``scale * (x @ A^T) @ B^T`` (Hu et al., "LoRA", 2021; scale = alpha / r as in PEFT):

- one segment: two plain matmuls;
- several, on CUDA in bf16/fp16: two grouped matmuls over all segments at once
  (``torch._grouped_mm``, the "shrink/expand" pattern of Punica/S-LoRA), ranks padded to the
  largest (zero columns get zero gradient);
- otherwise a loop over the segments.

Autograd gives every adapter its own gradient in one backward pass: an adapter's ``A``/``B``
are its own leaf tensors, and only its segment's rows reach them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

GROUP_ALIGN = 8  # grouped_mm wants 16-byte aligned strides: bf16 ranks padded to a multiple of 8


class Adapter:
    """One adapter's LoRA factors over every layer it covers.

    All its ``A`` factors live in ONE float32 leaf tensor (``flat_a``) and all its ``B``
    factors in another (``flat_b``): the optimizer steps two tensors per adapter, a pass casts
    each once (``prepare``), and the backward gathers each adapter's gradient into one buffer.
    Each layer's factors are stored transposed, ``A^T`` [in, r] and ``B^T`` [r, out], the
    layout the matmuls (and the grouped matmuls' stacks) read, so the backward writes each
    gradient straight into place. ``layers`` maps a layer path to views in PEFT's layout,
    ``A`` [r, in] and ``B`` [out, r]; ``params`` maps the canonical PEFT state-dict names to
    the same views.
    """

    def __init__(
        self, name: str, rank: int, alpha: float, shapes: dict[str, tuple[int, int]], device: Any
    ) -> None:
        self.name, self.rank, self.alpha = name, rank, alpha
        self.paths = list(shapes)
        self.shapes = dict(shapes)  # path -> (in_features, out_features)
        self.a_sizes = [rank * shapes[p][0] for p in self.paths]
        self.b_sizes = [shapes[p][1] * rank for p in self.paths]
        self.flat_a = nn.Parameter(
            torch.zeros(sum(self.a_sizes), device=device), requires_grad=False
        )
        self.flat_b = nn.Parameter(
            torch.zeros(sum(self.b_sizes), device=device), requires_grad=False
        )
        # Views for reading and writing values (checkpoints, init) outside autograd; a pass
        # takes fresh views of its own (``prepare``).
        self.layers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        with torch.no_grad():
            for path, at, bt in zip(
                self.paths, *self._stored(self.flat_a, self.flat_b), strict=True
            ):
                self.layers[path] = (at.t(), bt.t())

    def _stored(
        self, a: torch.Tensor, b: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-layer ``A^T`` [in, r] and ``B^T`` [r, out] views of flat tensors laid out like
        the leaves (the leaves themselves, their casts, gradients or optimizer moments)."""
        r = self.rank
        ats = [
            piece.view(self.shapes[p][0], r)
            for p, piece in zip(self.paths, a.split(self.a_sizes), strict=True)
        ]
        bts = [
            piece.view(r, self.shapes[p][1])
            for p, piece in zip(self.paths, b.split(self.b_sizes), strict=True)
        ]
        return ats, bts

    def named_views(self, a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
        """Canonical name -> PEFT-layout view ([r, in] / [out, r]) of flat tensors laid out
        like the leaves (gradients, optimizer moments)."""
        ats, bts = self._stored(a, b)
        out: dict[str, torch.Tensor] = {}
        for path, at, bt in zip(self.paths, ats, bts, strict=True):
            out[canonical_name(path, "A")] = at.t()
            out[canonical_name(path, "B")] = bt.t()
        return dict(sorted(out.items()))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def leaves(self) -> list[torch.Tensor]:
        """The tensors an optimizer steps (and whose ``.grad`` accumulates)."""
        return [self.flat_a, self.flat_b]

    @property
    def params(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for path, (a, b) in self.layers.items():
            out[canonical_name(path, "A")] = a
            out[canonical_name(path, "B")] = b
        return dict(sorted(out.items()))

    def grads(self) -> dict[str, torch.Tensor | None]:
        """Each canonical name's gradient (a view of the leaves' gradients), or None."""
        ga, gb = self.flat_a.grad, self.flat_b.grad
        if ga is None or gb is None:
            return dict.fromkeys(self.params)
        return dict(self.named_views(ga, gb).items())

    def requires_grad_(self, flag: bool) -> None:
        for leaf in self.leaves:
            leaf.requires_grad_(flag)

    def prepare(self, dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The factors a forward uses, in ``dtype``: path -> (A^T [in, r], scale * B^T [r, out]).

        Two casts for the whole adapter (autograd carries the gradient back to the leaves).
        """
        a = self.flat_a.to(dtype)
        b = (self.flat_b * self.scale).to(dtype)
        ats, bts = self._stored(a, b)
        out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for path, at, bt in zip(self.paths, ats, bts, strict=True):
            out[path] = (at, bt)
        return out

    def free(self) -> None:
        self.layers.clear()
        for leaf in self.leaves:
            leaf.grad = None
            leaf.data = torch.empty(0, device=leaf.device)


def canonical_name(path: str, which: str) -> str:
    """PEFT's state-dict name of a LoRA factor: ``base_model.model.<path>.lora_<A|B>.weight``."""
    return f"base_model.model.{path}.lora_{which}.weight"


@dataclass
class Segment:
    """Rows [start, stop) of a forward's flattened tokens, served by ``adapter`` (None: base)."""

    adapter: Adapter | None
    start: int
    stop: int
    # The adapter's factors as this forward uses them (``Adapter.prepare``), set by the route.
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


class LoraRoute:
    """The adapter of every row of one forward: contiguous segments over the flattened rows."""

    def __init__(self, segments: Sequence[Segment], dtype: torch.dtype) -> None:
        self.segments = list(segments)
        self.active = [
            s for s in self.segments if s.adapter is not None and (s.stop == -1 or s.stop > s.start)
        ]
        prepared: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        for seg in self.active:
            assert seg.adapter is not None
            key = id(seg.adapter)
            if key not in prepared:
                prepared[key] = seg.adapter.prepare(dtype)
            seg.factors = prepared[key]
        self._offsets: dict[torch.device, torch.Tensor] = {}

    @classmethod
    def single(cls, adapter: Adapter | None, dtype: torch.dtype) -> LoraRoute:
        """Every row (of any shape) through one adapter."""
        return cls([Segment(adapter, 0, -1)], dtype)

    @property
    def rows(self) -> int:
        return self.segments[-1].stop if self.segments else 0

    def adapters(self) -> list[Adapter]:
        seen: dict[int, Adapter] = {}
        for s in self.active:
            assert s.adapter is not None
            seen.setdefault(id(s.adapter), s.adapter)
        return list(seen.values())

    def offsets(self, device: torch.device) -> torch.Tensor:
        """Cumulative row ends of every segment (int32, on ``device``), for grouped matmuls."""
        if device not in self._offsets:
            ends = [s.stop for s in self.segments]
            self._offsets[device] = torch.tensor(ends, dtype=torch.int32, device=device)
        return self._offsets[device]


class LoraContext:
    """The route of the forward in progress, shared by every ``MultiLoraLinear`` of a base."""

    def __init__(self) -> None:
        self.route: LoraRoute | None = None


class MultiLoraLinear(nn.Module):
    """A frozen ``Linear``/``Conv1D`` plus the LoRA deltas of any number of adapters.

    Input [..., in], output [..., out], in the base layer's dtype. The adapters' factors are not
    registered as parameters of the module (the base's ``parameters()`` stay the frozen base);
    each ``Adapter`` owns them.
    """

    def __init__(self, base: nn.Module, path: str, context: LoraContext) -> None:
        super().__init__()
        self.base_layer = base
        self.path = path
        self.context = context
        weight = self.weight
        if isinstance(base, Conv1D):
            self.in_features, self.out_features = int(weight.shape[0]), int(weight.shape[1])
        else:
            self.out_features, self.in_features = int(weight.shape[0]), int(weight.shape[1])

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight (as ``Linear.weight``/``Conv1D.weight`` lays it out)."""
        weight = self.base_layer.weight
        assert isinstance(weight, torch.Tensor)
        return weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        route = self.context.route
        if route is None or not route.active:
            return y
        delta = lora_delta(x.reshape(-1, x.shape[-1]), self.path, route, self.out_features)
        if delta is None:
            return y
        return y + delta.view(y.shape).to(y.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, path={self.path!r}"


def lora_delta(
    x: torch.Tensor, path: str, route: LoraRoute, out_features: int
) -> torch.Tensor | None:
    """Each row's own LoRA delta for layer ``path``: x [N, in] -> [N, out] (x's dtype).

    Rows of segments without an adapter (or whose adapter skips this layer) get 0; None when
    no row has a delta here.
    """
    active = [s for s in route.active if path in s.factors]
    if not active:
        return None
    whole = len(route.segments) == 1 and route.segments[0].stop in (-1, x.shape[0])
    if whole:
        at, bt = active[0].factors[path]
        return (x @ at) @ bt
    if _grouped_ok(x):
        return _grouped_delta(x, path, route, out_features)
    pieces = []
    for seg in route.segments:
        rows = x[seg.start : seg.stop]
        if path not in seg.factors:
            pieces.append(rows.new_zeros(rows.shape[0], out_features))
            continue
        at, bt = seg.factors[path]
        pieces.append((rows @ at) @ bt)
    return torch.cat(pieces)


def _grouped_ok(x: torch.Tensor) -> bool:
    return (
        x.is_cuda
        and x.dtype in (torch.bfloat16, torch.float16)
        and hasattr(torch, "_grouped_mm")
        and x.shape[1] % GROUP_ALIGN == 0
    )


def _grouped_delta(x: torch.Tensor, path: str, route: LoraRoute, out_features: int) -> torch.Tensor:
    """Two grouped matmuls over all segments: x @ A_g^T (shrink), then @ (s_g B_g)^T (expand).

    Ranks are padded to the largest (a multiple of 8); segments without an adapter get zeros.
    """
    ranks = [s.factors[path][0].shape[1] for s in route.segments if path in s.factors]
    r_max = max(GROUP_ALIGN, math.ceil(max(ranks) / GROUP_ALIGN) * GROUP_ALIGN)
    shrink, expand = [], []
    for seg in route.segments:
        if path not in seg.factors:
            shrink.append(x.new_zeros(x.shape[1], r_max))
            expand.append(x.new_zeros(r_max, out_features))
            continue
        at, bt = seg.factors[path]  # [in, r], [r, out]
        pad = r_max - at.shape[1]
        shrink.append(nn.functional.pad(at, (0, pad)) if pad else at)  # [in, r_max]
        expand.append(nn.functional.pad(bt, (0, 0, 0, pad)) if pad else bt)  # [r_max, out]
    offs = route.offsets(x.device)
    w_shrink = torch.stack(shrink)  # [G, in, r_max]: one copy; its backward, views in place
    w_expand = torch.stack(expand)  # [G, r_max, out]
    h = torch._grouped_mm(_ContiguousGrad.apply(x.contiguous()), w_shrink, offs=offs)
    out = torch._grouped_mm(_ContiguousGrad.apply(h), w_expand, offs=offs)
    return _ContiguousGrad.apply(out)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient: grouped_mm's backward refuses
    the strided ones that views and transposes further on produce."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> torch.Tensor:
        return grads[0].contiguous()


# --------------------------------------------------------------------------- injection


def inject(model: nn.Module, paths: Sequence[str]) -> LoraContext:
    """Replace each module at ``paths`` by a ``MultiLoraLinear`` around it (once per base).

    Returns the context shared by the new layers. Paths already injected are left as they are.
    """
    context = LoraContext()
    for path in paths:
        parent, attr = _parent(model, path)
        module = getattr(parent, attr)
        if isinstance(module, MultiLoraLinear):
            module.context = context
            continue
        if not isinstance(module, (nn.Linear, Conv1D)):
            raise TypeError(f"{path} is a {type(module).__name__}, not a Linear/Conv1D")
        setattr(parent, attr, MultiLoraLinear(module, path, context))
    return context


def _parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    return parent, attr


def lora_layers(model: nn.Module) -> Iterator[MultiLoraLinear]:
    for module in model.modules():
        if isinstance(module, MultiLoraLinear):
            yield module


def layer_at(model: nn.Module, path: str) -> MultiLoraLinear:
    module = model.get_submodule(path)
    if not isinstance(module, MultiLoraLinear):
        raise KeyError(f"{path} carries no LoRA layer")
    return module


def new_adapter(
    model: nn.Module,
    name: str,
    paths: Sequence[str],
    rank: int,
    alpha: float,
    seed: int,
    device: torch.device,
) -> Adapter:
    """Create an adapter's factors on the layers at ``paths`` (already injected).

    Initialised as PEFT does by default: ``A`` ~ kaiming_uniform(a=sqrt(5)), i.e.
    U(-1/sqrt(in), 1/sqrt(in)), and ``B`` = 0, so a new adapter leaves the base unchanged. The
    draws come from a CPU generator seeded with ``seed``, in ``paths`` order, so the same seed
    gives the same adapter on any device.
    """
    generator = torch.Generator().manual_seed(seed)
    shapes = {}
    for path in paths:
        layer = layer_at(model, path)
        shapes[path] = (layer.in_features, layer.out_features)
    adapter = Adapter(name, rank, alpha, shapes, device)
    with torch.no_grad():
        for path in paths:
            bound = 1.0 / math.sqrt(shapes[path][0])
            a = (torch.rand(rank, shapes[path][0], generator=generator) * 2 - 1) * bound
            adapter.layers[path][0].copy_(a)
    return adapter
