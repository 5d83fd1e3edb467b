"""Every chart of the app: pure functions from results to plotly figures (no state, no I/O)."""

from __future__ import annotations

import plotly.graph_objects as go


def _floor_line(fig: go.Figure, y: float) -> None:
    """The floor (a random face from the base model) as a dotted line at distance ``y``."""
    fig.add_hline(
        y=y,
        line=dict(color="#868e96", width=2, dash="dot"),
        annotation_text="random face from the base model (floor)",
        annotation_position="top left",
    )


def _threshold_line(fig: go.Figure, threshold: float) -> None:
    """dlib's same-person threshold as a thin line."""
    fig.add_hline(
        y=threshold,
        line=dict(color="#495057", width=1),
        annotation_text=f"dlib: same person below {threshold}",
        annotation_position="bottom left",
    )


def _layout(fig: go.Figure, title: str, x: str, y: str) -> go.Figure:
    fig.update_layout(
        title=title,
        xaxis_title=x,
        yaxis_title=y,
        height=300,
        margin=dict(l=50, r=20, t=50, b=40),
        template="plotly_white",
        legend=dict(orientation="h", y=-0.25),
    )
    return fig


def loss_curve(
    steps: list[int], losses: list[float], instance: list[float] | None = None, total: int | None = None
) -> go.Figure:
    """Training loss per step (and its photos-only part), with a running mean to read the trend."""
    fig = go.Figure()
    fig.add_scatter(
        x=steps, y=losses, mode="lines", name="loss (photos + class images)", line=dict(width=1, color="#9aa5b1")
    )
    if len(losses) >= 5:
        k = max(5, len(losses) // 10)
        run = [
            sum(losses[max(0, i - k + 1) : i + 1]) / len(losses[max(0, i - k + 1) : i + 1]) for i in range(len(losses))
        ]
        fig.add_scatter(
            x=steps, y=run, mode="lines", name=f"running mean ({k} steps)", line=dict(width=2.5, color="#3b5bdb")
        )
    if instance:
        fig.add_scatter(
            x=steps, y=instance, mode="markers", name="photos part", marker=dict(size=3, color="#e8590c"), opacity=0.5
        )
    if total:
        fig.update_xaxes(range=[0, total])
    return _layout(fig, "Fine-tune loss (noise-prediction error; lower = fits your photos better)", "step", "loss")


def attack_curve(
    steps: list[int],
    attack: list[float | None],
    ceiling: list[float | None],
    floor: float | None,
    total: int | None = None,
    threshold: float = 0.6,
) -> go.Figure:
    """The live attack over fine-tuning steps: dlib identity distance to the visitor's photos of the
    attacker's reconstruction, of the LoRA's own samples with its true trigger (the ceiling) and of a
    random base-model face (the floor, flat), with dlib's same-person threshold. ``None`` = not measured."""
    fig = go.Figure()
    fig.add_scatter(
        x=steps,
        y=attack,
        mode="lines+markers",
        name="attacker's reconstruction (weights only)",
        line=dict(width=2.5, color="#c92a2a"),
        connectgaps=True,
    )
    fig.add_scatter(
        x=steps,
        y=ceiling,
        mode="lines+markers",
        name="your LoRA with its secret trigger (ceiling)",
        line=dict(width=2, color="#2b8a3e", dash="dash"),
        connectgaps=True,
    )
    if floor is not None:
        _floor_line(fig, floor)
    _threshold_line(fig, threshold)
    if total:
        fig.update_xaxes(range=[0, total])
    return _layout(fig, "Identity distance to your photos (lower = closer to you)", "fine-tuning step", "dlib distance")


def _log_ticks(lo: float, hi: float) -> list[float]:
    """1-2-3-5 tick positions (log10 values) inside [lo, hi]; at least the two ends."""
    import math

    ticks = [math.log10(m * 10.0**d) for d in range(math.floor(lo) - 1, math.ceil(hi) + 1) for m in (1, 2, 3, 5)]
    ticks = [t for t in ticks if lo - 1e-9 <= t <= hi + 1e-9]
    return ticks if len(ticks) >= 2 else [lo, hi]


def _pct(v: float) -> str:
    return f"{100 * v:.3g} %"


def layer_heatmap(
    matrix,
    layer_names: list[str],
    steps: list[int],
    groups: list[str],
    title: str | None = None,
    value_label: str = "relative change ||ΔW|| / ||W₀||",
) -> go.Figure:
    """Per-layer change over training steps (``matrix``: layers x steps, layers in the UNet's forward
    order): one column per layer, left to right from the UNet's input to its output, grouped by block
    (labels on top, separators between blocks); one row per step. Colour on a log scale (a zero
    change is drawn at the smallest colour); the hover shows the layer's name and the exact value."""
    import numpy as np

    m = np.asarray(matrix, dtype=float).reshape(len(layer_names), len(steps))
    pos = m[np.isfinite(m) & (m > 0)]
    lo = float(np.log10(pos.min())) if pos.size else -6.0
    hi = float(np.log10(pos.max())) if pos.size else lo + 1
    hi = max(hi, lo + 1e-3)
    z = np.log10(np.clip(np.nan_to_num(m, posinf=10.0**hi), 10.0**lo, None)).T  # steps x layers
    custom = np.empty((len(steps), len(layer_names), 3), dtype=object)
    for j, name in enumerate(layer_names):
        custom[:, j, 0], custom[:, j, 1] = name, groups[j]
        custom[:, j, 2] = [_pct(v) for v in m[j]]
    ticks = _log_ticks(lo, hi)
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=list(range(len(layer_names))),
            y=[str(s) for s in steps],
            customdata=custom,
            colorscale="Viridis",
            zmin=lo,
            zmax=hi,
            colorbar=dict(
                title=dict(text="change<br>(log)", side="top"), tickvals=ticks, ticktext=[_pct(10.0**t) for t in ticks]
            ),
            hovertemplate="<b>%{customdata[0]}</b><br>block: %{customdata[1]}<br>after step %{y}<br>"
            + value_label
            + ": <b>%{customdata[2]}</b><extra></extra>",
        )
    )
    # blocks: a label over each run of equal groups, a white line between runs
    runs, start = [], 0
    for j in range(1, len(groups) + 1):
        if j == len(groups) or groups[j] != groups[start]:
            runs.append((groups[start], start, j - 1))
            start = j
    for g, a, b in runs:
        if a > 0:
            fig.add_vline(x=a - 0.5, line=dict(color="white", width=2))
        fig.add_annotation(
            x=(a + b) / 2,
            y=1.0,
            yref="paper",
            yanchor="bottom",
            text=g.replace("_blocks.", " ").replace("_block", ""),
            showarrow=False,
            font=dict(size=10),
            textangle=-30 if len(runs) > 6 else 0,
        )
    fig.update_xaxes(
        showticklabels=False,
        title_text=f"{len(layer_names)} layers, from the UNet's input (left) to its output (right)",
    )
    fig.update_yaxes(title_text="training step", type="category")
    fig.update_layout(
        title=dict(text=title or "How much each layer changed", y=0.98),
        template="plotly_white",
        height=220 + 18 * len(steps),
        margin=dict(l=60, r=20, t=90, b=50),
    )
    return fig


