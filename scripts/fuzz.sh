#!/usr/bin/env bash
# Long fuzzing runs: every target natively, and the device targets also in
# sandbox mode (the same input through the wasm component under the
# production limits, answers compared). Prints execs/s per target and the
# total executions. Usage: scripts/fuzz.sh [SECONDS-PER-RUN] [TARGET...]
# A smoke (fixed runs, deterministic seed) is: scripts/fuzz.sh --smoke
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
smoke=0
if [ "${1:-}" = "--smoke" ]; then smoke=1; shift; fi
seconds=${1:-60}
[ $# -gt 0 ] && shift
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(ctrl_command device_sequence state_load handover_stream vring vhost_user_requests)
device_targets=" ctrl_command device_sequence state_load "
cargo +nightly fuzz build -O -s none
total=0
printf "%-18s %-8s %12s %10s\n" target mode execs execs/s
for t in "${targets[@]}"; do
    modes=(0)
    [[ "$device_targets" == *" $t "* ]] && modes=(0 1)
    for m in "${modes[@]}"; do
        mkdir -p "corpus/$t"
        if [ $smoke = 1 ]; then
            args=(-runs=3000 -seed=1)
        else
            args=(-max_total_time="$seconds")
        fi
        log=$(mktemp)
        if ! SANDNIC_FUZZ_SANDBOX=$m cargo +nightly fuzz run -O -s none "$t" -- "${args[@]}" >"$log" 2>&1; then
            cat "$log"
            echo "fuzz: $t (sandbox=$m) found a problem; see fuzz/artifacts/$t" >&2
            exit 1
        fi
        line=$(grep -E "^#[0-9]+.*DONE" "$log" | tail -1)
        execs=$(echo "$line" | sed -E 's/^#([0-9]+).*/\1/')
        rate=$(echo "$line" | sed -E 's/.*exec\/s: ([0-9]+).*/\1/')
        total=$((total + execs))
        printf "%-18s %-8s %12s %10s\n" "$t" "$([ "$m" = 1 ] && echo sandbox || echo native)" "$execs" "$rate"
        rm -f "$log"
    done
done
echo "total executions: $total"
