#!/bin/sh
# A stand-in for a distributed PyTorch trainer, on busybox sh only.
#
# Reads:  TRAIN_CONFIG (flat "key: value" YAML, relative to /app or absolute), CHECKPOINT_DIR,
#         EXPERIMENT, RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT (or torchrun's PET_*:
#         PET_NODE_RANK, PET_NNODES, PET_MASTER_ADDR, PET_MASTER_PORT of a Trainer v2 TrainJob),
#         RESUME_FROM (a checkpoint of an earlier attempt: start after its epoch).
# Args:   --config PATH  --epochs N  --checkpoint-dir DIR  --fail-at-epoch N
# Prints: "epoch 2/3 loss=0.4123 rank=0 world_size=2" per epoch, "step 3/4" lines inside an
#         epoch when the config has steps_per_epoch > 1, and
#         "checkpoint saved to /checkpoints/<experiment>/epoch-2.ckpt" (rank 0 only).
# Exits:  1 when the config's fail_at_epoch is reached, or peers never meet; 137 (as if the
#         node were lost) at preempt_at_epoch, once per experiment (a marker in the
#         checkpoint directory remembers), so a retry that resumes gets past it.
set -eu
cd /app 2>/dev/null || true

config="${TRAIN_CONFIG:-configs/default.yaml}"
epochs=""
fail_at=""
checkpoint_dir="${CHECKPOINT_DIR:-/checkpoints}"
while [ $# -gt 0 ]; do
  case "$1" in
    --config) config="$2"; shift 2 ;;
    --epochs) epochs="$2"; shift 2 ;;
    --checkpoint-dir) checkpoint_dir="$2"; shift 2 ;;
    --fail-at-epoch) fail_at="$2"; shift 2 ;;
    *) echo "train.sh: unknown argument $1 (see the header of src/train.sh)" >&2; exit 2 ;;
  esac
done
if [ ! -f "$config" ]; then
  echo "train.sh: config $config not found (set TRAIN_CONFIG or --config)" >&2
  exit 2
fi

