//! Reading prefix files from the directory without ever blocking on one.
//!
//! A file named `*.safetensors` can be anything: a FIFO (whose open blocks until a writer comes,
//! which once froze the registry), a device, a 2 GB sparse file (read whole, it cost 2.4 GB of
//! memory). So: open non-blocking, accept only regular files, refuse anything over the size cap
//! before reading it, and check the safetensors header's length against the file's before the
//! rest is read.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use crate::prefix::{PrefixError, PrefixFile, PrefixMeta};

/// What identifies one version of a file on disk: a rename (every upload) or a rewrite changes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
}

impl Stamp {
    pub(super) fn len(&self) -> u64 {
        self.len
    }

    fn of(m: &std::fs::Metadata) -> Self {
        Self {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
        }
    }
}

/// The stamp of whatever is at `path` now (following symlinks), if anything.
pub(super) fn stamp(path: &Path) -> Option<Stamp> {
    std::fs::metadata(path).ok().map(|m| Stamp::of(&m))
}

/// The bytes of a prefix file and their stamp; `Ok(None)` if nothing is there.
pub(super) fn read_prefix_file(
    path: &Path,
    max_bytes: usize,
) -> Result<Option<(Vec<u8>, Stamp)>, PrefixError> {
    let io = |source| PrefixError::Io {
        path: path.to_path_buf(),
        source,
    };
    // O_NONBLOCK: opening a FIFO for reading returns at once instead of waiting for a writer.
    let Some(mut file) = open_regular(path, max_bytes)? else {
        return Ok(None);
    };
    let meta = file.metadata().map_err(io)?;
    let bytes = read_checked(&mut file, meta.len()).map_err(|e| e.at(path))?;
    Ok(Some((bytes, Stamp::of(&meta))))
}

/// A prefix file's metadata and stamp, from its header alone (what indexing a task needs);
/// `Ok(None)` if nothing is there. Same guards as [`read_prefix_file`].
pub(super) fn read_prefix_header(
    path: &Path,
    max_bytes: usize,
) -> Result<Option<(PrefixMeta, Stamp)>, PrefixError> {
    let io = |source| PrefixError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = match open_regular(path, max_bytes)? {
        Some(f) => f,
        None => return Ok(None),
    };
    let meta = file.metadata().map_err(io)?;
    let read_header = |file: &mut File| -> Result<Vec<u8>, Read_> {
        let (_, header_len) = read_header_len(file, meta.len())?;
        let mut header = vec![0u8; header_len as usize];
        file.read_exact(&mut header).map_err(Read_::Io)?;
        Ok(header)
    };
    let header = read_header(&mut file).map_err(|e| e.at(path))?;
    let prefix_meta = PrefixFile::meta_from_header(&header)?;
    Ok(Some((prefix_meta, Stamp::of(&meta))))
}

/// Opens `path` for reading without blocking (a FIFO returns at once), refusing anything but a
/// regular file within `max_bytes`. `Ok(None)`: nothing there.
fn open_regular(path: &Path, max_bytes: usize) -> Result<Option<File>, PrefixError> {
    let io = |source| PrefixError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(e)),
    };
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(PrefixError::NotRegularFile);
    }
    if meta.len() > max_bytes as u64 {
        return Err(PrefixError::FileTooLarge {
            size: meta.len(),
            max: max_bytes as u64,
        });
    }
    Ok(Some(file))
}

enum Read_ {
    Io(std::io::Error),
    Bad(String),
}

impl Read_ {
    fn at(self, path: &Path) -> PrefixError {
        match self {
            Read_::Io(source) => PrefixError::Io {
                path: path.to_path_buf(),
                source,
            },
            Read_::Bad(m) => PrefixError::NotSafetensors(m),
        }
    }
}

/// The 8-byte header length (and its bytes), refused if the file cannot hold that header.
fn read_header_len(file: &mut File, len: u64) -> Result<([u8; 8], u64), Read_> {
    if len < 8 {
        return Err(Read_::Bad(format!(
            "{len} bytes: too short for a safetensors header"
        )));
    }
    let mut head = [0u8; 8];
    file.read_exact(&mut head).map_err(Read_::Io)?;
    let header_len = u64::from_le_bytes(head);
    if header_len > len - 8 {
        return Err(Read_::Bad(format!(
            "the header claims {header_len} bytes but the file has {len}"
        )));
    }
    Ok((head, header_len))
}

