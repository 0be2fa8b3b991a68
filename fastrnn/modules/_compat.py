"""What fastrnn's layers do under tools that take a model apart: torch.fx, TorchScript, devices
without autocast. In each, a torch.nn layer has a behaviour third-party code relies on; the
drop-ins match it."""
from __future__ import annotations

import functools

import torch.fx
from torch import nn

from ..functional import autocast_enabled  # noqa: F401 (the layers' checks import it from here)


Proxy = torch.fx.Proxy


def fx_leaf(forward):
    """Decorates a layer's forward so torch.fx.symbolic_trace records the layer as one
    call_module node, as it does torch.nn's layers (its default Tracer treats modules from
    torch.nn as leaves), instead of tracing into Python that branches on shapes and types."""

    @functools.wraps(forward)
    def wrapper(self, *args, **kwargs):
        proxy = None
        for a in args:  # (a loop, not a generator: this runs on every call)
            if isinstance(a, Proxy):
                proxy = a
                break
        if proxy is None and kwargs:
            proxy = next((a for a in kwargs.values() if isinstance(a, Proxy)), None)
        if proxy is None:
            return forward(self, *args, **kwargs)
        tracer = proxy.tracer
        if getattr(tracer, "root", None) is self:
            raise TypeError(f"torch.fx.symbolic_trace: {type(self).__name__} is recorded as a leaf module; trace a "
                            "module that contains it (torch.nn's layers behave the same way)")
        return tracer.create_proxy("call_module", tracer.path_of_module(self), args, kwargs)

    return wrapper


def plain_class(module: nn.Module) -> type:
    """The class `module` was made as. torch.nn.utils.parametrize gives a parametrized module a
    class of its own, Parametrized<Name>, subclassing that one with a property per parametrized
    tensor."""
    cls = type(module)
    bases = cls.__bases__
    if (isinstance(module.__dict__.get("_modules", {}).get("parametrizations"), nn.ModuleDict) and len(bases) == 1
            and cls.__name__ == "Parametrized" + bases[0].__name__):
        return bases[0]
    return cls


def _class_like(cls, module: nn.Module) -> type:
    """cls, or for a parametrized module cls made parametrized the same way (the properties of
    module's class over cls)."""
    made = type(module)
    if plain_class(module) is made:
        return cls
    own = {k: v for k, v in made.__dict__.items() if k not in ("__dict__", "__weakref__", "__module__", "__doc__")}
    return type(f"Parametrized{cls.__name__}", (cls,), own)


def take_over(cls, module: nn.Module, drop=()) -> nn.Module:
    """A `cls` module with all of `module`'s state (convert and to_torch: fastrnn's layers and
    cells keep the attributes of their torch.nn twins): configuration, training mode, the same
    parameter tensors, and whatever else third-party code registered on it: extra parameters and
    buffers (weight_norm's g and v, pruning's masks, AWD-LSTM's raw weights), a weight set as a
    plain tensor, submodules, hooks (the forward pre-hooks that recompute those weights, state
    dict hooks, a user's forward hooks). The registries of parameters, buffers and submodules are
    the new module's own copies; the hook dictionaries are shared, so that a RemovableHandle
    taken on the old module removes its hook from the new one. `drop`: attributes `cls` lacks."""
    cls = _class_like(cls, module)
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    for k, v in module.__dict__.items():
        if k in drop:
            continue
        # (_flat_weights, _flat_weight_refs: nn.RNNBase's cache of the weights, which fastrnn's
        # layers keep alike; taken as it is, as a rebuild would evaluate parametrized weights)
        if k in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set", "_flat_weights_names",
                 "_flat_weights", "_flat_weight_refs"):
            v = v.copy()
        elif k == "_all_weights":
            v = [list(w) for w in v]
        new.__dict__[k] = v
    if "_flat_weights" not in new.__dict__ and hasattr(new, "_init_flat_weights"):
        new._init_flat_weights()
    return new


class TorchNNTwin:
    """What a fastrnn layer or cell shares with its torch.nn twin (the class's _torch_class):
    conversion both ways, taking over all of the other's state (take_over), and TorchScript:
    torch.jit.script compiles the twin holding the same parameters (to_torch()), as fastrnn's
    Python forward is not TorchScript and the scripted model computes what the fastrnn one does,
    on torch's kernels. torch calls __prepare_scriptable__ on every submodule before scripting
    (and puts the result in the module it was given)."""

    _torch_class: type = None
    _fastrnn_only: tuple = ()  # attributes the torch.nn twin lacks (not handed over by to_torch)

    @classmethod
    def from_torch(cls, module: nn.Module):
        """A fastrnn module sharing the given torch.nn module's parameters (the same tensors),
        configuration and training mode, with anything else registered on it (extra parameters
        and buffers, hooks: take_over)."""
        if plain_class(module) is not cls._torch_class:
            raise TypeError(f"{cls.__name__}.from_torch expects a torch.nn.{cls._torch_class.__name__}, got "
                            f"{type(module).__name__}")
        return take_over(cls, module)

    def to_torch(self) -> nn.Module:
        """The equivalent torch.nn module holding the same parameters (shared, not copied) and
        anything else registered on this one (take_over)."""
        return take_over(self._torch_class, self, drop=self._fastrnn_only)

    def __prepare_scriptable__(self):
        return self.to_torch()
