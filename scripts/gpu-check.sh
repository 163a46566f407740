#!/usr/bin/env bash
# The GPU check, run THERE (the nvidia-h200 device machine, repo root) after scripts/gpu-prepare.sh HERE:
#   bash scripts/gpu-check.sh [--device cuda|cpu] [--quick] [--no-cpu] [--total-s 480]
# (a) trains the quick encoder victim on --device into a temp model store, (b) serves it with uvicorn
# on 127.0.0.1 (embedded Redis, random admin token) and creates a key, (c) steals it with RDA on
# --device (budget 2000) and prints the key figures of result.json, (d) unless --no-cpu, runs the
# same attack on the CPU for a speed ratio, if the time left allows, (e) stops the server.
# Everything is timed and teed into ${OUT:-/tmp/out}/gpu-check.log (result JSONs copied beside it).
# It stops by itself within --total-s seconds and exits non-zero if a step fails (a CPU run cut by
# the deadline is reported, not failed).
#
# Dry run here:  SKIP_WHEELS=1 PYTHON=.venv/bin/python bash scripts/gpu-check.sh --device cpu --quick --no-cpu
set -uo pipefail
cd "$(dirname "$0")/.."

DEVICE=cuda QUICK=0 CPU_TOO=1 TOTAL_S=480
while (($#)); do
    case $1 in
        --device) DEVICE=$2; shift 2 ;;
        --quick) QUICK=1; shift ;;
        --no-cpu) CPU_TOO=0; shift ;;
        --total-s) TOTAL_S=$2; shift 2 ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done

PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
LOG=$OUT/gpu-check.log
: >"$LOG"
START=$SECONDS
DEADLINE=$((START + TOTAL_S))

if ((QUICK)); then  # a dry run on a slow CPU: proves the plumbing, measures nothing
    EPOCHS=1
    ATTACK=(-p max_steps=10 -p batch_size=64 -p train_views=2 --probe-train-size 1000 --probe-epochs 5
            --no-mlp-probe)
else                # the recipe's 4 epochs; RDA's released setup, 200 steps = 100 epochs of 200 samples
    EPOCHS=4
    ATTACK=(-p max_steps=200 --probe-train-size 5000 --probe-epochs 50)
fi
BUDGET=2000

