"""Analysis of finished runs and grids: loaders, paper-style tables, report figures, the report.

Reads what training wrote (run directories, grid directories, collected tables); training never
imports this package.
"""

from .figures import (
    attention_maps,
    bar_chart,
    forest_plot,
    layer_heatmaps,
    layer_lines,
    prediction_trajectory,
    save_figure,
    training_curves,
)
from .inputs import (
    MissingInput,
    ensure_collected,
    last_rollouts,
    load_one_run,
    load_tables,
    open_grid,
    open_runs,
)
from .report import write_report
from .runs import GridData, RunData, load_grid, load_results, load_run, load_snapshot
from .tables import (
    METHOD_ORDER,
    PAPER_QWEN3_4B,
    aggregate_table,
    beside_paper,
    mean_ci,
    method_task_table,
    paired_table,
    summary_sentences,
    to_latex,
    to_markdown,
)
from .trajectory import lens_trajectory

__all__ = [
    "GridData", "RunData", "load_grid", "load_results", "load_run", "load_snapshot",
    "METHOD_ORDER", "PAPER_QWEN3_4B", "mean_ci", "method_task_table", "paired_table", "aggregate_table",
    "beside_paper", "summary_sentences", "to_markdown", "to_latex",
    "bar_chart", "training_curves", "forest_plot", "layer_lines", "layer_heatmaps",
    "prediction_trajectory", "attention_maps", "save_figure",
    "lens_trajectory", "write_report", "ensure_collected",
    "MissingInput", "open_grid", "open_runs", "load_tables", "load_one_run", "last_rollouts",
]
