"""Permutation groups of a model, derived by tracing it.

The model is traced with torch.fx (timm's no-trace registrations honoured); every tensor axis in the
graph and every axis of every parameter and buffer is an element of a union-find. Each op joins the
axes that must be permuted together for the network to compute the same function, and *fixes* the
axes that may not be permuted at all (the input's and output's, an axis that is sliced, reshaped
together with another, concatenated, ...). The classes that end up free and hold parameter axes are
the permutation groups. Attention modules are taken whole: their heads and within-head dimensions
become a :class:`HeadGroup` (see ``heads.py``).

An op or module without a rule is a WgenError naming it and its module path: guessing would risk
changing what the network computes, and every canonicalized member is verified anyway.
"""

from __future__ import annotations

import inspect
import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import WgenError

METHOD_NONE_HINT = "this architecture cannot be canonicalized yet; use --method none to copy members through"

AxisRef = tuple[str, int]  # (state dict key, axis)


@dataclass
class PermGroup:
    """Axes of parameters that share one permutation of ``size`` units.

    With ``blocks > 1`` the units fall into that many contiguous equal blocks (GroupNorm groups)
    and a permutation may only move units within their block.
    """

    name: str
    size: int
    axes: list[AxisRef]
    blocks: int = 1


@dataclass
class HeadGroup:
    """One attention module: heads permuted together, units permuted within each head.

    ``axes`` maps a parameter axis to its layout, a tuple of segments ``"qk"``, ``"v"`` (each
    ``num_heads * head_dim`` long, heads outermost) or ``"qk_norm"`` (``head_dim`` long, shared by
    every head, which forces one within-head permutation of q and k for all heads).
    """

    name: str
    num_heads: int
    head_dim: int
    axes: list[tuple[str, int, tuple[str, ...]]]

    @property
    def shared_qk(self) -> bool:
        """Return True when q/k norms force one within-head q/k permutation for every head."""
        return any("qk_norm" in layout for _, _, layout in self.axes)


@dataclass
class PermSpec:
    """All permutation symmetries wgen uses for one architecture."""

    groups: list[PermGroup] = field(default_factory=list)
    heads: list[HeadGroup] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Return counts for reports: groups, permuted units, attention modules."""
        return {"groups": len(self.groups), "units": sum(g.size for g in self.groups),
                "head_groups": len(self.heads), "heads": sum(h.num_heads for h in self.heads)}


# ------------------------------------------------------------------------------------------------
# union-find over axes


class _Axes:
    """Union-find over axes, with per-class 'fixed' flags and block constraints."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.fixed: list[bool] = []
        self.blocks: list[int] = []
        self.size: list[int] = []
        self.ids: dict[Any, int] = {}

    def get(self, key: Any, size: int) -> int:
        if key not in self.ids:
            self.ids[key] = len(self.parent)
            self.parent.append(len(self.parent))
            self.fixed.append(False)
            self.blocks.append(1)
            self.size.append(size)
        return self.ids[key]

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] != self.size[rb]:  # a rule joined axes of different sizes: be safe
            self.fixed[ra] = self.fixed[rb] = True
        self.parent[rb] = ra
        self.fixed[ra] = self.fixed[ra] or self.fixed[rb]
        self.blocks[ra] = _finer_blocks(self.blocks[ra], self.blocks[rb], self.size[ra])
        if self.blocks[ra] == 0:
            self.fixed[ra] = True

    def fix(self, a: int) -> None:
        self.fixed[self.find(a)] = True

    def block(self, a: int, blocks: int) -> None:
        r = self.find(a)
        self.blocks[r] = _finer_blocks(self.blocks[r], blocks, self.size[r])
        if self.blocks[r] == 0:
            self.fixed[r] = True


def _finer_blocks(a: int, b: int, size: int) -> int:
    """Return the block count both constraints allow (0: none, the class must stay fixed)."""
    hi, lo = max(a, b), min(a, b)
    return hi if hi % lo == 0 and size % hi == 0 else 0


# ------------------------------------------------------------------------------------------------
# tracing


