# Shared by cluster-up and cluster-down (sourced, not run): the local
# topology's names and addresses, and how to read its state.

CL_NET4=10.231.0
CL_NET6=fd00:c4a0::
CL_MQTT_PORT=1883
CL_CLUSTER_PORT=7000
CL_HTTP_PORT=9100

cl_die() { local code=$1; shift; echo "$(basename "$0"): $*" >&2; exit "$code"; }
cl_hub() { echo "$1-hub"; }
cl_node_ns() { echo "$1-n$2"; }
cl_netns_names() { cl_hub "$1"; for i in $(seq "$2"); do cl_node_ns "$1" "$i"; done; }

# cl_alive PIDFILE: the process it names is running.
cl_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# cl_all_running DIR NAME N: every namespace exists and every node's
# supervisor is running.
cl_all_running() {
  local ns i
  for ns in $(cl_netns_names "$2" "$3"); do [ -e "/run/netns/$ns" ] || return 1; done
  for i in $(seq "$3"); do cl_alive "$1/n$i/supervisor.pid" || return 1; done
}

# cl_cluster_views NAME N: every node's /cluster document, one per line
# (an empty line for a node that does not answer).
cl_cluster_views() {
  local i
  for i in $(seq "$2"); do
    ip netns exec "$(cl_hub "$1")" curl -s --max-time 1 "http://$CL_NET4.$i:$CL_HTTP_PORT/cluster" | jq -c . 2>/dev/null || echo
  done
}

# cl_converged NAME N: every node answers, sees every other node up, and
# knows each one's routes at the version that node itself is at.
cl_converged() {
  local views
  views=$(cl_cluster_views "$1" "$2")
  [ "$(grep -c '^{' <<<"$views")" -eq "$2" ] || return 1
  jq -se --argjson n "$2" '
    (map({key: .node, value: .route_version}) | from_entries) as $own
    | length == $n and all(.[]; (.members | length) == $n - 1
        and all(.members[]; .state == "up" and .route_version == $own[.name]))' <<<"$views" >/dev/null
}

# cl_topology_json DIR NAME N HUB: what a client needs to reach the nodes.
cl_topology_json() {
  local dir=$1 name=$2 n=$3 hub=$4 i nodes=()
  for i in $(seq "$n"); do
    nodes+=("$(jq -nc --arg name "n$i" --arg netns "$(cl_node_ns "$name" "$i")" \
      --arg v4 "$CL_NET4.$i" --arg v6 "${CL_NET6}$i" --arg dir "$dir/n$i" \
      --argjson mp "$CL_MQTT_PORT" --argjson cp "$CL_CLUSTER_PORT" --argjson hp "$CL_HTTP_PORT" \
      '{name: $name, netns: $netns, ipv4: $v4, ipv6: $v6, mqtt: "\($v4):\($mp)", mqtt_ipv6: "[\($v6)]:\($mp)",
        cluster: "\($v4):\($cp)", http: "\($v4):\($hp)", pid_file: "\($dir)/pid", restarts_file: "\($dir)/restarts",
        data_dir: "\($dir)/data", log: "\($dir)/broker.log"}')")
  done
  printf '%s\n' "${nodes[@]}" | jq -s --arg name "$name" --arg dir "$dir" --arg hub "$hub" \
    --arg h4 "$CL_NET4.254" --arg h6 "${CL_NET6}fe" \
    '{name: $name, run_dir: $dir, hub_netns: $hub, hub_ipv4: $h4, hub_ipv6: $h6, nodes: .}'
}
