"""Every chart of the app: pure functions from results to plotly figures (no state, no I/O)."""

from __future__ import annotations

import plotly.graph_objects as go


def _layout(fig: go.Figure, title: str, x: str, y: str) -> go.Figure:
    fig.update_layout(title=title, xaxis_title=x, yaxis_title=y, height=300, margin=dict(l=50, r=20, t=50, b=40),
                      template="plotly_white", legend=dict(orientation="h", y=-0.25))
    return fig


def loss_curve(steps: list[int], losses: list[float], instance: list[float] | None = None, total: int | None = None) -> go.Figure:
    """Training loss per step (and its photos-only part), with a running mean to read the trend."""
    fig = go.Figure()
    fig.add_scatter(x=steps, y=losses, mode="lines", name="loss (photos + class images)", line=dict(width=1, color="#9aa5b1"))
    if len(losses) >= 5:
        k = max(5, len(losses) // 10)
        run = [sum(losses[max(0, i - k + 1): i + 1]) / len(losses[max(0, i - k + 1): i + 1]) for i in range(len(losses))]
        fig.add_scatter(x=steps, y=run, mode="lines", name=f"running mean ({k} steps)", line=dict(width=2.5, color="#3b5bdb"))
    if instance:
        fig.add_scatter(x=steps, y=instance, mode="markers", name="photos part", marker=dict(size=3, color="#e8590c"), opacity=0.5)
    if total:
        fig.update_xaxes(range=[0, total])
    return _layout(fig, "Fine-tune loss (noise-prediction error; lower = fits your photos better)", "step", "loss")


def attack_curve(steps: list[int], attack: list[float | None], ceiling: list[float | None], floor: float | None,
                 total: int | None = None, threshold: float = 0.6) -> go.Figure:
    """The live attack over fine-tuning steps: dlib identity distance to the visitor's photos of the
    attacker's reconstruction, of the LoRA's own samples with its true trigger (the ceiling) and of a
    random base-model face (the floor, flat), with dlib's same-person threshold. ``None`` = not measured."""
    fig = go.Figure()
    fig.add_scatter(x=steps, y=attack, mode="lines+markers", name="attacker's reconstruction (weights only)",
                    line=dict(width=2.5, color="#c92a2a"), connectgaps=True)
    fig.add_scatter(x=steps, y=ceiling, mode="lines+markers", name="your LoRA with its secret trigger (ceiling)",
                    line=dict(width=2, color="#2b8a3e", dash="dash"), connectgaps=True)
    if floor is not None:
        fig.add_hline(y=floor, line=dict(color="#868e96", width=2, dash="dot"),
                      annotation_text="random face from the base model (floor)", annotation_position="top left")
    fig.add_hline(y=threshold, line=dict(color="#495057", width=1),
                  annotation_text=f"dlib: same person below {threshold}", annotation_position="bottom left")
    if total:
        fig.update_xaxes(range=[0, total])
    return _layout(fig, "Identity distance to your photos (lower = closer to you)", "fine-tuning step", "dlib distance")