WORK=$(mktemp -d /tmp/gpu-check.XXXXXX)
SERVER_PID=
cleanup() {
    if [[ -n $SERVER_PID ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null
        for _ in $(seq 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.2; done
        kill -KILL "$SERVER_PID" 2>/dev/null
    fi
    SERVER_PID=
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log() { echo "$@" | tee -a "$LOG"; }
left() { echo $((DEADLINE - SECONDS)); }
FAILED=0
# step NAME RESERVE_S CMD...: runs CMD under the time left minus RESERVE_S, teed into the log
step() {
    local name=$1 reserve=$2; shift 2
    local limit=$(($(left) - reserve)) t0=$SECONDS rc
    if ((limit < 5)); then log "== $name: SKIPPED, ${limit}s left"; STEP_S=0 STEP_RC=124; return 124; fi
    log "== $name (limit ${limit}s): ${*//${API_KEY:-@@}/sr-...}"
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    STEP_S=$((SECONDS - t0)) STEP_RC=$rc
    log "== $name: rc=$rc in ${STEP_S}s$( ((rc == 124 || rc == 137)) && echo ' (TIMED OUT)')"
    return "$rc"
}
fail() { log "!! FAILED: $*"; FAILED=1; exit 1; }

# ------------------------------------------------------------------ environment
if [[ -z ${SKIP_WHEELS:-} ]]; then
    ls .whl/*.whl >/dev/null 2>&1 || fail "no .whl/*.whl: run scripts/gpu-prepare.sh here and carry .whl"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl 2>&1 | tee -a "$LOG"
    ((PIPESTATUS[0] == 0)) || fail "wheel install"
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
# The CLIs hand STEALRANGE_DATA_ROOT to every dataset as its folder (see scripts/gpu-prepare.sh).
[[ -d .gpu-data/FashionMNIST/raw && -f .gpu-data/mnist_5k.csv.gz ]] \
    || fail "no .gpu-data: run scripts/gpu-prepare.sh here and carry .gpu-data"
export STEALRANGE_DATA_ROOT=$PWD/.gpu-data
export STEALRANGE_MODEL_STORE=$WORK/store
export STEALRANGE_NO_PROGRESS=1 PYTHONUNBUFFERED=1 COLUMNS=160
unset STEALRANGE_REDIS_URL STEALRANGE_URL STEALRANGE_API_KEY

log "== gpu-check: device=$DEVICE quick=$QUICK cpu_too=$CPU_TOO total=${TOTAL_S}s python=$PY $(date -u +%FT%TZ)"
{ command -v nvidia-smi >/dev/null && nvidia-smi || echo "(no nvidia-smi)"; } 2>&1 | tee -a "$LOG"
"$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import os, platform, torch
from common.compat import torchvision
import fastapi, pydantic, pydantic_core, starlette, uvicorn, redis, fakeredis, lupa
print(f"python {platform.python_version()}  torch {torch.__version__}  torchvision {torchvision.__version__}"
      f"  cuda {torch.version.cuda}  available={torch.cuda.is_available()}  cpus={os.cpu_count()}"
      f"  threads={torch.get_num_threads()}")
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0), f"cudnn {torch.backends.cudnn.version()}")
print(f"fastapi {fastapi.__version__}  pydantic {pydantic.__version__}  starlette {starlette.__version__}"
      f"  uvicorn {uvicorn.__version__}  redis {redis.__version__}")
EOF
((PIPESTATUS[0] == 0)) || fail "imports"

# ------------------------------------------------------------------ (a) train the victim
step "train-victim" 240 "$PY" -m stealrange.cli train-victim --kind encoder --device "$DEVICE" \
    --epochs "$EPOCHS" --store "$WORK/store" --force || fail "train-victim"
TRAIN_S=$STEP_S
MODEL=fmnist-encoder
[[ -f $WORK/store/$MODEL/card.json ]] || fail "no $WORK/store/$MODEL/card.json"

# ------------------------------------------------------------------ (b) serve it, create a key
PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
URL=http://127.0.0.1:$PORT
ADMIN=$("$PY" -c 'import secrets, string; a = string.ascii_letters + string.digits; print("".join(secrets.choice(a) for _ in range(32)))')
log "== serve: $URL (device $DEVICE)"
t0=$SECONDS
STEALRANGE_ADMIN_TOKEN=$ADMIN STEALRANGE_DEVICE=$DEVICE \
    "$PY" -m uvicorn server.app:create_app --factory --host 127.0.0.1 --port "$PORT" --log-level warning \
    >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
API_KEY=$(ADMIN=$ADMIN URL=$URL PID=$SERVER_PID "$PY" - <<'EOF'
import os, sys, time, httpx
url, admin, pid = os.environ["URL"], os.environ["ADMIN"], int(os.environ["PID"])
deadline = time.monotonic() + 90
while True:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit("the server exited")
    try:
        if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
            break
    except httpx.HTTPError:
        pass
    if time.monotonic() > deadline:
        sys.exit("the server was not ready within 90 s")
    time.sleep(0.3)
r = httpx.post(f"{url}/admin/keys", headers={"Authorization": f"Bearer {admin}"}, timeout=10,
               json={"name": "gpu-check", "budget": 5 * 2000, "tier": "standard"})
if r.status_code != 201:
    sys.exit(f"POST /admin/keys: {r.status_code} {r.text[:300]}")
print(r.json()["api_key"])
EOF
) || { cat "$WORK/server.log" | tee -a "$LOG"; fail "server start / key creation"; }
SERVE_S=$((SECONDS - t0))
log "== serve: ready with a key in ${SERVE_S}s"

# ------------------------------------------------------------------ (c) steal it
summary() {  # summary RESULT_JSON: the key figures
    "$PY" - "$1" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
q, ev, s = r["queries"], r["evaluation"], r["seconds"]
print(f"  device {r['device']}  samples {r['samples']}  queries planned {q['planned']} spent {q['spent']}"
      f" sent {q['sent']} cache_hits {q['cache_hits']}")
h = r.get("history") or []
if h:
    print(f"  training  epochs {len(h)}  last loss {h[-1].get('loss', float('nan')):.4f}  "
          f"params {', '.join(f'{k}={v}' for k, v in r['params'].items() if k in ('batch_size', 'max_steps', 'n_views', 'train_views'))}")
for role in ("surrogate", "victim"):
    for ds, scores in (ev.get(role) or {}).items():
        print(f"  {role:9s} {ds:14s} " + "  ".join(f"{k} {v:.4f}" for k, v in scores.items()))
fid = ev.get("fidelity") or {}
print("  fidelity  " + "  ".join(f"{k} {v:.4f}" for k, v in fid.items() if isinstance(v, (int, float))))
if ev.get("untrained_fidelity"):
    print("  untrained " + "  ".join(f"{k} {v:.4f}" for k, v in ev["untrained_fidelity"].items()
                                     if isinstance(v, (int, float))))
print("  seconds   " + "  ".join(f"{k} {v:.1f}" for k, v in s.items()))
EOF
}
attack() {  # attack DEVICE: the command line, in CMD (timeout runs no shell function)
    CMD=("$PY" -m stealrange.cli attack rda --url "$URL" --key "$API_KEY" --model "$MODEL" --budget "$BUDGET"
         --out "$WORK/rda-$1" --device "$1" --query-set fashion_mnist --query-split attacker
         --victim-checkpoint "$WORK/store/$MODEL" "${ATTACK[@]}")
}
attack "$DEVICE"
step "attack rda --device $DEVICE" 20 "${CMD[@]}" || fail "attack on $DEVICE"
ATTACK_S=$STEP_S
cp "$WORK/rda-$DEVICE/result.json" "$OUT/result-$DEVICE.json"
summary "$WORK/rda-$DEVICE/result.json" | tee -a "$LOG"

# ------------------------------------------------------------------ (d) the same attack on the CPU
CPU_NOTE=$( ((CPU_TOO)) && echo "the run above was on cpu" || echo "not run (--no-cpu)")
if ((CPU_TOO)) && [[ $DEVICE != cpu ]]; then
    if (($(left) < ATTACK_S + 30)); then
        CPU_NOTE="skipped: $(left)s left, the $DEVICE run took ${ATTACK_S}s"
        log "== attack rda --device cpu: $CPU_NOTE"
    elif attack cpu && step "attack rda --device cpu" 15 "${CMD[@]}"; then
        cp "$WORK/rda-cpu/result.json" "$OUT/result-cpu.json"
        summary "$WORK/rda-cpu/result.json" | tee -a "$LOG"
        CPU_NOTE=$("$PY" - "$WORK/rda-$DEVICE/result.json" "$WORK/rda-cpu/result.json" <<'EOF'
import json, sys
g, c = (json.load(open(p))["seconds"] for p in sys.argv[1:])
print("cpu/gpu seconds: " + "  ".join(f"{k} {c[k]:.1f}/{g[k]:.1f}={c[k] / max(g[k], 1e-9):.1f}x" for k in g))
EOF
)
    elif ((STEP_RC == 124 || STEP_RC == 137)); then
        CPU_NOTE="cut by the deadline after ${STEP_S}s: cpu/gpu total >= $((STEP_S / (ATTACK_S > 0 ? ATTACK_S : 1)))x"
    else
        fail "attack on cpu"
    fi
fi

# ------------------------------------------------------------------ (e) stop the server
grep -iE "error|traceback" "$WORK/server.log" | head -20 | tee -a "$LOG"
cleanup
trap - EXIT
log "== summary: train ${TRAIN_S}s, serve ${SERVE_S}s, attack on $DEVICE ${ATTACK_S}s; cpu: $CPU_NOTE"
log "== gpu-check OK in $((SECONDS - START))s (log and result-*.json in $OUT)"
