use super::*;

struct Fake {
    _dir: tempfile::TempDir,
    roots: Roots,
}

fn fake(mounts: &str) -> Fake {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_path_buf();
    let cg = base.join("cgroup");
    fs::create_dir_all(&cg).unwrap();
    fs::create_dir_all(base.join("proc")).unwrap();
    fs::write(base.join("mounts"), mounts.replace("ROOT", &cg.display().to_string())).unwrap();
    Fake { roots: Roots { mounts: base.join("mounts"), cgroup: cg, proc: base.join("proc") }, _dir: dir }
}

fn mkcg(dir: &Path) {
    fs::create_dir_all(dir).unwrap();
    fs::write(dir.join("cgroup.procs"), "").unwrap();
}

const V1: &str = "tmpfs ROOT tmpfs rw 0 0\n\
    cgroup ROOT/cpu cgroup rw,relatime,cpu 0 0\n\
    cgroup ROOT/cpuacct cgroup rw,relatime,cpuacct 0 0\n\
    cgroup ROOT/memory cgroup rw,relatime,memory 0 0\n\
    cgroup ROOT/blkio cgroup rw,relatime,blkio 0 0\n\
    cgroup ROOT/systemd cgroup rw,relatime,name=systemd 0 0\n\
    cgroup2 ROOT/unified cgroup2 rw,relatime 0 0\n";

#[test]
fn hybrid_host_is_v1_with_the_joined_controllers() {
    let f = fake(V1);
    let Layout::V1 { hierarchies } = Layout::detect(&f.roots).unwrap() else { panic!("not v1") };
    let names: Vec<_> = hierarchies.iter().map(|h| h.mount.file_name().unwrap().to_str().unwrap()).collect();
    assert_eq!(names, ["cpu", "cpuacct", "memory"]);
}

#[test]
fn co_mounted_cpu_and_cpuacct_through_a_symlink() {
    let f = fake("cgroup ROOT/cpu,cpuacct cgroup rw,cpu,cpuacct 0 0\ncgroup ROOT/memory cgroup rw,memory 0 0\n");
    let cg = f.roots.cgroup.clone();
    std::os::unix::fs::symlink(cg.join("cpu,cpuacct"), cg.join("cpu")).unwrap();
    mkcg(&cg.join("cpu,cpuacct/app"));
    let layout = Layout::detect(&f.roots).unwrap();
    let set = layout.of_path(&f.roots, &cg.join("cpu/app")).unwrap();
    assert_eq!(set.join, [cg.join("cpu,cpuacct/app")]);
    assert_eq!(set.cpu, Some(cg.join("cpu,cpuacct/app")));
    assert_eq!(set.memory, None);
}

#[test]
fn v2_at_the_root_wins() {
    let f = fake("cgroup2 ROOT cgroup2 rw,nsdelegate 0 0\n");
    assert_eq!(Layout::detect(&f.roots).unwrap().version(), Version::V2);
}

#[test]
fn nothing_mounted_is_an_error() {
    let f = fake("proc /proc proc rw 0 0\n");
    assert!(matches!(Layout::detect(&f.roots), Err(CgroupError::NoHierarchy(_))));
}

#[test]
fn v1_pid_cgroups_per_hierarchy() {
    let f = fake(V1);
    let layout = Layout::detect(&f.roots).unwrap();
    fs::create_dir_all(f.roots.proc.join("77")).unwrap();
    fs::write(
        f.roots.proc.join("77/cgroup"),
        "9:name=systemd:/\n4:memory:/app/x\n3:blkio:/\n2:cpuacct:/app/x\n1:cpu:/app/x\n0::/\n",
    )
    .unwrap();
    let set = layout.of_pid(&f.roots, 77).unwrap();
    let cg = &f.roots.cgroup;
    assert_eq!(set.join, [cg.join("cpu/app/x"), cg.join("cpuacct/app/x"), cg.join("memory/app/x")]);
    assert_eq!(set.cpu, Some(cg.join("cpuacct/app/x")));
    assert_eq!(set.memory, Some(cg.join("memory/app/x")));
    assert!(!set.is_root);
    assert!(matches!(layout.of_pid(&f.roots, 78), Err(CgroupError::NoPid(78))));
}

