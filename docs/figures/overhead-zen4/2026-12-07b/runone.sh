#!/bin/bash
# usage: runone.sh TREE N
cd $1
/work/main/.venv/bin/python -m splitserve.cli up --grpc-port 18601 --http-port 18600 > /tmp/up.log 2>&1 &
UP=$!
for i in $(seq 1 240); do curl -sf localhost:18600/ready >/dev/null 2>&1 && break; sleep 1; done
sleep 3
${CLIENT:-/work/main/.venv/bin/python /tmp/client.py 127.0.0.1:18601 $2}
kill -TERM $UP; wait $UP