def swap_curve_plot(rows, title: str | None = None, threshold: float = 0.6) -> go.Figure:
    """Utility with only the k busiest layers kept: rows (k, n_layers, distance, floor) as
    ``core.layers.change.SwapRow`` or dicts; dlib distance of the samples with the true trigger to the
    private photos, beside the base model's floor and dlib's same-person threshold."""

    def get(r, key):
        return r[key] if isinstance(r, dict) else getattr(r, key)

    rows = sorted(rows, key=lambda r: get(r, "k"))
    ks, d = [get(r, "k") for r in rows], [get(r, "distance") for r in rows]
    n = get(rows[-1], "n_layers") if rows else 0
    fig = go.Figure()
    fig.add_scatter(
        x=ks,
        y=d,
        mode="lines+markers",
        name="fine-tune with only its k busiest layers (true trigger)",
        line=dict(width=2.5, color="#3b5bdb"),
        hovertemplate="%{x} busiest layers kept: distance <b>%{y:.3f}</b><extra></extra>",
    )
    if rows:
        _floor_line(fig, get(rows[-1], "floor"))
    _threshold_line(fig, threshold)
    if ks and ks[-1] == n:
        fig.add_annotation(x=n, y=d[-1], text=f"all {n} layers", showarrow=True, ay=-30)
    if ks and min(ks) >= 1:
        fig.update_xaxes(type="log")
    return _layout(
        fig,
        title or "Keep only the busiest layers: does the fine-tune still draw you?",
        f"busiest layers kept (of {n})",
        "dlib distance to your photos",
    )


DEFENSE_COLORS = {
    "weight_noise": "#1971c2",
    "prune": "#e8590c",
    "quantize": "#2f9e44",
    "rank_truncate": "#9c36b5",
    "dp_sgd": "#c92a2a",
}


