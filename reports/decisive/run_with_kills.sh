#!/usr/bin/env bash
# Runs the decisive grid and kills the grid runner with SIGKILL three times along the way (after
# 12, 21 and 29 minutes of each start), resuming it a few seconds later with the same command.
# Each kill, with the cells that were running, goes to kills.log beside the grid.
#   bash reports/decisive/run_with_kills.sh [grid_dir] [workers]
set -u
grid_dir=${1:-runs/grids/decisive}
workers=${2:-1}
mkdir -p "$grid_dir"
record="$grid_dir/kills.log"
for wait_s in 720 1260 1740 0; do
    oisd-lab grid decisive --out "$grid_dir" --workers "$workers" >> "$grid_dir/runner.log" 2>&1 &
    runner=$!
    if [ "$wait_s" -eq 0 ]; then wait "$runner"; echo "$(date -u +%FT%TZ) finished rc=$?" >> "$record"; break; fi
    sleep "$wait_s"
    running=$(grep -l '"status": "running"' "$grid_dir"/cells/*/status.json 2>/dev/null | xargs -r -n1 dirname | xargs -r -n1 basename | tr '\n' ' ')
    kill -KILL "$runner" 2>/dev/null && echo "$(date -u +%FT%TZ) SIGKILL runner $runner; running: $running" >> "$record"
    wait "$runner" 2>/dev/null
    sleep 5
done
