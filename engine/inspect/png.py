"""PNG heatmaps with matplotlib (the optional `plot` extra): score maps and per-head attention matrices."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from engine.capture.head_labels import top_heads
from engine.inspect.dump import AttentionDump

MISSING = ("--png needs matplotlib, the optional 'plot' extra: `make setup` installs it in a checkout; "
           "elsewhere pip install 'kvmini[plot]' (or pip install matplotlib)")
MAX_TICK_LABELS = 64  # beyond this many tokens, every n-th label (and the position with it)


def require_matplotlib() -> None:
    """Fail early, before a model run, when the extra is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError(MISSING) from None


def default_png_heads(stats) -> list[tuple[int, int]]:
    """The best head for induction, previous token, duplicate token and first token (those scored)."""
    names = [n for n in ("induction", "prev", "duplicate", "sink") if n in stats.scores()]
    heads = [top_heads(stats, name, 1)[0][:2] for name in names]
    return list(dict.fromkeys(heads))


def write_pngs(dump: AttentionDump, out_dir: str | Path, heads: list[tuple[int, int]] | None = None) -> list[Path]:
    """`scores.png` (layer x head maps of induction and previous-token scores) and `L{l}_H{h}.png` per head."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")  # files only; never open a window
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = dump.stats if dump.stats is not None else dump.recompute_stats()
    written = [_score_maps(plt, stats, out_dir / "scores.png")]
    for layer, head in heads or default_png_heads(stats):
        written.append(_head_matrix(plt, dump, layer, head, out_dir / f"L{layer}_H{head}.png"))
    return written


def _score_maps(plt, stats, path: Path) -> Path:
    scores = stats.scores()
    names = [(n, t) for n, t in (("induction", "induction score"), ("prev", "previous-token score"))
             if n in scores] or [(n, n) for n in list(scores)[:2]]
    fig, axes = plt.subplots(1, len(names), figsize=(2 + 0.45 * len(stats.heads) * len(names),
                                                     1.5 + 0.22 * len(stats.layers)), squeeze=False)
    for ax, (name, title) in zip(axes[0], names):
        im = ax.imshow(scores[name], cmap="Blues", vmin=0, vmax=1, aspect="auto")
        ax.set_title(title)
        ax.set_xticks(range(len(stats.heads)), [str(h) for h in stats.heads])
        ax.set_yticks(range(len(stats.layers)), [str(layer) for layer in stats.layers])
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _head_matrix(plt, dump: AttentionDump, layer: int, head: int, path: Path) -> Path:
    from matplotlib.colors import PowerNorm

    m = dump.matrix(layer, head)
    n_rows, n_cols = m.shape
    mask = np.arange(n_cols)[None, :] > dump.query_positions[:, None]  # keys after the query do not exist
    size = min(14.0, 3 + 0.16 * max(n_rows, n_cols))
    fig, ax = plt.subplots(figsize=(size, size * max(n_rows, 1) / max(n_cols, 1) + 1))
    im = ax.imshow(np.ma.masked_array(m, mask), cmap="Blues", norm=PowerNorm(0.5, 0, 1), aspect="auto",
                   interpolation="nearest")
    ax.set_title(f"layer {layer} head {head}: rows = queries, columns = keys (colour on a square-root scale)")
    show = [repr(t)[1:-1] for t in dump.token_texts]
    if n_cols <= MAX_TICK_LABELS:
        ax.set_xticks(range(n_cols), show[:n_cols], rotation=90, fontsize=7)
        ax.set_yticks(range(n_rows), [show[q] for q in dump.query_positions], fontsize=7)
    else:  # every n-th token, with its position, truncated: readable at any length
        def tick(i: int) -> str:
            text = show[i] if len(show[i]) <= 10 else show[i][:9] + "\u2026"
            return f"{i} {text}"

        every = -(-n_cols // MAX_TICK_LABELS)
        ax.set_xticks(range(0, n_cols, every), [tick(i) for i in range(0, n_cols, every)], rotation=90, fontsize=6)
        every_r = -(-n_rows // MAX_TICK_LABELS)
        rows = range(0, n_rows, every_r)
        ax.set_yticks(rows, [tick(int(dump.query_positions[s])) for s in rows], fontsize=6)
        ax.set_xlabel(f"key (a label every {every} positions)")
        ax.set_ylabel("query")
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
