//! chaosd's API over TCP with mutual TLS, as a user meets it: certificates
//! made with `chaosctl certs`, a real `chaosd serve --listen-tls` on
//! loopback, chaosctl over the TLS port. A good client lists, injects and
//! recovers; every bad certificate, a client without one, a plaintext
//! client and a server certificate for another name each get one clear line
//! and inject nothing (checked over the unix socket); a bad server
//! configuration stops chaosd at start with one line.

mod common;

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::Path,
    process::{Command, Output},
    time::{Duration, Instant},
};

use common::{Daemon, Netns, chaosctl, chaosd, require_root, text};

fn certs(args: &[&str]) {
    let out = Command::new(chaosctl()).arg("certs").args(args).output().unwrap();
    assert!(out.status.success(), "chaosctl certs {args:?}: {}", text(&out.stderr));
}

/// chaosctl against `url` with the given CA and client files (None: left out).
fn over_tls(url: &str, ca: &Path, client: Option<(&Path, &str)>, args: &[&str]) -> Output {
    let mut cmd = Command::new(chaosctl());
    cmd.args(["--endpoint", url]).arg("--ca").arg(ca);
    if let Some((dir, name)) = client {
        cmd.arg("--cert").arg(dir.join(format!("{name}.pem"))).arg("--key").arg(dir.join(format!("{name}.key")));
    }
    cmd.args(args).output().unwrap()
}

/// Exit code 2 and exactly one line on stderr that contains `expected`.
fn refused(out: &Output, expected: &str, case: &str) {
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{case}: exit code {:?}, stderr: {err}", out.status.code());
    assert_eq!(err.trim_end().lines().count(), 1, "{case}: not one line: {err}");
    assert!(err.contains(expected), "{case}: expected '{expected}' in: {err}");
}

