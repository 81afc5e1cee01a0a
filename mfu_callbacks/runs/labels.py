"""A short name for each run named on the command line, for tables and legends."""

from __future__ import annotations

from pathlib import Path

# Files every run of a kind names alike: the run is named by their folder instead.
_GENERIC_NAMES = {"mfu_summary.json", "metrics.csv", "trainer_state.json", "files"}


def default_labels(paths: list[str]) -> list[str]:
    """A short name per run: the file or folder name (the folder's for files with generic names), with
    parent folders added where names repeat ("a/version_0", "b/version_0")."""
    parts = []
    for path in paths:
        file = Path(path)
        if file.name in _GENERIC_NAMES or file.suffix == ".wandb":
            file = file.parent
        parts.append(file.parts or (str(path),))
    labels = [names[-1] for names in parts]
    for depth in (2, 3, 4):
        repeated = {label for label in labels if labels.count(label) > 1}
        labels = [
            "/".join(names[-depth:]) if label in repeated else label for label, names in zip(labels, parts)
        ]
    repeated = {label for label in labels if labels.count(label) > 1}
    return [f"{label}#{index + 1}" if label in repeated else label for index, label in enumerate(labels)]
