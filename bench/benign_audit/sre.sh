#!/bin/bash
# Benign SRE / service-developer session (one "work block"), written after the detector
# was tuned, with other tools, paths and ports than dev.sh / admin.sh: a C++ service built
# with cmake, a bare git remote, a deploy key used for ssh/scp to this host, tarballs
# fetched from a local artefact server with wget, a netcat port test, gpg/openssl
# encrypted backups, strace/gdb, sqlite3, node, dotfile and scheduler edits (@reboot
# cron, systemd user timer) and sudo config chores. ROUND and PORT vary what is done.
set +e
R=${ROUND:-1}; PORT=${PORT:-9300}; SSHP=${SSHPORT:-2222}
think() { sleep "0.$(( (RANDOM % 8) + 2 ))"; }
mkdir -p ~/src ~/repos ~/bin ~/logs && cd ~/src
if [ ! -d ~/repos/svc.git ]; then
  git init -q --bare ~/repos/svc.git
  git clone -q ~/repos/svc.git svc 2>/dev/null && cd svc
  git config user.email "$USER@svc.example.test" && git config user.name "$USER"
  mkdir -p src
  printf 'cmake_minimum_required(VERSION 3.10)\nproject(svc CXX)\nadd_executable(svc src/main.cpp)\n' > CMakeLists.txt
  printf '#include <iostream>\nint main(int argc, char**){ std::cout << "svc up " << argc << std::endl; return 0; }\n' > src/main.cpp
  printf 'const fs = require("fs");\nconsole.log(JSON.stringify({files: fs.readdirSync(".").length}));\n' > stats.js
  git add -A && git commit -qm "svc skeleton" && git push -q origin HEAD 2>/dev/null
  cd ..
