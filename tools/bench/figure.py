"""bench/profile.png: horizontal bars of the time of each stage of the profile (report.profile_rows), one
panel per section (training iteration, deploy forward, make segment), each GEMM stage's ceiling (its FLOPs
at the sgemm GFLOP/s) marked on its bar."""
import atomic
from tools.bench import report


def draw(r, path):
    """Write the figure of run r to path (PNG); returns path, or None when r has no profile."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = report.profile_rows(r)
    if not rows:
        return None
    sections = []
    for section, *_ in rows:
        if section not in sections:
            sections.append(section)
    heights = [sum(1 for row in rows if row[0] == s) for s in sections]
    fig, axes = plt.subplots(len(sections), 1, figsize=(9, 1.2 + 0.24 * sum(heights) + 0.6 * len(sections)),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, section in zip(axes[:, 0], sections):
        part = [row for row in rows if row[0] == section]
        labels = [row[1] for row in part]
        secs = [max(0.0, row[2] or 0.0) for row in part]
        y = list(range(len(part)))[::-1]
        colors = ["#4c72b0" if i else "#8c8c8c" for i in range(len(part))]
        ax.barh(y, secs, color=colors, height=0.7)
        marked = False
        for yi, row in zip(y, part):
            if row[3]:
                ax.plot([row[3], row[3]], [yi - 0.42, yi + 0.42], color="#c44e52", lw=2.2,
                        label=None if marked else "ceiling: FLOPs / sgemm GFLOP/s")
                marked = True
        for yi, s, row in zip(y, secs, part):   # the measured value, also where a derived part is negative
            ax.text(s, yi, " %.3f s" % (row[2] or 0.0), va="center", fontsize=7)
        ax.set_yticks(y)
        ax.set_yticklabels(labels, fontsize=7)
        ax.set_xlim(0, max(secs + [row[3] or 0 for row in part]) * 1.18 or 1)
        ax.set_title(section, fontsize=9, loc="left")
        ax.tick_params(axis="x", labelsize=7)
        if marked:
            ax.legend(fontsize=7, loc="lower right")
    axes[-1, 0].set_xlabel("seconds (median)", fontsize=8)
    m = r.get("machine", {})
    fig.suptitle("TS-FCN where the time goes: %s, %s threads, sgemm %.0f GFLOP/s, load %s%s%s" % (
        m.get("cpu_model", "?"), m.get("threads_used", "?"), r.get("sgemm_gflops") or 0, r.get("loadavg_start"),
        " (QUICK)" if r.get("quick") else "",
        "\nSHARED MACHINE: this run's slice of the CPUs, not the machine's figures" if report.shared_warning(r) else ""),
        fontsize=9)
    fig.tight_layout()
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path
