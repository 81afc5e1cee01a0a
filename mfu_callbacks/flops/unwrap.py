"""Find the model inside the wrappers that training frameworks put around it."""

from __future__ import annotations

from torch import nn

# (class name, attribute holding the wrapped module). Matched by name so that no framework is imported.
_WRAPPERS: tuple[tuple[str, str], ...] = (
    ("OptimizedModule", "_orig_mod"),  # torch.compile
    ("DistributedDataParallel", "module"),
    ("DataParallel", "module"),
    ("FullyShardedDataParallel", "module"),  # FSDP1; FSDP2 shards in place and needs no unwrapping
    ("DeepSpeedEngine", "module"),
    ("_FabricModule", "_forward_module"),  # Lightning Fabric
    ("_LightningModuleWrapperBase", "_forward_module"),  # Lightning strategies
    ("FlattenParamsWrapper", "_fpw_module"),
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
