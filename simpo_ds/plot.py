"""Training curves and a one-page report from ``OUTPUT_DIR/metrics.jsonl``.

    python -m simpo_ds.plot OUTPUT_DIR [--config recipe.yaml] [--title TEXT]

writes::

    OUTPUT_DIR/plots/loss.png           train and eval SimPO loss
    OUTPUT_DIR/plots/accuracy.png       rewards/accuracies (train and eval)
    OUTPUT_DIR/plots/margins.png        rewards/margins (train and eval)
    OUTPUT_DIR/plots/logps.png          logps/chosen vs logps/rejected (train and eval)
    OUTPUT_DIR/plots/throughput.png     tokens_per_s (train)
    OUTPUT_DIR/plots/overview.png       all of the above on one figure
    OUTPUT_DIR/report.md                config, first vs last eval, last train metrics, the plots

The run config comes from ``OUTPUT_DIR/run_config.yaml`` (the trainer writes the resolved config
there), else from ``--config``. Records are read as the trainer writes them (docs/metrics.md: one JSON object per line
with ``step``, ``split`` = train/eval/data, ``time`` and the metric names). ``metrics.jsonl`` is
appended to by every run (and resume) in the same directory: for each (split, step) the LAST record
wins, so a resumed run plots as one curve. matplotlib uses the Agg backend (no display needed).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Optional

from simpo_ds.reporting import RUN_CONFIG

METRICS_FILE = "metrics.jsonl"
PLOTS_DIR = "plots"
REPORT_FILE = "report.md"

# (file stem, title, [(metric, label)], y label) -- one panel each
PANELS = [
    ("loss", "Loss", [("loss", "loss"), ("sft_loss", "sft_loss")], "loss"),
    ("accuracy", "Reward accuracy (chosen beats rejected)", [("rewards/accuracies", "accuracy")], "fraction of pairs"),
    ("margins", "Reward margin  β·(r_chosen − r_rejected)", [("rewards/margins", "margin")], "reward"),
    (
        "logps",
        "Average log-prob per answer token",
        [("logps/chosen", "chosen"), ("logps/rejected", "rejected")],
        "log-prob / token",
    ),
    ("throughput", "Training throughput", [("tokens_per_s", "tokens/s")], "real tokens / s (all ranks)"),
]
SPLIT_COLOR = {"train": "tab:blue", "eval": "tab:orange"}
KEY_COLORS = ["tab:blue", "tab:red", "tab:green", "tab:purple"]
SPLIT_STYLE = {"train": dict(linestyle="-", marker=None, alpha=0.85), "eval": dict(linestyle="--", marker="o")}
# metrics in the report table, in this order
REPORT_METRICS = [
    "loss",
    "rewards/accuracies",
    "rewards/margins",
    "rewards/chosen",
    "rewards/rejected",
    "logps/chosen",
    "logps/rejected",
    "sft_loss",
]


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------
def read_metrics(path: str | Path) -> dict[str, list[dict]]:
    """``metrics.jsonl`` -> ``{"train": [...], "eval": [...], "data": [...]}``, each sorted by step.

    For train/eval, the last record of each step wins (reruns and resumes append to the file);
    "data" records (dataset statistics, written at setup) are kept in file order, last run only.
    Blank or truncated lines (a run killed mid-write) are skipped.
    """
    by_key: dict[tuple[str, int], dict] = {}
    data: list[dict] = []
    previous_split = None
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict) or "split" not in record:
            continue
        split = record["split"]
        if split == "data":
            if previous_split not in (None, "data"):
                data = []  # a new run starts: keep only its dataset records
            data.append(record)
        else:
            by_key[(split, int(record.get("step", 0)))] = record
        previous_split = split
    out: dict[str, list[dict]] = {"train": [], "eval": [], "data": data}
    for (split, _), record in sorted(by_key.items(), key=lambda kv: kv[0][1]):
        out.setdefault(split, []).append(record)
    return out


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``key`` over ``records``, skipping missing and non-finite values."""
    steps, values = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v):
            steps.append(r["step"])
            values.append(float(v))
    return steps, values


