"""The probe's packed linear: a custom op over oneDNN's packed linear, and a module holding the packed weight as a buffer."""
from typing import Optional
import torch

@torch.library.custom_op("draftsmith_probe::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
@packed_linear.register_fake
def _(x, packed, bias):
    return x.new_empty(x.shape[0], packed.shape[0])

def probe_target(mode: str, max_length: int):
    """SmolLM2 fp32 compiled at c464b8c's code: "frozen"/"onednn" its frozen oneDNN graph, "packed" this probe's
    BufLinear layers with the kernel marked not frozen, else the kernel named."""
    from draftsmith.models import cpu_linear
    from draftsmith.models.target import load_target
    t = load_target("smollm2-135m-instruct", "fp32")
    if mode == "packed":
        for parent in list(t.model.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is torch.nn.Linear:
                    setattr(parent, name, BufLinear(child))
        t.compile(max_length, linear_kernel="onednn")
        t.compiled.kernel = cpu_linear.LinearKernel("onednn-packed", 2)    # not "onednn": not frozen
    else:
        t.compile(max_length, linear_kernel="onednn" if mode == "frozen" else mode)
    return t


class BufLinear(torch.nn.Module):
    def __init__(self, lin):
        super().__init__()
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.weight = lin.weight
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(lin.weight.detach(), None), persistent=False)
        self.bias = lin.bias
    def forward(self, x):
        y = packed_linear(x.reshape(-1, x.shape[-1]), self.packed, self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)


import os
if os.environ.get("LOWER"):
    from torch._inductor.lowering import register_lowering, fallback_handler
    _aten = fallback_handler(torch.ops.mkldnn._linear_pointwise.default, add_to_fallback_set=False)

    @register_lowering(torch.ops.draftsmith_probe.packed_linear.default, type_promotion_kind=None)
    def _lower(x, packed, bias):
        return _aten(x, packed, bias, "none", [], "")
