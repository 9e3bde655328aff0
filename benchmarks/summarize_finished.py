"""Summary and plots of the finished tasks of an unfinished (or interrupted) bench run.

    python benchmarks/summarize_finished.py RUN_DIR OUT_DIR

Keeps the tasks whose every (optimizer, seed) run has all its epochs in RUN_DIR/runs.jsonl,
and writes summary.json, summary.md and the plots for them into OUT_DIR (the same code as
``tekfac bench`` uses at the end of a run). Continue the run itself with ``--resume``.
"""

import json
import sys
from pathlib import Path

from tekfac.bench.report import finished_records, markdown_table, plot, write_summary

run_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
config = json.loads((run_dir / "config.json").read_text())
lines = (run_dir / "runs.jsonl").read_text().splitlines()
records = [json.loads(line) for line in lines if line.strip()]
runs = finished_records(records, config["epochs"])
done = {(r["task"], r["optimizer"], r["seed"]) for r in runs}
finished = [r for r in runs if all((r["task"], o, s) in done
                                   for o in config["optimizers"] for s in config["seeds"])]
out.mkdir(parents=True, exist_ok=True)
rows = write_summary(finished, out)
plot(finished, out)
print(markdown_table(rows))
