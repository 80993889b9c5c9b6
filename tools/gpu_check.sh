#!/usr/bin/env bash
# The GPU path end to end on one GPU (docs/differences.md #16), about 8 minutes on an H100; one CHECK line each.
#   bash tools/gpu_check.sh [DEVICE]        # DEVICE default cuda; runs go to ${GPU_CHECK_DIR:-/tmp/gpu_check}
# 1 main job (toy world) in the GPU's precision   2 the same with fp16 + loss scaling forced (a V100/T4)
# 3 PromptSRC interrupted after 2 of 4 epochs, then --resume   4 a DPC step with no negative at all
# 5 evaluate.py with the feature cache (twice) and without it   6 tools/bench.py step / floor ratios
set -u
DEV=${1:-cuda}
W=${GPU_CHECK_DIR:-/tmp/gpu_check}
REPO=$(cd "$(dirname "$0")/.." && pwd)
rm -rf "$W" && mkdir -p "$W" && cd "$W" || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
COMMON="--data toy --clip toy --root $W/data --workers 0 --device $DEV --print-every 100000"   # workers 0: the main job's numbers
nvidia-smi --query-gpu=name,compute_cap,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/GPU: /'
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

check() {   # check NAME COMMAND...: run it, then print NAME's summary (summary.py) or why it failed
  local name=$1; shift
  local t0=$SECONDS
  if "$@" > "$W/$name.log" 2>&1; then
    echo "CHECK $name: ok in $((SECONDS - t0)) s; $(python "$W/summary.py" "$name" 2>&1 | tail -1)"
  else
    echo "CHECK $name: FAILED (exit $?) in $((SECONDS - t0)) s: $(grep -v '^\s*$' "$W/$name.log" | tail -1)"
  fi
}

cat > "$W/summary.py" <<'EOF'
import json, os, re, sys
import torch
name, w = sys.argv[1], os.getcwd()
def res(d): r = json.load(open(os.path.join(w, d, "results.json"))); return f"{r['base']:.2f}/{r['new']:.2f}/{r['hm']:.2f}"
def ckpt(d): return torch.load(os.path.join(w, d, "checkpoint.pt"), weights_only=True)
def precision(d): m = re.search(r"device (cuda\S*) \(([^)]*)\)", open(os.path.join(w, d, "log.txt")).read()); return m.group(2) if m else "?"
if name in ("bf16", "fp16"):
    print(f"{precision(name + '/coop')}; CoOp {res(name + '/coop')}, + DPC {res(name + '/dpc')} (base/new/H; CPU: 65.25/74.00/69.35, "
          f"72.50/74.00/73.24), loss scale {ckpt(name + '/dpc').get('scaler', {}).get('scale', 'off')}")
elif name == "resume":
    a, b = ckpt("resume/straight"), ckpt("resume/cut")
    diff = max((a["state"][k].float() - b["state"][k].float()).abs().max().item() for k in a["state"])
    print(f"straight {res('resume/straight')}, interrupted + resumed {res('resume/cut')}; max |Δ prompt| {diff:.3g} "
          f"(bitwise only on the CPU)")
elif name == "empty":
    print(open(os.path.join(w, "empty.log")).read().strip().splitlines()[-1])
elif name == "cache":
    t = [json.load(open(os.path.join(w, d, "results.json"))) for d in ("ev_cold", "ev_warm", "ev_off")]
    rows = [[(g["kind"], g["data"], g["base"], g["new"]) for g in r["groups"]] for r in t]
    print(f"cold cache == warm cache: {rows[0] == rows[1]}; cache == no cache: {rows[0] == rows[2]}")
elif name == "bench":
    b = json.load(open(os.path.join(w, "bench.json")))
    print("step/floor " + ", ".join(f"{k} {b[k]['step_over_floor']:.2f}" for k in ("coop", "maple", "promptsrc", "promptkd") if k in b)
          + (f"; DPC step / CoOp step at 32 images {b['dpc']['dpc_over_coop32']:.2f}" if "dpc" in b else ""))
EOF

fp16_then() {   # run a stage's CLI in this process with fp16 autocast + loss scaling forced on the GPU
  python - "$@" <<'EOF'
import sys, torch, run_io
precision.compute_dtype = lambda device: torch.float16 if device.startswith("cuda") else torch.float32
import train_backbone, train_dpc
{"backbone": train_backbone, "dpc": train_dpc}[sys.argv[1]].run(sys.argv[2:])
EOF
}

main_job() {   # main_job DIR [fp16]
  if [ "${2:-}" = fp16 ]; then
    fp16_then backbone --learner coop $COMMON --output-dir "$1/coop" && fp16_then dpc --backbone "$1/coop" --workers 0 --device "$DEV" --output-dir "$1/dpc"
  else
    python "$REPO/train_backbone.py" --learner coop $COMMON --output-dir "$1/coop" &&
      python "$REPO/train_dpc.py" --backbone "$1/coop" --workers 0 --device "$DEV" --output-dir "$1/dpc"
  fi
}

resume() {   # PromptSRC (a PromptKD teacher's learner): Ctrl-C when epoch 3 starts, then --resume
  local flags="--learner promptsrc --epochs 4 --batch-size 8 $COMMON"
  python "$REPO/train_backbone.py" $flags --output-dir resume/straight || return 1
  python - $flags --output-dir resume/cut <<'EOF'
import sys, data, train_backbone
real = data.make_loader
def make_loader(dataset, batch_size, shuffle, workers, seed=0, **kw):
    if shuffle and seed % 1000 == 3:
        raise KeyboardInterrupt
    return real(dataset, batch_size, shuffle, workers, seed=seed, **kw)
data.make_loader = make_loader
train_backbone.run(sys.argv[1:])
EOF
  [ $? -eq 130 ] || return 1
  python "$REPO/train_backbone.py" $flags --output-dir resume/cut --resume
}

empty() {   # the sampler leaves every image of the first step without a negative
  python - --backbone bf16/coop --min-negatives 0 --epochs 1 --workers 0 --device "$DEV" --output-dir empty_dpc <<'EOF'
import sys, train_dpc
real, steps = train_dpc.NegativeSampler.sample, []
def sample(self, scores, labels):
    picked = real(self, scores, labels)
    if not steps:   # the first step: positives only
        picked = train_dpc.HardNegativeBatch(picked.positives, picked.pair_labels[:len(picked.positives)], [])
    steps.append(len(picked.pair_labels))
    return picked
train_dpc.NegativeSampler.sample = sample
train_dpc.run(sys.argv[1:])
import json
r = json.load(open("empty_dpc/results.json"))
print(f"{len(steps)} steps, the first with L = {steps[0]} pairs and no negative; base {r['base']:.2f} new {r['new']:.2f}")
EOF
}

cache() {
  python "$REPO/evaluate.py" bf16 --zero-shot --recompute --device "$DEV" --feature-cache "$W/cache" --out ev_cold &&
    python "$REPO/evaluate.py" bf16 --zero-shot --recompute --device "$DEV" --feature-cache "$W/cache" --out ev_warm &&
    python "$REPO/evaluate.py" bf16 --zero-shot --recompute --device "$DEV" --feature-cache off --out ev_off
}

check bf16 main_job bf16
check fp16 main_job fp16 fp16
check resume resume
check empty empty
check cache cache
check bench python "$REPO/tools/bench.py" --arch ViT-B/16 --batch 32 --classes 50 --device "$DEV" --repeats 5 \
  --eval-images 400 --skip-pipeline --out "$W/bench.json"