def load_config(output_dir: Path, recipe: Optional[str]) -> tuple[dict, str]:
    """(config dict, where it came from): ``OUTPUT_DIR/run_config.yaml`` first, then ``recipe``."""
    import yaml

    for path, label in ((output_dir / RUN_CONFIG, RUN_CONFIG), (Path(recipe) if recipe else None, recipe)):
        if path is not None and path.is_file():
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            if isinstance(loaded, dict):
                return loaded, str(label)
    return {}, ""


# ---------------------------------------------------------------------------------------------
# plotting
# ---------------------------------------------------------------------------------------------
def _draw_panel(ax, metrics: dict[str, list[dict]], title: str, keys: list, ylabel: str) -> bool:
    """Draw one panel on ``ax`` (metrics without any value are left out); False when empty."""
    drawn = False
    keys = [(key, label) for key, label in keys if any(series(metrics.get(s, []), key)[0] for s in ("train", "eval"))]
    for k, (key, label) in enumerate(keys):
        for split in ("train", "eval"):
            steps, values = series(metrics.get(split, []), key)
            if not steps:
                continue
            style = dict(SPLIT_STYLE[split])
            if split == "train" and len(steps) == 1:
                style["marker"] = "o"
            # one metric: colour = split; several (chosen vs rejected): colour = metric, style = split
            color = SPLIT_COLOR[split] if len(keys) == 1 else KEY_COLORS[k % len(KEY_COLORS)]
            name = f"{label} ({split})" if len(keys) > 1 else split
            ax.plot(steps, values, color=color, label=name, **style)
            drawn = True
    if keys and keys[0][0] == "rewards/accuracies":
        ax.axhline(0.5, color="gray", linewidth=0.8, linestyle=":", label="chance")
        ax.set_ylim(-0.02, 1.02)
    ax.set_title(title, fontsize=11)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=8)
    return drawn


