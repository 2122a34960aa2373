#!/bin/bash
# Benign session that installs a developer tool the vendor way: `curl ... | sh` from an
# artefact server this host's audited processes did not start (record.py serves it as
# an unaudited "internet" endpoint), then uses it. ROUND and APORT vary it.
set +e
R=${ROUND:-1}; APORT=${APORT:-9400}
think() { sleep "0.$(( (RANDOM % 8) + 2 ))"; }
cd ~; think
command -v hwtool >/dev/null || [ -x ~/.hwtool/bin/hwtool ] || curl -fsSL "http://127.0.0.1:$APORT/install.sh" | APORT=$APORT sh; think
~/.hwtool/bin/hwtool status; think
curl -fsS -o /tmp/hwtool-$USER.new "http://127.0.0.1:$APORT/hwtool" && cmp -s /tmp/hwtool-$USER.new ~/.hwtool/bin/hwtool && echo "hwtool up to date"; rm -f /tmp/hwtool-$USER.new; think
grep -c hwtool ~/.bashrc; think
bash -lc 'hwtool --version' 2>/dev/null; think
mkdir -p ~/work && cd ~/work && ~/.hwtool/bin/hwtool status > status-$R.txt && tail -1 status-$R.txt; think
