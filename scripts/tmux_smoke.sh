#!/usr/bin/env bash
# Run `moe` in a real terminal under tmux: type a prompt, check that a reply and the heatmap appear,
# then quit with Ctrl+Q and check the app exited. Usage: scripts/tmux_smoke.sh [MODEL] (default: demo).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v tmux >/dev/null || { echo "tmux_smoke: tmux is not installed (apt-get install tmux)"; exit 2; }
MOE="${MOE:-.venv/bin/moe}"
MODEL="${1:-}"
session="moe-smoke-$$"
tmp="$(mktemp -d)"
trap 'tmux kill-session -t "$session" 2>/dev/null || true; rm -rf "$tmp"' EXIT
screen() { tmux capture-pane -t "$session" -p; }
wait_for() {  # wait_for PATTERN SECONDS
  for _ in $(seq 1 $(( $2 * 5 ))); do screen | grep -q -- "$1" && return 0; sleep 0.2; done
  echo "tmux_smoke: '$1' did not appear in $2 s; screen was:"; screen; return 1
}
tmux new-session -d -s "$session" -x 120 -y 40 \
  "MOE_CONFIG=$tmp/config.toml $MOE chat $MODEL --data-dir $tmp/data; echo MOE-EXITED rc=\$?; sleep 60"
wait_for "experts per layer" 120          # header shows mode/policy/capacity once the model is up
wait_for "hit rate" 30                    # stats panel
tmux send-keys -t "$session" "Write a Python function that adds two numbers" Enter
wait_for "L[0-9]" 30                      # heatmap rows
wait_for "tokens   [1-9]" 120             # tokens were generated
sleep 2
screen | sed -n '1,40p'
tmux send-keys -t "$session" C-q
wait_for "MOE-EXITED rc=0" 20
echo "tmux_smoke: ok"