class _Tracer(torch.fx.Tracer):
    """torch.fx tracer whose leaves are the modules wgen has rules for (and timm's no-trace ones)."""

    def __init__(self) -> None:
        try:
            from timm.layers import _fx as timm_fx

            functions = tuple(f for f in timm_fx.get_notrace_functions() if callable(f))
            self.timm_leaves = tuple(timm_fx.get_notrace_modules())
        except ImportError:  # older timm
            functions, self.timm_leaves = (), ()
        super().__init__(autowrap_functions=functions)

    def is_leaf_module(self, module: nn.Module, qualname: str) -> bool:
        if _is_attention(module) or isinstance(module, self.timm_leaves):
            return True
        owns = any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False))
        if owns and not any(any(True for _ in c.parameters()) for c in module.children()):
            return True
        return super().is_leaf_module(module, qualname)


def _is_attention(module: nn.Module) -> bool:
    return (isinstance(getattr(module, "num_heads", None), int) and isinstance(getattr(module, "proj", None), nn.Linear)
            and (isinstance(getattr(module, "qkv", None), nn.Linear)
                 or all(isinstance(getattr(module, n, None), nn.Linear) for n in ("q", "k", "v"))))


def trace(model: nn.Module, input_size: tuple[int, ...]) -> torch.fx.GraphModule:
    """Return ``model`` traced by torch.fx, with shapes recorded from a real batch of two inputs."""
    forward_args = list(inspect.signature(model.forward).parameters.values())[1:]
    concrete = {p.name: p.default for p in forward_args if p.default is not inspect.Parameter.empty}
    was_training = model.training
    model.eval()
    try:
        graph = _Tracer().trace(model, concrete_args=concrete or None)
        module = torch.fx.GraphModule(model, graph)
        device = next(iter(model.parameters())).device
        with torch.no_grad():
            ShapeProp(module).propagate(torch.randn(2, *input_size, device=device))
    except WgenError:
        raise
    except Exception as exc:  # fx raises many error types for untraceable code
        raise WgenError(f"torch.fx cannot trace {type(model).__name__}: {' '.join(str(exc).split())[:200]}",
                        METHOD_NONE_HINT) from exc
    finally:
        model.train(was_training)
    return module


# ------------------------------------------------------------------------------------------------
# rules


def derive_groups(model: nn.Module, input_size: tuple[int, ...]) -> PermSpec:
    """Return the permutation groups of ``model`` (fed ``input_size`` inputs), derived by tracing."""
    graph_module = trace(model, input_size)
    return _Deriver(graph_module, model).run()


def _shape(node: Any) -> tuple[int, ...] | None:
    if not isinstance(node, torch.fx.Node):
        return None
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _module_path(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    paths = [v[0] if isinstance(v, tuple) else str(k) for k, v in stack.items()]
    return paths[-1] if paths else "<model>"


_ELEMENTWISE_FUNCS: set[Any] = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.pow, operator.iadd,
    operator.imul, torch.add, torch.sub, torch.mul, torch.div, torch.maximum, torch.minimum, torch.where,
    torch.sigmoid, torch.tanh, torch.relu, torch.exp, torch.sqrt, torch.rsqrt, torch.abs, torch.clamp,
    torch.erf, F.relu, F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.sigmoid, F.tanh, F.leaky_relu,
    F.elu, F.mish, F.softplus, F.dropout, F.hardtanh, torch._C._nn.gelu, torch.softmax, F.softmax,
}
_ELEMENTWISE_METHODS = {
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "sigmoid", "sigmoid_", "tanh", "relu", "relu_",
    "exp", "sqrt", "rsqrt", "pow", "abs", "neg", "clamp", "clamp_", "clip", "float", "half", "bfloat16", "to",
    "type_as", "contiguous", "clone", "detach", "softmax", "gelu", "silu", "erf", "masked_fill",
}
_REDUCE_METHODS = {"mean", "sum", "amax", "amin", "std", "var"}
_RESHAPE_METHODS = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze"}
_ELEMENTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh,
                        nn.LeakyReLU, nn.ELU, nn.Mish, nn.Softplus, nn.Hardtanh, nn.Identity, nn.Dropout,
                        nn.Dropout2d, nn.Softmax, nn.PReLU)
_POOL_MODULES = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d, nn.MaxPool2d, nn.AdaptiveAvgPool1d,
                 nn.AvgPool1d, nn.MaxPool1d)
_POOL_FUNCS = {F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.avg_pool2d, F.max_pool2d, F.adaptive_avg_pool1d}


