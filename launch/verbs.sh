# Sourced by the launchers (tpu_pod.sh, gpu_slurm.sh): their usage text, errors and verb check.
# shellcheck shell=bash

# Prints the launcher's header comment (its usage) and exits with status 2.
usage() {
  awk 'NR > 1 && !/^#/ { exit } NR > 1 && !/^#SBATCH/' "$0" >&2
  exit 2
}

# One line on stderr naming the launcher, exit status 2.
die() {
  echo "$(basename "$0"): $*" >&2
  exit 2
}

# check_verb VERB ALLOWED...: help verbs print the usage; a verb not in ALLOWED is refused,
# naming the allowed ones (those starting with _ are internal and not shown).
check_verb() {
  local verb=$1 v shown=()
  shift
  case "$verb" in -h | --help | help) usage ;; esac
  for v in "$@"; do
    [[ $verb != "$v" ]] || return 0
    [[ $v == _* ]] || shown+=("$v")
  done
  local IFS=,
  die "unknown verb '$verb'; allowed: $(echo "${shown[*]}" | sed 's/,/, /g') (see --help)"
}
