#!/usr/bin/env bash
# One prepared command for a lent GPU (one NVIDIA H200, one device call of at most 9 minutes), run from the repo root:
#
#   bash scripts/gpu_run.sh                  # on the GPU machine: checks, bench, training, export into $OUT
#   bash scripts/gpu_run.sh --dry-run        # the same path on a CPU with tiny configs (test_gpu_run.py runs it)
#   bash scripts/gpu_run.sh --prepare        # here, once: copy the kanji font into data/site, to carry there
#
# 1. Checks the CUDA paths, each logged PASS/FAIL and none stopping the rest: a --dry-run training step of each model
#    under bf16 autocast, with and without --compile, and a one-process torchrun step through NCCL (the checks run side
#    by side: they wait on imports and compilers far more than on the GPU); then bench.py --quick writes its table.
# 2. Continues training the shipped DDPM and GAN (--init-from pretrained/, width 0.25 stays so a CPU still samples
#    them fast) for the time that is left, split between the two.
# 3. Exports slim files into $OUT with a sample grid of each, and the whole log. docs/gpu.md says how to score them.
#
# Options: --dry-run, --out DIR (default: $OUT, else ./gpu_out). Environment: GPU_RUN_SECONDS (the whole script's
# budget), TRAIN_SECONDS (the training time of both models; default: what is left after checks and bench, and 8 s in a
# dry run), WORK (the run folders; default runs/gpu_<date>_<time>), DATA_DIR (the kanji render cache; default data).
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0
OUT=${OUT:-gpu_out}
while [ $# -gt 0 ]; do
    case $1 in
        --dry-run) DRY=1 ;;
        --out) OUT=$2; shift ;;
        --prepare)
            # The device machine reaches no package registry, and the kanji are rendered from the font that the
            # package pylopdf-fonts-jp holds (data.default_font). Its folder goes under data/ (ignored by git) and
            # travels with the run's `carry: ["data/site"]`; the script puts data/site on PYTHONPATH.
            src=$(python3 -c 'import os, pylopdf_fonts_jp; print(os.path.dirname(pylopdf_fonts_jp.__file__))')
            mkdir -p data/site && cp -r "$src" data/site/
            echo "copied $src into data/site; carry data/site in the device call"
            exit 0 ;;
        *) echo "usage: bash scripts/gpu_run.sh [--dry-run] [--out DIR] | --prepare" >&2; exit 2 ;;
    esac
    shift
done

PY=python3  # the device image has python3 (with PyTorch) and maybe no `python`
DATA_DIR=${DATA_DIR:-data}
WORK=${WORK:-runs/gpu_$(date +%Y%m%d_%H%M%S)}  # run folders: big checkpoints, not brought back; a new name each time
if [ -d data/site ]; then export PYTHONPATH="$PWD/data/site${PYTHONPATH:+:$PYTHONPATH}"; fi
export PYTHONUNBUFFERED=1   # the log in the order things happened
export TQDM_MININTERVAL=10  # progress bars every 10 s, not 10 times a second, in a log that comes back

if [ "$DRY" = 1 ]; then
    # conftest.TINY: width 0.125, 32 px, 64 kanji, batch 16 (4 steps an epoch); the DDPM's grids take 4 DDIM steps
    DEVICE=cpu PRECISION=fp32
    MODEL=(--width 0.125 --image-size 32 --limit 64 --device cpu --precision fp32 --data-dir "$DATA_DIR")
    DDPM_EXTRA=(--sample-steps 4)
    GRID=(--n 16 --nrow 4)
    BATCH=16 DDPM_LR=4e-4 GAN_LR=4e-4 VAE_LR=1e-3
    TOTAL=${GPU_RUN_SECONDS:-300} CHECK_CAP=120 GRACE=60  # generous: the CPU may be shared
    TRAIN_SECONDS=${TRAIN_SECONDS:-8}  # both models: a first epoch, its Ctrl-C, the fit, a resumed epoch or two
    D_WARM_EPOCHS=1