class _Deriver:
    """Walks the traced graph once, applying one rule per node."""

    def __init__(self, graph_module: torch.fx.GraphModule, model: nn.Module) -> None:
        self.gm = graph_module
        self.model = model
        self.uf = _Axes()
        self.state = model.state_dict()
        self.heads: list[HeadGroup] = []

    # -- helpers --------------------------------------------------------------------------------

    def ax(self, node: torch.fx.Node, dim: int, index: int | None = None) -> int:
        shape = self._shape_of(node, index)
        dim = dim % len(shape)
        return self.uf.get(("node", node.name, index, dim), shape[dim])

    def _shape_of(self, node: torch.fx.Node, index: int | None) -> tuple[int, ...]:
        if index is None:
            shape = _shape(node)
            assert shape is not None, node
            return shape
        return tuple(node.meta["tensor_meta"][index].shape)

    def par(self, key: str, axis: int) -> int:
        return self.uf.get(("param", key, axis), self.state[key].shape[axis])

    def join(self, a: int, b: int) -> None:
        self.uf.union(a, b)

    def fix_all(self, node: Any) -> None:
        shape = _shape(node)
        if shape is not None:
            for d in range(len(shape)):
                self.uf.fix(self.ax(node, d))

    def fail(self, node: torch.fx.Node, what: str) -> WgenError:
        return WgenError(f"cannot derive permutations through {what} in module '{_module_path(node)}'",
                         METHOD_NONE_HINT)

    # -- driver ---------------------------------------------------------------------------------

    def run(self) -> PermSpec:
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                self.fix_all(node)
            elif node.op == "output":
                for arg in _flatten(node.args):
                    self.fix_all(arg)
            elif node.op == "get_attr":
                self._get_attr(node)
            elif node.op == "call_module":
                self._module(node, self.gm.get_submodule(node.target))
            elif node.op in ("call_function", "call_method"):
                self._function(node)
        return self._collect()

    def _collect(self) -> PermSpec:
        classes: dict[int, list[AxisRef]] = {}
        for key, tensor in self.state.items():
            for axis in range(tensor.ndim):
                if ("param", key, axis) in self.uf.ids:  # axes no op touched stay as they are
                    root = self.uf.find(self.uf.ids[("param", key, axis)])
                    classes.setdefault(root, []).append((key, axis))
        groups = []
        for root, axes in classes.items():
            if self.uf.fixed[root] or self.uf.size[root] < 2:
                continue
            key, axis = axes[0]
            groups.append(PermGroup(f"{key}:{axis}", self.uf.size[root], axes, self.uf.blocks[root]))
        return PermSpec(groups, self.heads)

    # -- get_attr: parameters used directly in the graph (cls tokens, position embeddings, gammas) --

    def _get_attr(self, node: torch.fx.Node) -> None:
        shape = _shape(node)
        if shape is None:
            return
        if node.target not in self.state:
            self.fix_all(node)
            return
        for d in range(len(shape)):
            self.join(self.ax(node, d), self.par(node.target, d))

    # -- leaf modules --------------------------------------------------------------------------

    def _module(self, node: torch.fx.Node, module: nn.Module) -> None:
        rule = next((rule for matches, rule in MODULE_RULES if _matches(matches, module)), None)
        if rule is None:
            raise self.fail(node, f"module {type(module).__module__}.{type(module).__name__}")
        rule(self, node, module, node.args[0] if node.args else None, f"{node.target}.")

    def _linear(self, node: torch.fx.Node, module: nn.Module, x: Any, prefix: str) -> None:
        self._check_params(node, module, {"weight", "bias"})
        self._batch_dims(x, node, except_last=True)
        self.join(self.ax(x, -1), self.par(prefix + "weight", 1))
        self._channel(node, -1, module, prefix, weight_axis=0)

    def _conv(self, node: torch.fx.Node, module: nn.Module, x: Any, prefix: str) -> None:
        self._check_params(node, module, {"weight", "bias"})
        self.join(self.ax(x, 0), self.ax(node, 0))
        for d in range(2, len(_shape(node))):
            self.uf.fix(self.ax(node, d))
        groups = module.groups
        if groups == 1:
            self.join(self.ax(x, 1), self.par(prefix + "weight", 1))
        elif module.in_channels == groups and module.out_channels == groups:  # depthwise
            self.join(self.ax(x, 1), self.ax(node, 1))
        else:  # grouped: keep channels in place (valid, if not optimal)
            self.uf.fix(self.ax(x, 1))
            self.uf.fix(self.ax(node, 1))
            self.uf.fix(self.par(prefix + "weight", 1))
        self._channel(node, 1, module, prefix, weight_axis=0)

    def _batchnorm(self, node: torch.fx.Node, module: nn.Module, x: Any, prefix: str) -> None:
        self._check_params(node, module, {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"})
        self._same_shape(x, node)
        self._channel(node, 1, module, prefix, names=("weight", "bias", "running_mean", "running_var"))

    def _layer_norm(self, node: torch.fx.Node, module: nn.Module, x: Any, prefix: str) -> None:
        shape = getattr(module, "normalized_shape", None) or getattr(module, "dim", None)
        shape = (shape,) if isinstance(shape, int) else tuple(shape or ())
        if len(shape) != 1:
            raise self.fail(node, f"{type(module).__name__} over several axes")
        self._check_params(node, module, {"weight", "bias"})
        self._same_shape(x, node)
        self._channel(node, 1 if type(module).__name__.endswith("2d") else -1, module, prefix, names=("weight", "bias"))

    def _group_norm(self, node: torch.fx.Node, module: nn.Module, x: Any, prefix: str) -> None:
        self._check_params(node, module, {"weight", "bias"})
        self._same_shape(x, node)
        self._channel(node, 1, module, prefix, names=("weight", "bias"))
        if 1 < module.num_groups < module.num_channels:
            self.uf.block(self.ax(node, 1), module.num_groups)

    def _layer_scale(self, node: torch.fx.Node, module: nn.Module, x: Any, prefix: str) -> None:
        self._check_params(node, module, {"gamma"})
        self._same_shape(x, node)
        self._channel(node, 1 if type(module).__name__.endswith("2d") else -1, module, prefix, names=("gamma",))

    def _elementwise_module(self, node: torch.fx.Node, module: nn.Module, x: Any, prefix: str) -> None:
        self._same_shape(x, node)
        if isinstance(module, nn.PReLU) and module.weight.numel() > 1:  # one slope a channel
            self.join(self.ax(node, 1), self.par(prefix + "weight", 0))

    def _pool_module(self, node: torch.fx.Node, module: nn.Module, x: Any, prefix: str) -> None:
        self._pool(x, node)

    def _flatten_module(self, node: torch.fx.Node, module: nn.Module, x: Any, prefix: str) -> None:
        self._reshape(x, node)

    def _check_params(self, node: torch.fx.Node, module: nn.Module, allowed: set[str]) -> None:
        names = {n for n, _ in module.named_parameters()} | {n for n, _ in module.named_buffers()}
        extra = sorted(names - allowed)
        if extra:
            raise self.fail(node, f"{type(module).__name__} with extra tensor {extra[0]!r}")

    def _channel(self, node: torch.fx.Node, dim: int, module: nn.Module, prefix: str, weight_axis: int = 0,
                 names: tuple[str, ...] = ("weight", "bias")) -> None:
        """Join output axis ``dim`` with axis 0 of the module's per-channel tensors."""
        out = self.ax(node, dim)
        for name in names:
            tensor = getattr(module, name, None)
            if isinstance(tensor, torch.Tensor) and tensor.ndim >= 1 and prefix + name in self.state:
                self.join(out, self.par(prefix + name, weight_axis if name == "weight" else 0))

    def _batch_dims(self, x: torch.fx.Node, node: torch.fx.Node, except_last: bool) -> None:
        shape = _shape(node)
        for d in range(len(shape) - (1 if except_last else 0)):
            self.join(self.ax(x, d), self.ax(node, d))

    def _same_shape(self, x: torch.fx.Node, node: torch.fx.Node) -> None:
        if _shape(x) != _shape(node):
            raise self.fail(node, "a shape-changing op")
        for d in range(len(_shape(node))):
            self.join(self.ax(x, d), self.ax(node, d))

    def _pool(self, x: torch.fx.Node, node: torch.fx.Node) -> None:
        out_shape, in_shape = _shape(node), _shape(x)
        self.join(self.ax(x, 0), self.ax(node, 0))
        self.join(self.ax(x, 1), self.ax(node, 1))
        for d in range(2, len(out_shape)):
            self.uf.fix(self.ax(node, d))
        for d in range(2, len(in_shape)):
            self.uf.fix(self.ax(x, d))

    # -- attention ------------------------------------------------------------------------------

    def _attention(self, node: torch.fx.Node, module: nn.Module, x: Any, prefix: str) -> None:
        heads, proj = module.num_heads, module.proj
        allowed = {"proj.weight", "proj.bias"}
        if hasattr(module, "qkv") and isinstance(module.qkv, nn.Linear):
            inputs = {"qkv": ("qk", "qk", "v")}
        else:
            inputs = {"q": ("qk",), "k": ("qk",), "v": ("v",)}
        width = proj.in_features
        if width % heads:
            raise self.fail(node, "attention whose width is not a multiple of its heads")
        head_dim = width // heads
        layouts: list[tuple[str, int, tuple[str, ...]]] = []
        self._batch_dims(x, node, except_last=True)
        for name, layout in inputs.items():
            linear = getattr(module, name)
            if linear.out_features != len(layout) * width:
                raise self.fail(node, f"attention projection {name} of unexpected width")
            self.join(self.ax(x, -1), self.par(f"{prefix}{name}.weight", 1))
            layouts.append((f"{prefix}{name}.weight", 0, layout))
            allowed.add(f"{name}.weight")
            if linear.bias is not None:
                layouts.append((f"{prefix}{name}.bias", 0, layout))
                allowed.add(f"{name}.bias")
        layouts.append((f"{prefix}proj.weight", 1, ("v",)))
        for norm_name in ("q_norm", "k_norm"):
            norm = getattr(module, norm_name, None)
            for pname, tensor in (norm.named_parameters() if norm is not None else []):
                if tensor.ndim != 1 or tensor.shape[0] != head_dim:
                    raise self.fail(node, f"attention {norm_name} of unexpected shape")
                layouts.append((f"{prefix}{norm_name}.{pname}", 0, ("qk_norm",)))
                allowed.add(f"{norm_name}.{pname}")
        scale_norm = getattr(module, "norm", None)
        for pname, tensor in (scale_norm.named_parameters() if scale_norm is not None else []):
            layouts.append((f"{prefix}norm.{pname}", 0, ("v",)))
            allowed.add(f"norm.{pname}")
        gate = getattr(module, "gate", None)
        if isinstance(gate, nn.Linear):
            self.join(self.ax(x, -1), self.par(f"{prefix}gate.weight", 1))
            layouts.append((f"{prefix}gate.weight", 0, ("v",)))
            allowed.add("gate.weight")
            if gate.bias is not None:
                layouts.append((f"{prefix}gate.bias", 0, ("v",)))
                allowed.add("gate.bias")
        names = {n for n, _ in module.named_parameters()} | {n for n, _ in module.named_buffers()}
        if names - allowed:
            raise self.fail(node, f"attention with extra tensor {sorted(names - allowed)[0]!r}")
        out = self.ax(node, -1)
        self.join(out, self.par(f"{prefix}proj.weight", 0))
        if proj.bias is not None:
            self.join(out, self.par(f"{prefix}proj.bias", 0))
        for key, axis, _ in layouts:  # these axes belong to the head group, not to a plain group
            self.uf.fix(self.par(key, axis))
        if heads > 1 or head_dim > 1:
            self.heads.append(HeadGroup(node.target, heads, head_dim, layouts))

    # -- functions and methods -----------------------------------------------------------------

    def _function(self, node: torch.fx.Node) -> None:
        multi = node.meta.get("tensor_meta") is not None and _shape(node) is None  # a tuple of tensors
        if node.target is operator.getitem:
            if _is_multi(node.args[0]):
                return self._getitem_multi(node)
            if _shape(node) is not None:
                self._index(node)
            return
        if _shape(node) is None and not multi:
            return  # ints, shapes, asserts: no tensor axes
        name = _target_name(node)
        if multi:
            if name not in _SPLITS:
                raise self.fail(node, f"{name}()")
            return self._split(node, name)
        rule = (METHOD_RULES.get(name) if node.op == "call_method" else FUNCTION_RULES.get(node.target)
                ) or FUNCTION_NAME_RULES.get(name)
        if rule is None:
            raise self.fail(node, f"{name}()")
        rule(self, node)

    def _elementwise(self, node: torch.fx.Node) -> None:
        self._broadcast(node, [a for a in _flatten(node.args) if _shape(a) is not None])

    def _expand(self, node: torch.fx.Node) -> None:
        self._broadcast(node, [node.args[0]])

    def _reshape_node(self, node: torch.fx.Node) -> None:
        self._reshape(node.args[0], node)

    def _pool_node(self, node: torch.fx.Node) -> None:
        self._pool(node.args[0], node)

    def _resample_pos_embed(self, node: torch.fx.Node) -> None:
        src = node.args[0]
        self.join(self.ax(src, -1), self.ax(node, -1))
        for d in range(len(_shape(node)) - 1):
            self.uf.fix(self.ax(node, d))
            self.uf.fix(self.ax(src, d))

    def _broadcast(self, node: torch.fx.Node, args: list[torch.fx.Node]) -> None:
        out_shape = _shape(node)
        for arg in args:
            shape = _shape(arg)
            offset = len(out_shape) - len(shape)
            if offset < 0:
                raise self.fail(node, "an op whose input has more axes than its output")
            for d, size in enumerate(shape):
                if size == out_shape[offset + d]:
                    self.join(self.ax(arg, d), self.ax(node, offset + d))

    def _reduce(self, node: torch.fx.Node) -> None:
        x = node.args[0]
        in_shape = _shape(x)
        dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        keepdim = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
        if dims is None:
            return
        dims = {d % len(in_shape) for d in ((dims,) if isinstance(dims, int) else dims)}
        kept = [d for d in range(len(in_shape)) if d not in dims]
        if keepdim:
            for d in kept:
                self.join(self.ax(x, d), self.ax(node, d))
        else:
            for out_d, d in enumerate(kept):
                self.join(self.ax(x, d), self.ax(node, out_d))

    def _reshape(self, x: torch.fx.Node, node: torch.fx.Node) -> None:
        """Join axes a reshape keeps whole; fix axes it merges or splits."""
        in_shape, out_shape = _shape(x), _shape(node)
        in_dims = [d for d, s in enumerate(in_shape) if s != 1]
        out_dims = [d for d, s in enumerate(out_shape) if s != 1]
        i = j = 0
        while i < len(in_dims) or j < len(out_dims):
            block_in, block_out = [in_dims[i]] if i < len(in_dims) else [], [out_dims[j]] if j < len(out_dims) else []
            i, j = i + len(block_in), j + len(block_out)
            p_in = math.prod(in_shape[d] for d in block_in)
            p_out = math.prod(out_shape[d] for d in block_out)
            while p_in != p_out:
                if p_in < p_out and i < len(in_dims):
                    block_in.append(in_dims[i])
                    p_in *= in_shape[in_dims[i]]
                    i += 1
                elif j < len(out_dims):
                    block_out.append(out_dims[j])
                    p_out *= out_shape[out_dims[j]]
                    j += 1
                else:
                    raise self.fail(node, "a reshape of mismatching sizes")
            if len(block_in) == 1 and len(block_out) == 1:
                self.join(self.ax(x, block_in[0]), self.ax(node, block_out[0]))
            else:
                for d in block_in:
                    self.uf.fix(self.ax(x, d))
                for d in block_out:
                    self.uf.fix(self.ax(node, d))

    def _permute(self, node: torch.fx.Node) -> None:
        x = node.args[0]
        rank = len(_shape(x))
        name = node.target if isinstance(node.target, str) else node.target.__name__
        rest = list(node.args[1:])
        if name == "permute":
            order = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
            order = list(order or node.kwargs.get("dims", []))
        else:
            if name == "movedim":
                raise self.fail(node, "movedim()")
            a, b = (rest + [node.kwargs.get("dim0"), node.kwargs.get("dim1")])[:2]
            order = list(range(rank))
            order[a % rank], order[b % rank] = order[b % rank], order[a % rank]
        for out_d, in_d in enumerate(order):
            self.join(self.ax(x, in_d % rank), self.ax(node, out_d))

    def _index(self, node: torch.fx.Node) -> None:
        x, index = node.args
        in_shape = _shape(x)
        items = list(index) if isinstance(index, tuple) else [index]
        if any(isinstance(i, torch.fx.Node) for i in items):
            raise self.fail(node, "tensor indexing")
        if Ellipsis in items:
            at = items.index(Ellipsis)
            fill = len(in_shape) - (len(items) - 1 - sum(i is None for i in items))
            items = items[:at] + [slice(None)] * fill + items[at + 1:]
        in_d = out_d = 0
        for item in items:
            if item is None:
                out_d += 1
            elif isinstance(item, int):
                self.uf.fix(self.ax(x, in_d))
                in_d += 1
            elif isinstance(item, slice):
                if item == slice(None):
                    self.join(self.ax(x, in_d), self.ax(node, out_d))
                else:
                    self.uf.fix(self.ax(x, in_d))
                    self.uf.fix(self.ax(node, out_d))
                in_d += 1
                out_d += 1
            else:
                raise self.fail(node, f"indexing with {type(item).__name__}")
        while in_d < len(in_shape):
            self.join(self.ax(x, in_d), self.ax(node, out_d))
            in_d += 1
            out_d += 1

    def _split(self, node: torch.fx.Node, name: str) -> None:
        """unbind/chunk/split: other axes pass through; the split axis stays fixed."""
        x = node.args[0]
        rank = len(_shape(x))
        default_dim = 0
        dim = node.kwargs.get("dim", node.args[2] if name != "unbind" and len(node.args) > 2 else
                              node.args[1] if name == "unbind" and len(node.args) > 1 else default_dim) % rank
        self.uf.fix(self.ax(x, dim))
        for i, meta in enumerate(node.meta["tensor_meta"]):
            out_rank = len(meta.shape)
            kept = [d for d in range(rank) if d != dim] if name == "unbind" else list(range(rank))
            for out_d, in_d in enumerate(kept[:out_rank]):
                if in_d == dim:
                    self.uf.fix(self.ax(node, out_d, i))
                else:
                    self.join(self.ax(x, in_d), self.ax(node, out_d, i))

    def _getitem_multi(self, node: torch.fx.Node) -> None:
        source, index = node.args
        if not isinstance(index, int):
            raise self.fail(node, "slicing a list of tensors")
        for d in range(len(_shape(node))):
            self.join(self.ax(source, d, index), self.ax(node, d))

    def _cat(self, node: torch.fx.Node) -> None:
        tensors = node.args[0]
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        rank = len(_shape(node))
        dim %= rank
        for t in tensors:
            for d in range(rank):
                if d == dim:
                    self.uf.fix(self.ax(t, d))
                else:
                    self.join(self.ax(t, d), self.ax(node, d))
        self.uf.fix(self.ax(node, dim))

    def _matmul(self, node: torch.fx.Node) -> None:
        a, b = node.args[:2]
        sa, sb, so = _shape(a), _shape(b), _shape(node)
        if len(sa) < 2 or len(sb) < 2:
            raise self.fail(node, "a vector matmul")
        self.join(self.ax(a, -1), self.ax(b, -2))
        self.join(self.ax(a, -2), self.ax(node, -2))
        self.join(self.ax(b, -1), self.ax(node, -1))
        for arg, shape in ((a, sa), (b, sb)):
            offset = len(so) - len(shape)
            for d in range(len(shape) - 2):
                if shape[d] == so[offset + d]:
                    self.join(self.ax(arg, d), self.ax(node, offset + d))

    def _sdpa(self, node: torch.fx.Node) -> None:
        q, k, v = node.args[:3]
        if any(k_ in node.kwargs and node.kwargs[k_] is not None for k_ in ("attn_mask",)) or len(node.args) > 3:
            raise self.fail(node, "scaled_dot_product_attention with a mask")
        rank = len(_shape(node))
        for d in range(rank - 2):
            for t in (q, k, v):
                self.join(self.ax(t, d), self.ax(node, d))
        self.join(self.ax(q, -1), self.ax(k, -1))
        self.join(self.ax(k, -2), self.ax(v, -2))
        self.join(self.ax(q, -2), self.ax(node, -2))
        self.join(self.ax(v, -1), self.ax(node, -1))

    def _functional_norm(self, node: torch.fx.Node) -> None:
        x = node.args[0]
        shape = node.args[1] if len(node.args) > 1 else node.kwargs["normalized_shape"]
        if len(shape) != 1:
            raise self.fail(node, "layer_norm over several axes")
        self._same_shape(x, node)
        weight = node.args[2] if len(node.args) > 2 else node.kwargs.get("weight")
        bias = node.args[3] if len(node.args) > 3 else node.kwargs.get("bias")
        for t in (weight, bias):
            if isinstance(t, torch.fx.Node):
                self.join(self.ax(node, -1), self.ax(t, 0))


def _is_timm_norm(module: nn.Module) -> bool:
    return type(module).__name__ in ("RmsNorm", "RmsNorm2d", "SimpleNorm", "SimpleNorm2d")


def _is_multi(node: Any) -> bool:
    return isinstance(node, torch.fx.Node) and _shape(node) is None and node.meta.get("tensor_meta") is not None


def _flatten(args: Any) -> list[Any]:
    out: list[Any] = []
    for a in args if isinstance(args, (list, tuple)) else [args]:
        if isinstance(a, (list, tuple)):
            out.extend(_flatten(a))
        elif isinstance(a, dict):
            out.extend(_flatten(list(a.values())))
        else:
            out.append(a)
    return out


def _target_name(node: torch.fx.Node) -> str:
    target = node.target
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


Matcher = Any  # a module type, a tuple of types, or a predicate on the module


def _matches(matcher: Matcher, module: nn.Module) -> bool:
    if isinstance(matcher, (type, tuple)):
        return isinstance(module, matcher)
    return bool(matcher(module))


def _is_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.conv._ConvNd) and not module.transposed


def _is_layer_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm))) or _is_timm_norm(module)


