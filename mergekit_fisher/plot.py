"""Heatmap pictures (``inspect --plot``, ``compare --plot``) with the optional matplotlib.

Every picture is a column of panels, each a matrix with labelled rows and columns, drawn on a
log colour scale (Fisher values span many decades) or a linear one (shares, overlaps).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mergekit_fisher.errors import FisherError


@dataclass(frozen=True)
class Panel:
    """One heatmap: ``values`` [rows, columns]; NaN and (on a log scale) zeros are blank."""

    values: torch.Tensor
    rows: list[str]
    columns: list[str] | None
    title: str
    log: bool = True
    label: str = ""


def _pyplot():  # type: ignore[no-untyped-def]
    try:
        import matplotlib
    except ImportError:
        raise FisherError('pictures need matplotlib: pip install "mergekit-fisher[demo]"') from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _draw(ax, fig, panel: Panel) -> None:  # type: ignore[no-untyped-def]
    from matplotlib.colors import LogNorm, Normalize

    values = panel.values.double().clone()
    if panel.log:
        values[values <= 0] = float("nan")
    finite = values[torch.isfinite(values)]
    low = float(finite.min()) if finite.numel() else 1.0
    high = float(finite.max()) if finite.numel() else 1.0
    norm = (
        LogNorm(vmin=low, vmax=max(high, low * 1.0001))
        if panel.log
        else Normalize(vmin=min(low, 0.0), vmax=max(high, 1e-12))
    )
    image = ax.imshow(values.numpy(), aspect="auto", interpolation="nearest", norm=norm)
    ax.set_title(panel.title)
    ax.set_yticks(range(len(panel.rows)), panel.rows, fontsize=7)
    if panel.columns is not None:
        ax.set_xticks(range(len(panel.columns)), panel.columns, rotation=45, ha="right")
    fig.colorbar(image, ax=ax, label=panel.label)


def save_panels(panels: list[Panel], path: str | Path) -> Path:
    """Draw ``panels`` one above the other into ``path`` (a .png or any matplotlib format)."""
    plt = _pyplot()
    height = sum(max(2.5, 0.22 * len(p.rows) + 1.5) for p in panels)
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, height), squeeze=False)
    for ax, panel in zip(axes[:, 0], panels):
        _draw(ax, fig, panel)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
