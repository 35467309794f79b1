"""ZeroI2V linear adapters (paper 002, sec. 3.3): serial, no activation, merged exactly (eq. 11).

``A(x) = x + s · W_up(dropout(W_down x))``. An adapter sits before or after one of a block's linear
layers (``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``: the same paths in every backbone family's
blocks, found through ``stage1_extract.families``). The adapted layer stays an ``nn.Linear``
owning the same ``weight``/``bias`` (an ``AdaptedLinear``), so timm's state-dict keys are unchanged and
the adapter's keys read ``...attn.qkv.adapter.down.weight``.

The places ``before_q``, ``before_k``, ``before_v`` give the query, key and value rows of ``attn.qkv``
separate input adapters (the release's ``attn_adapter_type='qkv'``, the 6-adapter setting of paper 002's
Table 11b with ``after_proj``, ``before_fc1``, ``after_fc2``); keys ``...attn.qkv.adapter.q.down.weight``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from stage1_extract.families import family_of

Position = Literal["before", "after"]
# Where an adapter may sit: "<before|after>_<layer>", layer one of these (path inside a timm block).
ADAPTED_LAYERS = {"qkv": "attn.qkv", "proj": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
DEFAULT_PLACES = ("before_qkv", "after_proj", "before_fc1", "after_fc2")
# Separate input adapters of the query, key and value rows of attn.qkv (rows [0, D), [D, 2D), [2D, 3D)).
QKV_PARTS = {"before_q": "q", "before_k": "k", "before_v": "v"}


class LinearAdapter(nn.Module):
    """``x + s · W_up(dropout(W_down x))`` with ``W_up`` zero-initialised: the identity at initialisation."""

    def __init__(
        self, dim: int, bottleneck: int, scale: float = 0.5, dropout: float = 0.1, bias: bool = True
    ):
        super().__init__()
        if dim < 1 or bottleneck < 1:
            raise ValueError(f"LinearAdapter: dim and bottleneck must be >= 1, got {dim} and {bottleneck}")
        self.scale = float(scale)
        self.down = nn.Linear(dim, bottleneck, bias=bias)
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(bottleneck, dim, bias=bias)
        nn.init.zeros_(self.up.weight)
        if bias:
            nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.scale * self.up(self.dropout(self.down(x)))

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``s W_up``, ``W_down``, ``c = s (W_up b_down + b_up)`` in float64: ``M = I + (s W_up) W_down``."""
        s_up, w_down = self.scale * self.up.weight.double(), self.down.weight.double()
        c = torch.zeros(s_up.shape[0], dtype=torch.float64, device=s_up.device)
        if self.down.bias is not None:
            c = c + s_up @ self.down.bias.double()
        if self.up.bias is not None:
            c = c + self.scale * self.up.bias.double()
        return s_up, w_down, c

    def merge_before(self, linear: nn.Linear) -> nn.Linear:
        """``linear ∘ adapter`` as one Linear (eq. 11, adapter on the input): ``W' = W M, b' = W c + b``.

        Computed in float64 in low-rank form, ``W M = W + (W s W_up) W_down``, then cast back.
        """
        s_up, w_down, c = self._factors()
        w = linear.weight.double()
        b = w @ c + (linear.bias.double() if linear.bias is not None else 0.0)
        return _linear_like(linear, w + (w @ s_up) @ w_down, b)

    def merge_after(self, linear: nn.Linear) -> nn.Linear:
        """``adapter ∘ linear`` as one Linear (eq. 11, adapter on the output): ``W' = M W, b' = M b + c``.

        Computed in float64 in low-rank form, ``M W = W + s W_up (W_down W)``, then cast back.
        """
        s_up, w_down, c = self._factors()
        w = linear.weight.double()
        b = c if linear.bias is None else linear.bias.double() + s_up @ (w_down @ linear.bias.double()) + c
        return _linear_like(linear, w + s_up @ (w_down @ w), b)

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