else
    DEVICE=cuda PRECISION=bf16
    MODEL=(--width 0.25 --image-size 64 --device cuda --precision bf16 --data-dir "$DATA_DIR")
    DDPM_EXTRA=()
    GRID=(--n 64 --nrow 8)
    # Batch 256, four times the shipped files' 64: a width-0.25 network gives a GPU little work per kernel launch,
    # more at 256, which still makes 50 steps an epoch (bench.py's rows show the speed). Adam's rates follow the
    # square-root rule for adaptive optimizers (Malladi et al. 2022, "On the SDEs and Scaling Rules for Adaptive
    # Gradient Algorithms"): 4x the batch, 2x the rate, from the recipes the shipped files were continued with (DDPM
    # 2e-4, GAN 2e-4 for G and D; VAE 1e-3, used by its check only).
    BATCH=256 DDPM_LR=4e-4 GAN_LR=4e-4 VAE_LR=2e-3
    TOTAL=${GPU_RUN_SECONDS:-520}  # inside a 9-minute call (timeout_s 600), with room for the export to run late
    CHECK_CAP=180                  # each check: three compilers run side by side, each compiling its model cold
    GRACE=30
    TRAIN_SECONDS=${TRAIN_SECONDS:-}  # empty: what is left after checks and bench, less RESERVE for the export
    D_WARM_EPOCHS=4                # 200 steps of batch 256: the GAN recipe's D warm-up (one epoch at batch 64)
fi
BENCH_CAP=120
RESERVE=60      # after training: two exports, two sample grids, packing the run folders
DDPM_SHARE=55   # percent of the training time for the DDPM, the flagship model; the GAN gets the rest
PROBE_SHARE=30  # percent of a model's time that it trains before its speed fixes --epochs (see train_model)

RESULTS=()
record() {  # record STATUS WHAT: one line of the summary
    RESULTS+=("$(printf '%-5s %s' "$1" "$2")")
    echo "==> $1 $2"
}

run_step() {  # run_step WHAT CAP CMD...: run CMD in the foreground, at most CAP seconds, and record how it went
    local what=$1 cap=$2 t=$SECONDS rc=0
    shift 2
    echo; echo "==> $what: $*"
    timeout --kill-after=10 "$cap" "$@" || rc=$?
    if [ "$rc" = 0 ]; then record PASS "$what ($((SECONDS - t)) s)"
    elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then record FAIL "$what: timed out after $cap s"
    else record FAIL "$what: exit code $rc"; fi
    return "$rc"
}

CHECKS=()
start_check() {  # start_check NAME CMD...: run a check in the background, its output into $WORK/NAME.log
    local name=$1
    shift
    echo "==> start check $name: $*"
    (
        rc=0
        timeout --kill-after=10 "$CHECK_CAP" "$@" >"$WORK/$name.log" 2>&1 || rc=$?
        echo "$rc $SECONDS" >"$WORK/$name.rc"  # its exit code and when it ended
    ) &
    CHECKS+=("$name:$!:$SECONDS")
}

finish_checks() {  # wait for every started check, then log each one's output and result in the order started
    local entry name pid t rc t_end
    for entry in "${CHECKS[@]}"; do
        IFS=: read -r name pid t <<<"$entry"
        wait "$pid" || true
        read -r rc t_end <"$WORK/$name.rc"
        echo; echo "==> output of check $name"; cat "$WORK/$name.log"
        if [ "$rc" = 0 ]; then record PASS "check $name ($((t_end - t)) s)"
        elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then record FAIL "check $name: timed out after $CHECK_CAP s"
        else record FAIL "check $name: exit code $rc"; fi
    done
    CHECKS=()
}

