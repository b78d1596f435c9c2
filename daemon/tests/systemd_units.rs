//! The systemd units in scripts/systemd/ pass `systemd-analyze verify`
//! against the binaries this build made (placed in a scratch root at the
//! paths the units name, beside a copy of the system's own units), and
//! chaosd.service grants exactly the capabilities chaosd keeps.

use std::{collections::BTreeSet, fs, path::PathBuf, process::Command};

fn units_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/systemd")
}

#[test]
fn units_verify() {
    let analyze = Command::new("systemd-analyze").arg("--version").output();
    assert!(
        analyze.is_ok_and(|o| o.status.success()),
        "systemd-analyze is missing: install Debian's systemd package (scripts/setup.sh does)"
    );
    let chaosd = PathBuf::from(env!("CARGO_BIN_EXE_chaosd"));
    let broker = chaosd.with_file_name("broker");
    assert!(broker.exists(), "{} is missing: build the workspace first", broker.display());
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    for d in ["usr/local/bin", "etc/systemd/system", "etc/chaosd/broker", "usr/lib/systemd"] {
        fs::create_dir_all(r.join(d)).unwrap();
    }
    // The units After=/WantedBy= the system's targets: verify resolves them.
    let ok = Command::new("cp").args(["-a", "/lib/systemd/system"]).arg(r.join("usr/lib/systemd")).status().unwrap();
    assert!(ok.success(), "copying /lib/systemd/system");
    fs::copy(&chaosd, r.join("usr/local/bin/chaosd")).unwrap();
    fs::copy(&broker, r.join("usr/local/bin/broker")).unwrap();
    for u in ["chaosd.service", "broker@.service"] {
        fs::copy(units_dir().join(u), r.join("etc/systemd/system").join(u)).unwrap();
    }
    fs::write(r.join("etc/chaosd/broker/n1.env"), "BROKER_ARGS=--mqtt-listen 127.0.0.1:1883\n").unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", r.display()))
        .args(["chaosd.service", "broker@n1.service"])
        .output()
        .unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // Unknown or misspelt settings are only warnings: any output fails.
    assert!(out.status.success() && said.trim().is_empty(), "systemd-analyze verify: {said}");
}

#[test]
fn chaosd_unit_grants_exactly_the_capabilities_chaosd_keeps() {
    let unit = fs::read_to_string(units_dir().join("chaosd.service")).unwrap();
    let kept: BTreeSet<String> = chaosd::privilege::REQUIRED
        .iter()
        .map(|(c, _)| c.to_string())
        .chain(chaosd::privilege::KEPT.iter().map(ToString::to_string))
        .collect();
    for key in ["CapabilityBoundingSet=", "AmbientCapabilities="] {
        let line = unit.lines().find(|l| l.starts_with(key)).unwrap_or_else(|| panic!("no {key} in chaosd.service"));
        let granted: BTreeSet<String> = line[key.len()..].split_whitespace().map(str::to_string).collect();
        assert_eq!(granted, kept, "{key} must list what daemon/src/privilege.rs keeps");
    }
}