def _linear_like(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
    """A plain ``nn.Linear`` with ``linear``'s dtype, device and gradient flags holding merged weights.

    A layer without bias stays without bias; that is exact because its adapter then has no biases.
    """
    if linear.bias is None and not bias.is_meta and bool(bias.abs().max() > 0):
        raise ValueError("merge: a bias-free linear layer cannot absorb a non-zero adapter offset")
    out = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
    out.weight = nn.Parameter(weight.to(linear.weight.dtype), requires_grad=linear.weight.requires_grad)
    if linear.bias is not None:
        out.bias = nn.Parameter(bias.to(linear.bias.dtype), requires_grad=linear.bias.requires_grad)
    return out


class AdaptedLinear(nn.Linear):
    """A timm ``nn.Linear`` with a ``LinearAdapter`` on its input (``before``) or output (``after``).

    It owns the very ``weight``/``bias`` Parameters of the linear layer it replaces, so the layer's
    state-dict keys do not change; ``merged()`` folds the adapter in and returns a plain ``nn.Linear``.
    """

    def __init__(self, linear: nn.Linear, adapter: LinearAdapter, position: Position):
        nn.Module.__init__(self)  # no new weights: the linear layer's own Parameters are reused
        if position not in ("before", "after"):
            raise ValueError(f"AdaptedLinear: position must be 'before' or 'after', got {position!r}")
        width = linear.in_features if position == "before" else linear.out_features
        if adapter.down.in_features != width:
            raise ValueError(
                f"AdaptedLinear: adapter width {adapter.down.in_features} != {position} width {width}"
            )
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.position = position
        self.adapter = adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.position == "before":
            return F.linear(self.adapter(x), self.weight, self.bias)
        return self.adapter(F.linear(x, self.weight, self.bias))

    @property
    def num_adapters(self) -> int:
        return 1

    def merged(self) -> nn.Linear:
        """The plain Linear equal to this layer (adapter folded in, float64 arithmetic)."""
        if self.position == "before":
            return self.adapter.merge_before(self)
        return self.adapter.merge_after(self)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, adapter={self.position}"


class QKVAdaptedLinear(AdaptedLinear):
    """timm's ``attn.qkv`` whose query, key and value rows each may have their own input adapter.

    ``Q = W_q A_q(x) + b_q`` (likewise K, V; a part without adapter reads ``x``): the release's
    ``attn_adapter_type='qkv'``. Merged exactly, part by part: ``W_q' = W_q M_q``, ``b_q' = W_q c_q + b_q``.
    """

    def __init__(self, linear: nn.Linear, adapters: dict[str, LinearAdapter]):
        nn.Module.__init__(self)
        if linear.out_features % 3 or not adapters or set(adapters) - {"q", "k", "v"}:
            raise ValueError(
                f"QKVAdaptedLinear: needs a (3·D, D) qkv layer and adapters among q, k, v; got "
                f"{linear.out_features} outputs and {sorted(adapters)}"
            )
        for part, adapter in adapters.items():
            if adapter.down.in_features != linear.in_features:
                raise ValueError(
                    f"QKVAdaptedLinear: adapter {part} width {adapter.down.in_features} != "
                    f"{linear.in_features}"
                )
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.position = "before"
        self.adapter = nn.ModuleDict(adapters)

    @property
    def num_adapters(self) -> int:
        return len(self.adapter)

    def _parts(self) -> list[tuple[str, torch.Tensor, torch.Tensor | None]]:
        weights = self.weight.chunk(3)
        biases = self.bias.chunk(3) if self.bias is not None else (None, None, None)
        return list(zip("qkv", weights, biases))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [
            F.linear(self.adapter[part](x) if part in self.adapter else x, w, b)
            for part, w, b in self._parts()
        ]
        return torch.cat(outs, dim=-1)

    def merged(self) -> nn.Linear:
        """The plain qkv Linear equal to this layer (each part's adapter folded in, float64)."""
        weights, biases = [], []
        for part, w, b in self._parts():
            rows = nn.Linear(self.in_features, w.shape[0], bias=b is not None, device="meta")
            rows.weight = nn.Parameter(w)
            if b is not None:
                rows.bias = nn.Parameter(b)
            if part in self.adapter:
                rows = self.adapter[part].merge_before(rows)
            weights.append(rows.weight.data)
            biases.append(rows.bias.data if b is not None else None)
        bias = torch.cat(biases) if self.bias is not None else torch.zeros(self.out_features)
        return _linear_like(self, torch.cat(weights), bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, adapters={list(self.adapter)}"
        )


def parse_place(place: str) -> tuple[Position, str]:
    """``"before_qkv"`` -> ``("before", "attn.qkv")``, with an error listing the valid places.

    ``before_q``/``before_k``/``before_v`` (one part of ``attn.qkv``'s input) give ``("before", "attn.qkv")``.
    """
    if place in QKV_PARTS:
        return "before", ADAPTED_LAYERS["qkv"]
    position, _, layer = place.partition("_")
    if position not in ("before", "after") or layer not in ADAPTED_LAYERS:
        valid = [f"{p}_{n}" for p in ("before", "after") for n in ADAPTED_LAYERS] + list(QKV_PARTS)
        raise ValueError(f"adapter place {place!r}: expected one of {valid}")
    return position, ADAPTED_LAYERS[layer]  # type: ignore[return-value]


def check_places(places: Sequence[str]) -> None:
    """Fails on an unknown or repeated place, and on ``before_qkv`` together with ``before_q/k/v``."""
    for place in places:
        parse_place(place)
    if len(set(places)) != len(places):
        raise ValueError(f"adapter places repeat: {list(places)}")
    if "before_qkv" in places and set(places) & set(QKV_PARTS):
        raise ValueError(
            "adapter places before_qkv (one adapter for Q, K and V) and before_q/k/v (one each) both adapt "
            "attn.qkv's input; choose one"
        )


def add_linear_adapters(
    model: nn.Module,
    ratio: float = 0.25,
    scale: float = 0.5,
    dropout: float = 0.1,
    places: Sequence[str] = DEFAULT_PLACES,
) -> nn.Module:
    """Puts a LinearAdapter (bottleneck ``round(ratio · D)``, D the block's width) at each place of every
    block of ``model`` (any backbone family), in place.

    A layer without bias gets an adapter without biases, so the merge needs no new bias. Returns ``model``.
    """
    if ratio <= 0:
        raise ValueError(f"add_linear_adapters: ratio must be > 0, got {ratio}")
    check_places(places)
    parts = [QKV_PARTS[p] for p in places if p in QKV_PARTS]
    places = [p for p in places if p not in QKV_PARTS]
    parsed = [parse_place(p) for p in places]
    for i, block in enumerate(family_of(model).blocks(model)):
        bottleneck = max(1, round(ratio * block.attn.qkv.in_features))
        if parts:
            qkv = block.attn.qkv
            if type(qkv) is not nn.Linear:
                raise TypeError(f"blocks.{i}.attn.qkv is a {type(qkv).__name__}, not an nn.Linear")
            adapters = {
                part: LinearAdapter(
                    qkv.in_features, bottleneck, scale, dropout, bias=qkv.bias is not None
                ).to(device=qkv.weight.device, dtype=qkv.weight.dtype)
                for part in parts
            }
            block.attn.qkv = QKVAdaptedLinear(qkv, adapters)
        for place, (position, path) in zip(places, parsed):
            parent_path, _, name = path.rpartition(".")
            parent = block.get_submodule(parent_path)
            linear = getattr(parent, name)
            if isinstance(linear, AdaptedLinear):
                raise ValueError(f"blocks.{i}.{path} already has an adapter (place {place!r} given twice?)")
            if type(linear) is not nn.Linear:
                raise TypeError(f"blocks.{i}.{path} is a {type(linear).__name__}, not an nn.Linear")
            width = linear.in_features if position == "before" else linear.out_features
            adapter = LinearAdapter(width, bottleneck, scale, dropout, bias=linear.bias is not None)
            adapter.to(device=linear.weight.device, dtype=linear.weight.dtype)
            setattr(parent, name, AdaptedLinear(linear, adapter, position))
    return model


def linear_adapter_modules(module: nn.Module) -> list[AdaptedLinear]:
    """Every adapted linear layer inside ``module``."""
    return [m for m in module.modules() if isinstance(m, AdaptedLinear)]


@torch.no_grad()
def merge_linear_adapters(model: nn.Module) -> nn.Module:
    """Folds every adapter of ``model`` into its linear layer and removes it, in place (eq. 11).

    Returns ``model``, now holding exactly the plain timm model's keys and parameter count (its attention
    stays STDHA where it was).
    """
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, AdaptedLinear)]
    for name, module in tqdm(targets, desc="merging linear adapters", unit="layer", disable=None):
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, module.merged())
    return model
