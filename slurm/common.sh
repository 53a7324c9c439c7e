# shellcheck shell=bash
# Shared body of the sbatch templates (sourced by slurm/{mnist,cifar10,sweep,evaluate}.sh; never submitted).
#
# The contract with jobs.train: exit 0 done, 2 bad input, 75 "got SIGUSR2/SIGTERM, saved a checkpoint,
# requeue me", anything else a failure. Here that becomes:
#   * the batch shell traps USR2 (what `#SBATCH --signal=B:USR2@120` sends it, only it) and TERM
#     (scancel, `scontrol requeue`, preemption, the time limit) and forwards them to srun, which
#     passes them on to every task on every node;
#   * exit 75 -> `scontrol requeue $SLURM_JOB_ID`: the rerun gets the same job id, hence the same run
#     dir, and resumes it. After a SIGTERM the shell never requeues: SLURM already decided (requeue,
#     preemption -> back in the queue; scancel -> cancelled; time limit -> TIMEOUT);
#   * exit 2 is never requeued, and bad overrides are caught before srun by a --dry-run in the batch
#     shell, so the one-line `error: ...` is the first line of the log; exit 74 (out of disk space or
#     quota) is never requeued either: it would fail again;
#   * a requeue only when the run advanced: the newest checkpoint's step (sampling: its committed
#     shards) is compared with the one the previous restart ended at, and after more restarts in a row
#     without progress than Python allows (ddpm.run.restarts; DDPM_MAX_IDLE_RESTARTS overrides it) the
#     job ends with one line saying why (a time limit or preemption that comes before the first new
#     checkpoint would otherwise requeue it forever);
#   * srun --kill-on-bad-exit=1: a rank that crashes takes the step down at once, instead of leaving
#     the other ranks waiting in a collective (train.collective_timeout_s), and that is a failure,
#     not a preemption: exit status != 75, no requeue.
# The shell asks Python for every number Python owns (ddpm_requeue_fact: python -m ddpm.cluster.requeue):
# the requeue exit code, the restart limit and count, the latest checkpoint's step, the rendezvous port.

export PYTHONPATH="$DDPM_ROOT${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's code, installed or not
export PYTHONUNBUFFERED=1                                   # log lines appear as they happen
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
# Some SLURM releases do not pass sbatch's --cpus-per-task on to srun; this makes every release do so.
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then export SRUN_CPUS_PER_TASK="${SRUN_CPUS_PER_TASK:-$SLURM_CPUS_PER_TASK}"; fi
PYTHON="${DDPM_PYTHON:-python}"
# ddpm_requeue_fact COMMAND [ARGS]: a number Python owns (python -m ddpm.cluster.requeue --help lists them);
# a bad argument or setting is one `error:` line and exit status 2.
ddpm_requeue_fact() { "$PYTHON" -m ddpm.cluster.requeue "$@"; }
# The exit code that means "checkpoint saved, requeue me", as ddpm.errors defines it (one definition).
REQUEUE_EXIT_CODE=$(ddpm_requeue_fact exit-code) || {
  echo "error: '$PYTHON' cannot import ddpm from $DDPM_ROOT; activate the environment ddpm-hpc is installed in," \
       "or set DDPM_PYTHON=/path/to/venv/bin/python" >&2
  exit 2
}

ddpm_log() { echo "[ddpm $(date +%T)] $*" >&2; }