def _defense_hover(r: dict) -> str:
    """A privacy-utility point's hover text: its strength, both distances with intervals, top-1 and top-5."""
    a, u = r["attack"], r["utility"]
    eps = f"<br>epsilon {r['epsilon']:.3g} per photo" if r.get("epsilon") is not None else ""
    return (
        f"<b>{r['label']}</b>{eps}<br>attack: distance {a['distance']:.3f} "
        f"[{a['distance_ci'][0]:.3f}, {a['distance_ci'][1]:.3f}], top-1 {a['top1']:.0%}, top-5 {a['top5']:.0%}"
        f"<br>LoRA with its trigger: distance {u['distance']:.3f} [{u['distance_ci'][0]:.3f}, "
        f"{u['distance_ci'][1]:.3f}], beats the floor for {u['beats_floor']:.0%} of the victims"
    )


def _add_floor(fig: go.Figure, flo: dict) -> None:
    """The floor (no LoRA, a random face from the base model) as a marked point, its two distances as
    dotted lines."""
    fx, fy = flo["utility"]["distance"], flo["attack"]["distance"]
    fig.add_scatter(
        x=[fx],
        y=[fy],
        mode="markers",
        name="floor: no LoRA, a random face from the base model",
        marker=dict(symbol="x", size=13, color="#868e96"),
        hovertext=[_defense_hover(flo)],
        hoverinfo="text",
    )
    fig.add_hline(
        y=fy,
        line=dict(color="#868e96", width=1.5, dash="dot"),
        annotation_text="attack no closer than a random face",
        annotation_position="bottom left",
    )
    fig.add_vline(
        x=fx,
        line=dict(color="#868e96", width=1.5, dash="dot"),
        annotation_text="LoRA no closer than a random face",
        annotation_position="bottom left",
    )


def privacy_utility_plot(rows, title: str | None = None) -> go.Figure:
    """The privacy-utility study (rows as written by :mod:`core.studies.defenses`): one line per defense
    through its strengths (weakest first, starting at the undefended LoRA); x = dlib distance of the
    LoRA's own samples with its true trigger to the private photos (its utility: lower = it still draws
    the person), y = dlib distance of the attacker's reconstruction to them (higher = more private);
    the undefended LoRA and the floor (a random face from the base model) as marked points, the floor's
    two distances as dotted lines. The hover gives each point's strength, top-1 and intervals."""
    rows = list(rows)
    und = next((r for r in rows if r["defense"] == "none"), None)
    flo = next((r for r in rows if r["defense"] == "floor"), None)
    fig = go.Figure()
    groups: dict[str, list] = {}
    for r in rows:
        if r["defense"] not in ("none", "floor"):
            groups.setdefault(r["defense"], []).append(r)
    for name, pts in groups.items():
        pts = ([und] if und else []) + pts
        fig.add_scatter(
            x=[p["utility"]["distance"] for p in pts],
            y=[p["attack"]["distance"] for p in pts],
            mode="lines+markers+text",
            name=pts[-1].get("title", name),
            text=[
                ""
                if p["defense"] == "none"
                else p["short"] + (f", ε {p['epsilon']:.2g}" if p.get("epsilon") is not None else "")
                for p in pts
            ],
            textposition="top center",
            textfont=dict(size=9, color=DEFENSE_COLORS.get(name, "#495057")),
            line=dict(width=2, color=DEFENSE_COLORS.get(name, "#495057")),
            marker=dict(size=7),
            hovertext=[_defense_hover(p) for p in pts],
            hoverinfo="text",
        )
    if und:
        fig.add_scatter(
            x=[und["utility"]["distance"]],
            y=[und["attack"]["distance"]],
            mode="markers",
            name="undefended LoRA",
            marker=dict(symbol="star", size=16, color="#212529"),
            hovertext=[_defense_hover(und)],
            hoverinfo="text",
        )
    if flo:
        _add_floor(fig, flo)
    fig = _layout(
        fig,
        title or "What each defense costs: privacy against utility (best: top left)",
        "your LoRA with its trigger: distance to the photos (lower = still draws the person)",
        "attacker's reconstruction: distance to the photos (higher = more private)",
    )
    fig.update_layout(
        height=560, margin=dict(l=60, r=20, t=50, b=130), legend=dict(orientation="h", y=-0.2, yanchor="top")
    )
    return fig


