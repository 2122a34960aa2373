"""LAUREL JSON lines."""

from __future__ import annotations

import json

from detection.engine import DetectionEngine
from detection.laurel import parse_laurel
from detection.records import ParseError


def test_laurel_execve_event():
    line = json.dumps(
        {
            "ID": "1700000000.100:77",
            "SYSCALL": {
                "arch": "0xc000003e",
                "syscall": 59,
                "SYSCALL": "execve",
                "success": "yes",
                "exit": 0,
                "ARGV": ["0x55", "0x56", "0x0", "0x0"],
                "items": 2,
                "ppid": 10,
                "pid": 11,
                "auid": 1000,
                "uid": 1000,
                "euid": 0,
                "ses": 3,
                "comm": "cat",
                "exe": "/usr/bin/cat",
                "key": "exec",
            },
            "EXECVE": {"argc": 2, "ARGV": ["cat", "/etc/sha%64ow"]},
            "CWD": {"cwd": "/tmp"},
            "PATH": [{"item": 0, "name": "/usr/bin/cat", "inode": 5, "nametype": "NORMAL"}],
            "PROCTITLE": {"ARGV": ["cat", "/etc/shadow"]},
        }
    )
    ev = parse_laurel(line)
    assert ev.syscall == "execve" and ev.pid == 11 and ev.ppid == 10 and ev.euid == 0
    assert ev.argv == ["cat", "/etc/shadow"]  # percent-decoding
    assert ev.args[0] == 0x55 and ev.cwd == "/tmp" and ev.paths[0]["inode"] == "5"


def test_laurel_connect_decoded_sockaddr():
    ev = parse_laurel(
        json.dumps(
            {
                "ID": "1700000000.2:78",
                "SYSCALL": {
                    "syscall": "connect",
                    "success": "yes",
                    "exit": 0,
                    "pid": 12,
                    "ppid": 11,
                },
                "SOCKADDR": [{"saddr": {"family": "inet", "port": 4444, "addr": "10.1.2.3"}}],
            }
        )
    )
    assert ev.sockaddr == {"family": "inet", "addr": "10.1.2.3", "port": 4444}


def test_laurel_errors():
    assert "not valid JSON" in parse_laurel("{nope").reason
    assert "'ID'" in parse_laurel('{"SYSCALL": {}}').reason
    assert isinstance(parse_laurel('{"ID": "x:y"}'), ParseError)
    assert isinstance(parse_laurel("[1,2]"), ParseError)


def test_engine_mixes_raw_and_laurel_lines():
    eng = DetectionEngine("h")
    res = eng.process_lines(
        [
            '{"ID":"1.0:1","SYSCALL":{"syscall":"execve","pid":5,"ppid":1,"exe":"/usr/bin/id",'
            '"auid":1000,"ses":1},"EXECVE":{"ARGV":["id"]}}',
            b'type=CWD msg=audit(1.0:2): cwd="/"',
            "{broken",
        ]
    )
    assert eng.graph.procs[5].argv == ["id"]
    assert len(res.errors) == 1 and res.errors[0][0] == "{broken"
