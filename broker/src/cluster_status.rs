//! `broker cluster status`: a node's `/cluster` as a table (or the JSON as
//! it came, with `--json`).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use anyhow::{Context as _, bail};

use crate::cluster::Status;

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// The node's HTTP listener (its --http-listen).
    #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:9100")]
    pub http: String,
    /// Print the node's JSON document unchanged.
    #[arg(long)]
    pub json: bool,
}

const TIMEOUT: Duration = Duration::from_secs(5);

/// GET `path` from `addr`: the status code and the body.
fn get(addr: &str, path: &str) -> anyhow::Result<(u16, String)> {
    let target: SocketAddr = addr
        .to_socket_addrs()
        .with_context(|| format!("resolving {addr:?} (expected HOST:PORT of the node's --http-listen)"))?
        .next()
        .with_context(|| format!("{addr:?} resolves to no address"))?;
    let mut s = TcpStream::connect_timeout(&target, TIMEOUT)
        .with_context(|| format!("connecting to {target}: is the node running with --http-listen {addr}?"))?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.set_write_timeout(Some(TIMEOUT))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).with_context(|| format!("reading {path} from {target}"))?;
    let code = raw.split_whitespace().nth(1).and_then(|c| c.parse().ok());
    let (Some(code), Some((_, body))) = (code, raw.split_once("\r\n\r\n")) else {
        bail!("{target} did not answer HTTP (is {addr} the node's --http-listen, not its MQTT port?)");
    };
    Ok((code, body.to_owned()))
}

pub fn run(a: &StatusArgs) -> anyhow::Result<()> {
    let (code, body) = get(&a.http, "/cluster")?;
    if code != 200 {
        bail!("{} answered /cluster with {code}: {}", a.http, body.trim());
    }
    if a.json {
        print!("{body}");
        return Ok(());
    }
    let s: Status =
        serde_json::from_str(&body).with_context(|| format!("{} sent a /cluster this tool cannot read", a.http))?;
    print!("{}", render(&s, crate::cluster::unix_ms()));
    Ok(())
}

/// "3.2s ago" for a resync at `ms` seen at `now` (both Unix ms).
fn ago(ms: u64, now: u64) -> String {
    if ms == 0 {
        return "never".into();
    }
    let d = now.saturating_sub(ms);
    match d {
        0..1_000 => format!("{d}ms ago"),
        1_000..120_000 => format!("{:.1}s ago", d as f64 / 1000.0),
        _ => format!("{}m ago", d / 60_000),
    }
}

pub fn render(s: &Status, now: u64) -> String {
    let mut o = format!(
        "node {} (incarnation {}): {}, route version {}, {} local routes\n",
        s.node,
        s.incarnation,
        if s.degraded { "DEGRADED" } else { "ok" },
        s.route_version,
        s.local_routes
    );
    if s.members.is_empty() {
        o.push_str("no other members known yet\n");
        return o;
    }
    let head = ["MEMBER", "STATE", "CLUSTER", "MQTT", "ROUTE VERSION", "ROUTES", "QUEUED", "DROPPED", "LAST RESYNC"];
    let rows: Vec<[String; 9]> = s
        .members
        .iter()
        .map(|m| {
            [
                m.name.clone(),
                m.state.clone(),
                m.cluster_addr.clone(),
                if m.mqtt_addr.is_empty() { "-".into() } else { m.mqtt_addr.clone() },
                m.route_version.to_string(),
                m.routes.to_string(),
                m.forward_queue.to_string(),
                m.forwards_dropped.to_string(),
                ago(m.last_resync_unix_ms, now),
            ]
        })
        .collect();
    let mut w: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let line = |cells: &[&str]| -> String {
        let mut l: String = cells.iter().enumerate().map(|(i, c)| format!("{c:<w$}  ", w = w[i])).collect();
        l.truncate(l.trim_end().len());
        l + "\n"
    };
    o.push_str(&line(&head));
    for r in &rows {
        o.push_str(&line(&r.iter().map(String::as_str).collect::<Vec<_>>()));
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::Member;

    #[test]
    fn table_has_a_row_per_member_with_its_numbers() {
        let s = Status {
            node: "n1".into(),
            incarnation: 7,
            route_version: 3,
            local_routes: 2,
            degraded: true,
            members: vec![Member {
                name: "n2".into(),
                cluster_addr: "10.0.0.2:7000".into(),
                mqtt_addr: String::new(),
                state: "down".into(),
                route_version: 5,
                routes: 4,
                forward_queue: 1200,
                forwards_dropped: 9,
                last_resync_unix_ms: 10_000,
            }],
        };
        let t = render(&s, 12_500);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].contains("DEGRADED") && lines[0].contains("route version 3"), "{t}");
        assert!(lines[1].starts_with("MEMBER"), "{t}");
        let cells: Vec<&str> = lines[2].split_whitespace().collect();
        assert_eq!(cells, ["n2", "down", "10.0.0.2:7000", "-", "5", "4", "1200", "9", "2.5s", "ago"], "{t}");
    }
}