#[test]
fn v1_path_in_one_hierarchy_applies_to_the_others_where_it_exists() {
    let f = fake(V1);
    let layout = Layout::detect(&f.roots).unwrap();
    let cg = f.roots.cgroup.clone();
    mkcg(&cg.join("memory/app"));
    mkcg(&cg.join("cpu/app"));
    let set = layout.of_path(&f.roots, &cg.join("memory/app")).unwrap();
    assert_eq!(set.join, [cg.join("cpu/app"), cg.join("memory/app")]);
    assert_eq!(set.cpu, None, "no cpuacct/app, so no CPU accounting");
    let rel = layout.of_path(&f.roots, Path::new("app")).unwrap();
    assert_eq!(rel.join, set.join);
}

#[test]
fn paths_outside_or_missing_are_refused() {
    let f = fake(V1);
    let layout = Layout::detect(&f.roots).unwrap();
    let cg = f.roots.cgroup.clone();
    assert!(matches!(layout.of_path(&f.roots, Path::new("/etc")), Err(CgroupError::Outside { .. })));
    assert!(matches!(layout.of_path(&f.roots, &cg.join("memory/../../x")), Err(CgroupError::Outside { .. })));
    assert!(matches!(layout.of_path(&f.roots, &cg.join("memory/nope")), Err(CgroupError::Missing(_))));
    mkcg(&cg.join("blkio/b"));
    assert!(matches!(layout.of_path(&f.roots, &cg.join("blkio/b")), Err(CgroupError::NotInHierarchy { .. })));
}

#[test]
fn v2_limit_is_the_smallest_on_the_way_up() {
    let f = fake("cgroup2 ROOT cgroup2 rw 0 0\n");
    let layout = Layout::detect(&f.roots).unwrap();
    let cg = f.roots.cgroup.clone();
    mkcg(&cg.join("a/b"));
    fs::write(cg.join("a/memory.max"), "134217728\n").unwrap();
    fs::write(cg.join("a/b/memory.max"), "max\n").unwrap();
    fs::write(cg.join("a/b/memory.events"), "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n").unwrap();
    fs::write(cg.join("a/b/cpu.stat"), "usage_usec 1500\nuser_usec 1000\n").unwrap();
    let set = layout.of_path(&f.roots, &cg.join("a/b")).unwrap();
    assert_eq!(set.memory_limit(&cg, 1 << 34).unwrap(), 134217728);
    assert_eq!(set.oom_kills(&f.roots.proc).unwrap(), 1);
    assert_eq!(set.cpu_usage_ns().unwrap(), 1_500_000);
    let root = layout.root();
    assert!(root.is_root);
    assert_eq!(root.memory_limit(&cg, 1 << 34).unwrap(), 1 << 34);
    fs::write(f.roots.proc.join("vmstat"), "oom_kill 7\n").unwrap();
    assert_eq!(root.oom_kills(&f.roots.proc).unwrap(), 7);
}

#[test]
fn links_to_nothing_and_to_non_cgroups_say_so() {
    let f = fake("cgroup2 ROOT cgroup2 rw 0 0\n");
    let layout = Layout::detect(&f.roots).unwrap();
    let cg = f.roots.cgroup.clone();
    mkcg(&cg.join("real"));
    fs::create_dir_all(cg.join("plain")).unwrap();
    std::os::unix::fs::symlink(cg.join("real"), cg.join("good")).unwrap();
    std::os::unix::fs::symlink(cg.join("plain"), cg.join("toplain")).unwrap();
    std::os::unix::fs::symlink(cg.join("gone"), cg.join("dangling")).unwrap();
    assert_eq!(layout.of_path(&f.roots, &cg.join("good")).unwrap().join, [cg.join("real")]);
    let e = layout.of_path(&f.roots, &cg.join("dangling")).unwrap_err().to_string();
    assert!(e.contains("is a symbolic link to") && e.contains("gone"), "{e}");
    let e = layout.of_path(&f.roots, &cg.join("toplain")).unwrap_err().to_string();
    assert!(e.contains("is not a cgroup: it leads to") && e.contains("plain"), "{e}");
    let e = layout.of_path(&f.roots, &cg.join("plain")).unwrap_err().to_string();
    assert!(e.contains("is not a cgroup: it has no cgroup.procs"), "{e}");
    assert!(matches!(layout.of_path(&f.roots, &cg.join("nope")), Err(CgroupError::Missing(_))));
}

#[test]
fn mount_escapes() {
    assert_eq!(unescape_mount("/a\\040b"), "/a b");
}
