#!/bin/sh
# check-in: host facts to the operator's web endpoint
curl -s -X POST --data "h=$(hostname)&u=$(id -un)" http://127.0.0.1:8123/checkin >/dev/null 2>&1
exit 0
