# Loopback port helpers for the benchmark scripts (sourced, not run).

# Prints a TCP port on 127.0.0.1 that nothing listens on right now.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# wait_port PORT [TRIES]: waits until something accepts on 127.0.0.1:PORT,
# TRIES times 50 ms (default 100); exits the script if nothing does.
wait_port() {
  for _ in $(seq "${2:-100}"); do
    (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0
    sleep 0.05
  done
  echo "$(basename "$0"): nothing listens on port $1" >&2
  exit 1
}
