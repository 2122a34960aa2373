#!/usr/bin/env bash
# Record Headwater's own attack scenarios with the kernel audit (run as root on a
# disposable VM, like the dev corpus's generate.sh, whose library this sources).
#
#   sudo bash bench/attack_audit/record.sh            # all scenarios
#   sudo bash bench/attack_audit/record.sh own02      # names starting with own02
#
# The scenarios use other tools, paths and ports than the dev corpus (see README.md).
# Accounts devops (1501) and alice (1502), an sshd on 127.0.0.1:2222, stand-in
# attacker servers on 127.0.0.1 and auditd with the dev corpus's rules.txt are
# started, and all of it (with what the scenarios installed) is removed on exit;
# auditing is left off. Output: a log and its labels per scenario in OUTDIR (xz the log
# into data/ to keep it).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
SHARED=${SHARED:-$HERE/../../../shared/datasets/audit}
TOOLS=$SHARED/tools; SCEN=$SHARED/scenarios; RULES=$SHARED/rules.txt
OUTDIR=${OUTDIR:-/tmp/attack-audit}; WORK=${WORK:-/tmp/corpus-own}
SSH_PORT=2222; USERS="devops=1501,alice=1502"; SUDOERS=/etc/sudoers.d/zz-audit-corpus-own
CUR=setup; ONLY=${1:-}
PY=${PY:-/usr/bin/python3}
# shellcheck source=/dev/null
source "$TOOLS/corpuslib.sh"
# shellcheck source=/dev/null
source "$SCEN/fixtures.sh"
require_root; ensure_packages

remove_artefacts() {  # what the scenarios install: gone after each one and on exit
  rm -rf /etc/cron.d/kworker-sync /var/tmp/.sysd /var/tmp/.cache /dev/shm/.kworker \
         /dev/shm/.b.tgz /dev/shm/.s /etc/systemd/system/netlog.service /tmp/.d.zip /tmp/.x \
         /etc/cron.d/0anacron-sync /etc/ssh/sshd_config.d/99-local.conf
  if id sysbackup >/dev/null 2>&1; then userdel sysbackup; fi
}
cleanup() {
  set +e
  audit_stop; bg_stop; sshd_stop
  for u in alice devops; do kill_user_procs "$u"; crontab -r -u "$u" 2>/dev/null; done
  remove_artefacts
  rm -f "$SUDOERS"
  for u in alice devops; do id "$u" >/dev/null 2>&1 && userdel -r "$u" 2>/dev/null; done
  log "cleanup done (auditing is off: $(auditctl -s | awk '$1=="enabled"{print $2}'))"
}
trap cleanup EXIT

selected() { [ -z "$ONLY" ] || [[ $1 == "$ONLY"* ]]; }
http_on() { spawn "$PY" "$TOOLS/c2.py" http --port "$1" --dir "$WORK/c2www" --log "$WORK/transcripts/$CUR-http.txt"; wait_port "$1"; }
listener_on() {  # listener_on PORT COMMANDS: one reverse-shell session (LISTENER: its pid)
  spawn "$PY" "$TOOLS/c2.py" listen --port "$1" --commands "$2" --out "$WORK/transcripts/$CUR-listener.txt" --delay 2.0
  LISTENER=${BG_PIDS[-1]}
}
begin() { reset_home devops; fixture_devops; reset_home alice; fixture_alice; }
record() {  # record BACKGROUND_CMDS SEED: devops's benign session beside alice's attack
  audit_start "$WORK/raw/$CUR.log"; sleep 2
  drive devops "$SCEN/$1" "$2" & local d1=$!
  sleep 4
  drive alice "$HERE/${CUR%%_*}_alice.cmds" $(( $2 + 1 ))
  [ -z "${LISTENER:-}" ] || wait "$LISTENER" 2>/dev/null || true
  LISTENER=""
  wait $d1 || true
  sleep 3; audit_stop; bg_stop
  remove_artefacts
  cp "$HERE/$CUR.meta.json" "$WORK/meta/$CUR.json"
  finish_scenario "$CUR" "$USERS" "$WORK/meta/$CUR.json"
}

rm -rf "$WORK"; mkdir -p "$WORK"/{raw,meta,transcripts,c2www} "$OUTDIR"
chmod 755 "$WORK"; chmod 700 "$WORK"/{raw,meta,transcripts}
make_user devops 1501; make_user alice 1502; chmod 700 "$WORK/keys"
printf 'devops ALL=(ALL) NOPASSWD: ALL\nalice ALL=(ALL) NOPASSWD: ALL\n' > "$SUDOERS"; chmod 440 "$SUDOERS"
cp "$HERE"/payloads/* "$WORK/c2www/"
sshd_start "$SSH_PORT"

if selected own01; then
  CUR=own01_pyshm_setuid_exfil; begin
  http_on 8123
  record bg_devops_b.cmds 2301
fi
if selected own02; then
  CUR=own02_perl_revshell_autostart; begin
  http_on 8444
  spawn "$PY" "$TOOLS/c2.py" sink --port 9555 --count 2 --log "$WORK/transcripts/$CUR-sink.txt"; wait_port 9555
  listener_on 7443 "$HERE/own02_listener.cmds"
  record bg_devops_a.cmds 2303
fi
if selected own03; then
  CUR=own03_pyagent_sysunit_upload; begin
  http_on 8555
  listener_on 6001 "$HERE/own03_listener.cmds"
  record bg_devops_c.cmds 2305
fi
if selected own04; then
  CUR=own04_miner_ransom; begin
  http_on 8666
  spawn "$PY" "$TOOLS/c2.py" sink --port 3333 --count 2 --log "$WORK/transcripts/$CUR-sink.txt"; wait_port 3333
  record bg_devops_a.cmds 2307
fi
if selected own05; then
  CUR=own05_admin_secrets_cron; begin
  record bg_devops_b.cmds 2309
fi
