//! What users get for three hosts: the stage (certificates, units, the
//! provisioning script, a plan) that vm-tests/provision/stage.sh makes for
//! the Vagrantfile and for the QEMU three-host run, and the Vagrantfile
//! itself, checked by Debian's `vagrant validate` (no box can boot here).
//! The provisioning script itself runs for real in the guests of
//! vm-tests/tests/three-hosts-plan.sh.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").canonicalize().unwrap()
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{cmd:?} failed ({}):\n{text}", out.status);
    text
}

#[test]
fn the_stage_holds_a_pki_per_node_and_a_plan_the_runner_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let stage = dir.path().join("stage");
    let chaosctl = env!("CARGO_BIN_EXE_chaosctl");
    let script = repo().join("vm-tests/provision/stage.sh");
    let nodes = ["n1=192.168.56.11", "n2=192.168.56.12", "n3=192.168.56.13"];
    run(Command::new(&script).arg(&stage).args(nodes).args(["--chaosctl", chaosctl]));

    let listed = std::fs::read_to_string(stage.join("nodes")).unwrap();
    assert_eq!(listed, "n1 192.168.56.11\nn2 192.168.56.12\nn3 192.168.56.13\n");
    for f in ["ca.pem", "n1.pem", "n1.key", "n2.pem", "n3.key", "runner.pem", "runner.key"] {
        assert!(stage.join("pki").join(f).is_file(), "pki/{f} missing");
    }
    for f in ["units/chaosd.service", "units/broker@.service", "node.sh", "plan.toml"] {
        assert!(stage.join(f).is_file(), "{f} missing");
    }
    // The plan names every node's chaosd over TLS, and the runner's own
    // check (file:line:column on any error) accepts it as it is.
    let plan = std::fs::read_to_string(stage.join("plan.toml")).unwrap();
    assert!(plan.contains("endpoint = \"https://192.168.56.13:7443\""), "{plan}");
    let checked = run(Command::new(chaosctl).args(["run", "--check"]).arg(stage.join("plan.toml")));
    assert!(checked.contains("partition-n3-cluster") || checked.contains("4 case"), "{checked}");
    // node.sh is POSIX sh (busybox ash in the guests, dash on Debian).
    run(Command::new("sh").arg("-n").arg(stage.join("node.sh")));

    // A second run keeps the CA (nodes provisioned earlier still trust it).
    let ca = std::fs::read(stage.join("pki/ca.pem")).unwrap();
    run(Command::new(&script).arg(&stage).args(nodes).args(["--chaosctl", chaosctl]));
    assert_eq!(ca, std::fs::read(stage.join("pki/ca.pem")).unwrap(), "the CA changed on a second run");

    // Bad input: a node without an address changes nothing.
    let out = Command::new(&script)
        .arg(dir.path().join("other"))
        .args(["n1="])
        .args(["--chaosctl", chaosctl])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("node n1 has no address"), "{out:?}");
}

#[test]
fn the_vagrantfile_validates() {
    let vagrant = Command::new("vagrant").arg("--version").output();
    assert!(
        vagrant.is_ok_and(|o| o.status.success()),
        "vagrant is not installed: run scripts/setup.sh (Debian packages vagrant, vagrant-libvirt)"
    );
    // Vagrant's own state goes to a temp dir, not the checkout or ~/.vagrant.d.
    let dir = tempfile::tempdir().unwrap();
    let out = run(Command::new("vagrant")
        .arg("validate")
        .current_dir(repo())
        .env("VAGRANT_HOME", dir.path().join("home"))
        .env("VAGRANT_DOTFILE_PATH", dir.path().join("dot"))
        .env("CHAOSD_STAGE", dir.path().join("stage"))
        .env("VAGRANT_CHECKPOINT_DISABLE", "1"));
    assert!(out.contains("Vagrantfile validated successfully"), "{out}");
}
