"""CountCalls: how often torch operators run while a block runs (which kernel a layer reached)."""

from torch.utils._python_dispatch import TorchDispatchMode


class CountCalls(TorchDispatchMode):
    """While active, counts the calls of each named group of operators:

        with CountCalls(kernel=(torch.ops.aten._weight_int8pack_mm.default,)) as calls:
            layer(x)
        assert calls.kernel == 1
    """

    def __init__(self, **groups):
        super().__init__()
        self._groups = groups
        for name in groups:
            setattr(self, name, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for name, ops in self._groups.items():
            if func in ops:
                setattr(self, name, getattr(self, name) + 1)
        return func(*args, **(kwargs or {}))