conf() {  # conf KEY DEFAULT: the value of "KEY: value" in the config
  value="$(sed -n "s/^$1:[[:space:]]*\([^#]*\).*/\1/p" "$config" | head -n 1 | sed 's/[[:space:]]*$//')"
  echo "${value:-$2}"
}
epochs="${epochs:-$(conf epochs 3)}"
fail_at="${fail_at:-${FAIL_AT_EPOCH:-$(conf fail_at_epoch 0)}}"
epoch_seconds="$(conf epoch_seconds 1)"
steps_per_epoch="$(conf steps_per_epoch 1)"
preempt_at="${PREEMPT_AT_EPOCH:-$(conf preempt_at_epoch 0)}"
lr="$(conf learning_rate 0.1)"
model="$(conf model resnet18)"
experiment="${EXPERIMENT:-vision-train}"
loss=""

rank="${RANK:-${PET_NODE_RANK:-0}}"
# WORLD_SIZE (PyTorchJob) counts processes; a TrainJob gives nodes (PET_NNODES): one
# process per node here, so both are the number of peers to meet.
world_size="${WORLD_SIZE:-${PET_NNODES:-1}}"
master_addr="${MASTER_ADDR:-${PET_MASTER_ADDR:-localhost}}"
master_port="${MASTER_PORT:-${PET_MASTER_PORT:-23456}}"
rendezvous_timeout="${RENDEZVOUS_TIMEOUT:-120}"

echo "vision-train: experiment=$experiment model=$model epochs=$epochs lr=$lr config=$config"
echo "vision-train: rank=$rank world_size=$world_size master=$master_addr:$master_port"

# Rendezvous, as torch.distributed does over TCP: rank 0 listens, the others check in and
# wait for its "ack". One peer per connection; without the ack a peer whose connection was
# only queued by the kernel (and reset when the one-shot listener closed) would believe it
# had joined and never call again, and the master would wait for it until its deadline.
if [ "$world_size" -gt 1 ]; then
  deadline=$(( $(date +%s) + rendezvous_timeout ))
  if [ "$rank" -eq 0 ]; then
    JOINED="$(mktemp)"
    export JOINED
    echo "rank 0" > "$JOINED"
    joined=1
    while [ "$joined" -lt "$world_size" ]; do
      left=$(( deadline - $(date +%s) ))
      if [ "$left" -le 0 ]; then
        echo "rendezvous failed: $joined of $world_size ranks joined in ${rendezvous_timeout}s" >&2
        exit 1
      fi
      timeout "$left" nc -l -p "$master_port" \
        -e sh -c 'read -r peer && echo "$peer" >> "$JOINED" && echo ack' || true
      now="$(sort -u "$JOINED" | wc -l)"
      if [ "$now" -gt "$joined" ]; then  # a peer that calls again is counted once
        joined=$now
        echo "rendezvous: $(tail -n 1 "$JOINED") joined ($joined/$world_size)"
      fi
    done
    rm -f "$JOINED"
  else
    until [ "$(echo "rank $rank" | nc -w 2 "$master_addr" "$master_port" 2>/dev/null)" = ack ]; do
      if [ "$(date +%s)" -ge "$deadline" ]; then
        echo "rendezvous failed: $master_addr:$master_port did not answer in ${rendezvous_timeout}s" >&2
        exit 1
      fi
      sleep 1
    done
    echo "rendezvous: joined master $master_addr:$master_port"
  fi
fi

# Resume: the checkpoint file says which epoch it holds ("... epoch=N ...").
epoch=1
if [ -n "${RESUME_FROM:-}" ]; then
  if [ ! -f "$RESUME_FROM" ]; then
    echo "train.sh: checkpoint $RESUME_FROM to resume from is missing (is $checkpoint_dir a persistent volume?)" >&2
    exit 1
  fi
  saved="$(sed -n 's/.*epoch=\([0-9]*\).*/\1/p' "$RESUME_FROM" | head -n 1)"
  echo "resuming from checkpoint $RESUME_FROM (epoch ${saved:-0})"
  epoch=$(( ${saved:-0} + 1 ))
fi

# Loss falls as 1/(epoch+1), scaled per rank a little, as a real run's would wobble.
while [ "$epoch" -le "$epochs" ]; do
  if [ "$steps_per_epoch" -gt 1 ]; then
    step=1
    while [ "$step" -le "$steps_per_epoch" ]; do
      sleep "$epoch_seconds"
      echo "epoch $epoch/$epochs step $step/$steps_per_epoch rank=$rank"
      step=$(( step + 1 ))
    done
  else
    sleep "$epoch_seconds"
  fi
  if [ "$preempt_at" -gt 0 ] && [ "$epoch" -eq "$preempt_at" ] && [ "$rank" -eq 0 ]; then
    marker="$checkpoint_dir/$experiment/.preempted-at-$epoch"
    if [ ! -f "$marker" ]; then
      mkdir -p "$checkpoint_dir/$experiment" && : > "$marker"
      echo "node lost: simulated preemption at epoch $epoch/$epochs (rank $rank)" >&2
      exit 137
    fi
  fi
  if [ "$fail_at" -gt 0 ] && [ "$epoch" -ge "$fail_at" ]; then
    echo "epoch $epoch/$epochs loss=nan rank=$rank world_size=$world_size"
    echo "training failed: loss diverged (nan) at epoch $epoch (config $config)" >&2
    exit 1
  fi
  loss="$(awk -v e="$epoch" -v r="$rank" 'BEGIN { printf "%.4f", 1.0 / (e + 1) + r * 0.001 }')"
  echo "epoch $epoch/$epochs loss=$loss rank=$rank world_size=$world_size"
  if [ "$rank" -eq 0 ]; then
    dir="$checkpoint_dir/$experiment"
    if mkdir -p "$dir" 2>/dev/null && echo "model=$model epoch=$epoch loss=$loss" > "$dir/epoch-$epoch.ckpt"; then
      echo "checkpoint saved to $dir/epoch-$epoch.ckpt"
    else
      echo "train.sh: cannot write checkpoint to $dir (mount a writable volume there)" >&2
      exit 1
    fi
  fi
  epoch=$(( epoch + 1 ))
done
echo "training finished: $epochs epochs, final loss=$loss"
