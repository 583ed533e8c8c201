#!/usr/bin/env bash
# Resume the newest unfinished so8t_exp run: the Linux twin of windows/resume_at_boot.bat, for
# cron @reboot or by hand (`python -m so8t_exp.boot install` writes a systemd unit instead).
# Output is appended to <project>/logs/resume_at_boot.log (SO8T_LOG_DIR to move it); the
# launcher timestamps every line itself (SO8T_STAMP_LINES), the same format on both OSes.
# Arguments are passed on (e.g. resume.dry_run=true); the exit code is the launcher's (0 done
# or nothing to do, 2 bad config, 4 not resumable, 6 store unreachable, else the trainer's),
# 8 if it succeeded but the log could not be written, 127 if no Python was found.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
log_dir="${SO8T_LOG_DIR:-$root/logs}"
log="$log_dir/resume_at_boot.log"
export PYTHONUTF8=1 PYTHONUNBUFFERED=1 SO8T_STAMP_LINES=1

if [ -n "${SO8T_PYTHON:-}" ]; then
  py="$SO8T_PYTHON"
elif [ -x "$root/.venv/bin/python" ]; then
  py="$root/.venv/bin/python"
else
  py="$(command -v python3 || true)"
fi

log_ok=1
mkdir -p "$log_dir" 2>/dev/null && : 2>/dev/null >> "$log" || log_ok=0
if [ "$log_ok" = 0 ]; then
  echo "resume_at_boot: cannot write the log $log: output goes to this console" >&2
fi
say() {  # a line of this script's own (the launcher stamps everything else)
  echo "$1" >&2
  if [ "$log_ok" = 1 ]; then printf '[%s] %s\n' "$(date '+%Y-%m-%d %H:%M:%S')" "$1" >> "$log"; fi
}

if [ -z "$py" ] || ! command -v "$py" > /dev/null; then
  say "resume_at_boot: error: no Python found: neither $root/.venv/bin/python nor python3 on PATH; create the venv (bash scripts/setup.sh) or set SO8T_PYTHON"
  exit 127
fi

cd "$root" || exit 1
if [ "$log_ok" = 1 ]; then
  "$py" -m so8t_exp.resume "$@" >> "$log" 2>&1
  exit $?
fi
"$py" -m so8t_exp.resume "$@"
code=$?
[ "$code" -eq 0 ] && code=8
exit "$code"