train_for() {  # train_for SECONDS RUN CMD...: train, then stop the run as a user would, with one Ctrl-C
    # The first Ctrl-C (SIGINT) makes a training script finish its step, save RUN/ckpt.pt and exit 130 (data.CtrlC);
    # a second one quits without saving, so exactly one is sent: once SECONDS have passed and this process has saved
    # RUN/ckpt.pt (a Ctrl-C before its training loop has begun would quit without saving). As a safety net, timeout
    # sends it GRACE s late if it never saved, and kills the script GRACE s after a Ctrl-C (--foreground: the signal
    # goes to the script alone, once, not to its process group as well). Returns the script's exit code: 0 (it
    # finished its --epochs), 130 (stopped and saved), 124 or 137 (timeout had to step in).
    local seconds=$1 run=$2 pid rc=0 marker
    shift 2
    local end=$((SECONDS + seconds)) limit=$(((seconds > 0 ? seconds : 0) + GRACE))
    marker=$(mktemp "$WORK/.start.XXXXXX")  # ckpt.pt newer than this: saved by this process
    echo; echo "==> train for ${seconds} s: $*"
    timeout --foreground --signal=INT --kill-after="$GRACE" "$limit" "$@" &
    pid=$!
    while kill -0 "$pid" 2>/dev/null; do
        if [ "$SECONDS" -ge "$end" ] && [ "$run/ckpt.pt" -nt "$marker" ]; then
            kill -INT "$pid"  # timeout hands it on to the script
            break
        fi
        sleep 0.2
    done
    wait "$pid" || rc=$?
    rm -f "$marker"
    return "$rc"
}