fi
cd ~/src/svc; think
git pull -q 2>/dev/null; git log -1 --format=%h; think
sed -i "s/svc up/svc up r$R/" src/main.cpp; think
mkdir -p build && cd build && cmake -S .. -B . >/dev/null 2>&1 && make -s 2>&1 | tail -1; think
./svc a b; think
strace -f -c -o /tmp/strace-$USER.txt ./svc >/dev/null; tail -n 2 /tmp/strace-$USER.txt; rm -f /tmp/strace-$USER.txt; think
gdb -q -batch -ex run -ex bt ./svc 2>/dev/null | tail -1; think
cd ..; node stats.js; think
git commit -qam "round $R" && git push -q origin HEAD 2>/dev/null; think
git diff HEAD~1 --stat | tail -1; think
# a local artefact server; fetch a release tarball with wget, unpack, verify
mkdir -p ~/artefacts && tar czf ~/artefacts/svc-$R.tar.gz --exclude=build -C ~/src svc; think
sha256sum ~/artefacts/svc-$R.tar.gz | cut -c1-16; think
python3 -m http.server "$PORT" --bind 127.0.0.1 --directory ~/artefacts >/dev/null 2>&1 &
SRV=$!; sleep 1.5
wget -q -O /tmp/fetch-$USER.tgz "http://127.0.0.1:$PORT/svc-$R.tar.gz" && tar tzf /tmp/fetch-$USER.tgz | wc -l; think
mkdir -p /tmp/unpack-$USER && tar xzf /tmp/fetch-$USER.tgz -C /tmp/unpack-$USER && ls /tmp/unpack-$USER/svc | head -3; think
rm -rf /tmp/unpack-$USER /tmp/fetch-$USER.tgz; think
curl -s -I "http://127.0.0.1:$PORT/" | head -1; think
kill $SRV; wait $SRV 2>/dev/null; think
# is the port free again? a netcat round trip on a test port
nc -z -w 1 127.0.0.1 "$PORT" || echo "port $PORT closed"; think
( nc -l -p $((PORT + 1)) -q 1 > /tmp/nc-$USER.txt 2>/dev/null || nc -l $((PORT + 1)) > /tmp/nc-$USER.txt 2>/dev/null ) &
LIS=$!; sleep 0.7
echo "ping $R" | nc -w 1 -q 1 127.0.0.1 $((PORT + 1)) 2>/dev/null || echo "ping $R" | nc -w 1 127.0.0.1 $((PORT + 1)); think
kill $LIS 2>/dev/null; wait $LIS 2>/dev/null; cat /tmp/nc-$USER.txt; rm -f /tmp/nc-$USER.txt; think
# a deploy key for this host: ssh and scp to itself like to a staging box
[ -f ~/.ssh/id_deploy ] || ssh-keygen -q -t ed25519 -N '' -C "deploy@$USER" -f ~/.ssh/id_deploy; think
grep -q "deploy@$USER" ~/.ssh/authorized_keys || cat ~/.ssh/id_deploy.pub >> ~/.ssh/authorized_keys; think
grep -q "Host staging" ~/.ssh/config 2>/dev/null || printf 'Host staging\n  HostName 127.0.0.1\n  Port %s\n  IdentityFile ~/.ssh/id_deploy\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n' "$SSHP" >> ~/.ssh/config
chmod 600 ~/.ssh/config; think
ssh -o BatchMode=yes staging 'uptime; ls ~/src | head -2'; think
scp -q -o BatchMode=yes ~/src/svc/CMakeLists.txt staging:/tmp/cm-$USER-$R.txt && ssh -o BatchMode=yes staging "wc -l /tmp/cm-$USER-$R.txt; rm -f /tmp/cm-$USER-$R.txt"; think
# data chores: sqlite, jq, perl, encrypted and compressed backups
sqlite3 ~/logs/runs.db "create table if not exists runs(r int, ts text); insert into runs values($R, datetime('now')); select count(*) from runs;"; think
echo "{\"round\": $R, \"ok\": true}" | jq -c '.ok'; think
perl -ne 'print if /svc/' ~/src/svc/CMakeLists.txt | head -1; think
[ -f ~/.backup-pass ] || { openssl rand -base64 24 > ~/.backup-pass; chmod 600 ~/.backup-pass; }; think
tar cf - -C ~/src svc --exclude=build | zstd -q -o /tmp/svc-$USER.tar.zst -f; think
gpg --batch --yes --quiet --pinentry-mode loopback --passphrase-file ~/.backup-pass -c -o ~/logs/svc-$R.tar.zst.gpg /tmp/svc-$USER.tar.zst 2>/dev/null; rm -f /tmp/svc-$USER.tar.zst; think
openssl enc -aes-256-cbc -pbkdf2 -pass file:$HOME/.backup-pass -in ~/src/svc/stats.js -out ~/logs/stats.js.enc && openssl enc -d -aes-256-cbc -pbkdf2 -pass file:$HOME/.backup-pass -in ~/logs/stats.js.enc | head -1; think
ls -t ~/logs/*.gpg 2>/dev/null | tail -n +3 | xargs -r rm -f; think
xz -kf ~/src/svc/CMakeLists.txt && rm -f ~/src/svc/CMakeLists.txt.xz; think
echo "$(date -u +%s) round $R" >> ~/logs/svc.log; : > ~/logs/old.log; think
# dotfiles and schedulers
grep -q "HW_SVC_HOME" ~/.profile || echo "export HW_SVC_HOME=~/src/svc" >> ~/.profile; think
grep -q "alias bld=" ~/.bash_aliases 2>/dev/null || echo "alias bld='cmake --build build'" >> ~/.bash_aliases; think
[ -f ~/.vimrc ] || printf 'set number\nset expandtab\n' > ~/.vimrc; vim -es -c "%s/expandtab/expandtab shiftwidth=4/e" -c wq ~/.vimrc; think
printf '#!/bin/sh\ncd ~/src/svc && git pull -q && cmake --build build\n' > ~/bin/deploy.sh && chmod +x ~/bin/deploy.sh; think
~/bin/deploy.sh >/dev/null 2>&1; think
( crontab -l 2>/dev/null | grep -v deploy.sh; echo "@reboot ~/bin/deploy.sh"; echo "*/30 * * * * ~/bin/deploy.sh >/dev/null 2>&1" ) | crontab -; think
mkdir -p ~/.config/systemd/user
printf '[Unit]\nDescription=svc sync\n[Service]\nType=oneshot\nExecStart=%%h/bin/deploy.sh\n' > ~/.config/systemd/user/svc-sync.service
printf '[Unit]\nDescription=svc sync timer\n[Timer]\nOnCalendar=hourly\n[Install]\nWantedBy=timers.target\n' > ~/.config/systemd/user/svc-sync.timer; think
systemctl --user daemon-reload 2>/dev/null; think
# admin chores when the account may sudo
if sudo -n true 2>/dev/null; then
  printf 'listen=127.0.0.1:%s\nround=%s\n' "$PORT" "$R" > /tmp/svc-$USER.conf
  sudo -n install -m 640 -o root -g "$USER" /tmp/svc-$USER.conf /etc/hw-svc-$USER.conf; rm -f /tmp/svc-$USER.conf; think
  sudo -n sed -i "s/round=.*/round=$R-ok/" /etc/hw-svc-$USER.conf; cat /etc/hw-svc-$USER.conf | tail -1; think
  sudo -n chage -l "$USER" | head -2; think
  sudo -n visudo -c -q && echo "sudoers ok"; think
  sudo -n ss -tlnp | head -4; think
  sudo -n journalctl -n 3 --no-pager 2>/dev/null | tail -1; think
  sudo -n lsof -nP -iTCP -sTCP:LISTEN 2>/dev/null | head -3; think
  sudo -n rm -f /etc/hw-svc-$USER.conf; think
fi
top -bn1 | head -3; netstat -tln 2>/dev/null | head -3; ip -br addr | head -2; think
