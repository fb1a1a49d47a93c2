//! One run per checkpoint directory: an OS lock (`flock`) on `<ckpt-dir>/.wick.lock`, taken at
//! start and held until the process ends. The kernel drops it when the holder dies however it
//! dies (even `kill -9`), so a stale lock never blocks; the file's content (the holder's PID and
//! command) is only for the message.

use crate::error::{Error, Result};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Mutex;

/// Locks held by this process (released when it exits).
static HELD: Mutex<Vec<File>> = Mutex::new(Vec::new());

pub const LOCK_FILE: &str = ".wick.lock";

/// Take the directory's lock or say who holds it (a usage error: exit 2).
pub fn acquire(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::usage(format!("cannot create {}: {e}", dir.display())))?;
    let path = dir.join(LOCK_FILE);
    // Read-only is enough to lock; a directory we cannot write to fails later, at the save,
    // with its own message (and the rescue location).
    let (mut file, writable) = match OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
    {
        Ok(f) => (f, true),
        Err(_) => match File::open(&path) {
            Ok(f) => (f, false),
            Err(_) => return Ok(()), // nothing to lock with; the save will report the directory
        },
    };
    // SAFETY: flock on an fd we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let mut holder = String::new();
        let _ = file.read_to_string(&mut holder);
        let holder = holder.trim();
        let who = if holder.is_empty() {
            "another wick process".to_string()
        } else {
            format!("another wick process ({holder})")
        };
        return Err(Error::usage(format!(
            "the checkpoint directory {} is in use by {who}; wait for it to finish or choose another --ckpt-dir",
            dir.display()
        )));
    }
    if writable {
        let args: Vec<String> = std::env::args().collect();
        let _ = file.set_len(0);
        let _ = file.rewind();
        let _ = write!(file, "pid {}: {}", std::process::id(), args.join(" "));
        let _ = file.flush();
    }
    HELD.lock().unwrap_or_else(|p| p.into_inner()).push(file);
    Ok(())
}
