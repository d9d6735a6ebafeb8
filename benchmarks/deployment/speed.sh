#!/usr/bin/env bash
# Deployment vs simulation on one machine, back to back (issue 24's acceptance): the quick demo config
# on the simulation engine, then `blindtune launch` of the same config (3 SuperNodes, warm clients).
# MODES="... launch-cold" adds a launch whose SuperNodes start a new ClientApp process per message
# (Flower's default, as before warm clients), for the per-message start-up it pays.
#   benchmarks/deployment/speed.sh OUT_DIR [PYTHON]
# Writes OUT_DIR/<mode>/ (results.json, report.md, logs/) and OUT_DIR/times.txt (wall seconds, load).
set -euo pipefail
out=${1:?usage: speed.sh OUT_DIR [PYTHON]}
python=${2:-python3}
config=blindtune/configs/offsite_wordnet_3clients_quick.yaml
mkdir -p "$out"
export OMP_NUM_THREADS=1
for mode in ${MODES:-simulation launch}; do
    echo "$mode start $(date -u +%FT%TZ) load: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$out/times.txt"
    start=$(date +%s.%N)
    case "$mode" in
    simulation) nice -n 10 "$python" -m blindtune.cli run "$config" --engine simulation --out "$out/$mode" --overwrite ;;
    launch) nice -n 10 "$python" -m blindtune.cli launch "$config" --out "$out/$mode" --overwrite ;;
    launch-cold)
        nice -n 10 "$python" -c 'import sys
from pathlib import Path
from blindtune.federation.deployment import DeploymentOptions
from blindtune.methods import load_run_config
from blindtune.runner import launch
launch(load_run_config(Path(sys.argv[1])), Path(sys.argv[2]), options=DeploymentOptions(warm_clients=False))' \
            "$config" "$out/$mode"
        ;;
    esac
    end=$(date +%s.%N)
    echo "$mode wall_seconds $(echo "$end - $start" | bc) end $(date -u +%FT%TZ) load: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$out/times.txt"
done