/// The TLS port the daemon bound (it was given port 0), from its log.
fn tls_port(d: &Daemon) -> u16 {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let log = d.log();
        if let Some(rest) = log.split("tls=127.0.0.1:").nth(1) {
            let port: String = rest.chars().take_while(char::is_ascii_digit).collect();
            return port.parse().expect("port in the log");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("chaosd did not log its TLS port: {}", d.log());
}

#[test]
fn mutual_tls_api() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let pki = tmp.path().join("pki");
    let other = tmp.path().join("other");
    let p = |s: &str| pki.join(s).display().to_string();
    let pki_s = pki.display().to_string();
    certs(&["ca", "--out", &pki_s]);
    certs(&["server", "--ca", &pki_s, "--name", "node1", "--addr", "127.0.0.1"]);
    certs(&["server", "--ca", &pki_s, "--name", "old-server", "--not-after", "2020-01-01"]);
    certs(&["client", "--ca", &pki_s, "--name", "ops"]);
    certs(&["client", "--ca", &pki_s, "--name", "eve"]);
    certs(&["client", "--ca", &pki_s, "--name", "old", "--not-after", "2020-01-01"]);
    certs(&["ca", "--out", &other.display().to_string()]);
    certs(&["client", "--ca", &other.display().to_string(), "--name", "ops"]);

    // A bad server configuration: one line, exit 1, nothing served.
    for (tls, expected) in [
        (["--tls-cert", &p("old-server.pem"), "--tls-key", &p("old-server.key")], "expired on"),
        (["--tls-cert", &p("node1.pem"), "--tls-key", &p("ops.key")], "is not the private key of --tls-cert"),
        (["--tls-cert", &p("missing.pem"), "--tls-key", &p("node1.key")], "cannot read server certificate"),
    ] {
        let socket = tmp.path().join("bad.sock");
        let out = Command::new(chaosd())
            .args(["serve", "--socket"])
            .arg(&socket)
            .arg("--state-dir")
            .arg(tmp.path().join("bad-state"))
            .args(["--bpf-dir", "/sys/fs/bpf/chaosd-e2e-tls-bad", "--listen-tls", "127.0.0.1:0"])
            .args(tls)
            .args(["--tls-client-ca", &p("ca.pem")])
            .output()
            .unwrap();
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{tls:?}: {err}");
        let last = err.trim_end().lines().last().unwrap_or_default();
        assert!(last.starts_with("chaosd: ") && last.contains(expected), "{tls:?}: {err}");
        assert!(!socket.exists(), "{tls:?}: the socket must not be served");
        let _ = std::fs::remove_dir_all("/sys/fs/bpf/chaosd-e2e-tls-bad");
    }

    let d = Daemon::start_with(&[
        "--listen-tls",
        "127.0.0.1:0",
        "--tls-cert",
        &p("node1.pem"),
        "--tls-key",
        &p("node1.key"),
        "--tls-client-ca",
        &p("ca.pem"),
        "--tls-allow-subject",
        "ops",
    ]);
    let port = tls_port(&d);
    let url = format!("https://127.0.0.1:{port}");
    let ca = pki.join("ca.pem");
    let ns = Netns::new("tls");
    let loss = [
        "inject",
        "network",
        "loss",
        "--netns",
        &ns.0,
        "--device",
        "lo",
        "--port",
        "7000",
        "--percent",
        "50",
        "--duration",
        "30s",
    ];

    // The good client: inject, list, recover, all over TLS.
    let out = over_tls(&url, &ca, Some((&pki, "ops")), &loss);
    assert!(out.status.success(), "inject over TLS: {}", text(&out.stderr));
    let id = text(&out.stdout).trim().to_string();
    let listed = over_tls(&url, &ca, Some((&pki, "ops")), &["list"]);
    assert!(text(&listed.stdout).contains(&id), "list over TLS: {}{}", text(&listed.stdout), text(&listed.stderr));
    let rec = over_tls(&url, &ca, Some((&pki, "ops")), &["recover", &id]);
    assert!(rec.status.success() && text(&rec.stdout).contains("recovered"), "recover: {}", text(&rec.stderr));

    // The TLS port is protected like SSH: a fault on it alone is refused.
    let port_s = port.to_string();
    let on_api: Vec<&str> = loss.iter().map(|a| if *a == "7000" { port_s.as_str() } else { a }).collect();
    let out = over_tls(&url, &ca, Some((&pki, "ops")), &on_api);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("protected"), "{}", text(&out.stderr));

    let localhost = format!("https://localhost:{port}");
    let other_ca = other.join("ca.pem");
    // (case, URL, --ca, client certificate, what the one line must say)
    type Case<'a> = (&'a str, &'a str, &'a Path, Option<(&'a Path, &'a str)>, &'a str);
    let cases: [Case; 6] = [
        (
            "expired client certificate",
            &url,
            &ca,
            Some((&pki, "old")),
            "refused the client certificate: it has expired",
        ),
        ("certificate from another CA", &url, &ca, Some((&other, "ops")), "not signed by a CA the daemon trusts"),
        ("no client certificate", &url, &ca, None, "requires a client certificate"),
        ("subject not on the allow-list", &url, &ca, Some((&pki, "eve")), "not on the daemon's --tls-allow-subject"),
        ("server certificate for another name", &localhost, &ca, Some((&pki, "ops")), "name mismatch"),
        ("server signed by an unknown CA", &url, &other_ca, Some((&pki, "ops")), "unknown CA"),
    ];
    for (case, url, ca, client, expected) in cases {
        refused(&over_tls(url, ca, client, &loss), expected, case);
    }

    // A plaintext HTTP/2 client on the TLS port gets no HTTP/2 answer, and
    // the daemon says why in one line.
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0").unwrap();
    let mut answer = Vec::new();
    let _ = tcp.read_to_end(&mut answer);
    assert!(answer.is_empty(), "a plaintext client got an answer: {answer:?}");
    common::wait_until(Duration::from_secs(5), "the daemon's line about the plaintext client", || {
        d.log().contains("does not speak TLS")
    });
    refused(
        &over_tls(&url.replace("https", "http"), &ca, Some((&pki, "ops")), &loss),
        "TCP API is TLS only",
        "http:// endpoint",
    );

    // Nothing of all that was injected.
    let active = d.ctl_ok(&["list"]);
    assert!(active.contains("no active experiments"), "after the refusals: {active}");
    let all = d.ctl_ok(&["list", "--all"]);
    assert_eq!(all.lines().filter(|l| l.contains("loss")).count(), 1, "only the good client's fault ran: {all}");
}
