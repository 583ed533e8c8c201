#!/usr/bin/env bash
# Resume the newest unfinished so8t_exp run: the Linux twin of windows/resume_at_boot.bat,
# started by the systemd user unit (so8t-resume.service), cron @reboot, or by hand.
# Output goes to <project>/logs/resume_at_boot.log (SO8T_LOG_DIR to move it) with
# timestamps; arguments are passed on (e.g. resume.dry_run=true); the exit code is the
# launcher's (0 done or nothing to do, 2 bad config, 4 not resumable, else the trainer's).
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
log_dir="${SO8T_LOG_DIR:-$root/logs}"
mkdir -p "$log_dir"
log="$log_dir/resume_at_boot.log"
if [ -n "${SO8T_PYTHON:-}" ]; then
  py="$SO8T_PYTHON"
elif [ -x "$root/.venv/bin/python" ]; then
  py="$root/.venv/bin/python"
else
  py="$(command -v python3)"
fi
export PYTHONUTF8=1 PYTHONUNBUFFERED=1

stamp() { while IFS= read -r line || [ -n "$line" ]; do printf '[%s] %s\n' "$(date '+%Y-%m-%d %H:%M:%S')" "$line"; done; }

cd "$root" || exit 1
echo "resume_at_boot: starting $py -m so8t_exp.resume $*" | stamp >> "$log"
"$py" -m so8t_exp.resume "$@" 2>&1 | stamp >> "$log"
code=${PIPESTATUS[0]}
echo "resume_at_boot: exit code $code" | stamp >> "$log"
exit "$code"