# ddpm_rendezvous: MASTER_ADDR = first host of the allocation (task 0 runs there), by the address SLURM
# itself reaches it at (its NodeAddr; that is the host name unless the cluster set one), MASTER_PORT =
# f(job id, restart count) from Python (ddpm.run.restarts.master_port), so every requeue gets a fresh
# port. Always derived here: a MASTER_PORT inherited from the submitting shell would be reused by every
# restart.
ddpm_rendezvous() {
  local hosts first addr port
  hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
  first=${hosts%%$'\n'*}
  addr=$(scontrol -o show node "$first" 2>/dev/null | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')
  port=$(ddpm_requeue_fact master-port "$SLURM_JOB_ID" "${SLURM_RESTART_COUNT:-0}") || return
  export MASTER_ADDR="${addr:-$first}" MASTER_PORT="$port"
}

# ddpm_resolve_config PATH: a config path as given (relative to the job's working directory), else
# relative to the checkout, so both `DDPM_CONFIG=my.yaml` and `DDPM_CONFIG=configs/recipes/x.yaml` work.
ddpm_resolve_config() {
  if [ -f "$1" ] || [ ! -f "$DDPM_ROOT/$1" ]; then echo "$1"; else echo "$DDPM_ROOT/$1"; fi
}

_ddpm_on_signal() {  # $1: USR2 or TERM. Only remember and forward; the training decides when to stop.
  if [ "$1" = USR2 ]; then _ddpm_usr2=1; else _ddpm_term=1; fi
  ddpm_log "batch shell got SIG$1${_ddpm_pid:+, forwarding it to the training step (srun pid $_ddpm_pid)}"
  if [ -z "$_ddpm_pid" ]; then return 0; fi
  kill -s "$1" "$_ddpm_pid" 2>/dev/null || true
  # srun drops a signal that comes while it is still launching the tasks: repeat USR2 every 10 s until
  # the step has ended (the training only sets its flag again).
  if [ "$1" = USR2 ]; then (while sleep 10 && kill -s USR2 "$_ddpm_pid" 2>/dev/null; do :; done) & fi
}

# ddpm_trap_signals: from now on the batch shell remembers USR2/TERM (and forwards them once a step
# runs) instead of dying of them.
ddpm_trap_signals() {
  _ddpm_usr2=0 _ddpm_term=0 _ddpm_pid=""
  trap '_ddpm_on_signal USR2' USR2
  trap '_ddpm_on_signal TERM' TERM
}

# ddpm_requeue RC: put this job back in the queue (same job id, so the same run dir); RC if that fails.
ddpm_requeue() {
  ddpm_log "requeueing job $SLURM_JOB_ID (restart $(( ${SLURM_RESTART_COUNT:-0} + 1 ))); the rerun resumes the" \
           "same run dir"
  if scontrol requeue "$SLURM_JOB_ID"; then return 0; fi
  ddpm_log "error: scontrol requeue $SLURM_JOB_ID failed; the checkpoint is saved: resubmit with" \
           "DDPM_RUN_DIR=<this job's run dir> to continue"
  return "$1"
}

# ddpm_latest_step RUN_DIR: the step of the newest complete checkpoint (-1 if none), from Python.
ddpm_latest_step() { ddpm_requeue_fact latest-step "$1"; }

# ddpm_idle_restarts DIR [PROGRESS]: how many restarts in a row of this job ended without progress (kept
# by Python in DIR/restarts_without_progress). With PROGRESS, first record that this run stopped there:
# the count goes back to 0 when PROGRESS is past the recorded one, and up by one otherwise.
ddpm_idle_restarts() { ddpm_requeue_fact idle-restarts "$1" ${2:+--record "$2"}; }

# ddpm_committed_shards DIR: the progress of sampling requests under DIR (RUN_DIR/samples): committed
# shards, and a finished request (its shards assembled into NAME.h5) counts more than any number of them;
# -1 when there is neither, as for a run without a checkpoint.
ddpm_committed_shards() {
  local shards done
  shards=$(find "$1" -name 'shard_*.npz' 2>/dev/null | wc -l)
  done=$(find "$1" -maxdepth 1 -name '*.h5' 2>/dev/null | wc -l)
  echo $(( shards + done == 0 ? -1 : shards + 1000000 * done ))
}

# ddpm_no_progress_error IDLE DIR PROGRESS: the one line that ends a job whose restarts keep stopping
# before progress; what progress is depends on the job ($_ddpm_what: training, or sampling with
# DIR=RUN_DIR/samples).
ddpm_no_progress_error() {
  local idle=$1 dir=$2 newest=$3
  if [ "${_ddpm_what:-training}" = sampling ]; then
    ddpm_log "error: $idle restarts in a row ended before a new sample shard was committed: the time limit or" \
             "preemption comes before the tasks finish one; not requeueing. Give it a longer lead (#SBATCH" \
             "--signal=B:USR2@300) or a longer --time (jobs.sample: or a smaller --batch), then submit the same" \
             "command again (or raise DDPM_MAX_IDLE_RESTARTS)"
    return
  fi
  if [ "$newest" -ge 0 ]; then newest="step $newest"; else newest=none; fi
  ddpm_log "error: $idle restarts in a row ended before a new checkpoint (newest: $newest): the time limit or" \
           "preemption comes before training reaches one; not requeueing. Give it a longer lead (#SBATCH" \
           "--signal=B:USR2@300), a longer --time or a smaller checkpoint.every, then resubmit with" \
           "DDPM_RUN_DIR=$dir (or raise DDPM_MAX_IDLE_RESTARTS)"
}

# ddpm_run_step RUN_DIR CMD...: run CMD (srun ...) in the background so that trapped signals reach it,
# wait for it, and requeue the job if it asks for that and made progress since the last restart
# (progress: the function named by $_ddpm_progress, default ddpm_latest_step). Returns CMD's exit
# status otherwise.
ddpm_run_step() {
  local run_dir=$1 idle max_idle reached progress=${_ddpm_progress:-ddpm_latest_step}
  shift
  local rc=0
  if [ "$_ddpm_usr2" = 1 ] || [ "$_ddpm_term" = 1 ]; then
    # The signal came after the last check but before the step started: nothing to forward it to, nothing
    # to save; a stop before any progress, as if the step had been stopped at once.
    ddpm_log "the signal came before ${_ddpm_what:-training} started; not starting it"
    rc=$REQUEUE_EXIT_CODE
  else
    "$@" &
    _ddpm_pid=$!
    # `wait` returns early whenever a trapped signal arrives; wait again until the step has really ended,
    # then once more for its exit status (bash keeps it).
    while kill -0 "$_ddpm_pid" 2>/dev/null; do wait "$_ddpm_pid" || true; done
    wait "$_ddpm_pid" || rc=$?
  fi
  # A task killed by the forwarded USR2 before Python installed its handler (rc > 128) also has
  # nothing to lose by a requeue: the rerun resumes from the newest checkpoint.
  if [ "$rc" = "$REQUEUE_EXIT_CODE" ] || { [ "$_ddpm_usr2" = 1 ] && [ "$rc" -gt 128 ]; }; then
    reached=$("$progress" "$run_dir") && idle=$(ddpm_idle_restarts "$run_dir" "$reached") &&
      max_idle=$(ddpm_requeue_fact max-idle-restarts) || return
    if [ "$idle" -gt "$max_idle" ]; then
      ddpm_no_progress_error "$idle" "$run_dir" "$reached"
      return 1
    fi
    if [ "$_ddpm_term" = 1 ]; then
      ddpm_log "${_ddpm_what:-training} stopped after SIGTERM (exit $rc); SLURM itself requeues or cancels the job"
      return "$rc"
    fi
    ddpm_log "${_ddpm_what:-training} stopped for preemption (exit $rc)"
    ddpm_requeue "$rc"
    return
  fi
  return "$rc"
}

# ddpm_sample JOB RUN_DIR [options]: jobs.sample, or jobs.evaluate (its --fid-samples shards), under srun
# with one task per GPU; the tasks share the request's shards. Stopped by the time limit or preemption
# while shards are made (exit 75), the job requeues itself and the rerun makes only the missing ones.
ddpm_sample() {
  local job=$1 run_dir=$2
  shift 2
  ddpm_trap_signals
  ddpm_rendezvous
  ddpm_log "job ${SLURM_JOB_ID} restart ${SLURM_RESTART_COUNT:-0} on $(hostname -s): $job $run_dir${*:+ $*};" \
           "${SLURM_NTASKS:-1} task(s), rendezvous $MASTER_ADDR:$MASTER_PORT; python $(command -v "$PYTHON")"
  # Progress and the count of restarts without it are kept in RUN_DIR/samples, apart from training's.
  _ddpm_progress=ddpm_committed_shards _ddpm_what=sampling
  ddpm_run_step "$run_dir/samples" srun --kill-on-bad-exit=1 "$PYTHON" -m "$job" "$run_dir" "$@"
}

# ddpm_train CONFIG RUN_DIR [key.sub=value ...]: validate, print where and how, then train under srun.
ddpm_train() {
  local config run_dir plan idle max_idle
  config=$(ddpm_resolve_config "$1")
  run_dir=$2
  shift 2
  ddpm_trap_signals
  # Validate the config, the overrides and the run dir in the batch shell first (a few seconds: the
  # model arguments are checked against the net classes): a bad override fails the job with exit 2 and
  # `error: ...` as the first log line, instead of N tasks printing it after srun started them.
  plan=$("$PYTHON" -m jobs.train --config "$config" "$@" --run-dir "$run_dir" --dry-run) || return $?
  # A signal during the check: nothing trained yet, nothing to save. SIGTERM: SLURM ends the job anyway;
  # the time-limit warning: a rerun with a fresh time limit beats starting now.
  if [ "$_ddpm_term" = 1 ]; then return 143; fi
  if [ "$_ddpm_usr2" = 1 ]; then ddpm_requeue "$REQUEUE_EXIT_CODE"; return; fi
  # Ask Python before the header lines: from the header on, the step starts at once.
  idle=$(ddpm_idle_restarts "$run_dir") && max_idle=$(ddpm_requeue_fact max-idle-restarts) || return
  ddpm_rendezvous
  ddpm_log "job ${SLURM_JOB_ID} restart ${SLURM_RESTART_COUNT:-0} on $(hostname -s):" \
           "${SLURM_JOB_NUM_NODES:-1} node(s), ${SLURM_NTASKS:-1} task(s), rendezvous $MASTER_ADDR:$MASTER_PORT"
  ddpm_log "config $config ${*:+with $* }-> ${plan##*$'\n'}; python $(command -v "$PYTHON")"
  if [ "$idle" -gt "$max_idle" ]; then  # SLURM requeued it itself (preemption), again
    ddpm_log "error: $idle restarts in a row ended before a new checkpoint; not training again. See the" \
             "earlier restarts in this log; resubmit with DDPM_RUN_DIR=$run_dir to try once more (a new job" \
             "starts a new count)"
    return 1
  fi
  ddpm_run_step "$run_dir" srun --kill-on-bad-exit=1 "$PYTHON" -m jobs.train --config "$config" "$@" --run-dir "$run_dir"
}

# ddpm_sweep_runs FILE: the run lines of a sweep file, one per line; `#` starts a comment (at the start
# of a line or after whitespace) and blank lines are dropped. Array index i is the i-th of these, from 0.
ddpm_sweep_runs() {
  awk '{ sub(/(^|[ \t])#.*/, ""); gsub(/^[ \t\r]+|[ \t\r]+$/, ""); if ($0 != "") print }' "$1"
}
