"""Which part of a model a matmul belongs to, for the per-component FLOP breakdown.

Decided from the module path and the classes on the module stack when the matmul runs. The
rules are data: the first rule whose test matches names the component.
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
    parts = path.lower().split(".") if path else []
    if any(part.startswith("lora_") for part in parts):
        return ADAPTERS
    leaf = parts[-1] if parts else ""
    if any("shared_expert" in part for part in parts) and leaf != "shared_expert_gate":
        return SHARED_EXPERTS
    if leaf in _ROUTER_LEAVES or any("router" in part for part in parts):
        return ROUTER
    if any("expert" in part for part in parts):  # routed experts (shared ones are named above)
        return EXPERTS
    if _is_attention(parts, class_names):
        return ATTENTION_SCORES if activation_matmul else ATTENTION_PROJECTIONS
    if any(part in _HEAD_NAMES for part in parts):
        return HEAD
    if any(any(key in part for key in _MLP_PARTS) for part in parts) or (
        len(parts) > 1 and parts[-2] == "output"
    ):
        return MLP
    if any("embed" in part or "patch" in part or "stem" in part for part in parts):
        return EMBEDDINGS
    return OTHER
