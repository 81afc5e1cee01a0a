"""Find the model inside the wrappers that training frameworks put around it."""

from __future__ import annotations

from torch import nn

from .._torch_internals import COMPILED_ORIGINAL, COMPILED_WRAPPER

# (class name, attribute holding the wrapped module). Matched by name so that no framework is imported.
_WRAPPERS: tuple[tuple[str, str], ...] = (
    (COMPILED_WRAPPER, COMPILED_ORIGINAL),  # torch.compile: no public way back to the model
    ("DistributedDataParallel", "module"),
    ("DataParallel", "module"),
    ("FullyShardedDataParallel", "module"),  # FSDP1; FSDP2 shards in place and needs no unwrapping
    ("DeepSpeedEngine", "module"),
    ("_FabricModule", "module"),  # Lightning Fabric
    ("FlattenParamsWrapper", "module"),  # FairScale
)


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the user's model without DDP/FSDP/DeepSpeed/compile wrappers (PEFT stays: its adapters count)."""
    seen: set[int] = set()
    while id(model) not in seen:
        seen.add(id(model))
        for class_name, attribute in _WRAPPERS:
            inner = getattr(model, attribute, None)
            if type(model).__name__ == class_name and isinstance(inner, nn.Module):
                model = inner
                break
    return model
