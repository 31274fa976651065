"""What a first call inside a CUDA-graph capture needs done before: CacheCopyPlan's device metadata exists when
the plan is built (a first call uploads nothing); inductor's own CUDA graphs (compile mode reduce-overhead) are
refused inside cuda_graphs."""

import pytest
import torch
from _helpers import make_model, units_of
from torch.utils._python_dispatch import TorchDispatchMode

import harmonica
from harmonica import CacheSchedule
from harmonica.kernels import CacheCopyPlan, _triton


class HostData(TorchDispatchMode):
    """Records the ops that make a tensor from host data (torch.tensor, as_tensor)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.lift_fresh.default, torch.ops.aten.lift_fresh_copy.default):
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def test_a_cache_copy_plan_uploads_its_metadata_when_built(monkeypatch):
    monkeypatch.setattr(_triton, "KERNELS_ON_CPU", True)  # the kernel path on CPU tensors: the interpreter
    srcs = [torch.randn(2, 7, 24), torch.randn(3, 16, dtype=torch.float16)]
    dsts = [torch.empty(2, 7, 24, dtype=torch.float16), torch.empty(3, 16)]
    assert _triton.kernel_path(srcs[0])
    plan = CacheCopyPlan(srcs, dsts)
    with HostData() as host:
        plan()
    assert host.seen == [], "the first call built its metadata from host data (a host-to-device copy)"
    for s, d in zip(srcs, dsts):
        torch.testing.assert_close(d, s.to(d.dtype), rtol=0, atol=0)


@pytest.mark.parametrize("options", [{"mode": "reduce-overhead"}, {"mode": "max-autotune"},
                                     {"options": {"triton.cudagraphs": True}}], ids=["reduce-overhead",
                                                                                     "max-autotune", "cudagraphs"])
def test_inductors_own_cuda_graphs_are_refused_inside_cuda_graphs(options):
    model = make_model("tiny-dit")
    schedule = CacheSchedule.fora(4, units_of(model), 2)
    with pytest.raises(ValueError, match=r"^compile: .* CUDA graphs of its own.*cuda_graphs=True") as error:
        harmonica.enable(model, schedule, cuda_graphs=True, compile=options)
    assert "\n" not in str(error.value)
    assert getattr(model, "_harmonica", None) is None  # nothing attached
    harmonica.enable(model, schedule, compile=options)  # without cuda_graphs: torch.compile's own business
    harmonica.disable(model)
    harmonica.enable(model, schedule, cuda_graphs=True, compile={"mode": "max-autotune-no-cudagraphs"})
    harmonica.disable(model)
