# Shared by the launch scripts (sourced, not run): error exit and shell quoting for display.
# The sourcing script sets PROG (its name in messages) and, when it has no --help,
# NO_HELP_HINT=1. (launch/slurm.sbatch keeps its own copy: sbatch runs a spooled copy of
# the script, away from this directory.)

die() {
  echo "$PROG: error: $*" >&2
  [[ "${NO_HELP_HINT:-0}" == 1 ]] || echo "Run '$PROG --help' for usage." >&2
  exit 2
}

# Quote one argument for printing / for a remote shell: bare when safe, else single quotes
# (--flag='value' keeps the flag name readable).
q() {
  local safe='^[A-Za-z0-9_./:=,@+%^-]+$'
  if [[ "$1" =~ $safe ]]; then printf '%s' "$1"
  elif [[ "$1" =~ ^(--[A-Za-z0-9_.-]+=)(.*)$ ]]; then
    printf "%s'%s'" "${BASH_REMATCH[1]}" "${BASH_REMATCH[2]//\'/\'\\\'\'}"
  else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}

# All arguments quoted with q, space-separated, no trailing newline.
show() { local a out=""; for a in "$@"; do out+="$(q "$a") "; done; printf '%s' "${out% }"; }
