#!/bin/bash
# Benign admin session (sudo for system chores, checks, backups); ROUND varies it.
set +e
R=${ROUND:-1}; PORT=${PORT:-8090}
think() { sleep "0.$(( (RANDOM % 8) + 2 ))"; }
id; hostname; uptime; think
df -h / | tail -1; free -m | head -2; think
sudo -n true && echo "sudo ok"; think
sudo -n tail -n 3 /var/log/dpkg.log; think
sudo -n ls -la /root | head -3; think
sudo -n cat /etc/sudoers.d/README 2>/dev/null | head -2; think
sudo -n find /var/log -name "*.gz" -mtime +30 | head -3; think
sudo -n apt-cache policy openssl | head -3; think
ss -tln | head -5; think
ps aux | wc -l; think
getent passwd "$USER"; think
grep -c . /etc/passwd; think
sudo -n mkdir -p /var/backups/home-$USER; think
tar czf /tmp/home-$USER-$R.tgz -C "$HOME" --exclude=work/proj/.venv --exclude=backups . 2>/dev/null; think
sudo -n cp /tmp/home-$USER-$R.tgz /var/backups/home-$USER/ && rm -f /tmp/home-$USER-$R.tgz; think
sudo -n ls -la /var/backups/home-$USER | tail -2; think
sudo -n find /var/backups/home-$USER -name "*.tgz" -mmin +60 -delete; think
sudo -n sh -c "echo 'rotated $R' >> /var/log/hw-admin-notes.log"; think
sudo -n tail -n 2 /var/log/hw-admin-notes.log; think
nc -z -w 1 127.0.0.1 2222 && echo "sshd up"; think
nc -z -w 1 127.0.0.1 "$PORT" || echo "docs server down (fine)"; think
curl -s -m 2 "http://127.0.0.1:2222/" >/dev/null; echo "curl rc $?"; think
openssl s_client -help 2>&1 | head -1; think
openssl version; think
echo "c2VydmljZT1iYWNrdXAKaW50ZXJ2YWw9ZGFpbHkK" | base64 -d > /tmp/job-$USER.conf && cat /tmp/job-$USER.conf && rm -f /tmp/job-$USER.conf; think
crontab -l 2>/dev/null | tail -2; think
( crontab -l 2>/dev/null | grep -v hw-backup; echo "15 3 * * * tar czf /tmp/hw-backup-\$(date +\%u).tgz -C \$HOME notes 2>/dev/null" ) | crontab -; think
mkdir -p ~/notes && echo "$(date -u +%FT%T) admin round $R ok" >> ~/notes/log.txt; think
tail -n 2 ~/notes/log.txt; think
grep -q "export EDITOR" ~/.profile || echo "export EDITOR=vi" >> ~/.profile; think
chmod 600 ~/notes/log.txt; think
ls -la ~/.ssh 2>/dev/null | head -3; think
gzip -kf ~/notes/log.txt && rm -f ~/notes/log.txt.gz; think
w -h | head -3; last -n 3 2>/dev/null | head -3; think