def _is_layer_scale(module: nn.Module) -> bool:
    return type(module).__name__ in ("LayerScale", "LayerScale2d") and hasattr(module, "gamma")


def _is_pool(module: nn.Module) -> bool:
    return isinstance(module, _POOL_MODULES) or type(module).__name__ == "SelectAdaptivePool2d"


# The rule of each leaf module, tried in order: (matcher, rule(deriver, node, module, input, prefix)).
MODULE_RULES: list[tuple[Matcher, Any]] = [
    (_is_attention, _Deriver._attention),
    (nn.Linear, _Deriver._linear),
    (_is_conv, _Deriver._conv),
    (nn.modules.batchnorm._BatchNorm, _Deriver._batchnorm),
    (_is_layer_norm, _Deriver._layer_norm),
    (nn.GroupNorm, _Deriver._group_norm),
    (_is_layer_scale, _Deriver._layer_scale),
    (_ELEMENTWISE_MODULES, _Deriver._elementwise_module),
    (_is_pool, _Deriver._pool_module),
    (nn.Flatten, _Deriver._flatten_module),
]
# The rule of each function (by object) and tensor method (by name): rule(deriver, node).
FUNCTION_RULES: dict[Any, Any] = {
    **{f: _Deriver._elementwise for f in _ELEMENTWISE_FUNCS},
    **{f: _Deriver._reduce for f in (torch.mean, torch.sum)},
    **{f: _Deriver._reshape_node for f in (torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze)},
    **{f: _Deriver._permute for f in (torch.permute, torch.transpose)},
    **{f: _Deriver._pool_node for f in _POOL_FUNCS},
    **{f: _Deriver._cat for f in (torch.cat, torch.concat)},
    **{f: _Deriver._matmul for f in (operator.matmul, torch.matmul, torch.bmm)},
    F.scaled_dot_product_attention: _Deriver._sdpa,
    F.layer_norm: _Deriver._functional_norm,
}
METHOD_RULES: dict[str, Any] = {
    **{m: _Deriver._elementwise for m in _ELEMENTWISE_METHODS},
    **{m: _Deriver._reduce for m in _REDUCE_METHODS},
    **{m: _Deriver._reshape_node for m in _RESHAPE_METHODS},
    **{m: _Deriver._permute for m in ("permute", "transpose", "swapaxes", "movedim")},
    **{m: _Deriver._expand for m in ("expand", "expand_as")},
    "matmul": _Deriver._matmul,
}
# Functions known by name (wrapped by timm, so their objects differ between versions).
FUNCTION_NAME_RULES: dict[str, Any] = {"resample_abs_pos_embed": _Deriver._resample_pos_embed}
_SPLITS = ("unbind", "chunk", "split", "tensor_split")