/// The 8-byte header length first: a file that cannot hold its own header is refused unread.
fn read_checked(file: &mut File, len: u64) -> Result<Vec<u8>, Read_> {
    let (head, _) = read_header_len(file, len)?;
    let mut bytes = Vec::with_capacity(len as usize);
    bytes.extend_from_slice(&head);
    // Bounded by the size checked above, even if the file grows while being read.
    file.take(len - 8)
        .read_to_end(&mut bytes)
        .map_err(Read_::Io)?;
    Ok(bytes)
}

/// Removes temp files (`.<task>.safetensors.<pid>.tmp`) left by writers that died mid-upload.
/// A temp file whose writer process is still alive is left alone.
pub(super) fn remove_stale_temp_files(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(pid) = temp_file_pid(name) else {
            continue;
        };
        if pid == std::process::id() || process_alive(pid) {
            continue;
        }
        match std::fs::remove_file(entry.path()) {
            Ok(()) => tracing::info!(file = name, "removed a temp file left by a crashed upload"),
            Err(e) => tracing::warn!(file = name, error = %e, "cannot remove a stale temp file"),
        }
    }
}

/// `.<name>.safetensors.<pid>.tmp` → pid.
fn temp_file_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix('.')?.strip_suffix(".tmp")?;
    let (stem, pid) = rest.rsplit_once('.')?;
    stem.ends_with(".safetensors").then_some(())?;
    pid.parse().ok()
}

fn process_alive(pid: u32) -> bool {
    // 0 and negative pids mean process groups to kill(2): not a writer's pid.
    if pid == 0 || pid > i32::MAX as u32 {
        return false;
    }
    // SAFETY: kill with signal 0 only checks for the process; it sends nothing.
    let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_file_names_parse() {
        assert_eq!(temp_file_pid(".sst2.safetensors.1234.tmp"), Some(1234));
        assert_eq!(temp_file_pid(".a.b.safetensors.7.tmp"), Some(7));
        assert_eq!(temp_file_pid("sst2.safetensors"), None);
        assert_eq!(temp_file_pid(".notes.txt.12.tmp"), None);
        assert_eq!(temp_file_pid(".x.safetensors.abc.tmp"), None);
    }

    #[test]
    fn fifos_are_refused_without_blocking_and_big_files_unread() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("pipe.safetensors");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo on a path in our own temp dir.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        assert!(matches!(
            read_prefix_file(&fifo, 1 << 20),
            Err(PrefixError::NotRegularFile)
        ));
        let big = dir.path().join("big.safetensors");
        File::create(&big).unwrap().set_len(10 << 20).unwrap();
        assert!(matches!(
            read_prefix_file(&big, 1 << 20),
            Err(PrefixError::FileTooLarge { .. })
        ));
        // Within the cap, a header longer than the file is refused before the rest is read.
        assert!(matches!(
            read_prefix_file(&big, 20 << 20),
            Ok(_) | Err(PrefixError::NotSafetensors(_))
        ));
        std::fs::write(&big, [255u8; 16]).unwrap();
        assert!(matches!(
            read_prefix_file(&big, 1 << 20),
            Err(PrefixError::NotSafetensors(_))
        ));
        assert!(read_prefix_file(&dir.path().join("none.safetensors"), 10)
            .unwrap()
            .is_none());
    }

    #[test]
    fn stale_temp_files_go_and_live_ones_stay() {
        let dir = tempfile::tempdir().unwrap();
        // pid 1 is always alive; a pid past the kernel's limit (4194304) never is.
        let live = dir.path().join(".a.safetensors.1.tmp");
        let dead = dir.path().join(".a.safetensors.4194999.tmp");
        let other = dir.path().join("notes.tmp");
        for p in [&live, &dead, &other] {
            std::fs::write(p, b"x").unwrap();
        }
        remove_stale_temp_files(dir.path());
        assert!(live.exists() && other.exists());
        assert!(!dead.exists());
    }
}
