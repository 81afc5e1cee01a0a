"""Which part of a model a matmul belongs to, for the per-component FLOP breakdown.

Decided from the module path and the classes on the module stack when the matmul runs. The
rules are data: the first rule whose test matches names the component. Wrappers that PEFT puts
around a module (``base_layer``, ``modules_to_save``, ``original_module``) do not change what it
computes: a wrapped router is still the router, its adapters are ``adapters``.
"""

from __future__ import annotations

from collections.abc import Sequence

ADAPTERS = "adapters"
ATTENTION_PROJECTIONS = "attention_projections"
ATTENTION_SCORES = "attention_scores"
MLP = "mlp"
EXPERTS = "experts"
SHARED_EXPERTS = "shared_experts"
ROUTER = "router"
HEAD = "head"
EMBEDDINGS = "embeddings"
OTHER = "other"

_HEAD_NAMES = frozenset(
    {
        "lm_head",
        "classifier",
        "score",
        "qa_outputs",
        "pooler",
        "head",
        "heads",
        "cls",
        "proj_out",
        "output_projection",
        "fc_out",
    }
)
_MLP_PARTS = (
    "mlp",
    "ffn",
    "feed_forward",
    "feedforward",
    "intermediate",
    "fc1",
    "fc2",
    "c_fc",
    "dense_h_to_4h",
    "dense_4h_to_h",
    "wi",
    "wo",
)
_ROUTER_LEAVES = frozenset({"gate", "router", "shared_expert_gate", "switch"})
# Embeddings whose names lack "embed": GPT-2's token and position tables, T5's and BART's shared one.
_EMBEDDING_NAMES = frozenset({"wte", "wpe", "shared"})
# Class names of routers whose path says nothing (MixtralTopKRouter, DeepseekV3TopkRouter, MoEGate).
_ROUTER_CLASS_SUFFIXES = ("router", "gate")
# Path parts that PEFT inserts between a module and what it wraps: the wrapped part computes what the module did.
_WRAPPER_PARTS = frozenset({"base_layer"})
# Path parts after which PEFT keeps copies of one module (per adapter name, or the original).
_COPY_PARTS = frozenset({"modules_to_save", "original_module"})


def _logical_parts(path: str) -> list[str]:
    """The path's parts without PEFT's wrapper parts: ``mlp.gate.base_layer`` is ``mlp.gate``."""
    parts: list[str] = []
    for part in path.lower().split(".") if path else []:
        if part in _COPY_PARTS:
            break
        if part not in _WRAPPER_PARTS:
            parts.append(part)
    return parts


def _is_head(part: str) -> bool:
    """An output head by name: lm_head, TRL's v_head / value_head / reward_head, a pre_classifier."""
    return part in _HEAD_NAMES or part.endswith(("_head", "classifier"))


def windowed_scores(slot: int) -> str:
    """While tracing: the scores and values of layers with the engine's attention window ``slot``,
    kept apart until their squares are moved to that window's feature, then counted as ATTENTION_SCORES."""
    return f"{ATTENTION_SCORES}@window{slot}"


def _is_attention(parts: Sequence[str], class_names: Sequence[str]) -> bool:
    return any("attn" in p or "attention" in p for p in parts) or any(
        "attention" in c.lower() for c in class_names
    )


def classify(path: str, class_names: Sequence[str], *, activation_matmul: bool) -> str:
    """Name the component of a matmul run inside module ``path`` (dotted, as in ``named_modules``).

    ``activation_matmul`` is true when neither operand is a parameter: in an attention module that
    is the scores or the values product.
    """
    parts = _logical_parts(path)
    if any(part.startswith("lora_") for part in parts):
        return ADAPTERS
    leaf = parts[-1] if parts else ""
    if any("shared_expert" in part for part in parts) and leaf != "shared_expert_gate":
        return SHARED_EXPERTS
    if (
        leaf in _ROUTER_LEAVES
        or any("router" in part for part in parts)
        or (class_names and class_names[-1].lower().endswith(_ROUTER_CLASS_SUFFIXES))
    ):
        return ROUTER
    if any("expert" in part for part in parts):  # routed experts (shared ones are named above)
        return EXPERTS
    if _is_attention(parts, class_names):
        return ATTENTION_SCORES if activation_matmul else ATTENTION_PROJECTIONS
    if any(_is_head(part) for part in parts):
        return HEAD
    if any(any(key in part for key in _MLP_PARTS) for part in parts) or (
        len(parts) > 1 and parts[-2] == "output"
    ):
        return MLP
    if any(
        part in _EMBEDDING_NAMES or "embed" in part or "patch" in part or "stem" in part for part in parts
    ):
        return EMBEDDINGS
    return OTHER


def component_of_parameter(owner_path: str) -> str:
    """The component of a matmul that uses the parameter of module ``owner_path`` outside that module's
    forward (a fused cross-entropy head multiplying by ``lm_head.weight``): what the owner computes.

    An embedding's weight used in a matmul is the output projection of tied embeddings: the head
    (a lookup is no matmul, so an embedding's own forward never gets here).
    """
    component = classify(owner_path, (), activation_matmul=False)
    return HEAD if component == EMBEDDINGS else component
