#!/bin/bash
# Benign developer session (one "work block"); ROUND and PORT vary what is done.
# Runs as the developer over ssh (bash -s); every command is ordinary daily work.
set +e
R=${ROUND:-1}; PORT=${PORT:-8090}
think() { sleep "0.$(( (RANDOM % 8) + 2 ))"; }
mkdir -p ~/work && cd ~/work
if [ ! -d proj/.git ]; then
  mkdir -p proj/src proj/tests && cd proj
  git init -q && git config user.email "$USER@example.test" && git config user.name "$USER"
  printf 'def add(a, b):\n    return a + b\n' > src/calc.py
  printf 'import sys, unittest\nsys.path.insert(0, "src")\nfrom calc import add\nclass T(unittest.TestCase):\n    def test_add(self):\n        self.assertEqual(add(2, 3), 5)\nif __name__ == "__main__":\n    unittest.main()\n' > tests/test_calc.py
  printf '#include <stdio.h>\nint main(void){ printf("tool %%d\\n", 1); return 0; }\n' > src/tool.c
  printf 'tool: src/tool.c\n\tcc -O2 -Wall -o tool src/tool.c\ncheck: tool\n\t./tool\nclean:\n\trm -f tool\n' > Makefile
  printf 'API_TOKEN=dev-local-not-secret\nDB_URL=sqlite:///tmp/dev.db\n' > .env
  git add -A && git commit -qm "initial import"
  cd ..
fi
cd proj; think
git status --short; think
git log --oneline | head -5; think
git checkout -q -b "feature-$R" 2>/dev/null || git checkout -q "feature-$R"; think
printf 'def mul(a, b):\n    return a * b  # round %s\n' "$R" >> src/calc.py; think
python3 -m unittest discover -s tests -q 2>&1 | tail -2; think
[ -d .venv ] || python3 -m venv .venv; think
.venv/bin/python -c "import sys; print(sys.prefix)"; think
.venv/bin/python -m unittest discover -s tests 2>&1 | tail -1; think
make -s clean; make -s tool && make -s check; think
cc -O0 -g -c src/tool.c -o /tmp/tool-$USER-$R.o && rm -f /tmp/tool-$USER-$R.o; think
grep -rn "def " src | head -5; think
git add -A && git commit -qm "work round $R"; think
git checkout -q master 2>/dev/null || git checkout -q main; git merge -q --no-edit "feature-$R"; think
git log --oneline | wc -l; think
python3 - <<'PY'
import json, pathlib
p = pathlib.Path.home() / "work" / "report.json"
data = {"files": sorted(str(x) for x in pathlib.Path(".").rglob("*.py") if ".venv" not in str(x))}
p.write_text(json.dumps(data, indent=1))
print(len(data["files"]), "python files")
PY
think
cat .env | cut -d= -f1; think
cp .env /tmp/env-backup-$USER-$R && rm -f /tmp/env-backup-$USER-$R; think
# local web server for docs, probed like a developer does
mkdir -p ~/work/site && echo "<h1>docs $R</h1>" > ~/work/site/index.html
python3 -m http.server "$PORT" --bind 127.0.0.1 --directory ~/work/site >/tmp/http-$USER.log 2>&1 &
SRV=$!; sleep 1.5
nc -z -w 2 127.0.0.1 "$PORT" && echo "port $PORT open"; think
curl -s "http://127.0.0.1:$PORT/" | head -2; think
curl -s -o /dev/null -w '%{http_code}\n' "http://127.0.0.1:$PORT/missing"; think
kill $SRV; wait $SRV 2>/dev/null; rm -f /tmp/http-$USER.log; think
# shell and scheduler housekeeping
grep -q "alias gs=" ~/.bashrc || echo "alias gs='git status --short'" >> ~/.bashrc; think
sed -i "s/^export HISTSIZE=.*/export HISTSIZE=$((5000 + R))/" ~/.bashrc; grep -q HISTSIZE ~/.bashrc || echo "export HISTSIZE=5000" >> ~/.bashrc; think
crontab -l 2>/dev/null > /tmp/cron-$USER; think
grep -q "work/proj" /tmp/cron-$USER || echo "30 2 * * * cd ~/work/proj && git gc -q" >> /tmp/cron-$USER
crontab /tmp/cron-$USER; rm -f /tmp/cron-$USER; crontab -l | tail -1; think
mkdir -p ~/.config/systemd/user
printf '[Unit]\nDescription=docs preview\n[Service]\nExecStart=/usr/bin/python3 -m http.server %s --bind 127.0.0.1\n[Install]\nWantedBy=default.target\n' "$PORT" > ~/.config/systemd/user/docs-preview.service; think
mkdir -p ~/.config/systemd/user/default.target.wants
ln -sf ~/.config/systemd/user/docs-preview.service ~/.config/systemd/user/default.target.wants/docs-preview.service; think
# crypto and encoding chores
echo "aGVsbG8gZnJvbSByb3VuZCAk" | base64 -d; echo; think
base64 -w0 src/calc.py | base64 -d | head -1; think
openssl rand -hex 8; think
openssl req -x509 -newkey rsa:2048 -nodes -subj "/CN=dev-$R.local" -days 1 -keyout /tmp/k-$USER.pem -out /tmp/c-$USER.pem 2>/dev/null && openssl x509 -in /tmp/c-$USER.pem -noout -subject; rm -f /tmp/k-$USER.pem /tmp/c-$USER.pem; think
openssl dgst -sha256 Makefile; think
[ -f ~/.ssh/id_work ] || ssh-keygen -q -t ed25519 -N '' -C "$USER@work" -f ~/.ssh/id_work; think
ssh-keygen -lf ~/.ssh/id_work.pub; think
# backups
mkdir -p ~/backups && tar czf ~/backups/proj-$R.tgz --exclude=.venv -C ~/work proj && tar tzf ~/backups/proj-$R.tgz | wc -l; think
ls -t ~/backups | tail -n +4 | while read f; do rm -f ~/backups/"$f"; done; think
find ~/work -name "*.pyc" -delete; think
ps -u "$USER" -o pid,comm | head -5; id; uname -r; think