fit_epochs() {  # fit_epochs RUN SECONDS WALL: "EPOCHS DECAY" for a run stopped after WALL s of its process
    # EPOCHS: the total --epochs that the run in RUN reaches in SECONDS more, at the speed its ckpt.pt recorded (steps
    # over training seconds, which count the per-epoch grids and saves); the start-up (WALL minus those training
    # seconds) comes off SECONDS, as the resumed process pays it again; 90 % of that speed, for the variation between
    # epochs. DECAY: the GAN's cool-down, the last quarter of EPOCHS, starting no earlier than where the run stands.
    "$PY" - "$1/ckpt.pt" "$2" "$3" <<'EOF'
import sys
import data
ckpt = data.load_checkpoint(sys.argv[1], mmap=True)
budget, wall = float(sys.argv[2]), float(sys.argv[3])
per_epoch, seconds = ckpt["config"]["steps_per_epoch"], ckpt["train_seconds"]
done = ckpt["epoch"] * per_epoch + ckpt["batch"]  # steps of this run (an --init-from run counts from 0)
more = 0.9 * done / max(seconds, 1e-6) * max(0.0, budget - (wall - seconds))
epochs = max(ckpt["epoch"] + 1, int((done + more) // per_epoch))
decay = min(max(1, round(epochs / 4)), epochs - ckpt["epoch"])
print(epochs, decay)
EOF
}

train_model() {  # train_model KIND SECONDS INIT_FROM FLAGS...: continue a model for SECONDS, ending on its schedule
    # The scripts take --epochs, not a time. Stage 1 trains with an --epochs too large to reach (the DDPM's cosine
    # hardly falls, the GAN's rates stay constant) for PROBE_SHARE % of the time, then a Ctrl-C saves it; the speed
    # it recorded fixes the --epochs that fill the rest of the time, and stage 2 --resumes with those, so the DDPM's
    # cosine reaches 0 and the GAN cools down over its last quarter (the recipes' schedules) within the time. If the
    # fit is off, the Ctrl-C at the deadline still saves a whole step.
    local kind=$1 seconds=$2 init=$3 run="$WORK/$1" t=$SECONDS rc=0 wall1 fit epochs decay
    shift 3
    local decay_flag=()
    [ "$kind" != gan ] || decay_flag=(--lr-decay-epochs 0)
    train_for "$((seconds * PROBE_SHARE / 100))" "$run" "$PY" "$kind.py" --init-from "$init" "${MODEL[@]}" "$@" \
        --batch-size "$BATCH" --epochs 10000 "${decay_flag[@]}" --sample-every 10 --out "$run" || rc=$?
    wall1=$((SECONDS - t))
    if [ ! -f "$run/ckpt.pt" ] || { [ "$rc" != 0 ] && [ "$rc" != 130 ]; }; then
        record FAIL "train $kind: stage 1 exit code $rc"
        return 1
    fi
    if ! fit=$(fit_epochs "$run" "$((seconds - wall1))" "$wall1"); then
        record FAIL "train $kind: reading $run/ckpt.pt"
        return 1
    fi
    read -r epochs decay <<<"$fit"
    [ "$kind" != gan ] || decay_flag=(--lr-decay-epochs "$decay")
    echo "==> $kind: stage 1 took $wall1 s; --resume to --epochs $epochs in the $((seconds - wall1)) s left"
    rc=0
    train_for "$((t + seconds - SECONDS))" "$run" "$PY" "$kind.py" --resume --out "$run" --epochs "$epochs" \
        "${decay_flag[@]}" || rc=$?
    local took=$((SECONDS - t))
    if [ "$rc" = 0 ]; then record PASS "train $kind: $epochs epochs in $took s"
    elif [ "$rc" = 130 ]; then record PASS "train $kind: stopped at its deadline, before epoch $epochs ($took s)"
    else record FAIL "train $kind: stage 2 exit code $rc"; return 1; fi
}

main() {
    SECONDS=0
    mkdir -p "$WORK"
    echo "GANji gpu_run $(date -u +%Y-%m-%dT%H:%M:%SZ)$([ "$DRY" = 0 ] || echo ', dry run'): out $OUT, runs $WORK"
    local commit changes=
    commit=$(git rev-parse --short HEAD 2>/dev/null || echo '?')  # a copied working tree may have no .git
    if git status --porcelain 2>/dev/null | grep -q .; then changes=', with local changes'; fi
    echo "git $commit$changes"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
    fi
    if ! "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda",
            torch.version.cuda, "available", torch.cuda.is_available()); sys.exit(sys.argv[1] == "cuda"
            and not torch.cuda.is_available())' "$DEVICE"; then
        echo "error: no CUDA device here; on a CPU run bash scripts/gpu_run.sh --dry-run" >&2
        return 2
    fi
    # the kanji, rendered once before the checks start side by side (each would render them otherwise)
    if ! run_step "render the kanji" 300 "$PY" data.py "${MODEL[@]}"; then
        echo "error: no kanji here: without the font, run bash scripts/gpu_run.sh --prepare and carry data/site" >&2
        return 2
    fi

    echo; echo "== 1. checks: a training step of each model ($DEVICE, $PRECISION), --compile, torchrun"
    local kind lr args
    for kind in vae gan ddpm; do
        case $kind in vae) lr=$VAE_LR ;; gan) lr=$GAN_LR ;; ddpm) lr=$DDPM_LR ;; esac
        args=("${MODEL[@]}" --batch-size "$BATCH" --lr "$lr" --dry-run)
        [ "$kind" != ddpm ] || args+=("${DDPM_EXTRA[@]}")
        start_check "$kind-step" "$PY" "$kind.py" "${args[@]}" --out "$WORK/check_$kind"
        if [ "$DEVICE" = cuda ]; then
            start_check "$kind-compile" "$PY" "$kind.py" "${args[@]}" --compile --out "$WORK/check_${kind}_compile"
        fi
    done
    # one process under torchrun: NCCL on a GPU, gloo on a CPU (data.distributed picks by device)
    start_check "torchrun-gan" "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 gan.py "${MODEL[@]}" \
        --batch-size "$BATCH" --lr "$GAN_LR" --dry-run --out "$WORK/check_torchrun"
    finish_checks
    if [ "$DEVICE" = cuda ]; then
        run_step "bench.py --quick" "$BENCH_CAP" "$PY" bench.py --device cuda --quick --data-dir "$DATA_DIR" \
            --out "$OUT/bench" || true
    else
        for kind in vae gan ddpm; do record SKIP "check $kind-compile: cuda only"; done
        record SKIP "bench.py: cuda only (test_bench.py runs it on a CPU)"
    fi

    echo; echo "== 2. training, from the shipped files"
    local ddpm_src=pretrained/ddpm_kanji.pt gan_src=pretrained/gan_kanji.pt guide=pretrained/ddpm_kanji_guide.pt
    if [ "$DRY" = 1 ]; then
        # the shipped files do not fit the tiny config: the checks' runs stand in for them (the DDPM's for its guide
        # too), so the same --init-from, Ctrl-C, --resume and export path runs
        ddpm_src=$WORK/check_ddpm/ckpt.pt gan_src=$WORK/check_gan/ckpt.pt guide=$WORK/check_ddpm/ckpt.pt
    fi
    local train=${TRAIN_SECONDS:-$((TOTAL - SECONDS - RESERVE))} ddpm_s gan_s t trained=()
    ddpm_s=$((train * DDPM_SHARE / 100))
    gan_s=$((train - ddpm_s))
    echo "training time: $train s (ddpm $ddpm_s s, gan $gan_s s)"
    if train_model ddpm "$ddpm_s" "$ddpm_src" --lr "$DDPM_LR" "${DDPM_EXTRA[@]}"; then trained+=(ddpm); fi
    # The slim GAN file keeps only G, so D starts from scratch: first D trains alone against the frozen G (--lr 0),
    # as the shipped file was continued (docs/pretrained.md), then both from that run.
    t=$SECONDS
    if run_step "train gan: D alone, $D_WARM_EPOCHS epochs" "$CHECK_CAP" "$PY" gan.py --init-from "$gan_src" \
            "${MODEL[@]}" --batch-size "$BATCH" --lr 0 --lr-d "$GAN_LR" --lr-decay-epochs 0 --epochs "$D_WARM_EPOCHS" \
            --out "$WORK/gan_dwarm" \
        && train_model gan "$((gan_s - (SECONDS - t)))" "$WORK/gan_dwarm/ckpt.pt" --lr "$GAN_LR" --lr-d "$GAN_LR"; then
        trained+=(gan)
    fi

    echo; echo "== 3. export: slim files and sample grids into $OUT"
    local grid
    for kind in "${trained[@]}"; do
        run_step "export $kind" 120 "$PY" sample.py export "$WORK/$kind/ckpt.pt" "$OUT/${kind}_kanji.pt" || continue
        grid=("${GRID[@]}" --device "$DEVICE" --out "$OUT/${kind}_kanji.png")
        [ "$kind" != ddpm ] || grid+=(--guide "$guide")  # drawn as the shipped file is: guided, DPM-Solver++ 20 steps
        run_step "grid $kind" 120 "$PY" sample.py "$kind" "$OUT/${kind}_kanji.pt" "${grid[@]}" || true
    done
    # the training runs' metrics, configs, curves and grids, without their checkpoints: a device call brings back at
    # most 8 files of 16 MB (here: the log, two slim files, two grids, bench.md, bench.json and this archive)
    local folders=()
    for kind in ddpm gan_dwarm gan; do [ ! -d "$WORK/$kind" ] || folders+=("$kind"); done
    if [ "${#folders[@]}" -gt 0 ]; then
        run_step "pack run folders" 60 tar -czf "$OUT/runs.tar.gz" -C "$WORK" --exclude='*.pt' "${folders[@]}" || true
    fi

    echo; echo "== summary: $SECONDS s of $TOTAL s; run folders in $WORK"
    printf '%s\n' "${RESULTS[@]}"
    ! printf '%s\n' "${RESULTS[@]}" | grep -q '^FAIL'
}

mkdir -p "$OUT"
main 2>&1 | tee "$OUT/gpu_run.log"
