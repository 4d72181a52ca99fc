"""A second device on a CPU-only machine, for tests of code that must keep its tensors on the models' device.

`FakeDevice` is a torch function mode. Tensors "on the device" are those moved there (`.to(fd.device)`, or a factory
given `device=fd.device`), the parameters and buffers of modules handed to `adopt`, and whatever is computed from
them; `fd.device` is a `torch.device` told apart by identity (its type is cpu, so the arithmetic is the CPU's), and a
device tensor's `.device` is `fd.device`. As on CUDA, an op that mixes device tensors with host tensors (of more than
one element) raises, and so do `.numpy()` / `np.asarray` on a device tensor; `.cpu()` brings one back to the host.
"""
from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

MARK = "_ovdiff_fake_device"


class DeviceMixError(RuntimeError):
    pass


def _tensors(x, out: list) -> list:
    if isinstance(x, torch.Tensor):
        out.append(x)
    elif isinstance(x, (list, tuple)):
        for v in x:
            _tensors(v, out)
    elif isinstance(x, dict):
        for v in x.values():
            _tensors(v, out)
    return out


class FakeDevice(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.device = torch.device("cpu")  # identity, not value, says "the device"
        self.ops = 0  # ops seen on device tensors (a test can check the code under test ran here)

    @staticmethod
    def on(t) -> bool:
        return isinstance(t, torch.Tensor) and getattr(t, MARK, False)

    def put(self, t: torch.Tensor) -> torch.Tensor:
        setattr(t, MARK, True)
        return t

    def adopt(self, module) -> None:
        """A module's parameters and buffers are on the device from now on."""
        for t in list(module.parameters()) + list(module.buffers()):
            self.put(t)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name == "__get__" and getattr(getattr(func, "__self__", None), "__name__", "") == "device":
            return self.device if self.on(args[0]) else func(*args, **kwargs)
        ins = _tensors(list(args) + list(kwargs.values()), [])
        dev = [t for t in ins if self.on(t)]
        if dev:
            self.ops += 1
            if name in ("numpy", "__array__"):
                raise DeviceMixError(f"{name}() on a device tensor (copy it to the host with .cpu() first)")
            host = [t for t in ins if not self.on(t) and t.dim() > 0]
            if host and name not in ("to", "cpu", "__set__"):
                raise DeviceMixError(f"{name}: a device tensor met a host tensor of shape {tuple(host[0].shape)}")
        out = func(*args, **kwargs)
        target = kwargs.get("device", next((a for a in args[1:] if isinstance(a, torch.device)), None))
        if name in ("cpu", "to") and args and out is args[0]:
            out = out.view_as(out)  # a copy on real devices: never the same object as the source
        if name == "cpu" or (name == "to" and target is not None and target is not self.device):
            return out
        if target is self.device or dev:
            for t in _tensors(out, []):
                self.put(t)
        return out
