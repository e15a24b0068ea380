#!/usr/bin/env bash
# The transport tests, N times in a row (default 50), while two busy loops load two cores: the
# done-criterion for the transports' shutdown and leak fixes. A race that needs an unlucky
# schedule shows up here, not in one quiet run. Stops at the first failing run and prints its output.
#
#     bench/stress_transport_tests.sh        # 50 runs
#     bench/stress_transport_tests.sh 20     # fewer; PYTHON=... picks the interpreter
set -u

runs="${1:-50}"
python="${PYTHON:-python3}"
cd "$(dirname "$0")/.." || exit 2

load_pids=()
log="$(mktemp -t segue-stress.XXXXXX)"
stop_load() {
    for pid in "${load_pids[@]}"; do
        kill "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
    done
    rm -f "$log"
}
trap stop_load EXIT
trap 'exit 130' INT TERM

for _ in 1 2; do
    "$python" -c "while True: pass" &
    load_pids+=("$!")
done
echo "load: busy loops ${load_pids[*]} on $(nproc) CPU(s); $runs run(s) of the transport tests"

passed=0
started=$SECONDS
for ((run = 1; run <= runs; run++)); do
    run_started=$SECONDS
    if "$python" -m pytest -q tests/test_zmq.py tests/test_osc.py tests/test_server.py -p no:randomly >"$log" 2>&1; then
        passed=$((passed + 1))
        echo "run $run passed in $((SECONDS - run_started)) s ($(tail -n 1 "$log"))"
    else
        echo "run $run FAILED after $((SECONDS - run_started)) s; its output:"
        cat "$log"
        break
    fi
done

elapsed=$((SECONDS - started))
echo "$passed of $runs runs passed in ${elapsed} s ($((elapsed / (passed > 0 ? passed : 1))) s per passing run)"
[ "$passed" -eq "$runs" ]
