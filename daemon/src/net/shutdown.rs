//! A clean stop of the daemon: once every experiment has been recovered,
//! nothing of chaosd stays on bpffs. Pins exist to let a daemon restarted
//! after a crash adopt running faults; after a clean stop there is nothing
//! to adopt, and leftover pins are the kind of residue people reboot for.

use std::{fs, io};

use super::bpf::Datapath;

impl Datapath {
    /// Removes the global map and program pins and chaosd's bpffs directory,
    /// unless a namespace still has classifier pins (a fault whose recovery
    /// failed: kept so that the next daemon can sweep or adopt it). Returns
    /// whether the directory is gone.
    pub fn remove_pins_if_idle(&self) -> io::Result<bool> {
        let dir = self.dir();
        let entries = match fs::read_dir(dir) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(true),
            other => other?,
        };
        let mut files = Vec::new();
        for entry in entries {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                // ns-<inode>: a namespace still has chaosd's classifiers.
                return Ok(false);
            }
            files.push(entry.path());
        }
        for f in files {
            fs::remove_file(&f).map_err(|e| io::Error::new(e.kind(), format!("unpin {}: {e}", f.display())))?;
        }
        fs::remove_dir(dir).map_err(|e| io::Error::new(e.kind(), format!("remove {}: {e}", dir.display())))?;
        Ok(true)
    }
}
