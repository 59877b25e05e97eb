"""What every plot does last."""

from __future__ import annotations

import matplotlib.pyplot as plt


def finish(fig: plt.Figure, *, show: bool | None, save: str | None) -> plt.Figure:
    """Save the figure when asked, show it unless only saving, and return it."""
    if save is not None:
        fig.savefig(save, dpi=120)
    if show or (show is None and save is None):
        plt.show()
    return fig