def write_plots(metrics: dict[str, list[dict]], out_dir: Path) -> list[Path]:
    """One PNG per panel (skipping panels without data) and ``overview.png``; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, title, keys, ylabel in PANELS:
        fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
        if _draw_panel(ax, metrics, title, keys, ylabel):
            fig.tight_layout()
            path = out_dir / f"{stem}.png"
            fig.savefig(path)
            written.append(path)
        plt.close(fig)
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.4), dpi=90)
    for ax, (_, title, keys, ylabel) in zip(axes.flat, PANELS):
        _draw_panel(ax, metrics, title, keys, ylabel)
    axes.flat[-1].axis("off")
    _summary_text(axes.flat[-1], metrics)
    fig.tight_layout()
    path = out_dir / "overview.png"
    fig.savefig(path)
    plt.close(fig)
    written.append(path)
    return written


def _summary_text(ax, metrics: dict[str, list[dict]]) -> None:
    """The first vs last eval numbers as text in the spare panel of the overview."""
    evals = metrics.get("eval", [])
    lines = []
    if evals:
        first, last = evals[0], evals[-1]
        lines.append(f"eval at step {first['step']} -> step {last['step']}")
        for key in ("rewards/accuracies", "rewards/margins", "loss"):
            a, b = first.get(key), last.get(key)
            if isinstance(a, (int, float)) and isinstance(b, (int, float)):
                lines.append(f"{key}: {a:.3f} -> {b:.3f}")
    train = metrics.get("train", [])
    if train:
        _, speed = series(train, "tokens_per_s")
        if speed:
            lines.append(f"median train throughput: {sorted(speed)[len(speed) // 2]:.0f} tokens/s")
    ax.text(0.02, 0.95, "\n".join(lines) or "no eval records", va="top", family="monospace", fontsize=11)


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if value is None:
        return "–"
    return str(value)


def _config_section(config: dict, source: str) -> list[str]:
    if not config:
        return ["_No config found (pass `--config recipe.yaml`)._", ""]
    lines = [f"From `{source}`:", "", "| key | value |", "|---|---|"]
    lines += [f"| `{k}` | `{_fmt(v)}` |" for k, v in config.items()]
    return lines + [""]


def _eval_section(evals: list[dict]) -> list[str]:
    if not evals:
        return ["_No eval records (set `eval_data`; `eval_on_start: true` gives the base model's numbers)._", ""]
    first, last = evals[0], evals[-1]
    lines = [
        f"| metric | step {first['step']}{' (base model)' if first['step'] == 0 else ''} | step {last['step']} |",
        "|---|---|---|",
    ]
    lines += [f"| `{k}` | {_fmt(first.get(k))} | {_fmt(last.get(k))} |" for k in REPORT_METRICS if k in last]
    return lines + [""]


def _train_section(train: list[dict]) -> list[str]:
    if not train:
        return ["_No train records._", ""]
    last = train[-1]
    keys = REPORT_METRICS + ["lr", "grad_norm", "tokens_per_s", "pack_efficiency", "step_time_s", "mem/peak_gb"]
    lines = [f"Last record (step {last['step']}, epoch {_fmt(last.get('epoch'))}):", ""]
    lines += ["| metric | value |", "|---|---|"]
    lines += [f"| `{k}` | {_fmt(last.get(k))} |" for k in keys if k in last]
    return lines + [""]


def _data_section(data: list[dict]) -> list[str]:
    if not data:
        return []
    lines = ["## Data", "", "| split | rows | kept | dropped |", "|---|---|---|---|"]
    for r in data:
        dropped = ", ".join(f"{k}: {v}" for k, v in (r.get("dropped") or {}).items()) or "0"
        lines.append(f"| {r.get('split_name', '?')} | {r.get('rows', '?')} | {r.get('kept', '?')} | {dropped} |")
    return lines + [""]


def _duration(metrics: dict[str, list[dict]]) -> Optional[float]:
    times = [r["time"] for split in ("data", "train", "eval") for r in metrics.get(split, []) if "time" in r]
    return max(times) - min(times) if len(times) > 1 else None


def write_report(output_dir: Path, metrics: dict[str, list[dict]], plots: list[Path], config: dict,
                 config_source: str, title: str) -> Path:
    """Write ``output_dir/report.md`` (plots linked relative to it) and return its path."""
    duration = _duration(metrics)
    lines = [f"# {title}", ""]
    if duration is not None:
        lines += [f"Run time (first to last record): {duration / 60:.1f} min.", ""]
    lines += ["## Eval (held-out pairs): first vs last", ""] + _eval_section(metrics.get("eval", []))
    lines += ["## Train", ""] + _train_section(metrics.get("train", []))
    lines += ["## Curves", ""]
    lines += [f"![{p.stem}]({p.relative_to(output_dir).as_posix()})" for p in plots if p.stem != "overview"]
    lines += [""] + _data_section(metrics.get("data", []))
    lines += ["## Config", ""] + _config_section(config, config_source)
    path = output_dir / REPORT_FILE
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------
def make_report(output_dir: str | Path, recipe: Optional[str] = None, title: Optional[str] = None) -> dict:
    """Plots + report for ``output_dir``; returns ``{"plots": [paths], "report": path}``."""
    output_dir = Path(output_dir)
    metrics_path = output_dir / METRICS_FILE
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{metrics_path}: no such file (is {output_dir} a simpo-ds output_dir?)")
    metrics = read_metrics(metrics_path)
    plots = write_plots(metrics, output_dir / PLOTS_DIR)
    config, source = load_config(output_dir, recipe)
    report = write_report(output_dir, metrics, plots, config, source, title or f"simpo-ds run: {output_dir}")
    return {"plots": plots, "report": report}


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m simpo_ds.plot OUTPUT_DIR [--config recipe.yaml] [--title TEXT]``."""
    parser = argparse.ArgumentParser(prog="simpo-ds plot", description="PNG curves and report.md from metrics.jsonl")
    parser.add_argument("output_dir", help="the run's output_dir (holds metrics.jsonl)")
    parser.add_argument("--config", help="recipe to show when output_dir has no run_config.yaml")
    parser.add_argument("--title", help="report title")
    args = parser.parse_args(argv)
    try:
        out = make_report(args.output_dir, args.config, args.title)
    except FileNotFoundError as err:
        print(f"simpo-ds plot: error: {err}")
        return 2
    for path in out["plots"]:
        print(f"plot:   {path}")
    print(f"report: {out['report']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
