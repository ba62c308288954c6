#!/bin/bash
# `accelerate launch` for a scheduler that signals every process of the job when it preempts or
# cancels it (Slurm does):
#   launch/preemptible.sh --config_file launch/multi_gpu.yaml train.py --config configs/my.yaml
# Under plain `accelerate launch`, torchrun turns a SIGTERM to the launcher into an exception: it
# passes the signal on, waits for the training processes (TORCH_ELASTIC_SHUTDOWN_TIMEOUT, 30 s by
# default, then SIGKILL) and fails, however they ended: status 1 with a SignalException traceback
# (accelerate before 1.16), or 143 (128 + SIGTERM, accelerate 1.16 and later). Here the
# launcher ignores SIGTERM: the training processes, signalled by the scheduler, finish their step,
# save a checkpoint and exit 0, and the launcher then exits 0 too. Ctrl-C is passed on as before,
# and a launcher that is killed still stops its processes (each asks for a SIGTERM when it dies).
# Not for a scheduler that signals one process only (a container's first process, `kill PID`):
# there plain `accelerate launch` is the one that passes the SIGTERM on.
set -euo pipefail
export PET_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT  # torchrun's handlers, without SIGTERM
# Ignored from here on, by the launcher exec'd below and by the training processes until they
# install their own handler (at the start of the program; a SIGTERM before that is not seen).
trap '' TERM
exec accelerate launch "$@"