def membership_roc_plot(r: dict, title: str | None = None) -> go.Figure:
    """ROC curves of the membership study (``core.studies.membership`` report): for the default-recipe
    LoRAs, the LoRA's training photos against unseen photos of the same person and against other
    people's photos, with each AUC and its interval; the calibrated threshold as a marked point."""
    c = r["calibration"]
    row = r["rows"][str(c["steps"])]
    fig = go.Figure()
    for key, name, color in (
        ("unseen", "vs unseen photos of the same person", "#c92a2a"),
        ("others", "vs other people's photos", "#1971c2"),
    ):
        fpr, tpr = row[f"roc_{key}"]
        a = row[f"auc_{key}"]
        fig.add_scatter(
            x=fpr,
            y=tpr,
            mode="lines",
            line=dict(width=2.5, color=color, shape="hv"),
            name=f"training photos {name}: AUC {a['auc']:.3f} [{a['ci'][0]:.3f}, {a['ci'][1]:.3f}]",
        )
    fig.add_scatter(
        x=[0, 1], y=[0, 1], mode="lines", line=dict(color="#adb5bd", dash="dot", width=1), name="chance (AUC 0.5)"
    )
    fig.add_scatter(
        x=[row["fpr_unseen"]["rate"]],
        y=[row["tpr"]["rate"]],
        mode="markers",
        marker=dict(symbol="star", size=14, color="#212529"),
        name=f"the app's threshold (calibrated at {c['fpr_target']:.0%} false positives on other people's LoRAs)",
    )
    fig = _layout(
        fig,
        title or f"Was this photo in the LoRA's training set? ({r['n_victims']} victims, {c['steps']}-step LoRAs)",
        "false-positive rate (photos not in the training set flagged)",
        "true-positive rate (training photos flagged)",
    )
    fig.update_layout(
        height=460, margin=dict(l=60, r=20, t=50, b=120), legend=dict(orientation="h", y=-0.2, yanchor="top")
    )
    fig.update_xaxes(range=[0, 1])
    fig.update_yaxes(range=[0, 1.02])
    return fig


def cloaking_plot(r: dict, title: str | None = None) -> go.Figure:
    """The cloaking study (``core.studies.cloaking`` report): x = the cloak's budget (0 = no cloak), y =
    dlib distance to the victims' clean photos (higher = further from the person), with 95 % intervals;
    the LoRA's own samples with its trigger (blue) and the attacker's reconstruction (red), trained on
    cloaked photos (solid) and on cloaked-then-purified photos (dashed, starting at purification
    alone); the floor (a random face) dotted."""
    rows = r["rows"]
    by = lambda kind: sorted((x for x in rows if x["kind"] == kind), key=lambda x: x["budget"])
    clean = next(x for x in rows if x["kind"] == "clean")
    pur = next((x for x in rows if x["kind"] == "purified"), None)
    floor = next((x for x in rows if x["kind"] == "floor"), None)
    fig = go.Figure()
    series = [
        ("utility", "#1971c2", "your LoRA with its trigger"),
        ("attack", "#c92a2a", "the attacker's reconstruction"),
    ]
    for key, color, who in series:
        if clean.get(key) is None:
            continue
        for kind, start, dash, how in (
            ("cloaked", clean, "solid", "cloaked photos"),
            ("cloaked+purified", pur, "dash", "cloaked, then purified photos"),
        ):
            pts = ([start] if start else []) + by(kind)
            if not pts:
                continue
            d = [p[key]["distance"] for p in pts]
            fig.add_scatter(
                x=[p["budget"] or 0 for p in pts],
                y=d,
                mode="lines+markers",
                name=f"{who}: trained on {how}",
                line=dict(color=color, dash=dash, width=2.5 if dash == "solid" else 2),
                error_y=dict(
                    type="data",
                    symmetric=False,
                    array=[p[key]["distance_ci"][1] - v for p, v in zip(pts, d)],
                    arrayminus=[v - p[key]["distance_ci"][0] for p, v in zip(pts, d)],
                    thickness=1,
                ),
                hovertext=[p["label"] for p in pts],
                hoverinfo="text+y",
            )
    if floor:
        _floor_line(fig, floor["utility"]["distance"])
    budgets = sorted({x["budget"] for x in rows if x["budget"] is not None})
    fig.update_xaxes(tickvals=[0] + budgets, ticktext=["no cloak"] + [f"{b:g}/255" for b in budgets])
    fig = _layout(
        fig,
        title or f"Cloaked photos against a LoRA fine-tune ({r['n']} victims)",
        "cloak budget (largest change of any pixel value, 0-255 scale)",
        "dlib distance to the person's clean photos (higher = protected)",
    )
    fig.update_layout(
        height=480, margin=dict(l=60, r=20, t=50, b=130), legend=dict(orientation="h", y=-0.22, yanchor="top")
    )
    return fig
